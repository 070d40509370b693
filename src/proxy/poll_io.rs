//! A poll-style (`AsyncRead`/`AsyncWrite`) view of an Apex stream, for the `h2` crate.
//!
//! Apex's streams take owned buffers (io_uring owns a buffer while a read is in flight), while
//! `h2` polls with borrowed ones. The adapter owns one read buffer and the write queue and
//! keeps at most one operation in flight per direction: the stream's half moves into the
//! boxed operation and comes back with its result, so an operation is never dropped
//! mid-flight and no byte the kernel delivered is lost. Shared by every runtime (a TLS stream
//! is an Apex stream too).
//!
//! Writes are batched per poll of the connection. `h2` flushes after every DATA frame of 1 KiB
//! or more (it hands such a payload over without copying it into its own buffer, and must see
//! it written before it encodes the next frame). Had each flush been a write, a connection
//! would send one TLS record and make one system call per frame: measured with 64 clients x
//! 10 streams of 4 KiB responses, about one send and one receive per request on io_uring,
//! against 0.1 each at 64 B. So a flush only queues: the connection's task sends what was
//! queued once `h2` has done all it can in that poll ([`Sender::send_queued`]), while `h2`
//! goes on queuing behind a write in flight. `poll_shutdown` writes everything.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ReadHalf, Stream, WriteHalf};
use crate::http::h2_guard::{Flood, FrameGuard};

/// Bytes asked of the stream per read.
const READ_SIZE: usize = 16 * 1024;
/// Bytes `h2` may queue while a write is in flight (so at most twice this is held per
/// connection): beyond it, `h2`'s writes wait for the write in flight.
const WRITE_HIGH: usize = 64 * 1024;

type ReadOp<R> = Pin<Box<dyn Future<Output = (R, io::Result<usize>, Vec<u8>)>>>;
type WriteOp<W> = Pin<Box<dyn Future<Output = (W, io::Result<()>, Vec<u8>)>>>;

enum ReadSide<R> {
    /// `buf[pos..]` is read and not yet handed out.
    Idle {
        half: R,
        buf: Vec<u8>,
        pos: usize,
    },
    Busy(ReadOp<R>),
    /// Only while switching states.
    Gone,
}

enum WriteSide<W> {
    Idle(W),
    Writing(WriteOp<W>),
    ShuttingDown(WriteOp<W>),
    /// FIN sent: nothing more goes out.
    Shut,
    /// Only while switching states.
    Gone,
}

/// The writing direction, shared by the adapter (which `h2` writes into) and the connection's
/// task (which sends the queue after each poll). Borrowed only within a poll.
struct Outbox<W> {
    side: WriteSide<W>,
    /// Bytes accepted from `h2` and not yet handed to a write.
    queued: Vec<u8>,
    /// The buffer of the last finished write, emptied, for the next queue.
    spare: Vec<u8>,
    /// A write failed: every later write fails the same way.
    failed: Option<io::ErrorKind>,
}

