//! Forwarding: keep-alive and the per-worker pool, framing both ways, streaming, pipelining.

mod support;

use std::io::Write;
use std::sync::{Arc, Barrier};

use support::*;

const GET: &str = "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";

fn keepalive_reuses_one_upstream_connection(rt: &str) {
    let up = Upstream::ok("hello");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    for _ in 0..10 {
        let r = c.request(GET);
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    }
    // A second client connection on the same worker draws from the same pool.
    let r = Wire::connect(apex.addr).request(GET);
    assert_eq!(r.status, 200);
    assert_eq!(up.accepts(), 1, "eleven requests, one upstream connection");
}

/// Three requests at once on a cluster whose cap is one idle connection: the upstream answers
/// only when all three have arrived, so Apex holds three connections at once. All three go
/// back to the pool, and a second burst reuses them; the two above the cap are closed later,
/// by the housekeeping sweep, and the one kept serves the third burst.
fn a_burst_above_pool_max_idle_reuses_its_connections_and_the_sweep_trims_them(rt: &str) {
    let all_in = Arc::new(Barrier::new(3));
    let gate = all_in.clone();
    let up = Upstream::start(move |_, w| {
        gate.wait();
        w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], "    pool_max_idle: 1\n"), rt);
    let burst = || {
        let clients: Vec<Wire> = (0..3).map(|_| Wire::connect(apex.addr)).collect();
        std::thread::scope(|s| {
            for mut c in clients {
                s.spawn(move || assert_eq!(c.request(GET).status, 200));
            }
        });
    };
    burst();
    assert_eq!(up.accepts(), 3);
    burst();
    assert_eq!(up.accepts(), 3, "the second burst reused the first burst's connections");
    let closed = [up.next_close(), up.next_close()];
    assert!(closed.iter().all(Option::is_some), "the sweep closed the two above the cap");
    burst();
    assert_eq!(up.accepts(), 5, "the one kept was reused, two were opened again");
}

/// Between requests a keep-alive connection waits for readability with no read buffer (io_uring,
/// epoll and the Tokio build; the buffer waits among the worker's spares), or, with
/// `release_idle_buffer: false`, reads with its own small one: either way its next requests,
/// one sent in two pieces, are served whole.
fn a_connection_waiting_without_a_buffer_serves_its_next_requests(rt: &str) {
    let up = Upstream::ok("hello");
    let released = proxy_config(&[up.addr], "");
    let kept = released.replace(
        "    address: 127.0.0.1:0\n",
        "    address: 127.0.0.1:0\n    release_idle_buffer: false\n",
    );
    assert_ne!(kept, released);
    for yaml in [released, kept] {
        let apex = Apex::start(&yaml, rt);
        let mut c = Wire::connect(apex.addr);
        assert_eq!(c.request(GET).status, 200);
        c.send(b"GET / HTTP/1.1\r\nHo");
        c.send(b"st: example.com\r\n\r\n");
        let r = c.read_response(false).expect("an answer after the idle wait");
        assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        for _ in 0..3 {
            let r = c.request(GET);
            assert_eq!((r.status, r.text().as_str()), (200, "hello"));
        }
    }
}

fn idle_connection_closed_by_upstream_is_not_reused(rt: &str) {
    // The upstream closes after each response without saying so (its keep-alive timeout).
    let up = Upstream::start(|_, w| {
        w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        After::Close
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).status, 200);
    up.next(); // the upstream has closed that connection by now
               // A POST cannot be retried, so it only succeeds if the stale connection was never used.
    let r = c.request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(r.status, 200);
    assert_eq!(up.next().body, b"abc");
    assert_eq!(up.accepts(), 2);
}

fn stale_pooled_connection_is_retried_for_get(rt: &str) {
    let up = Upstream::closing_after_first_request();
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).status, 200);
    let r = c.request(GET);
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "the retry is invisible to the client");
    // Two upstream threads report concurrently: compare in sorted order.
    let mut seen: Vec<(usize, usize)> =
        (0..3).map(|_| up.next()).map(|r| (r.conn, r.index)).collect();
    seen.sort();
    assert_eq!(seen, vec![(0, 0), (0, 1), (1, 0)], "replayed once, on a fresh connection");
    assert_eq!(up.accepts(), 2);
}

