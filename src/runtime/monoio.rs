//! The monoio adapter: implements the proxy's runtime seam on monoio (io_uring or epoll).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::proxy::io::{socket_is_stale, stop_listening, ReadHalf, Runtime, Stream, WriteHalf};
use crate::proxy::wait::{race, Either};

/// Marker type for the monoio runtime (either driver: the driver is chosen when the worker's
/// runtime is built, and the same futures run on both).
pub struct Monoio;

pub struct MonoioStream {
    s: TcpStream,
    /// `O_NONBLOCK` is set on the socket. On io_uring it is not by default, and system calls
    /// made outside the ring ([`Stream::nonblocking`]) need it: the ring's own operations are
    /// the same with or without it.
    nonblocking: bool,
}

impl MonoioStream {
    fn new(s: TcpStream) -> Self {
        MonoioStream { s, nonblocking: false }
    }
}

thread_local! {
    /// This worker runs monoio's epoll driver (set once, before it starts).
    static EPOLL: Cell<bool> = const { Cell::new(false) };
    /// Socket operations in a row on this worker that finished without waiting.
    static RUN: Cell<u32> = const { Cell::new(0) };
}

/// Called on a worker thread that runs the epoll driver: its socket operations go under the
/// budget. (On io_uring every operation waits for its completion, so the budget would cost
/// without ever yielding: measured 1–5% CPU per request at 64 B.)
pub fn on_epoll_driver() {
    EPOLL.set(true);
}

/// Operations that may finish without waiting before the running task yields once. monoio has
/// no cooperative budget (Tokio's does this), and on the epoll driver an operation on a socket
/// that is always readable and writable finishes at once: one client pipelining requests (or
/// flooding HTTP/2 frames) while reading the answers would keep the worker to itself, and no
/// other connection would be accepted or served. On io_uring every operation waits for its
/// completion, so the run never grows there.
const BUDGET: u32 = 64;

/// A socket operation under the worker's budget (on the epoll driver): it yields once first
/// when the operations before it ran over the budget without waiting, and counts whether it
/// had to wait. A plain struct rather than an `async fn`, so the operation is stored once
/// (an idle connection's task waits inside one of these).
struct Budgeted<F> {
    op: F,
    checked: bool,
    waited: bool,
}

fn budgeted<F: Future>(op: F) -> Budgeted<F> {
    Budgeted { op, checked: false, waited: false }
}

impl<F: Future> Future for Budgeted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `op` is never moved out of `self` (it is only polled in place), and the two
        // flags are plain data, not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        if !this.checked {
            this.checked = true;
            if EPOLL.get() && RUN.get() >= BUDGET {
                RUN.set(0);
                yield_once(cx);
                return Poll::Pending;
            }
        }
        // SAFETY: as above, `op` stays where it is.
        let op = unsafe { Pin::new_unchecked(&mut this.op) };
        match op.poll(cx) {
            Poll::Pending => {
                this.waited = true;
                Poll::Pending
            }
            Poll::Ready(out) => {
                RUN.set(if this.waited { 0 } else { RUN.get() + 1 });
                Poll::Ready(out)
            }
        }
    }
}

/// Arranges for the task of `cx` to run again after the worker's other ready tasks (and its
/// poller). A task that wakes itself goes back to the front of monoio's run queue (it would
/// run again at once); woken by another task it goes to the back: so a one-line task wakes it.
fn yield_once(cx: &Context<'_>) {
    let waker = cx.waker().clone();
    monoio::spawn(async move { waker.wake() });
}

impl Stream for MonoioStream {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = budgeted(self.s.read(buf.slice_mut(len..cap))).await;
        (res, slice.into_inner())
    }

    async fn read_at_most(&mut self, buf: Vec<u8>, max: usize) -> (io::Result<usize>, Vec<u8>) {
        let len = buf.len();
        let end = buf.capacity().min(len + max);
        let (res, slice) = budgeted(self.s.read(buf.slice_mut(len..end))).await;
        (res, slice.into_inner())
    }

    fn waits_without_buffer(&self) -> bool {
        true
    }

    /// io_uring: a poll operation (no buffer). epoll: the driver's readiness state, checked
    /// with one `poll(2)` first. Not relaxed: after a read that took a whole request the
    /// driver still remembers the socket as readable, and a relaxed wait returned at once,
    /// so the connection went on to wait in a read, holding a buffer (and never parked).
    async fn readable(&mut self) -> io::Result<()> {
        self.s.readable(false).await
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = budgeted(AsyncWriteRentExt::write_all(&mut self.s, buf)).await;
        (res.map(|_| ()), buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        AsyncWriteRent::shutdown(&mut self.s).await
    }

    fn is_stale(&self) -> bool {
        socket_is_stale(self.s.as_raw_fd())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.s.local_addr()
    }

    type Read = MonoioRead;
    type Write = MonoioWrite;
    fn into_split(self) -> (MonoioRead, MonoioWrite) {
        // monoio's split shares the socket through an `Rc`: both halves stay on this worker.
        let (r, w) = self.s.into_split();
        (MonoioRead(r), MonoioWrite(w))
    }

    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.s.as_raw_fd())
    }

    async fn nonblocking<T>(
        &mut self,
        write: bool,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        if !self.nonblocking {
            set_nonblocking(self.s.as_raw_fd())?;
            self.nonblocking = true;
        }
        loop {
            match op() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            // Not relaxed: on the epoll driver the readiness monoio remembers may be stale
            // after `op` found the socket not ready, so it polls once before waiting. On
            // io_uring this is one poll operation on the ring.
            if write {
                self.s.writable(false).await?;
            } else {
                self.s.readable(false).await?;
            }
        }
    }
}

