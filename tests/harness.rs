//! The test harness itself: what its checks report must be true, or every test built on them
//! could pass without the behaviour they name.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use support::*;

#[test]
fn a_connection_that_stays_open_is_not_reported_closed() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = Wire::connect(l.local_addr().unwrap());
    let (held, _) = l.accept().unwrap();
    assert!(!c.closes_within(Duration::from_millis(200)), "a read timeout means still open");
    drop(held);
    assert!(c.is_closed(), "EOF means closed");
}

#[test]
fn a_panicking_fake_upstream_fails_the_test_with_its_message() {
    let up = Upstream::start(|_, _| panic!("the handler's own assertion"));
    Wire::connect(up.addr).send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| up.next()));
    let p = caught.expect_err("next() raises the upstream's panic");
    let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("a fake upstream thread panicked: the handler's own assertion"), "{msg}");
}
