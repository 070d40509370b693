//! Graceful drain on SIGTERM/SIGINT: finish what is in flight, close what is idle, exit 0.

mod support;

use std::time::{Duration, Instant};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";

fn sigterm_finishes_requests_in_flight_then_exits_zero(rt: &str) {
    let (up, arrived, release) = Upstream::held();
    let mut apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut busy = Wire::connect(apex.addr);
    busy.send(GET.as_bytes());
    arrived.wait();
    apex.signal(libc::SIGTERM);
    apex.wait_for_log(&["draining: stopped accepting"]).expect("the worker began draining");
    assert!(
        std::net::TcpStream::connect(apex.addr).is_err(),
        "new connections are refused once draining"
    );
    release.wait();
    let r = busy.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "done"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(busy.is_closed());
    assert_eq!(apex.wait_exit(), Some(0));
}

fn sigterm_closes_idle_keepalive_connections(rt: &str) {
    let up = Upstream::ok("ok");
    let mut apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut idle = Wire::connect(apex.addr);
    assert_eq!(idle.request(GET).status, 200);
    let mut fresh = Wire::connect(apex.addr);
    let _ = fresh.request(GET); // accepted, so it is idle in the worker too
    apex.signal(libc::SIGINT);
    assert!(idle.is_closed());
    assert!(fresh.is_closed());
    assert_eq!(apex.wait_exit(), Some(0));
}

fn second_signal_exits_at_once(rt: &str) {
    let (up, arrived, _release) = Upstream::held();
    let mut apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut busy = Wire::connect(apex.addr);
    busy.send(GET.as_bytes());
    arrived.wait();
    apex.signal(libc::SIGTERM);
    apex.wait_for_log(&["draining: no new connections"]).unwrap();
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(1));
}

fn drain_timeout_bounds_the_exit(rt: &str) {
    let (up, arrived, _release) = Upstream::held();
    let yaml = format!("drain_timeout: 300ms\n{}", proxy_config(&[up.addr], ""));
    let mut apex = Apex::start(&yaml, rt);
    let mut busy = Wire::connect(apex.addr);
    busy.send(GET.as_bytes());
    arrived.wait();
    let started = Instant::now();
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(5), "{took:?}");
    assert!(apex.logs().contains("drain timeout reached"));
}

under_each_driver!(
    sigterm_finishes_requests_in_flight_then_exits_zero,
    sigterm_closes_idle_keepalive_connections,
    second_signal_exits_at_once,
    drain_timeout_bounds_the_exit,
);