fn post_is_never_replayed(rt: &str) {
    let up = Upstream::closing_after_first_request();
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request(GET).status, 200);
    let r = c.request("POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nmoney");
    assert_eq!(r.status, 502);
    up.next();
    let post = up.next();
    assert_eq!(post.request_line(), "POST /pay HTTP/1.1");
    assert_eq!(up.accepts(), 1, "no second connection was opened to replay the POST");
    assert!(up.drain().is_empty(), "the POST reached the upstream exactly once");
}

fn pipelined_requests_are_answered_in_order(rt: &str) {
    let up = Upstream::start(|r, w| {
        let path = r.request_line().split(' ').nth(1).unwrap().to_string();
        w.send(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}", path.len()).as_bytes(),
        );
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nPOST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyzGET /three HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    for want in ["/one", "/two", "/three"] {
        let r = c.read_response(false).unwrap();
        assert_eq!(r.text(), want);
    }
}

fn http10_client_keeps_alive_only_when_asked(rt: &str) {
    let up = Upstream::ok("hi");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let r = c.request("GET / HTTP/1.0\r\n\r\n");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.is_closed());
    // HTTP/1.0 has no Host; the upstream still gets a valid HTTP/1.1 request.
    let got = up.next();
    assert_eq!(got.request_line(), "GET / HTTP/1.1");
    assert_eq!(got.header("host"), Some(up.addr.to_string()));
}

