//! The admin API: `/metrics`, `/healthz`, `/config` and `POST /reload` on their own thread.
//!
//! It never touches worker state: every request becomes a [`Lifecycle`] event for the main
//! thread, which asks the workers over their control channels and answers here.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use tracing::{info, warn};

use crate::lifecycle::Lifecycle;

/// How long the admin API waits for the main thread (a reload or a scrape).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest admin request head, in bytes.
const MAX_HEAD: usize = 8 * 1024;

/// Binds the admin API (or serves on `inherited`, the socket an upgrade handed over) on a
/// thread of its own; returns the bound address and a copy of the socket (for the next
/// upgrade).
pub fn start(
    addr: SocketAddr,
    events: Sender<Lifecycle>,
    inherited: Option<TcpListener>,
) -> io::Result<(SocketAddr, TcpListener)> {
    let listener = match inherited {
        Some(l) if l.local_addr().is_ok_and(|a| crate::listener::serves_address(a, addr)) => l,
        _ => TcpListener::bind(addr)?,
    };
    let bound = listener.local_addr()?;
    let copy = listener.try_clone()?;
    // Non-blocking, and waited on with poll: after an upgrade handed this socket to the new
    // process, this thread stops accepting (the socket itself stays open for the new one).
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("apex-admin".into()).spawn(move || loop {
        if crate::upgrade::handed_over() {
            return;
        }
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call; 200 ms bounds how long a
        // handed-over process keeps this thread.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                if let Err(e) = serve(s, &events) {
                    warn!(error = %e, "admin request failed");
                }
            }
            // The new process took it first, or a spurious wake-up.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!(error = %e, "admin accept failed"),
        }
    })?;
    info!(address = %bound, "admin API listening");
    Ok((bound, copy))
}

fn ask<T>(events: &Sender<Lifecycle>, make: impl FnOnce(Sender<T>) -> Lifecycle) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    events.send(make(tx)).ok()?;
    rx.recv_timeout(ANSWER_TIMEOUT).ok()
}

fn serve(mut s: TcpStream, events: &Sender<Lifecycle>) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("/");
                let path = path.split('?').next().unwrap_or("/");
                break (req.method.unwrap_or("").to_string(), path.to_string());
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return respond(&mut s, 400, "text/plain", "bad request\n"),
        }
    };
    let unavailable = || "the main thread did not answer\n".to_string();
    match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => respond(&mut s, 200, "text/plain", "ok\n"),
        ("GET", "/") => match ask(events, Lifecycle::Status) {
            Some(status) => respond(&mut s, 200, "text/html; charset=utf-8", &status.to_html()),
            None => respond(&mut s, 503, "text/plain", &unavailable()),
        },
        ("GET", "/endpoints") => match ask(events, Lifecycle::Status) {
            Some(status) => respond(&mut s, 200, "application/json", &status.to_json()),
            None => respond(&mut s, 503, "text/plain", &unavailable()),
        },
        ("GET", "/metrics") => match ask(events, Lifecycle::Scrape) {
            Some(text) => respond(&mut s, 200, "text/plain; version=0.0.4", &text),
            None => respond(&mut s, 503, "text/plain", &unavailable()),
        },
        ("GET", "/config") => match ask(events, Lifecycle::ShowConfig) {
            Some(text) => respond(&mut s, 200, "text/yaml", &text),
            None => respond(&mut s, 503, "text/plain", &unavailable()),
        },
        ("POST", "/reload") => match ask(events, |tx| Lifecycle::Reload(Some(tx))) {
            Some(Ok(summary)) => {
                respond(&mut s, 200, "text/plain", &format!("reloaded: {summary}\n"))
            }
            Some(Err(e)) => respond(&mut s, 400, "text/plain", &format!("{e}\n")),
            None => respond(&mut s, 503, "text/plain", &unavailable()),
        },
        (_, "/" | "/endpoints" | "/healthz" | "/metrics" | "/config" | "/reload") => {
            respond(&mut s, 405, "text/plain", "method not allowed\n")
        }
        _ => respond(
            &mut s,
            404,
            "text/plain",
            "not found: try /, /endpoints, /metrics, /healthz, /config, POST /reload\n",
        ),
    }
}

fn respond(s: &mut TcpStream, status: u16, content_type: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::http::reason_phrase(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}
