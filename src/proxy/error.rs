//! Why forwarding a request to an upstream failed, and the status each failure answers with.
//! (Failures on the client's side are answered where they happen: 400, 408, 413, 499.)

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum ProxyError {
    /// The upstream refused or could not be reached.
    ConnectFailed(io::Error),
    /// The TCP connect took longer than the cluster's `connect_timeout`.
    ConnectTimeout,
    /// No response head within the cluster's `response_timeout`.
    ResponseTimeout,
    /// The upstream closed or reset before a full response head arrived.
    UpstreamClosed,
    /// Writing the request upstream failed.
    UpstreamWrite(io::Error),
    /// The upstream's response head is malformed or ambiguously framed.
    BadResponse(&'static str),
    /// Every endpoint of the cluster failed its health check (and the cluster does not fail
    /// open).
    NoHealthyEndpoint,
    /// The TLS handshake with the upstream failed (a certificate that does not verify, say).
    TlsFailed(String),
}

impl ProxyError {
    /// A short fixed name of the failure, for logs and the per-worker log limiter's key.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::ConnectFailed(_) => "connect failed",
            ProxyError::ConnectTimeout => "connect timed out",
            ProxyError::ResponseTimeout => "no response head in time",
            ProxyError::UpstreamClosed => "upstream closed before responding",
            ProxyError::UpstreamWrite(_) => "writing the request failed",
            ProxyError::BadResponse(_) => "bad response",
            ProxyError::NoHealthyEndpoint => "no healthy endpoint",
            ProxyError::TlsFailed(_) => "TLS handshake with the upstream failed",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            ProxyError::ConnectFailed(_)
            | ProxyError::UpstreamClosed
            | ProxyError::UpstreamWrite(_)
            | ProxyError::BadResponse(_)
            | ProxyError::TlsFailed(_) => 502,
            ProxyError::ConnectTimeout | ProxyError::ResponseTimeout => 504,
            ProxyError::NoHealthyEndpoint => 503,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            ProxyError::ConnectTimeout => write!(f, "connect timed out"),
            ProxyError::ResponseTimeout => write!(f, "no response head in time"),
            ProxyError::UpstreamClosed => write!(f, "upstream closed before responding"),
            ProxyError::UpstreamWrite(e) => write!(f, "writing the request failed: {e}"),
            ProxyError::BadResponse(r) => write!(f, "bad response: {r}"),
            ProxyError::NoHealthyEndpoint => write!(f, "no healthy endpoint"),
            ProxyError::TlsFailed(e) => write!(f, "TLS handshake with the upstream failed: {e}"),
        }
    }
}