fn chunked_request_body_is_reframed_upstream(rt: &str) {
    let up = Upstream::ok("done");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let got = up.next();
    assert_eq!(got.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(got.body, b"hello world");
    assert!(!got.head.contains("ext=1"));
}

fn chunked_and_close_delimited_responses_are_relayed(rt: &str) {
    let up = Upstream::start(|r, w| {
        if r.request_line().contains("/chunked") {
            w.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n");
            After::KeepOpen
        } else {
            w.send(b"HTTP/1.1 200 OK\r\n\r\nuntil close");
            After::Close
        }
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.header("transfer-encoding"), r.text().as_str()), (Some("chunked"), "abcde"));
    // A close-delimited body reaches an HTTP/1.1 client chunked, on a connection that stays.
    let r = c.request("GET /close HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(
        (r.header("transfer-encoding"), r.text().as_str()),
        (Some("chunked"), "until close")
    );
    let r = c.request("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.text(), "abcde");
    // An HTTP/1.0 client gets it close-delimited.
    let mut old = Wire::connect(apex.addr);
    let r = old.request("GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!((r.header("transfer-encoding"), r.text().as_str()), (None, "abcde"));
    assert_eq!(r.header("connection"), Some("close"));
}

fn bodiless_responses_carry_no_body(rt: &str) {
    let up = Upstream::start(|r, w| {
        let line = r.request_line().to_string();
        if line.starts_with("HEAD") {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        } else if line.contains("/204") {
            w.send(b"HTTP/1.1 204 No Content\r\n\r\n");
        } else if line.contains("/304") {
            w.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n");
        } else {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext");
        }
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.header("content-length")), (200, Some("10")));
    let r = c.request("GET /204 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 204);
    let r = c.request("GET /304 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((r.status, r.header("content-length")), (304, Some("10")));
    // Had any of them carried a body, this response would be read out of step.
    let r = c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.text(), "next");
    assert_eq!(up.accepts(), 1);
}

fn expect_100_continue_is_answered_before_the_body(rt: &str) {
    let up = Upstream::ok("stored");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    let interim = c.read_head().unwrap().unwrap();
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");
    c.send(b"12345");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "stored"));
    let got = up.next();
    assert_eq!(got.body, b"12345");
    assert_eq!(got.header("expect"), None);
}

fn streamed_response_reaches_client_before_it_ends(rt: &str) {
    let barrier = Arc::new(Barrier::new(2));
    let b = barrier.clone();
    let up = Upstream::start(move |_, w| {
        w.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n");
        // The rest exists only after the client has seen the first chunk.
        b.wait();
        w.send(b"4\r\nlast\r\n0\r\n\r\n");
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(GET.as_bytes());
    let head = c.read_head().unwrap().unwrap();
    assert!(head.starts_with("HTTP/1.1 200"));
    assert_eq!(c.read_chunk().unwrap().unwrap(), b"first");
    barrier.wait();
    assert_eq!(c.read_chunk().unwrap().unwrap(), b"last");
    assert_eq!(c.read_chunk().unwrap(), None);
}

fn slow_stream_is_not_cut_by_the_response_timeout(rt: &str) {
    let up = Upstream::start(|_, w| {
        w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n");
        for b in [b"a", b"b", b"c", b"d"] {
            // A slow upstream, simulated: four pauses add up to twice the response timeout.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(std::time::Duration::from_millis(150));
            w.send(b);
        }
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], "    response_timeout: 300ms\n"), rt);
    let r = Wire::connect(apex.addr).request(GET);
    assert_eq!((r.status, r.text().as_str()), (200, "abcd"));
}

fn response_cut_mid_body_closes_the_client_connection(rt: &str) {
    let up = Upstream::start(|r, w| {
        if r.request_line().contains("/chunked") {
            w.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
        } else {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
        }
        After::Close
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"GET /length HTTP/1.1\r\nHost: a\r\n\r\n");
    let head = c.read_head().unwrap().unwrap();
    assert!(head.contains("Content-Length: 100"));
    assert_eq!(c.read_to_end().unwrap(), b"only ten b", "short body, then the connection closed");

    let mut c = Wire::connect(apex.addr);
    c.send(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
    c.read_head().unwrap().unwrap();
    assert_eq!(c.read_chunk().unwrap().unwrap(), b"hello");
    assert!(c.read_chunk().is_err(), "no last chunk: the client can tell the body was cut");
}

fn eight_mib_body_streams_with_bounded_memory(rt: &str) {
    const SIZE: usize = 8 * 1024 * 1024;
    let up = Upstream::start(|r, w| {
        if r.request_line().starts_with("POST") {
            let n = r.body.len().to_string();
            w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{n}", n.len()).as_bytes());
        } else {
            w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
            let block = vec![b'x'; 64 * 1024];
            for _ in 0..SIZE / block.len() {
                w.send(&block);
            }
        }
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    // Warm up: first request, so one-off allocations are in the baseline.
    c.request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
    let peak_before = apex.peak_rss_kib();

    c.send(format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
    let block = vec![b'y'; 64 * 1024];
    for _ in 0..SIZE / block.len() {
        c.send(&block);
    }
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), SIZE.to_string(), "the upstream got every byte");

    let r = c.request(GET);
    assert_eq!(r.body.len(), SIZE);

    let growth = apex.peak_rss_kib().saturating_sub(peak_before);
    assert!(growth < 2048, "peak RSS grew by {growth} KiB moving 2 x 8 MiB");
}

/// A body of `len` bytes that no two nearby offsets share, so a byte lost, doubled or moved
/// shows.
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// An upstream that answers every request with `body` (`Content-Length`), keeping the
/// connection open.
fn large_body_upstream(body: Vec<u8>) -> Upstream {
    Upstream::start(move |_, w| {
        w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        w.send(&body);
        After::KeepOpen
    })
}

/// A large body of known length moves from upstream to client inside the kernel: every byte
/// arrives in order, the metric counts all but the first read's share of it, and the upstream
/// connection, read exactly to the end of each body, carries the next request.
fn a_large_body_is_spliced_intact_and_its_connection_reused(rt: &str) {
    const SIZE: usize = 1024 * 1024 + 7;
    let body = patterned(SIZE);
    let up = large_body_upstream(body.clone());
    let mut apex = Apex::start(&with_admin(&proxy_config(&[up.addr], "")), rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    for i in 0..2 {
        let r = c.request(GET);
        assert_eq!(r.status, 200);
        assert!(r.body == body, "response {i}: the body arrived changed ({} bytes)", r.body.len());
    }
    assert_eq!(up.accepts(), 1, "both responses came over one upstream connection");
    let spliced = metric(&metrics(admin_at), "apex_spliced_bytes_total").unwrap() as usize;
    // The first read after the head takes at most 64 KiB the ordinary way.
    assert!(
        (2 * (SIZE - 64 * 1024)..=2 * SIZE).contains(&spliced),
        "spliced {spliced} of {} body bytes",
        2 * SIZE
    );
}

/// A large buffer left by an earlier response does not cost the next one its splice: the
/// response-head read takes at most 16 KiB, so a 60 KiB body sent with its head in one write
/// still has most of itself to splice, although the previous (chunked, copied) response on
/// the connection grew the upstream read buffer to 64 KiB.
fn a_large_body_after_a_copied_one_is_still_spliced(rt: &str) {
    const SIZE: usize = 60 * 1024;
    let body = patterned(SIZE);
    let sent = body.clone();
    let up = Upstream::start(move |req, w| {
        let mut bytes = if req.request_line().contains("/chunked") {
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", 64 * 1024)
                .into_bytes()
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes()
        };
        if req.request_line().contains("/chunked") {
            bytes.extend_from_slice(&[b'c'; 64 * 1024]);
            bytes.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            bytes.extend_from_slice(&sent);
        }
        w.send(&bytes);
        After::KeepOpen
    });
    let mut apex = Apex::start(&with_admin(&proxy_config(&[up.addr], "")), rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.body.len(), 64 * 1024, "the chunked body, whole");
    assert_eq!(metric(&metrics(admin_at), "apex_spliced_bytes_total"), Some(0));
    let r = c.request(GET);
    assert!(r.body == body, "the body arrived changed ({} bytes)", r.body.len());
    let spliced = metric(&metrics(admin_at), "apex_spliced_bytes_total").unwrap() as usize;
    assert!(spliced >= SIZE - 16 * 1024, "spliced {spliced} of {SIZE} body bytes");
}

/// An upstream that sends bytes after a spliced body (a response nobody asked for): the
/// splice stops at the body's end, so the client never sees them, and the connection they
/// arrived on is not reused.
fn a_splice_stops_at_the_end_of_the_body(rt: &str) {
    let body = patterned(200 * 1024);
    let sent = body.clone();
    let up = Upstream::start(move |_, w| {
        let mut bytes =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", sent.len()).into_bytes();
        bytes.extend_from_slice(&sent);
        bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra");
        w.send(&bytes);
        After::KeepOpen
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    for i in 0..2 {
        let r = c.request(GET);
        assert!(r.body == body, "response {i}: {} bytes, not the body", r.body.len());
    }
    assert_eq!(up.accepts(), 2, "the connection with unasked-for bytes was not reused");
}

/// A client that goes away in the middle of a spliced body: the splice into its socket fails
/// (EPIPE or a reset, never a signal that stops Apex), the pipe is dropped rather than lent
/// again, and the next client gets the whole body.
fn a_client_gone_mid_splice_leaves_the_worker_serving(rt: &str) {
    let body = patterned(4 * 1024 * 1024);
    let sent = body.clone();
    let up = Upstream::start(move |_, w| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", sent.len());
        // Apex closes this connection when its client goes away mid-body: a failed write here
        // is that close, not a failure of the test.
        match w.stream.write_all(head.as_bytes()).and_then(|_| w.stream.write_all(&sent)) {
            Ok(()) => After::KeepOpen,
            Err(_) => After::Close,
        }
    });
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    for _ in 0..3 {
        let mut c = Wire::connect(apex.addr);
        c.send(GET.as_bytes());
        c.read_head().unwrap().unwrap();
        drop(c);
    }
    let r = Wire::connect(apex.addr).request(GET);
    assert!(r.body == body, "the body arrived changed ({} bytes)", r.body.len());
}

/// `splice: false` on a cluster: the same body arrives intact, copied, with nothing spliced.
fn splice_off_copies_the_body(rt: &str) {
    let body = patterned(256 * 1024);
    let up = large_body_upstream(body.clone());
    let yaml = with_admin(&proxy_config(&[up.addr], "    splice: false\n"));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let r = Wire::connect(apex.addr).request(GET);
    assert!(r.body == body, "the body arrived changed ({} bytes)", r.body.len());
    assert_eq!(metric(&metrics(admin_at), "apex_spliced_bytes_total"), Some(0));
}

/// An upstream that closes in the middle of a spliced body: the client gets the bytes that
/// came, then the connection closes, so it can tell the body was cut.
fn a_spliced_body_cut_by_the_upstream_closes_the_client_connection(rt: &str) {
    let part = patterned(300 * 1024);
    let sent = part.clone();
    let up = Upstream::start(move |_, w| {
        w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n");
        w.send(&sent);
        After::Close
    });
    let mut apex = Apex::start(&with_admin(&proxy_config(&[up.addr], "")), rt);
    let admin_at = admin_addr(&mut apex);
    let mut c = Wire::connect(apex.addr);
    c.send(GET.as_bytes());
    assert!(c.read_head().unwrap().unwrap().contains("Content-Length: 1048576"));
    let got = c.read_to_end().unwrap();
    assert!(got == part, "the {} bytes sent, then the close (got {})", part.len(), got.len());
    let spliced = metric(&metrics(admin_at), "apex_spliced_bytes_total").unwrap();
    assert!(spliced > 0, "the cut came during a splice");
}

/// One client pipelining requests as fast as it can while reading the answers does not keep
/// the (single) worker to itself: another client is accepted and served during the flood.
fn a_pipelining_flood_does_not_starve_other_clients(rt: &str) {
    let yaml = "workers: 1\nlisteners:\n  - name: test\n    address: 127.0.0.1:0\nroutes:\n  - match: { path_prefix: \"/\" }\n    respond: { status: 200, body: \"ok\" }\n";
    let apex = Apex::start(yaml, rt);
    let flood = Flood::start(apex.addr, b"", GET.repeat(2000).into_bytes());
    let mut other = Wire::connect(apex.addr);
    let r = other.request(GET);
    flood.stop();
    assert_eq!(r.status, 200, "served during the flood");
}

under_each_driver!(
    a_large_body_is_spliced_intact_and_its_connection_reused,
    a_large_body_after_a_copied_one_is_still_spliced,
    a_splice_stops_at_the_end_of_the_body,
    a_client_gone_mid_splice_leaves_the_worker_serving,
    splice_off_copies_the_body,
    a_spliced_body_cut_by_the_upstream_closes_the_client_connection,
    a_pipelining_flood_does_not_starve_other_clients,
    keepalive_reuses_one_upstream_connection,
    a_connection_waiting_without_a_buffer_serves_its_next_requests,
    a_burst_above_pool_max_idle_reuses_its_connections_and_the_sweep_trims_them,
    idle_connection_closed_by_upstream_is_not_reused,
    stale_pooled_connection_is_retried_for_get,
    post_is_never_replayed,
    pipelined_requests_are_answered_in_order,
    http10_client_keeps_alive_only_when_asked,
    chunked_request_body_is_reframed_upstream,
    chunked_and_close_delimited_responses_are_relayed,
    bodiless_responses_carry_no_body,
    expect_100_continue_is_answered_before_the_body,
    streamed_response_reaches_client_before_it_ends,
    slow_stream_is_not_cut_by_the_response_timeout,
    response_cut_mid_body_closes_the_client_connection,
    eight_mib_body_streams_with_bounded_memory,
);
