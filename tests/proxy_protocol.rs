//! The PROXY protocol: a listener takes the client's address from a trusted load balancer's
//! header (v1 or v2), refuses headers from anyone else; a cluster can send v2 upstream.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use apex::proxy_protocol::{encode_v2, parse, Accept, Header, Parsed};
use support::*;

fn pp_config(up: SocketAddr, trusted: &str, extra: &str) -> String {
    config(
        "  - { match: { path_prefix: \"/\" }, cluster: backend }\n  - { match: { path_prefix: \"/lan\" }, cluster: backend, allow: [192.0.2.0/24] }",
        &format!("  - name: backend\n    endpoints: [\"{up}\"]"),
    )
    .replace(
        "address: 127.0.0.1:0",
        &format!("address: 127.0.0.1:0\n    proxy_protocol: {{ accept: [v1, v2], trusted: [{trusted}]{extra} }}"),
    )
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn v1_and_v2_from_a_trusted_balancer_carry_the_client(rt: &str) {
    let up = Upstream::ok("ok");
    let dir = TempDir::new();
    let log = dir.0.join("access.log");
    let yaml = format!(
        "access_log: {{ path: \"{}\" }}\n{}",
        log.display(),
        pp_config(up.addr, "127.0.0.0/8", "")
    );
    let mut apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\n");
    assert_eq!(c.request(std::str::from_utf8(GET).unwrap()).status, 200);
    assert_eq!(up.next().header("x-forwarded-for").as_deref(), Some("192.0.2.10"));
    // The carried address is what allow lists check.
    assert_eq!(c.request("GET /lan HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    up.next();
    let mut c2 = Wire::connect(apex.addr);
    let mut header = Vec::new();
    encode_v2(
        &mut header,
        "[2001:db8::7]:4000".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    header.extend_from_slice(GET);
    c2.send(&header);
    assert_eq!(c2.read_response(false).unwrap().status, 200);
    assert_eq!(up.next().header("x-forwarded-for").as_deref(), Some("2001:db8::7"));
    drop((c, c2));
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().any(|l| l.starts_with("192.0.2.10 - - [")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("2001:db8::7 - - [")), "{text}");
}

fn headers_from_untrusted_peers_malformed_or_missing_ones_close_the_connection(rt: &str) {
    let up = Upstream::ok("ok");
    // 127.0.0.1 is not trusted here: a header from it is refused, plain HTTP is served.
    let apex = Apex::start(&pp_config(up.addr, "10.0.0.0/8", ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"PROXY TCP4 192.0.2.10 198.51.100.1 51000 443\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(c.is_closed(), "a PROXY header from an untrusted peer");
    let mut plain = Wire::connect(apex.addr);
    assert_eq!(plain.request(std::str::from_utf8(GET).unwrap()).status, 200);
    assert_eq!(up.next().header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    // Trusted, header required (the default): plain HTTP and a malformed header are refused.
    let apex = Apex::start(&pp_config(up.addr, "127.0.0.1", ""), rt);
    let mut missing = Wire::connect(apex.addr);
    missing.send(GET);
    assert!(missing.is_closed(), "no header where one is required");
    let mut bad = Wire::connect(apex.addr);
    bad.send(b"PROXY TCP4 192.0.2.10 198.51.100.1 99999 443\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(bad.is_closed(), "a malformed header");
    assert!(up.drain().is_empty());
    // required: false lets a trusted peer connect without one.
    let apex = Apex::start(&pp_config(up.addr, "127.0.0.1", ", required: false"), rt);
    assert_eq!(Wire::connect(apex.addr).request(std::str::from_utf8(GET).unwrap()).status, 200);
}

/// `proxy_protocol: v2` on a cluster: every upstream connection starts with a v2 header that
/// names the client, and is never reused for another client.
fn a_cluster_sends_v2_to_an_upstream_that_checks_it(rt: &str) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let (header, len) = loop {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "closed before a PROXY header");
                buf.extend_from_slice(&chunk[..n]);
                match parse(&buf, Accept { v1: false, v2: true }).expect("a valid v2 header") {
                    Parsed::Complete { header, len } => break (header, len),
                    Parsed::Partial => continue,
                    Parsed::Absent => {
                        panic!("no PROXY header: {:?}", String::from_utf8_lossy(&buf))
                    }
                }
            };
            while !buf[len..].windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
            tx.send(header).unwrap();
        }
    });
    let yaml = config(
        "  - { match: { path_prefix: \"/\" }, cluster: backend }",
        &format!("  - name: backend\n    endpoints: [\"{up}\"]\n    proxy_protocol: v2"),
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..2 {
        assert_eq!(c.request(std::str::from_utf8(GET).unwrap()).status, 200);
        let header = seen.recv_timeout(PATIENCE).expect("the upstream saw a request");
        let Header::Proxied { source, destination } = header else { panic!("{header:?}") };
        assert_eq!(source.ip(), c.stream.local_addr().unwrap().ip());
        assert_eq!(source.port(), c.stream.local_addr().unwrap().port(), "the client's own port");
        assert_eq!(destination, apex.addr);
    }
}

under_each_driver!(
    v1_and_v2_from_a_trusted_balancer_carry_the_client,
    headers_from_untrusted_peers_malformed_or_missing_ones_close_the_connection,
    a_cluster_sends_v2_to_an_upstream_that_checks_it,
);
