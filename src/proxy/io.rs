//! The runtime seam: the few operations the proxy loop needs from an async runtime.
//!
//! The proxy loop is written once against these traits; each runtime adapter implements them.
//! Buffers are passed by value (the io_uring model: the kernel owns a buffer while an operation
//! is in flight) and handed back with the result.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// A connected stream on the worker's runtime.
// Futures are !Send on purpose: every connection lives and dies on one worker thread.
#[allow(async_fn_in_trait)]
pub trait Stream: Sized + 'static {
    /// Reads into the spare capacity of `buf` (after its `len`), extending its length.
    /// `Ok(0)` means the peer closed its side. `buf` must have spare capacity.
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);

    /// [`Stream::read`], taking at most `max` bytes however much room `buf` has: a response
    /// head's read must leave a large body in the socket, where it can be spliced. A layer
    /// whose bytes are never spliced (TLS, HTTP/2) may read more.
    async fn read_at_most(&mut self, buf: Vec<u8>, _max: usize) -> (io::Result<usize>, Vec<u8>) {
        self.read(buf).await
    }

    /// Whether [`Stream::readable`] waits without a buffer: then a connection waiting for its
    /// next request holds none (it allocates a small read buffer once bytes have come).
    fn waits_without_buffer(&self) -> bool {
        false
    }

    /// Waits until a read would find bytes or the end of the stream, holding no buffer.
    async fn readable(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);

    /// Sends FIN: no more bytes from us; reading stays possible.
    async fn shutdown_write(&mut self) -> io::Result<()>;

    /// Without blocking: whether the peer has closed or sent bytes nobody asked for. An idle
    /// pooled upstream connection for which this is true must not be reused.
    fn is_stale(&self) -> bool;

    /// The local address of the connection (for a client connection: the address the client
    /// reached, which a PROXY header sent upstream names as the destination).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The stream's two directions, usable at the same time: a tunnel reads from one side
    /// while it writes to the other, and neither operation may be dropped mid-flight (an
    /// io_uring read dropped after the kernel filled it would lose bytes).
    type Read: ReadHalf;
    type Write: WriteHalf;
    fn into_split(self) -> (Self::Read, Self::Write);

    /// The socket, when bytes may move to or from it inside the kernel (`splice(2)`): a
    /// plaintext TCP connection. `None` for a layer that transforms its bytes (TLS, HTTP/2).
    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Runs `op`, a non-blocking system call on [`Stream::splice_fd`], until it no longer fails
    /// with `WouldBlock`, waiting for the socket to be readable (or, `write`, writable) between
    /// tries. The socket is put in non-blocking mode first: `op` must never block the worker.
    async fn nonblocking<T>(
        &mut self,
        _write: bool,
        _op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The reading direction of a split stream; `read` as [`Stream::read`].
#[allow(async_fn_in_trait)]
pub trait ReadHalf: 'static {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
}

/// The writing direction of a split stream.
#[allow(async_fn_in_trait)]
pub trait WriteHalf: 'static {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// Sends FIN: the peer reads end-of-stream; the other direction stays open.
    async fn shutdown_write(&mut self) -> io::Result<()>;
}

/// The worker's runtime.
#[allow(async_fn_in_trait)]
pub trait Runtime: 'static {
    type Stream: Stream;

    async fn connect(addr: SocketAddr) -> io::Result<Self::Stream>;

    /// `None` when `dur` passed before `fut` finished (and `fut` was dropped).
    async fn timeout<F: Future>(dur: Duration, fut: F) -> Option<F::Output>;

    async fn sleep(dur: Duration);

    /// Runs `fut` as a task on the current worker.
    fn spawn(fut: impl Future<Output = ()> + 'static);

    /// A listening socket on this runtime.
    type Listener: 'static;
    fn listener_from_std(l: std::net::TcpListener) -> io::Result<Self::Listener>;
    /// The next connection, or `None` once `stop` finishes first. Stopping never loses a
    /// connection: one the kernel handed over while the accept was being stopped is returned
    /// (and must be served), never dropped unseen.
    async fn accept(
        l: &Self::Listener,
        stop: impl Future<Output = ()>,
    ) -> Option<io::Result<(Self::Stream, SocketAddr)>>;
    /// Stops listening now, not whenever the runtime gets to closing the descriptor: once this
    /// returns, new connections to this socket are refused.
    fn close_listener(l: Self::Listener);

    /// A client connection taken back from the worker's parked table (`park.rs`): a socket
    /// already connected, non-blocking and with its options set.
    fn stream_from_std(s: std::net::TcpStream) -> io::Result<Self::Stream>;

    /// A descriptor whose readability a task can wait for (the worker's epoll set of parked
    /// connections).
    type Poller: 'static;
    fn poller(fd: std::os::fd::OwnedFd) -> io::Result<Self::Poller>;
    /// Waits until `p` is readable. It may return early: the caller checks what is ready.
    async fn poller_wait(p: &Self::Poller) -> io::Result<()>;

    /// The worker's end of its control socket.
    type Control: 'static;
    fn control_from_std(c: std::os::unix::net::UnixStream) -> io::Result<Self::Control>;
    /// Waits for a wake-up byte; `false` once the other end is closed.
    async fn control_wait(c: &mut Self::Control) -> bool;
}

/// Stops a listening socket synchronously: `shutdown(SHUT_RDWR)` on a listener makes the
/// kernel leave the LISTEN state at once, even if closing the descriptor is deferred.
///
/// Not after an upgrade handed the socket to a new process: the socket is shared with it, and a
/// shutdown would stop it there too (resetting the connections queued on it). Closing this
/// process's descriptor is then enough.
pub fn stop_listening(fd: std::os::fd::RawFd) {
    if crate::upgrade::handed_over() {
        return;
    }
    // SAFETY: `fd` is a listening socket owned by the caller; shutdown does not invalidate it.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// A non-blocking check on a raw socket: `MSG_PEEK` sees either EOF, unexpected bytes, or
/// nothing yet (`EAGAIN`, the healthy idle case). Shared by every adapter on Unix.
pub fn socket_is_stale(fd: std::os::fd::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is an open socket owned by the caller for the duration of this call, and the
    // buffer is one valid, writable byte.
    let n = unsafe {
        libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return !matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
    }
    true // 0: closed by the peer; >0: bytes that answer no request
}