pub struct MonoioRead(OwnedReadHalf<TcpStream>);
pub struct MonoioWrite(OwnedWriteHalf<TcpStream>);

impl ReadHalf for MonoioRead {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = budgeted(self.0.read(buf.slice_mut(len..cap))).await;
        (res, slice.into_inner())
    }
}

impl WriteHalf for MonoioWrite {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = budgeted(AsyncWriteRentExt::write_all(&mut self.0, buf)).await;
        (res.map(|_| ()), buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        AsyncWriteRent::shutdown(&mut self.0).await
    }
}

/// Sets `O_NONBLOCK` on `fd`: a system call on it then fails with `WouldBlock` instead of
/// blocking the worker thread.
fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller; F_GETFL/F_SETFL only read and change
    // its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Runtime for Monoio {
    type Stream = MonoioStream;

    async fn connect(addr: SocketAddr) -> io::Result<MonoioStream> {
        let s = TcpStream::connect_addr(addr).await?;
        // Heads and small bodies go out in one write each; Nagle would only delay them.
        s.set_nodelay(true)?;
        Ok(MonoioStream::new(s))
    }

    async fn timeout<F: Future>(dur: Duration, fut: F) -> Option<F::Output> {
        monoio::time::timeout(dur, fut).await.ok()
    }

    async fn sleep(dur: Duration) {
        monoio::time::sleep(dur).await
    }

    fn spawn(fut: impl Future<Output = ()> + 'static) {
        monoio::spawn(fut);
    }

    type Listener = monoio::net::TcpListener;

    fn listener_from_std(l: std::net::TcpListener) -> io::Result<Self::Listener> {
        monoio::net::TcpListener::from_std(l)
    }

    async fn accept(
        l: &Self::Listener,
        stop: impl Future<Output = ()>,
    ) -> Option<io::Result<(MonoioStream, SocketAddr)>> {
        // Dropping an io_uring accept in flight would lose a connection the kernel completed
        // meanwhile (monoio discards an abandoned operation's result: the new socket would
        // stay open, unserved, until the process exits). So a stop cancels the operation and
        // waits for its completion: ECANCELED, or a connection that must be served.
        let canceller = monoio::io::Canceller::new();
        let mut accept = std::pin::pin!(l.cancelable_accept(canceller.handle()));
        let result = match race(accept.as_mut(), stop).await {
            Either::Left(r) => r,
            Either::Right(()) => {
                let _ = canceller.cancel();
                match accept.await {
                    Ok(c) => Ok(c),
                    Err(_) => return None,
                }
            }
        };
        Some(result.map(|(s, peer)| {
            // Heads and small bodies go out in one write each; Nagle would only delay them.
            let _ = s.set_nodelay(true);
            (MonoioStream::new(s), peer)
        }))
    }

    fn close_listener(l: Self::Listener) {
        stop_listening(l.as_raw_fd());
    }

    fn stream_from_std(s: std::net::TcpStream) -> io::Result<MonoioStream> {
        // `nonblocking: false` even if the socket has O_NONBLOCK from its earlier life: the
        // flag only saves an fcntl, and setting it again is harmless.
        TcpStream::from_std(s).map(MonoioStream::new)
    }

    /// monoio has no readiness wait for an arbitrary descriptor; its `TcpStream` over the
    /// epoll set gives one (a poll operation on io_uring, the driver's readiness on epoll)
    /// and nothing else of it is used: no address of it is ever asked, nothing read or written.
    type Poller = TcpStream;

    fn poller(fd: std::os::fd::OwnedFd) -> io::Result<TcpStream> {
        TcpStream::from_std(std::net::TcpStream::from(fd))
    }

    async fn poller_wait(p: &TcpStream) -> io::Result<()> {
        // Not relaxed: on the epoll driver, readiness remembered from an earlier wake-up may
        // be stale once the set was emptied; this checks it with one poll first.
        p.readable(false).await
    }

    type Control = monoio::net::UnixStream;

    fn control_from_std(c: std::os::unix::net::UnixStream) -> io::Result<Self::Control> {
        monoio::net::UnixStream::from_std(c)
    }

    async fn control_wait(c: &mut Self::Control) -> bool {
        let (res, _) = c.read(Vec::with_capacity(64)).await;
        matches!(res, Ok(n) if n > 0)
    }
}
