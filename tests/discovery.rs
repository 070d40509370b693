//! Endpoints from DNS: a fake name server (tests/support/dns.rs) whose A and SRV answers the
//! tests change while Apex runs. Every wait is on an observed change (a response from another
//! endpoint, a metric, a log line), bounded by `PATIENCE`.

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{mpsc, Arc, Barrier};
use std::time::Instant;

use support::dns::{FakeDns, Record};
use support::*;

/// Records expire after a second; Apex may ask again that soon.
fn dns_config(dns: &FakeDns, endpoints: &str) -> String {
    format!(
        "resolvers: [\"{}\"]\ndns_min_ttl: 1s\n{}",
        dns.addr,
        config(
            "  - match: { path_prefix: \"/\" }\n    cluster: api",
            &format!("  - name: api\n    endpoints: {endpoints}\n"),
        )
    )
}

/// `GET path` on the client's keep-alive connection: the status and the body (which fake
/// upstream answered).
fn get(c: &mut Wire, path: &str) -> (u16, String) {
    let r = c.request(&format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n"));
    (r.status, r.text())
}

/// Calls `f` until it returns true, for at most `PATIENCE`.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
    }
    false
}

/// An upstream that answers with its name; a request for `/slow` reports `name` on `held` and
/// waits on `release` before answering.
fn named(
    at: SocketAddr,
    name: &'static str,
    held: mpsc::Sender<&'static str>,
    release: Arc<Barrier>,
) -> Upstream {
    Upstream::start_on(at, move |r, w| {
        if r.request_line().contains("/slow") {
            held.send(name).unwrap();
            release.wait();
        }
        w.send(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}", name.len()).as_bytes(),
        );
        After::KeepOpen
    })
}

fn a_records_that_change_move_traffic_and_removed_endpoints_drain(rt: &str) {
    let dns = FakeDns::start(1);
    let (held_tx, held) = mpsc::channel();
    let release = Arc::new(Barrier::new(2));
    let one = named("127.0.0.1:0".parse().unwrap(), "one", held_tx.clone(), release.clone());
    let port = one.addr.port();
    let two = named(SocketAddr::from(([127, 0, 0, 2], port)), "two", held_tx, release.clone());
    let ip = |last| Record::A(Ipv4Addr::new(127, 0, 0, last));
    dns.set("api.test", vec![ip(1)]);
    let apex = Apex::start(&dns_config(&dns, &format!("[ {{ dns: \"api.test:{port}\" }} ]")), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(get(&mut c, "/"), (200, "one".into()), "resolved before the first request");

    // An address added to the name gets traffic once Apex asks again.
    dns.set("api.test", vec![ip(1), ip(2)]);
    assert!(eventually(|| get(&mut c, "/").1 == "two"), "the added address got no request");
    let seen: Vec<String> = (0..10).map(|_| get(&mut c, "/").1).collect();
    assert!(seen.contains(&"one".into()) && seen.contains(&"two".into()), "{seen:?}");

    // A request in flight to an endpoint the name then drops.
    let addr = apex.addr;
    let slow = std::thread::spawn(move || get(&mut Wire::connect(addr), "/slow"));
    let on = held.recv_timeout(PATIENCE).expect("the slow request reached an upstream");
    let (gone, stays, gone_up) = if on == "one" { (1, 2, &one) } else { (2, 1, &two) };
    dns.set("api.test", vec![ip(stays)]);
    let stays_name = if stays == 1 { "one" } else { "two" };
    assert!(
        eventually(|| (0..10).all(|_| get(&mut c, "/").1 == stays_name)),
        "127.0.0.{gone} kept getting requests after the name dropped it"
    );
    for _ in 0..30 {
        assert_eq!(
            get(&mut c, "/"),
            (200, stays_name.to_string()),
            "no request to the dropped one"
        );
    }
    // The request in flight finishes on the endpoint that left, and Apex then closes its
    // connections to it instead of pooling them for an endpoint it no longer uses.
    release.wait();
    assert_eq!(slow.join().unwrap(), (200, on.to_string()), "the in-flight request finished");
    assert!(gone_up.next_close().is_some(), "a connection to the dropped endpoint stayed open");
}

fn srv_records_give_ports_and_weights_and_only_the_lowest_priority(rt: &str) {
    let dns = FakeDns::start(1);
    let ups = [Upstream::ok("a"), Upstream::ok("b"), Upstream::ok("c")];
    let srv = |priority, weight, i: usize, target: &str| Record::Srv {
        priority,
        weight,
        port: ups[i].addr.port(),
        target: target.into(),
    };
    for t in ["a.test", "b.test", "c.test"] {
        dns.set(t, vec![Record::A(Ipv4Addr::LOCALHOST)]);
    }
    let name = "_http._tcp.api.test";
    dns.set(name, vec![srv(10, 1, 0, "a.test"), srv(10, 3, 1, "b.test"), srv(20, 5, 2, "c.test")]);
    let apex = Apex::start(&dns_config(&dns, &format!("[ {{ srv: {name} }} ]")), rt);
    let mut c = Wire::connect(apex.addr);
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *count.entry(get(&mut c, "/").1).or_default() += 1;
    }
    // Smooth weighted round robin over weights 1 and 3: exactly 10 and 30 in 40 requests.
    assert_eq!((count.get("a"), count.get("b")), (Some(&10), Some(&30)), "{count:?}");
    assert_eq!(count.get("c"), None, "the priority-20 record is a backup, unused: {count:?}");

    // The records change: the backup is all that is left.
    dns.set(name, vec![srv(20, 5, 2, "c.test")]);
    assert!(eventually(|| (0..10).all(|_| get(&mut c, "/").1 == "c")), "traffic never moved to c");
}