impl<W: WriteHalf> Outbox<W> {
    /// Drives the operation in flight; `Ready` once none is (its result recorded).
    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let op = match &mut self.side {
            WriteSide::Writing(op) | WriteSide::ShuttingDown(op) => op,
            _ => return Poll::Ready(()),
        };
        let (half, res, mut buf) = std::task::ready!(op.as_mut().poll(cx));
        self.side = match self.side {
            WriteSide::ShuttingDown(_) => WriteSide::Shut,
            _ => {
                buf.clear();
                if self.spare.capacity() == 0 {
                    self.spare = buf;
                }
                WriteSide::Idle(half)
            }
        };
        if let Err(e) = res {
            self.failed = Some(e.kind());
        }
        Poll::Ready(())
    }

    /// Hands the queue to a write, if nothing is in flight and there is a queue.
    fn start_write(&mut self) -> bool {
        if self.queued.is_empty() || !matches!(self.side, WriteSide::Idle(_)) {
            return false;
        }
        let WriteSide::Idle(mut half) = std::mem::replace(&mut self.side, WriteSide::Gone) else {
            unreachable!("checked above")
        };
        let buf = std::mem::replace(&mut self.queued, std::mem::take(&mut self.spare));
        self.side = WriteSide::Writing(Box::pin(async move {
            let (res, buf) = half.write_all(buf).await;
            (half, res, buf)
        }));
        true
    }

    fn check(&self) -> io::Result<()> {
        match (self.failed, &self.side) {
            (Some(kind), _) => Err(kind.into()),
            (None, WriteSide::Gone | WriteSide::Shut | WriteSide::ShuttingDown(_)) => {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            _ => Ok(()),
        }
    }

    /// Sends the queue without waiting for the write to finish: starts a write if none is in
    /// flight, and polls it (so its end wakes the task).
    fn send(&mut self, cx: &mut Context<'_>) {
        loop {
            if self.poll_op(cx).is_pending() {
                return;
            }
            if self.failed.is_some() {
                // `h2` learns of it at its next write or flush: have it polled again.
                cx.waker().wake_by_ref();
                return;
            }
            if !self.start_write() {
                return;
            }
        }
    }

    /// Writes everything queued, waiting for it.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.poll_op(cx));
            self.check()?;
            if !self.start_write() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The connection task's handle on an adapter's writes: see [`Sender::send_queued`].
pub struct Sender<W>(Rc<RefCell<Outbox<W>>>);

impl<W: WriteHalf> Sender<W> {
    /// Sends what `h2` queued: called by the connection's task after each poll of the `h2`
    /// connection (accept, handshake), so a poll's frames leave in one write.
    pub fn send_queued(&self, cx: &mut Context<'_>) {
        self.0.borrow_mut().send(cx);
    }
}

pub struct PollIo<S: Stream> {
    read: ReadSide<S::Read>,
    write: Rc<RefCell<Outbox<S::Write>>>,
    watch: Watch,
}

/// Watches the frames the client sends before `h2` sees them (see `http::h2_guard`).
pub struct Watch {
    frames: FrameGuard,
    /// Bytes of the connection preface still to pass before frames start.
    preface: usize,
    /// Set when a limit was crossed: from then on nothing more is handed to `h2`, and the
    /// connection's task answers GOAWAY ENHANCE_YOUR_CALM.
    tripped: Rc<Cell<Option<Flood>>>,
    /// When the header block being received began (the guard's view, after each read).
    block_since: Rc<Cell<Option<Instant>>>,
}

/// What the connection's task reads of a [`Watch`]: a flood, and an open header block.
pub struct Watched {
    pub tripped: Rc<Cell<Option<Flood>>>,
    pub block_since: Rc<Cell<Option<Instant>>>,
}

impl Watch {
    pub fn new(frames: FrameGuard, preface: usize) -> (Watch, Watched) {
        let tripped = Rc::new(Cell::new(None));
        let block_since = Rc::new(Cell::new(None));
        let w = Watch {
            frames,
            preface,
            tripped: Rc::clone(&tripped),
            block_since: Rc::clone(&block_since),
        };
        (w, Watched { tripped, block_since })
    }

    fn see(&mut self, mut bytes: &[u8]) -> Result<(), Flood> {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        let seen = self.frames.feed(bytes, crate::clock::now());
        self.block_since.set(self.frames.header_block_since());
        seen
    }
}

// No field is ever pinned in place: the operations are boxed, the halves moved by value.
impl<S: Stream> Unpin for PollIo<S> {}

impl<S: Stream> PollIo<S> {
    /// Wraps `stream`; `already_read` are bytes read from it before (a preface sniffed to
    /// choose the protocol), handed out first; `watch` sees every byte before `h2` does. The
    /// [`Sender`] must send the queue after every poll of whatever writes through the adapter.
    pub fn new(stream: S, already_read: Vec<u8>, watch: Watch) -> (PollIo<S>, Sender<S::Write>) {
        let (r, w) = stream.into_split();
        let outbox = Rc::new(RefCell::new(Outbox {
            side: WriteSide::Idle(w),
            queued: Vec::new(),
            spare: Vec::new(),
            failed: None,
        }));
        let io = PollIo {
            read: ReadSide::Idle { half: r, buf: already_read, pos: 0 },
            write: Rc::clone(&outbox),
            watch,
        };
        (io, Sender(outbox))
    }
}

impl<S: Stream> AsyncRead for PollIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.watch.tripped.get().is_some() {
            // The connection is being closed for a flood: nothing more from the client.
            return Poll::Pending;
        }
        loop {
            let this = &mut *self;
            match &mut this.read {
                ReadSide::Idle { buf, pos, .. } if *pos < buf.len() => {
                    let n = out.remaining().min(buf.len() - *pos);
                    let bytes = &buf[*pos..*pos + n];
                    if let Err(flood) = this.watch.see(bytes) {
                        // The connection's task sees this at once and sends GOAWAY.
                        this.watch.tripped.set(Some(flood));
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    out.put_slice(bytes);
                    *pos += n;
                    return Poll::Ready(Ok(()));
                }
                ReadSide::Idle { .. } => {
                    let ReadSide::Idle { mut half, mut buf, .. } =
                        std::mem::replace(&mut self.read, ReadSide::Gone)
                    else {
                        unreachable!()
                    };
                    buf.clear();
                    buf.reserve(READ_SIZE);
                    self.read = ReadSide::Busy(Box::pin(async move {
                        let (res, buf) = half.read(buf).await;
                        (half, res, buf)
                    }));
                }
                ReadSide::Busy(op) => {
                    let (half, res, buf) = std::task::ready!(op.as_mut().poll(cx));
                    self.read = ReadSide::Idle { half, buf, pos: 0 };
                    match res {
                        // End of stream: nothing put into `out`.
                        Ok(0) => return Poll::Ready(Ok(())),
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                ReadSide::Gone => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }
}

impl<S: Stream> AsyncWrite for PollIo<S> {
    /// Queues; waits only when the queue is full and a write is in flight.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut out = self.write.borrow_mut();
        loop {
            out.check()?;
            if out.queued.len() < WRITE_HIGH {
                let n = data.len().min(WRITE_HIGH - out.queued.len());
                out.queued.extend_from_slice(&data[..n]);
                return Poll::Ready(Ok(n));
            }
            std::task::ready!(out.poll_op(cx));
            out.check()?;
            out.start_write();
        }
    }

    /// Reports a failed write and drives the one in flight, but does not wait for the queue to
    /// be written: the connection's task sends it after this poll ([`Sender::send_queued`]).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.write.borrow_mut();
        let _ = out.poll_op(cx);
        Poll::Ready(out.check())
    }

    /// Writes everything queued, then sends FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.write.borrow_mut();
        loop {
            let queued = !out.queued.is_empty();
            match &out.side {
                WriteSide::Shut => return Poll::Ready(Ok(())),
                WriteSide::Gone => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                WriteSide::ShuttingDown(_) => {
                    std::task::ready!(out.poll_op(cx));
                    if let Some(kind) = out.failed {
                        return Poll::Ready(Err(kind.into()));
                    }
                }
                WriteSide::Writing(_) => std::task::ready!(out.poll_written(cx))?,
                WriteSide::Idle(_) if queued => std::task::ready!(out.poll_written(cx))?,
                WriteSide::Idle(_) => {
                    let WriteSide::Idle(mut half) =
                        std::mem::replace(&mut out.side, WriteSide::Gone)
                    else {
                        unreachable!()
                    };
                    let buf = std::mem::take(&mut out.spare);
                    out.side = WriteSide::ShuttingDown(Box::pin(async move {
                        let res = half.shutdown_write().await;
                        (half, res, buf)
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::task::Waker;

    /// What the fake stream saw written, in order; `None` is a FIN.
    type Log = Rc<RefCell<Vec<Option<Vec<u8>>>>>;

    /// A stream whose writes are recorded. While `hold` is set a write stays in flight; `fail`
    /// makes writes fail.
    struct Fake {
        log: Log,
        hold: Rc<Cell<bool>>,
        fail: Rc<Cell<bool>>,
    }

    struct FakeRead;
    struct FakeWrite(Fake);

    impl ReadHalf for FakeRead {
        async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            std::future::pending::<()>().await;
            (Ok(0), buf)
        }
    }

    impl WriteHalf for FakeWrite {
        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            let hold = Rc::clone(&self.0.hold);
            std::future::poll_fn(|_| if hold.get() { Poll::Pending } else { Poll::Ready(()) })
                .await;
            if self.0.fail.get() {
                return (Err(io::ErrorKind::ConnectionReset.into()), buf);
            }
            self.0.log.borrow_mut().push(Some(buf.clone()));
            (Ok(()), buf)
        }

        async fn shutdown_write(&mut self) -> io::Result<()> {
            self.0.log.borrow_mut().push(None);
            Ok(())
        }
    }

    impl Stream for Fake {
        async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
            (Ok(0), buf)
        }
        async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
            (Ok(()), buf)
        }
        async fn shutdown_write(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn is_stale(&self) -> bool {
            false
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Err(io::ErrorKind::NotConnected.into())
        }
        type Read = FakeRead;
        type Write = FakeWrite;
        fn into_split(self) -> (FakeRead, FakeWrite) {
            (FakeRead, FakeWrite(self))
        }
    }

    struct Setup {
        io: PollIo<Fake>,
        sender: Sender<FakeWrite>,
        log: Log,
        hold: Rc<Cell<bool>>,
        fail: Rc<Cell<bool>>,
    }

    fn setup() -> Setup {
        let (log, hold, fail) = (Log::default(), Rc::default(), Rc::default());
        let fake = Fake { log: Rc::clone(&log), hold: Rc::clone(&hold), fail: Rc::clone(&fail) };
        let (watch, _) = Watch::new(FrameGuard::new(crate::config::defaults::HTTP2.floods), 0);
        let (io, sender) = PollIo::new(fake, Vec::new(), watch);
        Setup { io, sender, log, hold, fail }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn write(io: &mut PollIo<Fake>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(io).poll_write(&mut cx(), bytes)
    }

    fn flush(io: &mut PollIo<Fake>) -> Poll<io::Result<()>> {
        Pin::new(io).poll_flush(&mut cx())
    }

    fn written(log: &Log) -> Vec<Option<Vec<u8>>> {
        log.borrow().clone()
    }

    #[test]
    fn what_a_poll_wrote_and_flushed_leaves_in_one_write_once_sent() {
        let mut s = setup();
        for frame in [&b"HEADERS"[..], b"DATA-1", b"DATA-2"] {
            assert!(matches!(write(&mut s.io, frame), Poll::Ready(Ok(n)) if n == frame.len()));
            // h2 flushes after each DATA frame it hands over whole: that must not write yet.
            assert!(matches!(flush(&mut s.io), Poll::Ready(Ok(()))));
        }
        assert!(written(&s.log).is_empty(), "a flush wrote before the poll ended");
        s.sender.send_queued(&mut cx());
        assert_eq!(written(&s.log), vec![Some(b"HEADERSDATA-1DATA-2".to_vec())]);
    }

    #[test]
    fn frames_queue_behind_a_write_in_flight_up_to_the_bound() {
        let mut s = setup();
        s.hold.set(true);
        assert!(write(&mut s.io, b"first").is_ready());
        s.sender.send_queued(&mut cx()); // in flight, held
        assert!(matches!(write(&mut s.io, b"second"), Poll::Ready(Ok(6))));
        let big = vec![b'x'; WRITE_HIGH];
        assert!(matches!(write(&mut s.io, &big), Poll::Ready(Ok(n)) if n == WRITE_HIGH - 6));
        // The queue is full and the write in flight has not finished: h2 must wait.
        assert!(write(&mut s.io, b"more").is_pending());
        assert!(written(&s.log).is_empty());
        s.hold.set(false);
        s.sender.send_queued(&mut cx());
        let log = written(&s.log);
        assert_eq!(log.len(), 2, "the first write, then the whole queue in one");
        assert_eq!(log[0].as_deref(), Some(&b"first"[..]));
        assert_eq!(log[1].as_ref().map(Vec::len), Some(WRITE_HIGH));
    }

    #[test]
    fn shutdown_writes_everything_queued_before_the_fin() {
        let mut s = setup();
        assert!(write(&mut s.io, b"GOAWAY").is_ready());
        assert!(flush(&mut s.io).is_ready());
        assert!(matches!(Pin::new(&mut s.io).poll_shutdown(&mut cx()), Poll::Ready(Ok(()))));
        assert_eq!(written(&s.log), vec![Some(b"GOAWAY".to_vec()), None]);
    }

    #[test]
    fn a_failed_write_fails_the_next_write_and_flush() {
        let mut s = setup();
        s.fail.set(true);
        assert!(write(&mut s.io, b"DATA").is_ready());
        s.sender.send_queued(&mut cx());
        assert!(matches!(flush(&mut s.io), Poll::Ready(Err(_))));
        assert!(matches!(write(&mut s.io, b"DATA"), Poll::Ready(Err(_))));
    }
}
