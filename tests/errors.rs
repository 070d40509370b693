//! What clients see when things go wrong: no route, dead or slow upstreams, malformed requests.

mod support;

use std::time::{Duration, Instant};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";

fn no_route_is_404_and_the_connection_stays_open(rt: &str) {
    let yaml =
        config("  - { match: { path: \"/only\" }, respond: { status: 200, body: \"x\" } }", "  []");
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET /other HTTP/1.1\r\nHost: a\r\n\r\n").status, 404);
    assert_eq!(c.request("GET /only HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
}

fn refused_upstream_is_502_promptly_and_logged_with_its_address(rt: &str) {
    let dead = closed_port();
    let mut apex = Apex::start(&proxy_config(&[dead], ""), rt);
    let started = Instant::now();
    let r = Wire::connect(apex.addr).request(GET);
    assert_eq!(r.status, 502);
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    let line = apex.wait_for_log(&["upstream request failed"]).expect("an error log line");
    assert!(line.contains(&dead.to_string()), "the log names the upstream: {line}");
    assert!(line.contains("WARN"), "{line}");
}

fn silent_upstream_is_504_after_the_response_timeout(rt: &str) {
    let up = Upstream::start(|_, w| {
        // Never answers; holds the connection until the proxy gives up.
        let _ = w.read_head();
        After::Close
    });
    let apex = Apex::start(&proxy_config(&[up.addr], "    response_timeout: 300ms\n"), rt);
    let started = Instant::now();
    let mut c = Wire::connect(apex.addr);
    let r = c.request(GET);
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "took {took:?}");
    // The request body was complete, so the client connection is still usable.
    assert_eq!(c.request(GET).status, 504);
}

fn connect_timeout_is_504(rt: &str) {
    let (_hole, _fillers, addr) = black_hole();
    let apex = Apex::start(&proxy_config(&[addr], "    connect_timeout: 300ms\n"), rt);
    let started = Instant::now();
    let r = Wire::connect(apex.addr).request(GET);
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
}

fn malformed_request_is_400_and_closed_without_reaching_upstream(rt: &str) {
    let up = Upstream::ok("fine");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    for (bad, status) in [
        ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        ("GET / HTTP/1.1\nHost: a\n\n", 400),
        ("GET / HTTP/1.1\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
        ("GET / HTTP/3.0\r\nHost: a\r\n\r\n", 400),
    ] {
        let mut c = Wire::connect(apex.addr);
        c.send(bad.as_bytes());
        let r = c.read_response(false).unwrap_or_else(|e| panic!("{bad:?}: {e}"));
        assert_eq!(r.status, status, "{bad:?}");
        assert_eq!(r.header("connection"), Some("close"), "{bad:?}");
        assert!(c.is_closed(), "{bad:?}");
    }
    assert_eq!(up.accepts(), 0, "no malformed request reached the upstream");
}

fn smuggled_request_in_a_body_never_reaches_upstream(rt: &str) {
    let up = Upstream::ok("fine");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    // Read as Content-Length, the body hides a second request; read as chunked, it ends at 0.
    c.send(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 400);
    assert!(c.is_closed());
    assert_eq!(up.accepts(), 0);
}

fn oversized_heads_get_414_and_431(rt: &str) {
    let up = Upstream::ok("fine");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
    let huge_field = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(70 * 1024));
    for (req, status) in [(long_target, 414), (huge_field, 431)] {
        let mut c = Wire::connect(apex.addr);
        c.send(req.as_bytes());
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, status);
        assert!(c.is_closed());
    }
    // A single 16 KiB field is fine.
    let ok = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "c".repeat(16 * 1024));
    assert_eq!(Wire::connect(apex.addr).request(&ok).status, 200);
    assert_eq!(up.accepts(), 1);
}

under_each_driver!(
    no_route_is_404_and_the_connection_stays_open,
    refused_upstream_is_502_promptly_and_logged_with_its_address,
    silent_upstream_is_504_after_the_response_timeout,
    connect_timeout_is_504,
    malformed_request_is_400_and_closed_without_reaching_upstream,
    smuggled_request_in_a_body_never_reaches_upstream,
    oversized_heads_get_414_and_431,
);

fn slow_request_head_gets_408_and_a_close(rt: &str) {
    let yaml = config("  - { match: { path: \"/\" }, respond: { status: 200 } }", "  []")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    header_timeout: 300ms");
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    let started = Instant::now();
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(290));
    assert!(c.is_closed());
}

fn idle_keepalive_connection_is_closed_silently(rt: &str) {
    let yaml = config("  - { match: { path: \"/\" }, respond: { status: 200 } }", "  []")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    keepalive_timeout: 300ms");
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    let started = Instant::now();
    let took = c.closed_after(started).expect("Apex closes the idle connection");
    // Idle deadlines are swept every 100 ms: the close comes between the timeout and the
    // timeout plus a sweep, with a generous margin for a loaded CI machine.
    assert!(took >= Duration::from_millis(250), "closed early, after {took:?}");
    assert!(took < Duration::from_secs(3), "closed late, after {took:?}");
}

under_each_driver!(
    slow_request_head_gets_408_and_a_close,
    idle_keepalive_connection_is_closed_silently
);

fn requests_log_nothing_at_info(rt: &str) {
    let up = Upstream::ok("ok");
    let dead = closed_port();
    let yaml = config(
        "  - { match: { path: \"/dead\" }, cluster: dead }\n  - { match: { path_prefix: \"/\" }, cluster: live }",
        &format!("  - {{ name: live, endpoints: [\"{}\"] }}\n  - {{ name: dead, endpoints: [\"{dead}\"] }}", up.addr),
    );
    let mut apex = Apex::start(&yaml, rt);
    let before = apex.logs().lines().filter(|l| l.contains(" INFO ")).count();
    let mut c = Wire::connect(apex.addr);
    for _ in 0..20 {
        assert_eq!(c.request(GET).status, 200);
    }
    assert_eq!(c.request("GET /dead HTTP/1.1\r\nHost: a\r\n\r\n").status, 502);
    // Log lines arrive in order: once the warning is here, any per-request line would be too.
    apex.wait_for_log(&["upstream request failed"]).unwrap();
    let after = apex.logs().lines().filter(|l| l.contains(" INFO ")).count();
    assert_eq!(before, after, "{}", apex.logs());
}

under_each_driver!(requests_log_nothing_at_info);
