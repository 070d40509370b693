//! The Tokio adapter: the same proxy on one current-thread Tokio runtime per pinned core, for
//! measuring what io_uring buys against epoll-through-Tokio. Never a multi-thread runtime.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::proxy::io::{socket_is_stale, stop_listening, ReadHalf, Runtime, Stream, WriteHalf};
use crate::proxy::wait::{race, Either};

/// Marker type for the Tokio runtime; tasks are spawned on the worker's `LocalSet`.
pub struct Tokio;

pub struct TokioStream(pub TcpStream);

impl Stream for TokioStream {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        // `read_buf` fills the spare capacity and extends the length, like the io_uring path.
        let res = self.0.read_buf(&mut buf).await;
        (res, buf)
    }

    async fn read_at_most(&mut self, mut buf: Vec<u8>, max: usize) -> (io::Result<usize>, Vec<u8>) {
        let res = self.0.read_buf(&mut (&mut buf).limit(max)).await;
        (res, buf)
    }

    fn waits_without_buffer(&self) -> bool {
        true
    }

    /// Tokio's readiness: no system call when the socket is not ready yet.
    async fn readable(&mut self) -> io::Result<()> {
        self.0.readable().await
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let res = self.0.write_all(&buf).await;
        (res, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }

    fn is_stale(&self) -> bool {
        socket_is_stale(self.0.as_raw_fd())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    type Read = TokioRead;
    type Write = TokioWrite;
    fn into_split(self) -> (TokioRead, TokioWrite) {
        let (r, w) = self.0.into_split();
        (TokioRead(r), TokioWrite(w))
    }

    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.0.as_raw_fd())
    }

    async fn nonblocking<T>(
        &mut self,
        write: bool,
        op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        // Tokio's sockets are non-blocking already; `async_io` clears the readiness it
        // remembers when `op` finds the socket not ready, then waits for the next event.
        let interest = if write { Interest::WRITABLE } else { Interest::READABLE };
        self.0.async_io(interest, op).await
    }
}

pub struct TokioRead(tokio::net::tcp::OwnedReadHalf);
pub struct TokioWrite(tokio::net::tcp::OwnedWriteHalf);

impl ReadHalf for TokioRead {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let res = self.0.read_buf(&mut buf).await;
        (res, buf)
    }
}

impl WriteHalf for TokioWrite {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let res = self.0.write_all(&buf).await;
        (res, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

impl Runtime for Tokio {
    type Stream = TokioStream;

    async fn connect(addr: SocketAddr) -> io::Result<TokioStream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(TokioStream(s))
    }

    async fn timeout<F: Future>(dur: Duration, fut: F) -> Option<F::Output> {
        tokio::time::timeout(dur, fut).await.ok()
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await
    }

    fn spawn(fut: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(fut);
    }

    type Listener = TcpListener;

    fn listener_from_std(l: std::net::TcpListener) -> io::Result<TcpListener> {
        TcpListener::from_std(l)
    }

    async fn accept(
        l: &TcpListener,
        stop: impl Future<Output = ()>,
    ) -> Option<io::Result<(TokioStream, SocketAddr)>> {
        // Tokio's accept is readiness-based and cancel-safe: dropping it takes no connection.
        let (s, peer) = match race(l.accept(), stop).await {
            Either::Left(r) => match r {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            },
            Either::Right(()) => return None,
        };
        let _ = s.set_nodelay(true);
        Some(Ok((TokioStream(s), peer)))
    }

    fn close_listener(l: TcpListener) {
        stop_listening(l.as_raw_fd());
    }

    fn stream_from_std(s: std::net::TcpStream) -> io::Result<TokioStream> {
        TcpStream::from_std(s).map(TokioStream)
    }

    type Poller = tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>;

    fn poller(fd: std::os::fd::OwnedFd) -> io::Result<Self::Poller> {
        // SAFETY: an `OwnedFd` is open and keeps the same descriptor until it is dropped,
        // which only the `AsyncFd` that owns it does.
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)
    }

    /// Tokio's registration is edge-triggered: the readiness is cleared here, before the
    /// caller empties the set, so that anything ready after that makes a new edge.
    async fn poller_wait(p: &Self::Poller) -> io::Result<()> {
        p.readable().await?.clear_ready();
        Ok(())
    }

    type Control = UnixStream;

    fn control_from_std(c: std::os::unix::net::UnixStream) -> io::Result<UnixStream> {
        UnixStream::from_std(c)
    }

    async fn control_wait(c: &mut UnixStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(c.read(&mut buf).await, Ok(n) if n > 0)
    }
}

/// Builds the worker's runtime: current-thread, so the worker stays one pinned thread.
pub fn build() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()
}

/// Runs `fut` to completion on `rt`, with a `LocalSet` so tasks may be `!Send`.
pub fn block_on(rt: &tokio::runtime::Runtime, fut: impl Future<Output = ()>) {
    let local = tokio::task::LocalSet::new();
    local.block_on(rt, fut);
}
