//! A client connection as the proxy loop sees it: plaintext, or TLS over the same runtime
//! stream. One type for both, so the journey (downstream → forward → relay, and tunnels) is
//! written once; TLS is a layer under the seam, not a fork of the loop.

use std::io;
use std::net::SocketAddr;

use super::io::{ReadHalf, Stream, WriteHalf};
use crate::tls::{TlsRead, TlsStream, TlsWrite};

pub enum ClientStream<S: Stream> {
    Plain(S),
    /// Boxed: the TLS state is large and only TLS listeners pay for it.
    Tls(Box<TlsStream<S>>),
}

impl<S: Stream> ClientStream<S> {
    /// `https` over TLS, else `http`: what X-Forwarded-Proto says.
    pub fn scheme(&self) -> &'static str {
        match self {
            ClientStream::Plain(_) => "http",
            ClientStream::Tls(_) => "https",
        }
    }
}

impl<S: Stream> Stream for ClientStream<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            ClientStream::Plain(s) => s.read(buf).await,
            ClientStream::Tls(s) => s.read(buf).await,
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            ClientStream::Plain(s) => s.write_all(buf).await,
            ClientStream::Tls(s) => s.write_all(buf).await,
        }
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.shutdown_write().await,
            ClientStream::Tls(s) => s.shutdown_write().await,
        }
    }

    fn is_stale(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_stale(),
            ClientStream::Tls(s) => s.is_stale(),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            ClientStream::Plain(s) => s.local_addr(),
            ClientStream::Tls(s) => s.local_addr(),
        }
    }

    type Read = ClientRead<S>;
    type Write = ClientWrite<S>;
    fn into_split(self) -> (ClientRead<S>, ClientWrite<S>) {
        match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.into_split();
                (ClientRead::Plain(r), ClientWrite::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = s.into_split();
                (ClientRead::Tls(r), ClientWrite::Tls(w))
            }
        }
    }
}

pub enum ClientRead<S: Stream> {
    Plain(S::Read),
    Tls(TlsRead<S>),
}

pub enum ClientWrite<S: Stream> {
    Plain(S::Write),
    Tls(TlsWrite<S>),
}

impl<S: Stream> ReadHalf for ClientRead<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            ClientRead::Plain(r) => r.read(buf).await,
            ClientRead::Tls(r) => r.read(buf).await,
        }
    }
}

impl<S: Stream> WriteHalf for ClientWrite<S> {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            ClientWrite::Plain(w) => w.write_all(buf).await,
            ClientWrite::Tls(w) => w.write_all(buf).await,
        }
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            ClientWrite::Plain(w) => w.shutdown_write().await,
            ClientWrite::Tls(w) => w.shutdown_write().await,
        }
    }
}
