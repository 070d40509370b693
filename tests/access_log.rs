//! The access log: one line per request with what operators need, and reopen for logrotate.

mod support;

use support::*;

fn logged_config(
    dir: &TempDir,
    format: &str,
    upstream: std::net::SocketAddr,
) -> (String, std::path::PathBuf) {
    let path = dir.0.join("access.log");
    let yaml = format!(
        "access_log: {{ path: \"{}\", format: {format} }}\n{}",
        path.display(),
        config(
            "  - { name: api, match: { path_prefix: \"/api\" }, cluster: backend }\n  - { name: home, match: { path: \"/\" }, respond: { status: 200, body: \"home\" } }",
            &format!("  - {{ name: backend, endpoints: [\"{upstream}\"] }}"),
        )
    );
    (yaml, path)
}

fn json_line_matches_the_request(rt: &str) {
    let up = Upstream::ok("twelve bytes");
    let dir = TempDir::new();
    let (yaml, path) = logged_config(&dir, "json", up.addr);
    let mut apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET /api/items?page=2 HTTP/1.1\r\nHost: a\r\nUser-Agent: tester/1.0\r\nReferer: http://r/\r\n\r\n");
    assert_eq!(r.status, 200);
    drop(c);
    // The drain hands the last buffered lines to the writer before the process exits.
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let log = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    let l = lines[0];
    for want in [
        "\"client\":\"127.0.0.1\"",
        "\"method\":\"GET\"",
        "\"target\":\"/api/items?page=2\"",
        "\"version\":\"HTTP/1.1\"",
        "\"status\":200",
        "\"bytes\":12",
        &format!("\"upstream\":\"{}\"", up.addr),
        "\"route\":\"api\"",
        "\"referer\":\"http://r/\"",
        "\"user_agent\":\"tester/1.0\"",
        "\"duration_ms\":",
        "\"time\":\"20",
    ] {
        assert!(l.contains(want), "{want} missing in {l}");
    }
}

fn combined_lines_and_reopen_on_sigusr1(rt: &str) {
    let up = Upstream::ok("ok");
    let dir = TempDir::new();
    let (yaml, path) = logged_config(&dir, "combined", up.addr);
    let mut apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    // logrotate: move the file away, then tell Apex.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    apex.signal(libc::SIGUSR1);
    apex.wait_for_log(&["access log reopened"]).unwrap();
    assert_eq!(c.request("GET /api/after HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    drop(c);
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let new = std::fs::read_to_string(&path).expect("a new file was opened");
    let old = std::fs::read_to_string(&rotated).unwrap();
    let after: Vec<&str> = new.lines().filter(|l| l.contains("/api/after")).collect();
    assert_eq!(after.len(), 1, "the request after the reopen is in the new file:\n{new}");
    assert!(
        after[0].starts_with("127.0.0.1 - - [")
            && after[0].contains("] \"GET /api/after HTTP/1.1\" 200 2 \"-\" \"-\" rt=")
            && after[0].ends_with(&format!("upstream={} route=api", up.addr)),
        "{}",
        after[0]
    );
    let home =
        format!("{old}{new}").lines().filter(|l| l.contains("\"GET / HTTP/1.1\" 200 4")).count();
    assert_eq!(home, 1, "the first request is logged once, in one of the files");
}

/// Requests Apex refuses or answers itself are logged too, with the body bytes it sent.
fn refused_and_generated_answers_are_logged_with_their_bytes(rt: &str) {
    let dead = closed_port();
    let dir = TempDir::new();
    let (yaml, path) = logged_config(&dir, "combined", dead);
    let mut apex = Apex::start(&yaml, rt);
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET /nowhere/else HTTP/1.1\r\nHost: a\r\n\r\n").status, 404);
    assert_eq!(c.request("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").status, 502);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Field: x\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 400);
    drop(c);
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let log = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    // "404 Not Found\n" and "502 Bad Gateway\n" are the bodies Apex sent.
    assert!(lines[0].contains("\"GET /nowhere/else HTTP/1.1\" 404 14 "), "{}", lines[0]);
    assert!(lines[1].contains("\"GET /api/x HTTP/1.1\" 502 16 "), "{}", lines[1]);
    assert!(lines[1].contains(&format!("upstream={dead} route=api")), "{}", lines[1]);
    assert!(lines[2].contains("\"- - -\" 400 16 "), "unparsed request: {}", lines[2]);
}

/// A writer that cannot keep up (here: a pipe nobody reads) never blocks a worker: lines are
/// dropped and counted instead.
fn a_stalled_log_writer_drops_and_counts_instead_of_blocking(rt: &str) {
    let dir = TempDir::new();
    let fifo = dir.0.join("stalled.log");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    // A reader that never reads: opening it lets the writer's open succeed, then the pipe
    // (64 KiB) fills and the writer thread blocks in write.
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let reader_path = fifo.clone();
    std::thread::spawn(move || {
        let f = std::fs::File::open(reader_path).unwrap();
        opened_tx.send(()).unwrap();
        // Held, unread, until the test process ends.
        std::mem::forget(f);
    });
    let yaml = with_admin(&format!(
        "access_log: {{ path: \"{}\", buffer: 32KiB }}\n{}",
        fifo.display(),
        config(
            "  - { match: { path_prefix: \"/\" }, respond: { status: 200, body: \"x\" } }",
            "  []"
        )
    ));
    let mut apex = Apex::start(&yaml, rt);
    opened.recv_timeout(PATIENCE).expect("the writer opened the pipe");
    let admin_at = admin_addr(&mut apex);
    let long = "a".repeat(2000);
    let mut c = Wire::connect(apex.addr);
    // ~2 KiB per line: 400 lines are ~800 KiB, far more than the pipe and the queue hold.
    for i in 0..400 {
        let r = c.request(&format!("GET /{long}/{i} HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert_eq!(r.status, 200, "request {i} was served");
    }
    let text = metrics(admin_at);
    let dropped = metric(&text, "apex_access_log_dropped_total").unwrap();
    assert!(dropped > 0, "{text}");
}

under_each_driver!(
    json_line_matches_the_request,
    combined_lines_and_reopen_on_sigusr1,
    refused_and_generated_answers_are_logged_with_their_bytes,
    a_stalled_log_writer_drops_and_counts_instead_of_blocking,
);
