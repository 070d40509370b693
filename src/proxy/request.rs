//! The state one request carries through its journey: the connection's reusable buffers, what
//! the head said, where the request goes, and how it ended.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Cluster, Route};
use crate::http::request::RequestHead;
use crate::http::{error_body_len, Framing, Version};

/// The buffers a connection reuses from request to request.
#[derive(Default)]
pub struct Buffers {
    /// Bytes read from the client not yet consumed; may hold the next pipelined request.
    pub rbuf: Vec<u8>,
    /// Bytes being written to the client.
    pub out: Vec<u8>,
    /// Bytes read from the upstream.
    pub ubuf: Vec<u8>,
    /// The request as sent upstream: head, plus the body when it arrived with the head; kept
    /// until the response head arrives so that a stale pooled connection can be retried.
    pub uhead: Vec<u8>,
    /// The request's fields the access log needs, copied out of the head (only when logging).
    pub logged: Logged,
    /// The route's response field edits, rendered for this request (boxed: most routes have
    /// none, and every connection's session carried 72 bytes for them).
    pub response_edits: Option<Box<crate::http::rewrite::FieldEdits>>,
}

/// What the access log and the per-protocol counters need of a connection's requests.
#[derive(Default)]
pub struct Logged {
    /// The request came as an HTTP/2 stream (logged as `HTTP/2.0`, as nginx does).
    pub h2: bool,
    /// The logged fields, on the heap and only once needed: a worker without an access log
    /// never allocates them, and its idle connections do not carry 184 bytes of empty strings.
    pub fields: Option<Box<LoggedFields>>,
}

/// Request fields kept for the access log; the strings are reused from request to request.
#[derive(Default)]
pub struct LoggedFields {
    pub method: String,
    pub target: String,
    pub version: &'static str,
    pub referer: String,
    pub user_agent: String,
    /// The request id Apex forwarded, when the listener or route uses them.
    pub request_id: String,
    /// The connection's TLS (set once, when the handshake completes).
    pub tls: Option<crate::tls::TlsSummary>,
}

impl Logged {
    /// The fields, allocated at first use.
    pub fn fields(&mut self) -> &mut LoggedFields {
        self.fields.get_or_insert_with(Box::default)
    }

    pub fn capture(&mut self, head: &RequestHead<'_, '_>, request_id: Option<&str>) {
        let h2 = self.h2;
        let f = self.fields();
        f.request_id.clear();
        f.request_id.push_str(request_id.unwrap_or(""));
        f.method.clear();
        f.method.push_str(head.method);
        f.target.clear();
        f.target.push_str(head.target);
        f.version = match head.version {
            _ if h2 => "HTTP/2.0",
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        f.referer.clear();
        f.user_agent.clear();
        for h in head.headers {
            let dest = if h.name.eq_ignore_ascii_case("referer") {
                &mut f.referer
            } else if h.name.eq_ignore_ascii_case("user-agent") {
                &mut f.user_agent
            } else {
                continue;
            };
            dest.push_str(&String::from_utf8_lossy(h.value));
        }
    }

    /// A request refused before its head could be parsed: logged with `-` fields, as nginx
    /// logs a 400.
    pub fn unparsed(&mut self) {
        let f = self.fields();
        for s in
            [&mut f.method, &mut f.target, &mut f.referer, &mut f.user_agent, &mut f.request_id]
        {
            s.clear();
        }
        f.method.push('-');
        f.target.push('-');
        f.version = "-";
    }
}

/// What the proxy needs to know about a request once its head is out of the read buffer.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub head_len: usize,
    pub framing: Framing,
    pub version: Version,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub idempotent: bool,
    pub is_head: bool,
    /// The request asks to switch protocols and its route forwards that upgrade.
    pub upgrade: bool,
    /// The encoding the response may be compressed with (the route compresses, the client
    /// accepts it).
    pub accept: Option<crate::http::encoding::Encoding>,
}

impl RequestInfo {
    /// Whether a response that keeps the connection open must say so (HTTP/1.0 clients).
    pub fn needs_keep_alive_header(&self) -> bool {
        self.version == Version::Http10
    }
}

/// Whether a request body is over the listener's `max_request_body`: its declared length, or
/// the bytes seen so far of a chunked body. The one check every stage of the body uses.
pub fn body_over_limit(max: Option<u64>, framing: Framing, seen: u64) -> bool {
    max.is_some_and(|max| seen > max || matches!(framing, Framing::Length(n) if n > max))
}

/// Where a request goes: its route, the route's cluster, and the consistent-hash key when the
/// cluster balances on one.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub route: usize,
    pub cluster: usize,
    pub hash_key: Option<u64>,
}

/// The timeouts of one request: the route's overrides, else the cluster's.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub read: Duration,
}

impl Timeouts {
    pub fn of(route: &Route, cluster: &Cluster) -> Timeouts {
        Timeouts {
            connect: route.timeouts.connect.unwrap_or(cluster.connect_timeout),
            response: route.timeouts.response.unwrap_or(cluster.response_timeout),
            read: route.timeouts.read.unwrap_or(cluster.read_timeout),
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub keep_open: bool,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub body_bytes: u64,
    pub upstream: Option<SocketAddr>,
    /// The response went out whole. A TLS connection closed after it sends close_notify first,
    /// which tells the client the response is complete (a close without it is a truncation to
    /// a TLS client, and OpenSSL then will not resume the session); after a response cut
    /// short, close_notify must not be sent.
    pub whole: bool,
}

impl Served {
    /// An answer Apex generated itself (`send_error`'s plain-text body), or none at all when
    /// the client was gone (`499`).
    pub fn generated(status: u16, keep_open: bool, upstream: Option<SocketAddr>) -> Served {
        let body_bytes = if status == 499 { 0 } else { error_body_len(status) };
        Served { keep_open, status, body_bytes, upstream, whole: status != 499 }
    }
}