fn a_name_that_stops_resolving_keeps_its_last_endpoints(rt: &str) {
    let dns = FakeDns::start(1);
    let up = Upstream::ok("one");
    let port = up.addr.port();
    dns.set("api.test", vec![Record::A(Ipv4Addr::LOCALHOST)]);
    let yaml = with_admin(&dns_config(&dns, &format!("[ {{ dns: \"api.test:{port}\" }} ]")));
    let mut apex = Apex::start(&yaml, rt);
    let at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(get(&mut c, "/"), (200, "one".into()));

    dns.remove("api.test");
    let failing = "apex_dns_failing{kind=\"dns\",name=\"api.test\"}";
    assert!(eventually(|| metric(&metrics(at), failing) == Some(1)), "{}", metrics(at));
    apex.wait_for_log(&["name does not resolve; keeping its last endpoints", "api.test"])
        .expect("the failure is logged");
    for _ in 0..10 {
        assert_eq!(get(&mut c, "/"), (200, "one".into()), "the last good address is kept");
    }
    let page = metrics(at);
    assert_eq!(metric(&page, "apex_dns_endpoints{kind=\"dns\",name=\"api.test\"}"), Some(1));
    assert!(
        metric(&page, "apex_dns_lookup_failures_total{kind=\"dns\",name=\"api.test\"}") >= Some(1)
    );

    dns.set("api.test", vec![Record::A(Ipv4Addr::LOCALHOST)]);
    assert!(eventually(|| metric(&metrics(at), failing) == Some(0)), "never recovered");
}

fn a_cluster_whose_name_resolves_later_answers_503_until_then(rt: &str) {
    let dns = FakeDns::start(1);
    let up = Upstream::ok("late");
    let yaml = dns_config(&dns, &format!("[ {{ dns: \"late.test:{}\" }} ]", up.addr.port()));
    let apex = Apex::start(&yaml, rt);
    assert!(dns.queries("late.test") > 0, "looked up before serving");
    let mut c = Wire::connect(apex.addr);
    assert_eq!(get(&mut c, "/").0, 503, "no endpoint yet");
    dns.set("late.test", vec![Record::A(Ipv4Addr::LOCALHOST)]);
    assert!(eventually(|| get(&mut c, "/") == (200, "late".into())), "never served");
}

