//! A connection as the proxy loop sees it, on either side: plaintext, or TLS over the same
//! runtime stream. One type for both, so the journey (downstream → forward → relay, tunnels,
//! the upstream pool) is written once; TLS is a layer under the seam, not a fork of the loop.

use std::io;
use std::net::SocketAddr;

use super::http2::{H2Stream, NoHalf};
use super::io::{ReadHalf, Stream, WriteHalf};
use crate::tls::{TlsRead, TlsStream, TlsWrite};

pub enum Transport<S: Stream> {
    Plain(S),
    /// Boxed: the TLS state is large and only TLS listeners pay for it.
    Tls(Box<TlsStream<S>>),
    /// One HTTP/2 stream of a client connection, read and written as HTTP/1.1.
    H2(Box<H2Stream>, &'static str),
}

impl<S: Stream> Transport<S> {
    /// `https` over TLS, else `http`: what X-Forwarded-Proto says.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Plain(_) => "http",
            Transport::Tls(_) => "https",
            Transport::H2(_, scheme) => scheme,
        }
    }
}

// The TLS branches' futures are boxed: unboxed, every plaintext connection's task would be as
// large as a TLS read (an async fn's future is as large as its largest branch), and an idle
// keep-alive connection waits inside a read.
impl<S: Stream> Stream for Transport<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Transport::Plain(s) => s.read(buf).await,
            Transport::Tls(s) => Box::pin(s.read(buf)).await,
            Transport::H2(s, _) => Box::pin(s.read(buf)).await,
        }
    }

    /// Plaintext only: the other layers' bytes are never spliced.
    async fn read_at_most(&mut self, buf: Vec<u8>, max: usize) -> (io::Result<usize>, Vec<u8>) {
        match self {
            Transport::Plain(s) => s.read_at_most(buf, max).await,
            _ => self.read(buf).await,
        }
    }

    /// Plaintext only: TLS keeps its record buffers anyway, and an h2 stream never waits for a
    /// second request.
    fn waits_without_buffer(&self) -> bool {
        matches!(self, Transport::Plain(s) if s.waits_without_buffer())
    }

    async fn readable(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.readable().await,
            _ => Ok(()),
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Transport::Plain(s) => s.write_all(buf).await,
            Transport::Tls(s) => Box::pin(s.write_all(buf)).await,
            Transport::H2(s, _) => Box::pin(s.write_all(buf)).await,
        }
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.shutdown_write().await,
            Transport::Tls(s) => Box::pin(s.shutdown_write()).await,
            Transport::H2(s, _) => Box::pin(s.shutdown_write()).await,
        }
    }

    fn is_stale(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_stale(),
            Transport::Tls(s) => s.is_stale(),
            Transport::H2(s, _) => s.is_stale(),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Transport::Plain(s) => s.local_addr(),
            Transport::Tls(s) => s.local_addr(),
            Transport::H2(s, _) => s.local_addr(),
        }
    }

    type Read = TransportRead<S>;
    type Write = TransportWrite<S>;
    fn into_split(self) -> (TransportRead<S>, TransportWrite<S>) {
        match self {
            Transport::Plain(s) => {
                let (r, w) = s.into_split();
                (TransportRead::Plain(r), TransportWrite::Plain(w))
            }
            Transport::Tls(s) => {
                let (r, w) = s.into_split();
                (TransportRead::Tls(r), TransportWrite::Tls(w))
            }
            Transport::H2(..) => (TransportRead::None(NoHalf), TransportWrite::None(NoHalf)),
        }
    }

    fn splice_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Transport::Plain(s) => s.splice_fd(),
            Transport::Tls(_) | Transport::H2(..) => None,
        }
    }

    async fn nonblocking<T>(
        &mut self,
        write: bool,
        op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        match self {
            Transport::Plain(s) => s.nonblocking(write, op).await,
            Transport::Tls(_) | Transport::H2(..) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

pub enum TransportRead<S: Stream> {
    Plain(S::Read),
    Tls(TlsRead<S>),
    None(NoHalf),
}

pub enum TransportWrite<S: Stream> {
    Plain(S::Write),
    Tls(TlsWrite<S>),
    None(NoHalf),
}

impl<S: Stream> ReadHalf for TransportRead<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            TransportRead::Plain(r) => r.read(buf).await,
            TransportRead::Tls(r) => Box::pin(r.read(buf)).await,
            TransportRead::None(r) => r.read(buf).await,
        }
    }
}

impl<S: Stream> WriteHalf for TransportWrite<S> {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            TransportWrite::Plain(w) => w.write_all(buf).await,
            TransportWrite::Tls(w) => Box::pin(w.write_all(buf)).await,
            TransportWrite::None(w) => w.write_all(buf).await,
        }
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            TransportWrite::Plain(w) => w.shutdown_write().await,
            TransportWrite::Tls(w) => Box::pin(w.shutdown_write()).await,
            TransportWrite::None(w) => w.shutdown_write().await,
        }
    }
}
