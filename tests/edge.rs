//! Edge features per route and listener: header and path rewriting, request ids, allow and
//! deny lists, and per-client limits.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn one_route(route_extra: &str, listener_extra: &str, upstream: std::net::SocketAddr) -> String {
    config(
        &format!("  - match: {{ path_prefix: \"/\" }}\n    cluster: backend\n{route_extra}"),
        &format!("  - name: backend\n    endpoints: [\"{upstream}\"]"),
    )
    .replace("address: 127.0.0.1:0", &format!("address: 127.0.0.1:0\n{listener_extra}"))
}

fn request_and_response_fields_paths_and_host_are_rewritten(rt: &str) {
    let up = Upstream::start(|_, w| {
        w.send(b"HTTP/1.1 200 OK\r\nServer: secret/1.2\r\nX-Backend: b1\r\nContent-Length: 2\r\n\r\nok");
        After::KeepOpen
    });
    let route = "    request_headers: { set: { x-client: \"${client_ip}\", x-env: prod }, add: { x-via: \"apex for ${host}\" }, remove: [x-debug] }\n    response_headers: { set: { x-frame-options: DENY }, remove: [server] }\n    replace_prefix: { from: /api/, to: /v2/ }\n    host_rewrite: backend.internal\n";
    let apex = Apex::start(&one_route(route, "", up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request(
        "GET /api/users?id=7 HTTP/1.1\r\nHost: shop.example\r\nX-Debug: 1\r\nX-Env: dev\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("server"), None, "removed from the response");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-backend"), Some("b1"), "other fields pass");
    let got = up.next();
    assert_eq!(got.request_line(), "GET /v2/users?id=7 HTTP/1.1");
    assert_eq!(got.header("host").as_deref(), Some("backend.internal"));
    assert_eq!(got.header("x-debug"), None);
    assert_eq!(got.header("x-env").as_deref(), Some("prod"), "set replaces the client's");
    assert_eq!(got.header("x-client").as_deref(), Some("127.0.0.1"));
    assert_eq!(got.header("x-via").as_deref(), Some("apex for shop.example"));
}

fn strip_prefix_removes_the_routes_prefix(rt: &str) {
    let up = Upstream::ok("ok");
    let apex = Apex::start(&one_route("    strip_prefix: /api\n", "", up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    c.request("GET /api/a/b HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(up.next().request_line(), "GET /a/b HTTP/1.1");
    c.request("GET /api HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(up.next().request_line(), "GET / HTTP/1.1");
}

/// A request id is made when the client sends none (or an unusable one), kept when valid,
/// forwarded, and logged.
fn request_ids_are_made_kept_forwarded_and_logged(rt: &str) {
    let up = Upstream::ok("ok");
    let dir = TempDir::new();
    let log = dir.0.join("access.log");
    let yaml = format!(
        "access_log: {{ path: \"{}\", format: json }}\n{}",
        log.display(),
        one_route("", "    request_id: true", up.addr)
    );
    let mut apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    c.request("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    let made = up.next().header("x-request-id").expect("an id was made");
    assert_eq!(made.len(), 32, "{made}");
    c.request("GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\n\r\n");
    assert_eq!(up.next().header("x-request-id").as_deref(), Some("abc-123"));
    c.request("GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: no spaces allowed\r\n\r\n");
    let replaced = up.next().header("x-request-id").unwrap();
    assert_ne!(replaced, made);
    assert_eq!(replaced.len(), 32);
    drop(c);
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("\"request_id\":\"{made}\"")), "{text}");
    assert!(text.contains("\"request_id\":\"abc-123\""), "{text}");
}

fn allow_and_deny_lists_answer_403(rt: &str) {
    let up = Upstream::ok("ok");
    let yaml = config(
        "  - { match: { path_prefix: \"/admin\" }, cluster: backend, allow: [10.0.0.0/8] }\n  - { match: { path_prefix: \"/public\" }, cluster: backend, deny: [127.0.0.1] }\n  - { match: { path_prefix: \"/open\" }, cluster: backend, allow: [127.0.0.0/8, \"::1\"] }",
        &format!("  - name: backend\n    endpoints: [\"{}\"]", up.addr),
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET /admin HTTP/1.1\r\nHost: h\r\n\r\n").status, 403);
    assert_eq!(c.request("GET /public HTTP/1.1\r\nHost: h\r\n\r\n").status, 403);
    assert_eq!(c.request("GET /open HTTP/1.1\r\nHost: h\r\n\r\n").status, 200, "still open");
    assert_eq!(up.next().request_line(), "GET /open HTTP/1.1");
    assert!(up.drain().is_empty(), "refused requests never reach the upstream");
}

/// One worker: the token bucket lets the burst through, then the configured rate (±20%);
/// the rest get 429 with Retry-After on a connection that stays usable.
fn the_rate_limit_answers_429_beyond_the_configured_rate(rt: &str) {
    let up = Upstream::ok("ok");
    let limit = "    rate_limit: { requests_per_second: 20, burst: 5 }";
    let apex = Apex::start(&one_route("", limit, up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    let started = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_millis(1500) {
        let r = c.request("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                limited += 1;
            }
            s => panic!("status {s}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let expected = 5.0 + 20.0 * secs;
    let got = f64::from(ok);
    assert!(
        (got - expected).abs() <= expected * 0.2,
        "{ok} allowed in {secs:.2}s, expected {expected:.0}"
    );
    assert!(limited > 0);
}

/// `max_connections_per_client: 2`: the third connection from one address is closed at once;
/// when one of the two ends, a new one is served.
fn the_connection_limit_refuses_the_next_connection(rt: &str) {
    let up = Upstream::ok("ok");
    let apex = Apex::start(&one_route("", "    max_connections_per_client: 2", up.addr), rt);
    let mut a = Wire::connect(apex.addr);
    let mut b = Wire::connect(apex.addr);
    assert_eq!(a.request("GET / HTTP/1.1\r\nHost: h\r\n\r\n").status, 200);
    assert_eq!(b.request("GET / HTTP/1.1\r\nHost: h\r\n\r\n").status, 200);
    let mut third = Wire::connect(apex.addr);
    third.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert!(third.is_closed(), "the third connection is closed without an answer");
    let r = a.request("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(a.is_closed());
    let mut fourth = Wire::connect(apex.addr);
    assert_eq!(fourth.request("GET / HTTP/1.1\r\nHost: h\r\n\r\n").status, 200);
}

/// `redirect: { scheme: https }` sends the same host, path and query to HTTPS; the
/// connection stays usable.
fn redirect_to_https_keeps_host_path_and_query(rt: &str) {
    let yaml = config(
        "  - { match: { path_prefix: \"/\" }, redirect: { scheme: https } }\n  - { match: { path_prefix: \"/moved\" }, redirect: { status: 308, port: 8443 } }",
        "  []",
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET /a/b?x=1 HTTP/1.1\r\nHost: shop.example:8080\r\n\r\n");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://shop.example/a/b?x=1"));
    let r =
        c.request("POST /moved/here HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://shop.example:8443/moved/here"));
}

under_each_driver!(
    redirect_to_https_keeps_host_path_and_query,
    request_and_response_fields_paths_and_host_are_rewritten,
    strip_prefix_removes_the_routes_prefix,
    request_ids_are_made_kept_forwarded_and_logged,
    allow_and_deny_lists_answer_403,
    the_rate_limit_answers_429_beyond_the_configured_rate,
    the_connection_limit_refuses_the_next_connection,
);

#[test]
fn rewriting_a_hop_by_hop_or_framing_field_is_refused() {
    let (code, err, file) = apex_check(
        "listeners: [ { name: a, address: \"127.0.0.1:1\" } ]\nroutes:\n  - match: { path_prefix: / }\n    cluster: c\n    request_headers: { set: { connection: close }, remove: [transfer-encoding] }\n    response_headers: { add: { x-id: \"${nope}\" } }\nclusters: [ { name: c, endpoints: [\"127.0.0.1:2\"] } ]\n",
    );
    assert_eq!(code, Some(1), "{err}");
    for want in [
        "routes[0].request_headers.set.connection: `connection` cannot be rewritten",
        "routes[0].request_headers.remove[0]: `transfer-encoding` cannot be rewritten",
        "routes[0].response_headers.add.x-id: unknown variable `nope`",
    ] {
        assert!(err.contains(&format!("{file}:")) && err.contains(want), "{want}\n{err}");
    }
}
