//! The failure path: what clients and operators see while an upstream is down, and the state
//! a worker keeps about endpoints (pool, ejection, health) across time and reloads.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
const POST: &str = "POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";

fn cluster(endpoints: &[std::net::SocketAddr], extra_cluster: &str, extra_route: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    config(
        &format!("  - match: {{ path_prefix: \"/\" }}\n    cluster: backend\n{extra_route}"),
        &format!("  - name: backend\n    endpoints: [{}]\n{extra_cluster}", eps.join(", ")),
    )
}

/// nginx's default (`proxy_next_upstream error timeout`, `max_fails=1`): a refused endpoint
/// costs clients nothing, for any method, with no `retry` block in the config.
fn a_refused_endpoint_costs_clients_nothing_by_default(rt: &str) {
    let (a, b, dead) = (Upstream::ok("a"), Upstream::ok("b"), closed_port());
    let apex = Apex::start(&cluster(&[a.addr, b.addr, dead], "", ""), rt);
    let mut c = Wire::connect(apex.addr);
    for i in 0..30 {
        let r = c.request(if i % 3 == 0 { POST } else { GET });
        assert_eq!(r.status, 200, "request {i}: {}", r.head);
    }
}

fn apex_proxy_with_a_dead_endpoint_loses_nothing(rt: &str) {
    let (a, b, dead) = (Upstream::ok("a"), Upstream::ok("b"), closed_port());
    let (a_at, b_at, dead_at) = (a.addr.to_string(), b.addr.to_string(), dead.to_string());
    let args = [
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &a_at,
        "--to",
        &b_at,
        "--to",
        &dead_at,
        "--workers",
        "1",
        "--runtime",
        rt,
    ];
    let apex =
        Apex::spawn(&args).unwrap_or_else(|logs| panic!("apex proxy did not start:\n{logs}"));
    let mut c = Wire::connect(apex.addr);
    for i in 0..30 {
        assert_eq!(c.request(GET).status, 200, "request {i}");
    }
}

/// The retry budget bounds replays of requests an upstream saw; a failed connect sent
/// nothing, so it is retried however dry the budget is.
fn connect_failures_are_not_starved_by_the_retry_budget(rt: &str) {
    let (a, dead) = (Upstream::ok("a"), closed_port());
    let yaml = cluster(
        &[a.addr, dead],
        "    outlier_detection: { enabled: false }\n",
        "    retry: { attempts: 2, budget: 0.0, min_retries: 0 }\n",
    );
    let apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    for i in 0..40 {
        assert_eq!(c.request(GET).status, 200, "request {i}");
    }
}

