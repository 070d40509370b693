//! Per-endpoint limits for a fleet: `max_connections` with a bounded queue, upstream
//! `max_requests_per_connection`, and `slow_start`.
// The gated upstream's release channel is shared by its connection threads (test code only).
#![allow(clippy::disallowed_types)]

mod support;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

/// An upstream that reports each request as it arrives and answers it only when the test
/// sends a unit on the returned sender.
fn gated() -> (Upstream, mpsc::Receiver<()>, mpsc::SyncSender<()>) {
    let (arrived_tx, arrived) = mpsc::channel();
    let (release, release_rx) = mpsc::sync_channel::<()>(16);
    let release_rx = std::sync::Arc::new(std::sync::Mutex::new(release_rx));
    let up = Upstream::start(move |_, w| {
        arrived_tx.send(()).unwrap();
        release_rx.lock().unwrap().recv_timeout(PATIENCE).expect("released by the test");
        w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        After::KeepOpen
    });
    (up, arrived, release)
}

fn cluster(endpoints: &[std::net::SocketAddr], extra: &str) -> String {
    proxy_config(endpoints, extra)
}

/// Sends a request on its own connection, from a thread; the response comes back on join.
fn send(addr: std::net::SocketAddr) -> std::thread::JoinHandle<(u16, Duration)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let status = Wire::connect(addr).request(GET).status;
        (status, started.elapsed())
    })
}

fn max_connections_queues_then_answers_503(rt: &str) {
    let (up, arrived, release) = gated();
    // A long queue timeout first: the queued request must go on when room frees up, not when
    // its wait runs out.
    let limits = "    max_connections: 1\n    max_queue: 1\n    queue_timeout: 5s\n";
    let mut apex = Apex::start(&with_admin(&cluster(&[up.addr], limits)), rt);
    let at = admin_addr(&mut apex);
    let depth = "apex_upstream_queue_depth{cluster=\"backend\"}";

    let a = send(apex.addr);
    arrived.recv_timeout(PATIENCE).expect("the first request reached the upstream");
    let b = send(apex.addr);
    let queued = || {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if metric(&metrics(at), depth) == Some(1) {
                return true;
            }
        }
        false
    };
    assert!(queued(), "the second request waits in the queue");
    // The queue holds one: a third request is refused at once.
    let (status, _) = send(apex.addr).join().unwrap();
    assert_eq!(status, 503, "queue full");
    assert!(arrived.try_recv().is_err(), "nothing beyond max_connections reached the upstream");
    // The first one finishing lets the queued one through.
    release.send(()).unwrap();
    assert_eq!(a.join().unwrap().0, 200);
    arrived
        .recv_timeout(Duration::from_secs(3))
        .expect("the queued request went on as soon as there was room");
    release.send(()).unwrap();
    assert_eq!(b.join().unwrap().0, 200);
    assert_eq!(
        metric(&metrics(at), "apex_upstream_queue_rejected_total{cluster=\"backend\"}"),
        Some(1)
    );

    // A queued request that finds no room within queue_timeout gets 503.
    let limits = limits.replace("5s", "500ms");
    let outcome = apex.reload_with(&with_admin(&cluster(&[up.addr], &limits)));
    assert!(outcome.contains("config reloaded"), "{outcome}");
    let held = send(apex.addr);
    arrived.recv_timeout(PATIENCE).unwrap();
    let (status, waited) = send(apex.addr).join().unwrap();
    assert_eq!(status, 503, "queue timeout");
    // The queue's deadline is checked by the worker's 100 ms sweep.
    assert!(waited >= Duration::from_millis(400), "answered after {waited:?}, before the timeout");
    release.send(()).unwrap();
    assert_eq!(held.join().unwrap().0, 200);
    let page = metrics(at);
    assert_eq!(metric(&page, "apex_upstream_queue_rejected_total{cluster=\"backend\"}"), Some(2));
    assert_eq!(metric(&page, depth), Some(0));
}

fn upstream_connections_close_after_max_requests(rt: &str) {
    let up = Upstream::ok("ok");
    let apex = Apex::start(&cluster(&[up.addr], "    max_requests_per_connection: 3\n"), rt);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..9 {
        assert_eq!(c.request(GET).status, 200);
    }
    // The fake upstream reports a request after answering it: wait for each report.
    let seen: Vec<Received> = (0..9).map(|_| up.next()).collect();
    assert!(seen.iter().all(|r| r.index < 3), "at most 3 requests on a connection");
    assert!(up.drain().is_empty(), "nothing more reached the upstream");
    assert_eq!(up.accepts(), 3, "a new connection after every 3 requests");
}

fn slow_start_ramps_an_added_endpoint(rt: &str) {
    let old = Upstream::ok("old");
    let new = Upstream::ok("new");
    // Long enough that a slow machine's first batch still sees the added endpoint near the
    // start of its ramp; short enough to reach the end within the test's patience.
    let mut apex = Apex::start(&cluster(&[old.addr], "    slow_start: 6s\n"), rt);
    let mut c = Wire::connect(apex.addr);
    let share_of_new = |c: &mut Wire, n: usize| {
        (0..n).filter(|_| c.request(GET).text() == "new").count() as f64 / n as f64
    };
    assert_eq!(share_of_new(&mut c, 10), 0.0);
    let outcome = apex.reload_with(&cluster(&[old.addr, new.addr], "    slow_start: 6s\n"));
    assert!(outcome.contains("config reloaded"), "{outcome}");
    // Equal weights: half of the requests once ramped; a tenth of a weight at first.
    let first = share_of_new(&mut c, 40);
    assert!(first > 0.0 && first <= 0.25, "the added endpoint started at {first}");
    let deadline = Instant::now() + PATIENCE;
    let mut last = first;
    while Instant::now() < deadline && last < 0.45 {
        last = share_of_new(&mut c, 40);
    }
    assert!(last >= 0.45, "the added endpoint never reached its share: {last}");
}

under_each_driver!(
    max_connections_queues_then_answers_503,
    upstream_connections_close_after_max_requests,
    slow_start_ramps_an_added_endpoint,
);
