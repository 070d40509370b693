//! Micro-benchmarks of the sans-IO core: parsing and encoding a typical request head, and route
//! lookup with 10, 100 and 1000 routes. `cargo bench --bench micro`; prints ns per operation.
//! (A plain harness: timing loops over `black_box`, best of five runs.)

use std::hint::black_box;
use std::time::Instant;

use apex::config::Config;
use apex::http::request::{encode_upstream_head, parse_request_head, Forwarding};
use apex::http::{HeadLimits, Status};
use apex::routing::Router;

const HEAD: &[u8] = b"GET /api/v1/users/12345?expand=profile HTTP/1.1\r\nHost: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: application/json\r\n\
Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nConnection: keep-alive\r\n\
Cookie: session=abcdef0123456789; theme=dark\r\nX-Request-Id: 7f3c2a1e-9b8d-4c6f-a5e4-3d2c1b0a9f8e\r\n\r\n";

/// Runs `f` `iters` times, five times over; returns the best ns per iteration.
fn bench(name: &str, iters: u32, mut f: impl FnMut()) {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(iters));
    }
    println!("{name:<40} {best:>9.1} ns/op");
}

fn routes_config(n: usize) -> Config {
    let mut yaml = String::from("listeners: [ { name: a, address: \"127.0.0.1:1\" } ]\nroutes:\n");
    for i in 0..n {
        // A mix of hosts and prefixes of many lengths, like a real edge tier.
        let host = match i % 3 {
            0 => format!("host: \"svc{i}.example.com\", "),
            1 => format!("host: \"*.zone{}.example.com\", ", i % 17),
            _ => String::new(),
        };
        yaml.push_str(&format!(
            "  - {{ match: {{ {host}path_prefix: \"/api/v{}/team{i}\" }}, respond: {{ status: 200 }} }}\n",
            i % 7
        ));
    }
    yaml.push_str("  - { match: { path_prefix: \"/\" }, respond: { status: 404 } }\n");
    Config::from_yaml(&yaml, "bench.yaml").expect("valid bench config")
}

fn main() {
    let limits = HeadLimits::default();
    bench("parse request head (9 fields)", 200_000, || {
        let mut f = apex::http::fields();
        let r = parse_request_head(black_box(HEAD), &mut f, &limits);
        assert!(matches!(r, Ok(Status::Complete(_))));
    });
    let mut out = Vec::with_capacity(1024);
    bench("parse + encode upstream head", 200_000, || {
        let mut f = apex::http::fields();
        let Ok(Status::Complete(h)) = parse_request_head(black_box(HEAD), &mut f, &limits) else {
            unreachable!()
        };
        out.clear();
        encode_upstream_head(
            &mut out,
            &h,
            &Forwarding::plain("10.0.0.1".parse().unwrap(), &"backend:80"),
        );
        black_box(&out);
    });
    for n in [10, 100, 1000] {
        let config = routes_config(n);
        let router = Router::new(&config.routes);
        let probes: Vec<(String, String)> = (0..64)
            .map(|k| {
                let i = (k * 37) % n;
                (format!("svc{i}.example.com"), format!("/api/v{}/team{i}/items/42", i % 7))
            })
            .collect();
        let mut k = 0;
        bench(&format!("route lookup, {n} routes"), 500_000, || {
            let (host, path) = &probes[k % probes.len()];
            k += 1;
            black_box(router.route(black_box(host), black_box(path), "GET"));
        });
    }
}
