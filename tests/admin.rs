//! The admin API: metrics that match the traffic, health, the active config, reload.

mod support;

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn metrics_match_the_requests_sent(rt: &str) {
    let up = Upstream::ok("up");
    let dead = closed_port();
    let yaml = with_admin(&config(
        "  - { name: api, match: { path_prefix: \"/api\" }, cluster: backend }\n  - { name: down, match: { path_prefix: \"/down\" }, cluster: dead }\n  - { name: home, match: { path: \"/\" }, respond: { status: 200, body: \"home\" } }",
        &format!("  - {{ name: backend, endpoints: [\"{}\"] }}\n  - {{ name: dead, endpoints: [\"{dead}\"] }}", up.addr),
    ));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..5 {
        assert_eq!(c.request("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(c.request(GET).status, 200);
    }
    assert_eq!(c.request("GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n").status, 404);
    assert_eq!(c.request("GET /down HTTP/1.1\r\nHost: a\r\n\r\n").status, 502);
    let r = admin(admin_at, "GET", "/metrics");
    assert_eq!(r.status, 200);
    let m = r.text();
    let at = |s: &str| metric(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    assert_eq!(at("apex_requests_total{route=\"api\",cluster=\"backend\",class=\"2xx\"}"), 5);
    assert_eq!(at("apex_requests_total{route=\"home\",cluster=\"\",class=\"2xx\"}"), 2);
    assert_eq!(at("apex_requests_total{route=\"\",cluster=\"\",class=\"4xx\"}"), 1);
    assert_eq!(at("apex_requests_total{route=\"down\",cluster=\"dead\",class=\"5xx\"}"), 1);
    assert_eq!(at("apex_pool_misses_total{cluster=\"backend\"}"), 1);
    assert_eq!(at("apex_pool_hits_total{cluster=\"backend\"}"), 4);
    assert_eq!(at("apex_upstream_connect_errors_total{cluster=\"dead\"}"), 1);
    assert_eq!(at("apex_upstream_latency_seconds_count{cluster=\"backend\"}"), 5);
    assert_eq!(at("apex_upstream_latency_seconds_bucket{cluster=\"backend\",le=\"+Inf\"}"), 5);
    assert_eq!(at("apex_downstream_connections"), 1);
    assert_eq!(at("apex_pool_idle_connections"), 1);
}

fn health_and_active_config(rt: &str) {
    let yaml =
        with_admin(&config("  - { match: { path: \"/\" }, respond: { status: 200 } }", "  []"));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let h = admin(admin_at, "GET", "/healthz");
    assert_eq!((h.status, h.text().as_str()), (200, "ok\n"));
    let c = admin(admin_at, "GET", "/config").text();
    assert!(c.starts_with("# hash: "), "{c}");
    assert!(c.contains("# loaded_at: 20"), "{c}");
    assert!(c.contains(&yaml), "the active file's text: {c}");
    assert_eq!(admin(admin_at, "GET", "/nope").status, 404);
    assert_eq!(admin(admin_at, "GET", "/reload").status, 405);
}

fn post_reload_applies_or_explains(rt: &str) {
    let make = |body: &str| {
        with_admin(&config(
            &format!(
                "  - {{ match: {{ path: \"/\" }}, respond: {{ status: 200, body: \"{body}\" }} }}"
            ),
            "  []",
        ))
    };
    let mut apex = Apex::start(&make("one"), rt);
    let admin_at = admin_addr(&mut apex);
    let path = apex.config_path.clone().unwrap();
    let before = admin(admin_at, "GET", "/config").text();
    std::fs::write(&path, make("two")).unwrap();
    let r = admin(admin_at, "POST", "/reload");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("reloaded: 1 routes"), "{}", r.text());
    assert_eq!(Wire::connect(apex.addr).request(GET).text(), "two");
    let after = admin(admin_at, "GET", "/config").text();
    assert_ne!(before.lines().next(), after.lines().next(), "the hash changed");

    std::fs::write(&path, make("three").replace("status: 200", "status: 99")).unwrap();
    let r = admin(admin_at, "POST", "/reload");
    assert_eq!(r.status, 400);
    let why = r.text();
    assert!(
        why.contains(&path.display().to_string()) && why.contains("routes[0].respond.status"),
        "{why}"
    );
    assert_eq!(Wire::connect(apex.addr).request(GET).text(), "two", "the old config keeps serving");
}

under_each_driver!(
    metrics_match_the_requests_sent,
    health_and_active_config,
    post_reload_applies_or_explains
);

#[test]
fn admin_refuses_a_public_address_unless_allowed() {
    let base = config("  - { match: { path: \"/\" }, respond: { status: 200 } }", "  []");
    let (code, err, file) = apex_check(&format!("admin: 0.0.0.0:9901\n{base}"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("{file}:1: admin: 0.0.0.0:9901 is not a loopback address")),
        "{err}"
    );
    let (code, err, _) =
        apex_check(&format!("admin: 0.0.0.0:9901\nadmin_allow_remote: true\n{base}"));
    assert_eq!(code, Some(0), "{err}");
}
