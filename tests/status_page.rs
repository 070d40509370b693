//! The fleet view of the admin API: `/endpoints` (JSON) and the HTML status page at `/`, and
//! the per-endpoint series with their cardinality guard.

mod support;

use std::time::Instant;

use serde_json::Value;
use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn yaml(up: std::net::SocketAddr, dead: std::net::SocketAddr, extra: &str) -> String {
    with_admin(&format!(
        "{extra}{}",
        config(
            "  - match: { path_prefix: \"/\" }\n    cluster: pool",
            &format!(
                "  - name: pool\n    endpoints: [ \"{up}\", {{ address: \"{dead}\", weight: 2 }} ]\n    health_check: {{ path: /healthz, interval: 100ms, unhealthy_threshold: 1 }}\n"
            ),
        )
    ))
}

fn endpoints(at: std::net::SocketAddr) -> Value {
    let r = admin(at, "GET", "/endpoints");
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// Waits until the dead endpoint's health check has failed.
fn until_down(at: std::net::SocketAddr, dead: std::net::SocketAddr) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = endpoints(at);
        let e = &v["clusters"][0]["endpoints"][1];
        if e["address"] == dead.to_string() && e["state"] == "down" {
            return v;
        }
        assert!(Instant::now() < deadline, "never marked down: {v}");
    }
}

/// Every element the page opens is closed, in order (void elements aside).
fn assert_balanced(html: &str) {
    let void = ["meta", "br", "hr", "img", "input", "link"];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').expect("a tag ends");
        let tag = &rest[..end];
        rest = &rest[end..];
        if tag.starts_with('!') {
            continue;
        }
        let name: String =
            tag.trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        if tag.starts_with('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.as_str()), "misnested </{name}>");
        } else if !void.contains(&name.as_str()) {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

fn the_endpoints_page_gives_state_weight_and_traffic(rt: &str) {
    let up = Upstream::ok("ok");
    let dead = closed_port();
    let mut apex = Apex::start(&yaml(up.addr, dead, ""), rt);
    let at = admin_addr(&mut apex);
    until_down(at, dead);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..7 {
        assert_eq!(c.request(GET).status, 200);
    }
    let v = endpoints(at);
    let cluster = &v["clusters"][0];
    assert_eq!(cluster["name"], "pool");
    assert_eq!(cluster["per_endpoint_series"], true);
    let live = &cluster["endpoints"][0];
    assert_eq!(live["address"], up.addr.to_string());
    assert_eq!((live["state"].as_str(), live["healthy"].as_bool()), (Some("up"), Some(true)));
    assert_eq!((live["weight"].as_u64(), live["source"].as_str()), (Some(1), Some("fixed")));
    assert_eq!(live["requests"], 7, "{v}");
    assert_eq!(live["errors"], 0);
    assert!(live["latency_p99_seconds"].as_f64().is_some(), "{v}");
    assert_eq!(live["last_check"]["ok"], true, "{v}");
    let down = &cluster["endpoints"][1];
    assert_eq!((down["weight"].as_u64(), down["healthy"].as_bool()), (Some(2), Some(false)));
    assert_eq!(down["last_check"]["ok"], false);
    // The same numbers as the metrics.
    let page = metrics(at);
    let series =
        format!("apex_endpoint_requests_total{{cluster=\"pool\",endpoint=\"{}\"}}", up.addr);
    assert_eq!(metric(&page, &series), Some(7));
    assert!(page.contains(&format!(
        "apex_endpoint_latency_seconds_count{{cluster=\"pool\",endpoint=\"{}\"}} 7",
        up.addr
    )));
}

fn the_status_page_is_self_contained_html_with_a_row_per_endpoint(rt: &str) {
    let up = Upstream::ok("ok");
    let dead = closed_port();
    let mut apex = Apex::start(&yaml(up.addr, dead, ""), rt);
    let at = admin_addr(&mut apex);
    until_down(at, dead);
    let r = admin(at, "GET", "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"), "it refreshes itself");
    for external in ["src=", "<link", "<script", "http://", "https://", "@import"] {
        assert!(!html.contains(external), "an external asset or script ({external}): {html}");
    }
    assert_balanced(&html);
    assert!(html.contains("<section class=\"cluster\" data-cluster=\"pool\">"), "{html}");
    let row = |state: &str, addr: std::net::SocketAddr| {
        format!("<tr class=\"state-{state}\" data-endpoint=\"{addr}\">")
    };
    assert!(html.contains(&row("up", up.addr)), "{html}");
    assert!(html.contains(&row("down", dead)), "{html}");
    assert_eq!(html.matches("<tr class=\"state-").count(), 2, "one row per endpoint");
    assert!(html.contains("tr.state-down td.state{background:"), "states have colours");
}

fn over_max_endpoint_series_only_cluster_totals_are_kept(rt: &str) {
    let up = Upstream::ok("ok");
    let dead = closed_port();
    let mut apex = Apex::start(&yaml(up.addr, dead, "max_endpoint_series: 1\n"), rt);
    let at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).status, 200);
    let page = metrics(at);
    assert!(!page.contains("apex_endpoint_requests_total{"), "{page}");
    assert!(!page.contains("apex_endpoint_ejected{"), "{page}");
    assert_eq!(metric(&page, "apex_upstream_latency_seconds_count{cluster=\"pool\"}"), Some(1));
    let v = endpoints(at);
    assert_eq!(v["clusters"][0]["per_endpoint_series"], false);
    assert!(v["clusters"][0]["endpoints"][0]["requests"].is_null(), "{v}");
    assert_eq!(v["clusters"][0]["requests"], 1, "the cluster's total is kept");
}

under_each_driver!(
    the_endpoints_page_gives_state_weight_and_traffic,
    the_status_page_is_self_contained_html_with_a_row_per_endpoint,
    over_max_endpoint_series_only_cluster_totals_are_kept,
);
