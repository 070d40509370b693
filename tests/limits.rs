//! Resource limits a client cannot push past: body size, head size, connections, descriptors.

mod support;

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use support::*;

fn with_listener_settings(yaml: String, settings: &str) -> String {
    yaml.replace("address: 127.0.0.1:0", &format!("address: 127.0.0.1:0\n{settings}"))
}

fn body_over_max_request_body_is_413_without_reading_it(rt: &str) {
    let up = Upstream::ok("ok");
    let yaml = with_listener_settings(proxy_config(&[up.addr], ""), "    max_request_body: 1KiB");
    let apex = Apex::start(&yaml, rt);
    // Announced too large: refused at once, before the client sends any of it.
    let mut c = Wire::connect(apex.addr);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("connection")), (413, Some("close")));
    // Chunked, so only counting tells.
    let mut c = Wire::connect(apex.addr);
    let chunk = format!("400\r\n{}\r\n", "x".repeat(1024));
    c.send(
        format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}")
            .as_bytes(),
    );
    assert_eq!(c.read_response(false).unwrap().status, 413);
    // At the limit is fine.
    let mut c = Wire::connect(apex.addr);
    let body = "y".repeat(1024);
    let r = c.request(&format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n{body}"));
    assert_eq!(r.status, 200);
    assert_eq!(up.next().body.len(), 1024);
    assert!(up.drain().is_empty(), "neither refused body reached the upstream");
}

fn head_limits_are_configurable(rt: &str) {
    let up = Upstream::ok("ok");
    let yaml = with_listener_settings(
        proxy_config(&[up.addr], ""),
        "    max_header_fields: 5\n    max_header_bytes: 2KiB\n    max_request_line: 100",
    );
    let apex = Apex::start(&yaml, rt);
    let fields: String = (0..5).map(|i| format!("X-{i}: v\r\n")).collect();
    for (req, status) in [
        (format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n"), 431),
        (format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "v".repeat(2100)), 431),
        (format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(100)), 414),
        ("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n".to_string(), 200),
    ] {
        let r = Wire::connect(apex.addr).request(&req);
        assert_eq!(r.status, status, "{}", &req[..40]);
    }
}

fn at_the_connection_cap_new_clients_wait_for_a_free_slot(rt: &str) {
    let yaml = format!(
        "worker_connections: 2\n{}",
        config("  - { match: { path: \"/\" }, respond: { status: 200, body: \"hi\" } }", "  []")
    );
    let apex = Apex::start(&yaml, rt);
    let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut first = Wire::connect(apex.addr);
    let mut second = Wire::connect(apex.addr);
    assert_eq!(first.request(get).status, 200);
    assert_eq!(second.request(get).status, 200);
    // The kernel completes the handshake, but Apex does not accept a third connection yet.
    let mut third = Wire::connect(apex.addr);
    third.send(get.as_bytes());
    third.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut byte = [0u8; 1];
    let waited = std::io::Read::read(&mut third.stream, &mut byte);
    assert!(
        matches!(&waited, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "served over the cap: {waited:?}"
    );
    third.stream.set_read_timeout(Some(PATIENCE)).unwrap();
    drop(first);
    let r = third.read_response(false).unwrap();
    assert_eq!(r.status, 200, "served once a slot freed up");
}

fn out_of_descriptors_backs_off_and_recovers(rt: &str) {
    let dir = TempDir::new();
    let yaml =
        config("  - { match: { path: \"/\" }, respond: { status: 200, body: \"hi\" } }", "  []");
    let path = dir.write("apex.yaml", &yaml);
    let mut apex =
        Apex::spawn_with(&["--config", path.to_str().unwrap(), "--runtime", rt], |cmd| {
            // SAFETY: setrlimit is async-signal-safe and only touches the child being spawned.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit { rlim_cur: 48, rlim_max: 48 };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
        .unwrap();
    let get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    // More connections than the process has descriptors for.
    let hogs: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(apex.addr).unwrap()).collect();
    let line = apex.wait_for_log(&["accept failed; backing off"]).expect("EMFILE was reported");
    assert!(line.contains("WARN"), "{line}");
    drop(hogs);
    let r = Wire::connect(apex.addr).request(get);
    assert_eq!(r.status, 200, "serves again once descriptors are free");
}

/// A client that stops reading its response is cut once a write to it has waited the
/// listener's `send_timeout`, whether the body is copied (chunked) or spliced (a length): its
/// upstream connection is closed with it (the upstream can write no more), what Apex had sent
/// still reaches the client before the close, and each cut is counted.
fn a_client_that_stops_reading_is_cut_after_the_send_timeout(rt: &str) {
    let up = Upstream::endless();
    let yaml = with_listener_settings(proxy_config(&[up.addr], ""), "    send_timeout: 1s");
    let mut apex = Apex::start(&with_admin(&yaml), rt);
    let admin_at = admin_addr(&mut apex);
    for (cuts, path) in [(1, "/chunked"), (2, "/sized")] {
        let mut c = Wire::connect(apex.addr);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        // The client reads nothing until the upstream's writes failed: Apex closed it.
        assert_eq!(up.next().request_line(), format!("GET {path} HTTP/1.1"));
        match c.read_to_end() {
            Ok(got) => assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{path}: {got:.40?}"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{path}: still open?")
            }
        }
        let text = metrics(admin_at);
        assert_eq!(metric(&text, "apex_client_send_timeouts_total"), Some(cuts), "{path}");
    }
    let spliced = metric(&metrics(admin_at), "apex_spliced_bytes_total").unwrap();
    assert!(spliced > 0, "the sized body took the splice path");
}

under_each_driver!(
    a_client_that_stops_reading_is_cut_after_the_send_timeout,
    body_over_max_request_body_is_413_without_reading_it,
    head_limits_are_configurable,
    at_the_connection_cap_new_clients_wait_for_a_free_slot,
    out_of_descriptors_backs_off_and_recovers,
);
