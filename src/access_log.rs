//! The access log: one line per request, formatted on the worker into a per-worker buffer and
//! written to disk by a thread of its own, so a slow disk never stalls an event loop. The
//! queue to that thread is bounded (`access_log.buffer`): when the disk falls that far behind,
//! a worker drops the buffer it would hand over and counts its lines
//! (`apex_access_log_dropped_total`) instead of waiting or growing memory.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use crate::timefmt;

pub use crate::config::{AccessLogConfig, LogFormat as Format, LogTarget as Target};

/// A worker hands its buffer over once it holds this many bytes (or on its flush tick).
pub const FLUSH_BYTES: usize = 32 * 1024;
/// How often a worker hands over a partly filled buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// What the writer thread is told.
pub enum LogMessage {
    Lines(Vec<u8>),
    /// Close and open the file again (logrotate moved it away): SIGUSR1.
    Reopen,
}

/// One request, as the access log records it.
pub struct Entry<'a> {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub upstream: Option<SocketAddr>,
    pub route: &'a str,
    pub referer: &'a str,
    pub user_agent: &'a str,
    /// Empty when the listener and route use no request ids.
    pub request_id: &'a str,
    /// The connection's TLS, when it is one.
    pub tls: Option<&'a crate::tls::TlsSummary>,
}

