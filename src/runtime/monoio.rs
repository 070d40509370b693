//! The monoio adapter: implements the proxy's runtime seam on monoio (io_uring or epoll).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::proxy::io::{socket_is_stale, stop_listening, ReadHalf, Runtime, Stream, WriteHalf};

/// Marker type for the monoio runtime (either driver: the driver is chosen when the worker's
/// runtime is built, and the same futures run on both).
pub struct Monoio;

pub struct MonoioStream(pub TcpStream);

thread_local! {
    /// Socket operations in a row on this worker that finished without waiting.
    static RUN: Cell<u32> = const { Cell::new(0) };
}

/// Operations that may finish without waiting before the running task yields once. monoio has
/// no cooperative budget (Tokio's does this), and on the epoll driver an operation on a socket
/// that is always readable and writable finishes at once: one client pipelining requests (or
/// flooding HTTP/2 frames) while reading the answers would keep the worker to itself, and no
/// other connection would be accepted or served. On io_uring every operation waits for its
/// completion, so the run never grows there.
const BUDGET: u32 = 64;

/// Runs a socket operation under the worker's budget.
async fn budgeted<F: Future>(op: F) -> F::Output {
    let mut op = pin!(op);
    let mut waited = false;
    let out = poll_fn(|cx| {
        let p = op.as_mut().poll(cx);
        waited |= p.is_pending();
        p
    })
    .await;
    let run = if waited { 0 } else { RUN.get() + 1 };
    if run >= BUDGET {
        RUN.set(0);
        yield_now().await;
    } else {
        RUN.set(run);
    }
    out
}

/// Lets the worker's other ready tasks (and its poller) run before this one goes on. A task
/// that wakes itself is put back at the front of monoio's run queue (it would run again at
/// once); woken by another task, it goes to the back: so a one-line task does the waking.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        Poll::Pending
    })
    .await
}

impl Stream for MonoioStream {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = budgeted(self.0.read(buf.slice_mut(len..cap))).await;
        (res, slice.into_inner())
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = budgeted(AsyncWriteRentExt::write_all(&mut self.0, buf)).await;
        (res.map(|_| ()), buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        AsyncWriteRent::shutdown(&mut self.0).await
    }

    fn is_stale(&self) -> bool {
        socket_is_stale(self.0.as_raw_fd())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    type Read = MonoioRead;
    type Write = MonoioWrite;
    fn into_split(self) -> (MonoioRead, MonoioWrite) {
        // monoio's split shares the socket through an `Rc`: both halves stay on this worker.
        let (r, w) = self.0.into_split();
        (MonoioRead(r), MonoioWrite(w))
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

impl Runtime for Monoio {
    type Stream = MonoioStream;

    async fn connect(addr: SocketAddr) -> io::Result<MonoioStream> {
        let s = TcpStream::connect_addr(addr).await?;
        // Heads and small bodies go out in one write each; Nagle would only delay them.
        s.set_nodelay(true)?;
        Ok(MonoioStream(s))
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

    async fn accept(l: &Self::Listener) -> io::Result<(MonoioStream, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        // Heads and small bodies go out in one write each; Nagle would only delay them.
        let _ = s.set_nodelay(true);
        Ok((MonoioStream(s), peer))
    }

    fn close_listener(l: Self::Listener) {
        stop_listening(l.as_raw_fd());
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
