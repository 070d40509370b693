//! Log output that never blocks a worker. tracing's formatter writes each event into a buffer
//! of its own, which goes to a writer thread over a bounded channel; when the channel is full
//! (stderr is a stalled pipe, say) the line is dropped and counted, and the writer later says
//! how many it lost. No lock is taken and nothing waits on the terminal or the journal.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines that may wait for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 4096;
/// How long [`LogWriter::flush`] waits for the writer before giving up (exit must not hang on
/// a stalled stderr).
const FLUSH_WAIT: Duration = Duration::from_secs(2);

enum Message {
    Line(Vec<u8>),
    /// Answer once everything sent before has been written.
    Flush(SyncSender<()>),
}

/// The `MakeWriter` given to tracing; cheap to share between threads (a sender and a counter
/// that is only written when a line is lost).
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl LogWriter {
    /// Starts the writer thread for standard error.
    pub fn stderr() -> io::Result<LogWriter> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name("apex-log".into())
            .spawn(move || write_lines(rx, &counter, &mut io::stderr()))?;
        Ok(LogWriter { tx, dropped })
    }

    /// Waits (boundedly) until every line logged so far is written: before the process exits.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(FLUSH_WAIT);
        }
    }
}

fn write_lines(rx: Receiver<Message>, dropped: &AtomicU64, out: &mut dyn Write) {
    for msg in rx {
        match msg {
            Message::Line(line) => {
                let _ = out.write_all(&line);
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(out, "apex: {lost} log lines dropped: standard error was too slow");
        }
    }
}

/// One event's line, sent when tracing drops the writer.
pub struct LineWriter<'a> {
    buf: Vec<u8>,
    owner: &'a LogWriter,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        if let Err(TrySendError::Full(_)) = self.owner.tx.try_send(Message::Line(line)) {
            self.owner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;
    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter { buf: Vec::with_capacity(256), owner: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = mpsc::sync_channel(2);
        let w = LogWriter { tx, dropped: Arc::new(AtomicU64::new(0)) };
        for i in 0..5 {
            let mut line = w.make_writer();
            let _ = writeln!(line, "line {i}");
        }
        assert_eq!(w.dropped.load(Ordering::Relaxed), 3, "two fit, three were dropped");
        drop(w);
        let mut out = Vec::new();
        write_lines(rx, &AtomicU64::new(3), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("line 0\n"), "{text}");
        assert!(text.contains("apex: 3 log lines dropped"), "{text}");
    }
}
