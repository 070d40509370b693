//! What crosses the proxy in heads, and which route a request takes.

mod support;

use support::*;

fn target_and_host_are_forwarded_unchanged(rt: &str) {
    let up = Upstream::ok("ok");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.request("GET /a/../b%20c?x=1&y=%2F HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n");
    let got = up.next();
    assert_eq!(got.request_line(), "GET /a/../b%20c?x=1&y=%2F HTTP/1.1");
    assert_eq!(got.header("host").as_deref(), Some("Example.COM:8080"));
}

fn hop_by_hop_fields_are_removed_in_both_directions(rt: &str) {
    let up = Upstream::start(|_, w| {
        w.send(
            b"HTTP/1.1 200 OK\r\nConnection: X-Up-Hop\r\nX-Up-Hop: secret\r\nKeep-Alive: timeout=5\r\n\
Upgrade: h2c\r\nTrailer: X-T\r\nProxy-Connection: keep-alive\r\nX-End: kept\r\nContent-Length: 2\r\n\r\nok",
        );
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Down-Hop\r\nX-Down-Hop: 1\r\n\
Keep-Alive: 300\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTrailer: X-T\r\nX-End: kept\r\n\r\n",
    );
    let got = up.next();
    for hop in [
        "connection",
        "x-down-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "trailer",
    ] {
        assert_eq!(got.header(hop), None, "{hop} reached the upstream:\n{}", got.head);
    }
    assert_eq!(got.header("x-end").as_deref(), Some("kept"));
    for hop in ["x-up-hop", "keep-alive", "upgrade", "trailer", "proxy-connection", "connection"] {
        assert_eq!(r.header(hop), None, "{hop} reached the client:\n{}", r.head);
    }
    assert_eq!(r.header("x-end"), Some("kept"));
}

/// A client's own X-Forwarded-For is replaced (it could forge the chain's start), unless the
/// client is a trusted proxy, whose chain is extended.
fn forwarded_for_is_replaced_unless_the_client_is_a_trusted_proxy(rt: &str) {
    let forged = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n";
    let up = Upstream::ok("ok");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let got = up.next();
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("http"));
    c.request(forged);
    let got = up.next();
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"), "replaced");
    assert_eq!(
        got.header("x-forwarded-proto").as_deref(),
        Some("http"),
        "a client cannot claim https"
    );
    let trusted = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    trusted_proxies: [127.0.0.0/8]",
    );
    let apex = Apex::start(&trusted, rt);
    Wire::connect(apex.addr).request(forged);
    let got = up.next();
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("203.0.113.7, 127.0.0.1"));
}

/// `forwarded_headers: forwarded` sends RFC 7239's field instead of X-Forwarded-*.
fn forwarded_style_sends_rfc_7239(rt: &str) {
    let up = Upstream::ok("ok");
    let yaml = proxy_config(&[up.addr], "")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    forwarded_headers: forwarded");
    let apex = Apex::start(&yaml, rt);
    Wire::connect(apex.addr).request("GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6\r\n\r\n");
    let got = up.next();
    assert_eq!(got.header("forwarded").as_deref(), Some("for=127.0.0.1;proto=http"));
    assert_eq!(got.header("x-forwarded-for"), None);
}

fn routes_choose_by_host_path_and_method(rt: &str) {
    let api = Upstream::ok("api");
    let web = Upstream::ok("web");
    let yaml = config(
        r#"  - match: { host: "api.example.com", path_prefix: "/v1", method: GET }
    cluster: api
  - match: { host: "*.example.com" }
    cluster: web
  - match: { path: "/" }
    respond: { status: 200, headers: { content-type: text/plain }, body: "front\n" }
  - match: { path_prefix: "/static/" }
    respond: { status: 200, body: "static" }"#,
        &format!(
            "  - {{ name: api, endpoints: [\"{}\"] }}\n  - {{ name: web, endpoints: [\"{}\"] }}",
            api.addr, web.addr
        ),
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    let mut ask = |req: &str| {
        let r = c.request(req);
        (r.status, r.text())
    };
    assert_eq!(ask("GET /v1/users HTTP/1.1\r\nHost: API.example.com\r\n\r\n"), (200, "api".into()));
    assert_eq!(
        ask("POST /v1/users HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\n\r\n"),
        (200, "web".into())
    );
    assert_eq!(ask("GET /other HTTP/1.1\r\nHost: api.example.com\r\n\r\n"), (200, "web".into()));
    assert_eq!(ask("GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"), (200, "web".into()));
    assert_eq!(ask("GET / HTTP/1.1\r\nHost: other.org\r\n\r\n"), (200, "front\n".into()));
    assert_eq!(
        ask("GET /static/app.js HTTP/1.1\r\nHost: other.org\r\n\r\n"),
        (200, "static".into())
    );
    assert_eq!(ask("GET /nothing HTTP/1.1\r\nHost: other.org\r\n\r\n").0, 404);
    assert_eq!(
        ask("GET http://api.example.com/v1/x HTTP/1.1\r\nHost: other.org\r\n\r\n"),
        (200, "api".into())
    );
}

fn clusters_balance_round_robin_per_request(rt: &str) {
    let ups = [Upstream::ok("0"), Upstream::ok("1"), Upstream::ok("2")];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let apex = Apex::start(&proxy_config(&addrs, ""), rt);
    let mut c = Wire::connect(apex.addr);
    let mut counts = [0usize; 3];
    for _ in 0..30 {
        let r = c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        counts[r.text().parse::<usize>().unwrap()] += 1;
    }
    assert_eq!(counts, [10, 10, 10]);
}

under_each_driver!(
    target_and_host_are_forwarded_unchanged,
    hop_by_hop_fields_are_removed_in_both_directions,
    forwarded_for_is_replaced_unless_the_client_is_a_trusted_proxy,
    forwarded_style_sends_rfc_7239,
    routes_choose_by_host_path_and_method,
    clusters_balance_round_robin_per_request,
);