/// Appends `s` with quotes, backslashes and control or non-ASCII bytes escaped as `\xHH`.
fn push_escaped(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

/// Appends `s` as a JSON string body (without quotes). Also the admin API's `/endpoints`.
pub fn push_json(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Appends one line for `e` in `format`.
pub fn format_entry(out: &mut String, format: Format, e: &Entry<'_>) {
    let upstream = e.upstream.map(|a| a.to_string());
    let upstream = upstream.as_deref().unwrap_or("-");
    let route = if e.route.is_empty() { "-" } else { e.route };
    match format {
        Format::Combined => {
            let _ = write!(out, "{} - - [{}] \"", e.client.ip(), timefmt::clf(e.time));
            push_escaped(out, e.method);
            out.push(' ');
            push_escaped(out, e.target);
            let _ = write!(out, " {}\" {} {} \"", e.version, e.status, e.bytes);
            push_escaped(out, if e.referer.is_empty() { "-" } else { e.referer });
            out.push_str("\" \"");
            push_escaped(out, if e.user_agent.is_empty() { "-" } else { e.user_agent });
            let _ = write!(
                out,
                "\" rt={:.3} upstream={upstream} route={route}",
                e.duration.as_secs_f64()
            );
            if !e.request_id.is_empty() {
                out.push_str(" request_id=");
                push_escaped(out, e.request_id);
            }
            if let Some(t) = e.tls {
                let _ = write!(out, " tls={} cipher={} sni=", t.version, t.cipher);
                push_escaped(out, t.sni.as_deref().unwrap_or("-"));
            }
            out.push('\n');
        }
        Format::Json => {
            let _ = write!(
                out,
                "{{\"time\":\"{}\",\"client\":\"{}\",\"method\":\"",
                timefmt::rfc3339(e.time),
                e.client.ip()
            );
            push_json(out, e.method);
            out.push_str("\",\"target\":\"");
            push_json(out, e.target);
            let _ = write!(
                out,
                "\",\"version\":\"{}\",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"upstream\":\"{upstream}\",\"route\":\"",
                e.version,
                e.status,
                e.bytes,
                e.duration.as_secs_f64() * 1000.0
            );
            push_json(out, route);
            out.push_str("\",\"referer\":\"");
            push_json(out, e.referer);
            out.push_str("\",\"user_agent\":\"");
            push_json(out, e.user_agent);
            if !e.request_id.is_empty() {
                out.push_str("\",\"request_id\":\"");
                push_json(out, e.request_id);
            }
            if let Some(t) = e.tls {
                let _ = write!(
                    out,
                    "\",\"tls_version\":\"{}\",\"tls_cipher\":\"{}\",\"sni\":\"",
                    t.version, t.cipher
                );
                push_json(out, t.sni.as_deref().unwrap_or(""));
            }
            out.push_str("\"}\n");
        }
    }
}

/// A worker's side of the log: a buffer it fills and hands over whole.
pub struct WorkerLog {
    pub format: Format,
    buf: RefCell<String>,
    line: RefCell<String>,
    /// `None` once the worker closed its log (see [`WorkerLog::close`]).
    writer: RefCell<Option<SyncSender<LogMessage>>>,
    /// Lines dropped because the writer's queue was full.
    dropped: Cell<u64>,
}

impl WorkerLog {
    pub fn new(format: Format, writer: SyncSender<LogMessage>) -> WorkerLog {
        WorkerLog {
            format,
            buf: RefCell::new(String::with_capacity(FLUSH_BYTES * 2)),
            line: RefCell::new(String::new()),
            writer: RefCell::new(Some(writer)),
            dropped: Cell::new(0),
        }
    }

    /// Lines this worker dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Hands a full buffer to the writer without waiting; a full queue drops it, counted.
    fn hand_over(&self, lines: String) {
        let writer = self.writer.borrow();
        let Some(writer) = writer.as_ref() else { return };
        if let Err(TrySendError::Full(LogMessage::Lines(lost))) =
            writer.try_send(LogMessage::Lines(lines.into_bytes()))
        {
            let n = lost.iter().filter(|&&b| b == b'\n').count() as u64;
            self.dropped.set(self.dropped.get() + n);
        }
    }

    pub fn record(&self, e: &Entry<'_>) {
        let mut line = self.line.borrow_mut();
        line.clear();
        format_entry(&mut line, self.format, e);
        let mut buf = self.buf.borrow_mut();
        buf.push_str(&line);
        if buf.len() >= FLUSH_BYTES {
            let full = std::mem::replace(&mut *buf, String::with_capacity(FLUSH_BYTES * 2));
            drop(buf);
            self.hand_over(full);
        }
    }

    /// Hands over whatever is buffered (the periodic tick, and the drain).
    pub fn flush(&self) {
        let full = std::mem::take(&mut *self.buf.borrow_mut());
        if !full.is_empty() {
            self.hand_over(full);
        }
    }

    /// The worker's last word: hands over what is buffered and lets go of the writer, so that
    /// the writer thread ends (and the process can exit) even if the worker outlives its
    /// thread. It did: a task still holding the worker was not dropped with its monoio
    /// runtime, and the process hung on exit joining the writer, the worker thread gone
    /// (seen with gdb; tests/proxy_protocol.rs, about 1 run in 15 under load, io_uring and
    /// epoll alike).
    pub fn close(&self) {
        self.flush();
        self.writer.borrow_mut().take();
    }
}

enum Sink {
    Stdout(io::Stdout),
    File(File, PathBuf),
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Starts the writer thread; returns the sender workers and the main thread use, and the thread,
/// which ends once every sender is gone and everything sent is written. At most `buffer` bytes
/// of lines (in `FLUSH_BYTES` hand-overs, at least one) wait in the queue.
pub fn start_writer(
    target: &Target,
    buffer: u64,
) -> io::Result<(SyncSender<LogMessage>, std::thread::JoinHandle<()>)> {
    let mut sink = match target {
        Target::Stdout => Sink::Stdout(io::stdout()),
        Target::File(p) => Sink::File(open(p)?, p.clone()),
    };
    let slots = usize::try_from(buffer / FLUSH_BYTES as u64).unwrap_or(usize::MAX).max(1);
    let (tx, rx): (SyncSender<LogMessage>, Receiver<LogMessage>) = mpsc::sync_channel(slots);
    let thread = std::thread::Builder::new().name("apex-access-log".into()).spawn(move || {
        for msg in rx {
            match (msg, &mut sink) {
                (LogMessage::Lines(bytes), Sink::Stdout(out)) => {
                    let _ = out.write_all(&bytes);
                    let _ = out.flush();
                }
                (LogMessage::Lines(bytes), Sink::File(f, _)) => {
                    let _ = f.write_all(&bytes);
                }
                (LogMessage::Reopen, Sink::File(f, path)) => match open(path) {
                    Ok(new) => *f = new,
                    Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log"),
                },
                (LogMessage::Reopen, Sink::Stdout(_)) => {}
            }
        }
    })?;
    Ok((tx, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn entry() -> Entry<'static> {
        Entry {
            time: UNIX_EPOCH + Duration::from_secs(1_795_639_205),
            client: "10.1.2.3:5555".parse().unwrap(),
            method: "GET",
            target: "/a\"b",
            version: "HTTP/1.1",
            status: 200,
            bytes: 42,
            duration: Duration::from_micros(1500),
            upstream: Some("127.0.0.1:9000".parse().unwrap()),
            route: "api",
            referer: "",
            user_agent: "curl/8",
            request_id: "",
            tls: None,
        }
    }

    #[test]
    fn combined_line() {
        let mut s = String::new();
        format_entry(&mut s, Format::Combined, &entry());
        assert_eq!(
            s,
            "10.1.2.3 - - [25/Nov/2026:20:40:05 +0000] \"GET /a\\x22b HTTP/1.1\" 200 42 \"-\" \"curl/8\" rt=0.002 upstream=127.0.0.1:9000 route=api\n"
        );
    }

    #[test]
    fn json_line() {
        let mut s = String::new();
        format_entry(&mut s, Format::Json, &entry());
        assert!(s.starts_with("{\"time\":\"2026-11-25T20:40:05.000Z\",\"client\":\"10.1.2.3\",\"method\":\"GET\",\"target\":\"/a\\\"b\""), "{s}");
        assert!(s.ends_with("\"upstream\":\"127.0.0.1:9000\",\"route\":\"api\",\"referer\":\"\",\"user_agent\":\"curl/8\"}\n"), "{s}");
    }
}
