//! The monoio adapter: implements the proxy's runtime seam on monoio (io_uring or epoll).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
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

impl Stream for MonoioStream {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let len = buf.len();
        let cap = buf.capacity();
        let (res, slice) = self.0.read(buf.slice_mut(len..cap)).await;
        (res, slice.into_inner())
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = AsyncWriteRentExt::write_all(&mut self.0, buf).await;
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
        let (res, slice) = self.0.read(buf.slice_mut(len..cap)).await;
        (res, slice.into_inner())
    }
}

impl WriteHalf for MonoioWrite {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let (res, buf) = AsyncWriteRentExt::write_all(&mut self.0, buf).await;
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
