//! Parked connections: a keep-alive connection idle past `park_after` gives up its task and
//! waits in the worker's epoll set; its next request, its close, its keep-alive timeout, the
//! drain and the per-client limit all work on it as on any idle connection.

mod support;

use std::net::SocketAddr;

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";

/// One worker (so the gauge is the one worker's), an admin API, and `listener_extra` under
/// the listener.
fn start(up: SocketAddr, listener_extra: &str, rt: &str) -> (Apex, SocketAddr) {
    let yaml = proxy_config(&[up], "").replace(
        "    address: 127.0.0.1:0\n",
        &format!("    address: 127.0.0.1:0\n{listener_extra}"),
    );
    let mut apex = Apex::start(&with_admin(&yaml), rt);
    let admin = admin_addr(&mut apex);
    (apex, admin)
}

/// Waits (at most `PATIENCE`) until `series` reads `value` on the admin API's metrics page.
fn gauge_reaches(admin: SocketAddr, series: &str, value: u64) -> bool {
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < deadline {
        if metric(&metrics(admin), series) == Some(value) {
            return true;
        }
    }
    false
}

const PARKED: &str = "apex_downstream_connections_parked";
/// Open client connections; the admin API's own connections are not on the proxy's listener.
const OPEN: &str = "apex_downstream_connections";

/// Apex with `park_after: 100ms` and `listener_extra`, its upstream, and a client whose first
/// request was answered and whose connection has then parked. (Bind every field: one left to
/// `..` is dropped at once, and with it the process or the upstream.)
struct ParkedClient {
    up: Upstream,
    apex: Apex,
    admin: SocketAddr,
    client: Wire,
}

fn parked_client(listener_extra: &str, rt: &str) -> ParkedClient {
    let up = Upstream::ok("hello");
    let (apex, admin) = start(up.addr, &format!("    park_after: 100ms\n{listener_extra}"), rt);
    let mut client = Wire::connect(apex.addr);
    let r = client.request(GET);
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert!(gauge_reaches(admin, PARKED, 1), "the idle connection parked");
    ParkedClient { up, apex, admin, client }
}

/// A parked connection's next request, sent in two pieces, is served whole; it parks again
/// when idle again, and serves again; a parked connection whose client closes is gone.
fn a_parked_connection_serves_its_next_requests(rt: &str) {
    let ParkedClient { up: _up, apex: _apex, admin, client: mut c } = parked_client("", rt);
    assert_eq!(metric(&metrics(admin), OPEN), Some(1), "a parked connection is still open");
    c.send(b"GET / HTTP/1.1\r\nHo");
    c.send(b"st: h\r\n\r\n");
    let r = c.read_response(false).expect("an answer after parking");
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert_eq!(metric(&metrics(admin), PARKED), Some(0), "serving, it is not parked");
    assert!(gauge_reaches(admin, PARKED, 1), "idle again, it parked again");
    for _ in 0..3 {
        let r = c.request(GET);
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    }
    // Pipelined: both requests arrive at once on a parked connection; both are answered.
    assert!(gauge_reaches(admin, PARKED, 1));
    c.send(format!("{GET}{GET}").as_bytes());
    for _ in 0..2 {
        assert_eq!(c.read_response(false).expect("a pipelined answer").status, 200);
    }
    assert!(gauge_reaches(admin, PARKED, 1));
    drop(c);
    assert!(gauge_reaches(admin, OPEN, 0), "the closed connection is gone");
    assert_eq!(metric(&metrics(admin), PARKED), Some(0));
}

/// A parked connection is closed at its keep-alive timeout, as any idle connection.
fn a_parked_connection_is_closed_at_its_keepalive_timeout(rt: &str) {
    let parked = parked_client("    keepalive_timeout: 1s\n", rt);
    let ParkedClient { up: _up, apex: _apex, admin, client: mut c } = parked;
    assert!(c.is_closed(), "closed at the keep-alive timeout");
    assert!(gauge_reaches(admin, OPEN, 0));
    assert_eq!(metric(&metrics(admin), PARKED), Some(0));
}

/// The drain closes parked connections (after the idle grace) and the process exits.
fn the_drain_closes_parked_connections(rt: &str) {
    let ParkedClient { up: _up, mut apex, admin: _, client: mut c } = parked_client("", rt);
    apex.signal(libc::SIGTERM);
    assert!(c.is_closed(), "the drain closed the parked connection");
    assert_eq!(apex.wait_exit(), Some(0));
}

/// A connection whose `park_after` passes during the drain does not park, and is not closed
/// then either: it keeps the drain's grace (500 ms) for a last request, which is served with
/// `Connection: close`.
fn the_drain_grace_outlasts_park_after(rt: &str) {
    let up = Upstream::ok("hello");
    let (mut apex, _admin) = start(up.addr, "    park_after: 100ms\n", rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).status, 200);
    apex.signal(libc::SIGTERM);
    apex.wait_for_log(&["draining: stopped accepting"]).expect("the worker began draining");
    // 250 ms: past `park_after`, inside the grace.
    let wait = std::time::Duration::from_millis(250);
    assert!(!c.closes_within(wait), "still open when park_after passed during the drain");
    let r = c.request(GET);
    assert_eq!((r.status, r.text().as_str()), (200, "hello"), "served within the grace");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
    assert_eq!(apex.wait_exit(), Some(0));
}

/// A parked connection keeps its place in `max_connections_per_client`: while it is parked a
/// second connection from the same address is refused, and once it closes one is served.
fn a_parked_connection_keeps_its_per_client_slot(rt: &str) {
    let parked = parked_client("    max_connections_per_client: 1\n", rt);
    let ParkedClient { up: _up, apex, admin, client: mut a } = parked;
    let mut b = Wire::connect(apex.addr);
    b.send(GET.as_bytes());
    assert!(b.is_closed(), "the second connection is refused while the first is parked");
    let r = a.request("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(a.is_closed());
    assert!(gauge_reaches(admin, OPEN, 0));
    assert_eq!(Wire::connect(apex.addr).request(GET).status, 200);
}

under_each_driver!(
    a_parked_connection_serves_its_next_requests,
    a_parked_connection_is_closed_at_its_keepalive_timeout,
    the_drain_closes_parked_connections,
    the_drain_grace_outlasts_park_after,
    a_parked_connection_keeps_its_per_client_slot,
);