fn a_reload_keeps_the_endpoints_its_names_resolved_to(rt: &str) {
    let dns = FakeDns::start(1);
    let up = Upstream::ok("one");
    dns.set("api.test", vec![Record::A(Ipv4Addr::LOCALHOST)]);
    let endpoints = format!("[ {{ dns: \"api.test:{}\" }} ]", up.addr.port());
    let mut apex = Apex::start(&dns_config(&dns, &endpoints), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(get(&mut c, "/"), (200, "one".into()));
    // The same name under a changed cluster: the new snapshot has its addresses at once,
    // without waiting for the name's next lookup.
    let changed =
        dns_config(&dns, &endpoints).replace("name: api\n", "name: api\n    connect_timeout: 1s\n");
    assert!(apex.reload_with(&changed).contains("config reloaded"), "reload refused");
    assert_eq!(get(&mut Wire::connect(apex.addr), "/"), (200, "one".into()));
}

fn a_consistent_hash_key_moves_only_to_an_endpoint_dns_added(rt: &str) {
    let dns = FakeDns::start(1);
    let first = Upstream::ok("1");
    let port = first.addr.port();
    let ups = [
        first,
        Upstream::start_on(SocketAddr::from(([127, 0, 0, 2], port)), |_, w| {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2");
            After::KeepOpen
        }),
        Upstream::start_on(SocketAddr::from(([127, 0, 0, 3], port)), |_, w| {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3");
            After::KeepOpen
        }),
    ];
    let ip = |last| Record::A(Ipv4Addr::new(127, 0, 0, last));
    // The added address sorts first: endpoints that stay change places in the list, and must
    // keep their keys all the same.
    dns.set("api.test", vec![ip(2), ip(3)]);
    let yaml = dns_config(&dns, &format!("[ {{ dns: \"api.test:{port}\" }} ]")).replace(
        "name: api\n",
        "name: api\n    policy: consistent_hash\n    hash_on: { header: x-user }\n",
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    let mut ask = |k: usize| {
        c.request(&format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: user-{k}\r\n\r\n")).text()
    };
    let keys = 300;
    let before: Vec<String> = (0..keys).map(&mut ask).collect();
    dns.set("api.test", vec![ip(1), ip(2), ip(3)]);
    assert!(eventually(|| ask(0) == "1" || (1..keys).any(|k| ask(k) == "1")), "1 never used");
    let after: Vec<String> = (0..keys).map(&mut ask).collect();
    let moved: Vec<usize> = (0..keys).filter(|&k| after[k] != before[k]).collect();
    assert!(!moved.is_empty(), "the added endpoint took some keys");
    assert!(moved.iter().all(|&k| after[k] == "1"), "a key moved between endpoints that stayed");
    drop(ups);
}

fn health_checks_follow_the_endpoints_dns_gives(rt: &str) {
    let dns = FakeDns::start(1);
    let (held_tx, _held) = mpsc::channel();
    let release = Arc::new(Barrier::new(2));
    let one = named("127.0.0.1:0".parse().unwrap(), "one", held_tx.clone(), release.clone());
    let port = one.addr.port();
    let two = named(SocketAddr::from(([127, 0, 0, 2], port)), "two", held_tx, release);
    dns.set("api.test", vec![Record::A(Ipv4Addr::new(127, 0, 0, 1))]);
    let yaml = dns_config(&dns, &format!("[ {{ dns: \"api.test:{port}\" }} ]"))
        .replace("name: api\n", "name: api\n    health_check: { path: /probe, interval: 100ms }\n");
    let _apex = Apex::start(&yaml, rt);
    assert!(one.next().request_line().contains("/probe"), "the resolved endpoint is probed");
    dns.set("api.test", vec![Record::A(Ipv4Addr::new(127, 0, 0, 2))]);
    assert!(two.next().request_line().contains("/probe"), "the added endpoint is probed");
}

under_each_driver!(
    a_consistent_hash_key_moves_only_to_an_endpoint_dns_added,
    health_checks_follow_the_endpoints_dns_gives,
    a_reload_keeps_the_endpoints_its_names_resolved_to,
    a_records_that_change_move_traffic_and_removed_endpoints_drain,
    srv_records_give_ports_and_weights_and_only_the_lowest_priority,
    a_name_that_stops_resolving_keeps_its_last_endpoints,
    a_cluster_whose_name_resolves_later_answers_503_until_then,
);