fn retries_the_budget_refuses_are_counted(rt: &str) {
    let busy = || {
        Upstream::start(|_, w| {
            w.send(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n");
            After::KeepOpen
        })
    };
    let (a, b) = (busy(), busy());
    let yaml = with_admin(&cluster(
        &[a.addr, b.addr],
        "    outlier_detection: { enabled: false }\n",
        "    retry: { attempts: 2, on: [503], budget: 0.0, min_retries: 0 }\n",
    ));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..7 {
        assert_eq!(c.request(GET).status, 503);
    }
    let text = metrics(admin_at);
    let skipped = metric(&text, "apex_upstream_retries_skipped_total{cluster=\"backend\"}");
    assert_eq!(skipped, Some(7), "{text}");
    assert_eq!(metric(&text, "apex_upstream_retries_total{cluster=\"backend\"}"), Some(0));
}

/// During an outage a worker logs each upstream and reason once a second, then the count of
/// what it did not log: never a line per request.
fn an_outage_logs_once_a_second_not_once_a_request(rt: &str) {
    let dead = closed_port();
    let yaml = cluster(&[dead], "", "    retry: { attempts: 1 }\n");
    let mut apex = Apex::start(&yaml, rt);
    let started = Instant::now();
    let mut c = Wire::connect(apex.addr);
    for _ in 0..50 {
        assert_eq!(c.request(GET).status, 502);
    }
    let took = started.elapsed();
    let line = apex
        .wait_for_log(&["more upstream failures like the last one", &dead.to_string()])
        .expect("the suppressed failures are reported");
    let logs = apex.logs();
    let logged = logs.matches("upstream request failed").count();
    let windows = took.as_secs() as usize + 1;
    assert!((1..=windows).contains(&logged), "{logged} lines for 50 failures in {took:?}");
    let suppressed: usize = field(&line, "suppressed").unwrap().parse().unwrap();
    assert!(suppressed >= 50 - windows, "{line}");
}

/// A route whose `retry.on` omits `stale_connection` does not replay a request on a fresh
/// connection when the pooled one turns out closed; the default does.
fn stale_connection_retries_follow_the_route(rt: &str) {
    for (retry, want) in [("    retry: { on: [connect_failure] }\n", 502), ("", 200)] {
        let up = Upstream::closing_after_first_request();
        let apex = Apex::start(&cluster(&[up.addr], "", retry), rt);
        let mut c = Wire::connect(apex.addr);
        assert_eq!(c.request(GET).status, 200);
        up.next();
        assert_eq!(c.request(GET).status, want, "retry block: {retry:?}");
    }
}

/// An endpoint answering 503 that outlier detection ejected stays ejected across a reload
/// that keeps it, and the metric says so.
fn an_ejection_survives_a_reload(rt: &str) {
    let sick_hits = Arc::new(AtomicUsize::new(0));
    let hits = sick_hits.clone();
    let sick = Upstream::start(move |_, w| {
        hits.fetch_add(1, Ordering::SeqCst);
        w.send(b"HTTP/1.1 503 Sick\r\nContent-Length: 0\r\n\r\n");
        After::KeepOpen
    });
    let well = Upstream::ok("well");
    let outlier = "    outlier_detection: { consecutive_failures: 1, base_ejection: 1h }\n";
    let yaml = with_admin(&cluster(&[sick.addr, well.addr], outlier, ""));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    let statuses: Vec<u16> = (0..4).map(|_| c.request(GET).status).collect();
    assert_eq!(sick_hits.load(Ordering::SeqCst), 1, "ejected after one 503: {statuses:?}");
    let series = format!("apex_endpoint_ejected{{cluster=\"backend\",endpoint=\"{}\"}}", sick.addr);
    assert_eq!(metric(&metrics(admin_at), &series), Some(1));
    let reloaded = yaml.replace(
        "routes:\n",
        "routes:\n  - { match: { path: \"/x\" }, respond: { status: 204 } }\n",
    );
    assert!(apex.reload_with(&reloaded).contains("config reloaded"));
    for _ in 0..10 {
        assert_eq!(c.request(GET).status, 200);
    }
    assert_eq!(sick_hits.load(Ordering::SeqCst), 1, "still ejected after the reload");
    assert_eq!(metric(&metrics(admin_at), &series), Some(1));
}

fn endpoint_health_is_in_the_metrics(rt: &str) {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let a = Upstream::start(move |r, w| {
        let status = if flag.load(Ordering::SeqCst) && r.request_line().contains("/healthz") {
            "503 Down"
        } else {
            "200 OK"
        };
        w.send(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        After::KeepOpen
    });
    let b = Upstream::ok("b");
    let hc = "    health_check: { path: /healthz, interval: 100ms, unhealthy_threshold: 1 }\n";
    let mut apex = Apex::start(&with_admin(&cluster(&[a.addr, b.addr], hc, "")), rt);
    let admin_at = admin_addr(&mut apex);
    apex.wait_for_log(&["endpoint unhealthy", &a.addr.to_string()]).expect("probe saw it");
    let text = metrics(admin_at);
    let series = |e: std::net::SocketAddr| {
        format!("apex_endpoint_healthy{{cluster=\"backend\",endpoint=\"{e}\"}}")
    };
    assert_eq!(metric(&text, &series(a.addr)), Some(0), "{text}");
    assert_eq!(metric(&text, &series(b.addr)), Some(1), "{text}");
}

/// The housekeeping tick closes pooled connections whose idle timeout passed, without waiting
/// for a request to find them.
fn expired_pooled_connections_are_closed(rt: &str) {
    let up = Upstream::ok("ok");
    let apex = Apex::start(&cluster(&[up.addr], "    pool_idle_timeout: 200ms\n", ""), rt);
    assert_eq!(Wire::connect(apex.addr).request(GET).status, 200);
    assert_eq!(up.next_close(), Some(0), "the idle pooled connection was closed by Apex");
}

/// A reload that removes an endpoint closes the worker's idle connections to it.
fn pooled_connections_of_a_removed_endpoint_are_closed(rt: &str) {
    let (old, new) = (Upstream::ok("old"), Upstream::ok("new"));
    let mut apex = Apex::start(&cluster(&[old.addr], "", ""), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).text(), "old");
    assert!(apex.reload_with(&cluster(&[new.addr], "", "")).contains("config reloaded"));
    assert_eq!(c.request(GET).text(), "new");
    assert_eq!(old.next_close(), Some(0), "the removed endpoint's connection was closed");
}

/// Probes run concurrently, each endpoint on its own interval: endpoints whose probes hang
/// until their timeout do not delay the verdict on another endpoint.
fn black_holed_endpoints_do_not_delay_health_verdicts(rt: &str) {
    let holes: Vec<_> = (0..3).map(|_| black_hole()).collect();
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    let flipping = Upstream::start(move |_, w| {
        let status = if flag.load(Ordering::SeqCst) { "503 Down" } else { "200 OK" };
        w.send(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        After::KeepOpen
    });
    let mut eps: Vec<_> = holes.iter().map(|h| h.2).collect();
    eps.push(flipping.addr);
    let hc = "    health_check: { path: /healthz, interval: 200ms, timeout: 2s, unhealthy_threshold: 2 }\n";
    let mut apex = Apex::start(&cluster(&eps, hc, ""), rt);
    let flipped = Instant::now();
    down.store(true, Ordering::SeqCst);
    apex.wait_for_log(&["endpoint unhealthy", &flipping.addr.to_string()]).expect("verdict");
    // Probed one after another, each round would wait 3 x 2 s for the black holes: the second
    // failing probe would come after 6 s or more. Concurrently it comes after two intervals.
    let took = flipped.elapsed();
    assert!(took < Duration::from_secs(4), "verdict after {took:?}");
}

under_each_driver!(
    a_refused_endpoint_costs_clients_nothing_by_default,
    apex_proxy_with_a_dead_endpoint_loses_nothing,
    connect_failures_are_not_starved_by_the_retry_budget,
    retries_the_budget_refuses_are_counted,
    an_outage_logs_once_a_second_not_once_a_request,
    stale_connection_retries_follow_the_route,
    an_ejection_survives_a_reload,
    endpoint_health_is_in_the_metrics,
    expired_pooled_connections_are_closed,
    pooled_connections_of_a_removed_endpoint_are_closed,
    black_holed_endpoints_do_not_delay_health_verdicts,
);
