//! Hot reload: SIGHUP swaps the config under load; a bad config is refused and the old one
//! keeps serving.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn respond(body: &str) -> String {
    config(
        &format!(
            "  - {{ match: {{ path: \"/\" }}, respond: {{ status: 200, body: \"{body}\" }} }}"
        ),
        "  []",
    )
}

fn sighup_swaps_routes_on_open_connections(rt: &str) {
    let mut apex = Apex::start(&respond("one"), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).text(), "one");
    let outcome = apex.reload_with(&respond("two"));
    assert!(outcome.contains("config reloaded"), "{outcome}");
    assert_eq!(c.request(GET).text(), "two", "the same keep-alive connection sees the new routes");
}

fn invalid_reload_keeps_the_old_config_and_names_the_problem(rt: &str) {
    let mut apex = Apex::start(&respond("one"), rt);
    let bad = config("  - { match: { path: \"/\" }, cluster: missing }", "  []");
    let outcome = apex.reload_with(&bad);
    assert!(outcome.contains("reload refused"), "{outcome}");
    let file = apex.config_path.clone().unwrap().display().to_string();
    let why = apex.wait_for_log(&[&file, "routes[0].cluster", "no cluster is named `missing`"]);
    assert!(why.is_some(), "{}", apex.logs());
    assert_eq!(Wire::connect(apex.addr).request(GET).text(), "one");
}

fn changing_workers_is_refused_as_needing_a_restart(rt: &str) {
    let mut apex = Apex::start(&respond("one"), rt);
    let outcome = apex.reload_with(&respond("two").replace("workers: 1", "workers: 2"));
    assert!(outcome.contains("reload refused"), "{outcome}");
    assert!(apex.wait_for_log(&["changing `workers` needs a restart"]).is_some());
    assert_eq!(Wire::connect(apex.addr).request(GET).text(), "one");
}

fn reload_opens_and_closes_listeners(rt: &str) {
    let mut apex = Apex::start(&respond("one"), rt);
    let first = apex.addr;
    let two = respond("both")
        .replace("listeners:\n", "listeners:\n  - name: second\n    address: 127.0.0.1:0\n");
    assert!(apex.reload_with(&two).contains("config reloaded"));
    let line = apex.wait_for_log(&["listening", "listener=second"]).unwrap();
    let second: std::net::SocketAddr = field(&line, "address").unwrap().parse().unwrap();
    apex.wait_for_log(&["listener added", "second"]).unwrap();
    assert_eq!(Wire::connect(second).request(GET).text(), "both");
    assert_eq!(Wire::connect(first).request(GET).text(), "both");
    // Now drop the first listener.
    let only_second = format!(
        "workers: 1\nlisteners:\n  - name: second\n    address: {second}\nroutes:\n  - {{ match: {{ path: \"/\" }}, respond: {{ status: 200, body: \"second\" }} }}\nclusters: []\n"
    );
    assert!(apex.reload_with(&only_second).contains("config reloaded"));
    apex.wait_for_log(&["listener closed", "listener=test"]).unwrap();
    assert!(std::net::TcpStream::connect(first).is_err(), "the removed listener is closed");
    assert_eq!(Wire::connect(second).request(GET).text(), "second");
}

/// A listener moved to another address by one reload and back by the next: each time the new
/// address serves and the old one is closed, and the reload says it moved.
fn a_listener_moved_and_moved_back_follows_the_config(rt: &str) {
    let mut apex = Apex::start(&respond("one"), rt);
    let a = apex.addr;
    let b = free_port();
    let at = |addr: std::net::SocketAddr| {
        respond("one").replace("address: 127.0.0.1:0", &format!("address: {addr}"))
    };
    for (to, from) in [(b, a), (a, b)] {
        let outcome = apex.reload_with(&at(to));
        assert!(outcome.contains("(0 added, 0 removed, 1 moved)"), "{outcome}");
        assert_eq!(Wire::connect(to).request(GET).text(), "one", "{to} serves");
        assert!(std::net::TcpStream::connect(from).is_err(), "{from} is closed after the move");
    }
}

fn pooled_connections_survive_a_reload(rt: &str) {
    let up = Upstream::ok("up");
    let mut apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).text(), "up");
    let reloaded = proxy_config(&[up.addr], "    response_timeout: 3s\n");
    assert!(apex.reload_with(&reloaded).contains("config reloaded"));
    assert_eq!(c.request(GET).text(), "up");
    assert_eq!(up.accepts(), 1, "the idle upstream connection was kept across the reload");
}

/// Twenty reloads back to back, alternating two bodies, under keep-alive load from two
/// clients: no request fails, and right after each reload the new body is served.
fn reload_under_load_drops_nothing(rt: &str) {
    let mut apex = Apex::start(&respond("A"), rt);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, served, addr) =
                (stop.clone(), failures.clone(), served.clone(), apex.addr);
            std::thread::spawn(move || {
                let mut c = Wire::connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    c.send(GET.as_bytes());
                    match c.read_response(false) {
                        Ok(r) if r.status == 200 && (r.text() == "A" || r.text() == "B") => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            c = Wire::connect(addr);
                        }
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut probe = Wire::connect(apex.addr);
    for i in 0..20 {
        let body = if i % 2 == 0 { "B" } else { "A" };
        assert!(apex.reload_with(&respond(body)).contains("config reloaded"));
        // The very next request after the reload's log line gets the new config.
        assert_eq!(probe.request(GET).text(), body, "reload {i}");
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().unwrap());
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed during reloads");
    assert!(served.load(Ordering::Relaxed) > 20, "the clients kept the proxy busy");
    assert!(took < Duration::from_secs(10), "twenty reloads took {took:?}");
    eprintln!(
        "20 reloads in {took:?}, {} requests served, 0 failed",
        served.load(Ordering::Relaxed)
    );
}

under_each_driver!(
    sighup_swaps_routes_on_open_connections,
    invalid_reload_keeps_the_old_config_and_names_the_problem,
    changing_workers_is_refused_as_needing_a_restart,
    reload_opens_and_closes_listeners,
    a_listener_moved_and_moved_back_follows_the_config,
    pooled_connections_survive_a_reload,
    reload_under_load_drops_nothing,
);
