//! One downstream (client) connection: read request heads, route them, answer or forward, and
//! keep the connection alive between requests.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use tracing::debug;

use super::buffers::IDLE_READ;
use super::forward::{forward_request, Target};
use super::io::{Runtime, Stream};
use super::wait::{race, Either};
use super::{ConnGuard, Worker, WorkerView};
use crate::access_log::Entry;
use crate::balance::hash64;
use crate::config::lb::{HashOn, Policy};
use crate::config::{Action, Listener};
use crate::http::body::BodyRelay;
use crate::http::request::RequestHead;
use crate::http::request::{encode_upstream_head, parse_request_head_at};
use crate::http::scan::{HeadEnd, HeadScanner};
use crate::http::{encode_error_response, Framing, HeadError, HeadLimits, Version};

/// Smallest free space offered to a read; reads never ask the kernel for less.
pub const MIN_READ: usize = 4 * 1024;
/// Read size while streaming bodies: the bound on body bytes held per direction.
pub const BODY_READ: usize = 16 * 1024;

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
}

/// Request fields kept for the access log; the strings are reused from request to request.
#[derive(Default)]
pub struct Logged {
    pub method: String,
    pub target: String,
    pub version: &'static str,
    pub referer: String,
    pub user_agent: String,
}

impl Logged {
    fn capture(&mut self, head: &crate::http::request::RequestHead<'_, '_>) {
        self.method.clear();
        self.method.push_str(head.method);
        self.target.clear();
        self.target.push_str(head.target);
        self.version = match head.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        self.referer.clear();
        self.user_agent.clear();
        for h in head.headers {
            let dest = if h.name.eq_ignore_ascii_case("referer") {
                &mut self.referer
            } else if h.name.eq_ignore_ascii_case("user-agent") {
                &mut self.user_agent
            } else {
                continue;
            };
            dest.push_str(&String::from_utf8_lossy(h.value));
        }
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
}

impl RequestInfo {
    /// Whether a response that keeps the connection open must say so (HTTP/1.0 clients).
    pub fn needs_keep_alive_header(&self) -> bool {
        self.version == Version::Http10
    }
}

enum Plan {
    Forward(Target),
    Respond(usize),
    NotFound,
}

/// Reads from `s` into `buf`'s spare capacity, first making room for at least `min_spare`.
pub async fn read_some<S: Stream>(
    s: &mut S,
    buf: &mut Vec<u8>,
    min_spare: usize,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare);
    }
    let (res, b) = s.read(std::mem::take(buf)).await;
    *buf = b;
    res
}

/// Writes `buf` to `s` and clears it; `false` if the peer is gone.
pub async fn flush<S: Stream>(s: &mut S, buf: &mut Vec<u8>) -> bool {
    if buf.is_empty() {
        return true;
    }
    let (res, mut b) = s.write_all(std::mem::take(buf)).await;
    b.clear();
    *buf = b;
    res.is_ok()
}

/// Answers with an error status produced by Apex and reports whether the connection stays open.
/// When it does not, the close lingers (see [`linger_close`]).
pub async fn send_error<R: Runtime>(
    client: &mut R::Stream,
    out: &mut Vec<u8>,
    status: u16,
    keep_open: bool,
    keep_alive_header: bool,
) -> bool {
    // Whatever was staged for the client (a body half re-framed) is abandoned.
    out.clear();
    encode_error_response(out, status, !keep_open, keep_alive_header);
    let sent = flush(client, out).await;
    if sent && !keep_open {
        linger_close::<R>(client, out).await;
    }
    sent && keep_open
}

/// Longest a lingering close waits for the client to stop sending.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes a lingering close reads and discards.
const LINGER_BYTES: usize = 256 * 1024;

/// Closing a socket with unread input makes the kernel send RST, which can destroy the error
/// response we just wrote before the client reads it. So: send FIN, then read and discard what
/// the client still sends, for a bounded time and byte count (nginx's lingering close).
pub async fn linger_close<R: Runtime>(client: &mut R::Stream, scratch: &mut Vec<u8>) {
    if client.shutdown_write().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        scratch.clear();
        let wait = deadline.saturating_duration_since(Instant::now());
        match R::timeout(wait, read_some(client, scratch, MIN_READ)).await {
            Some(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
    scratch.clear();
}

enum HeadRead {
    /// A whole head, ending here, with its line endings already checked.
    Ready(HeadEnd),
    /// The client closed, or stayed idle past the keep-alive timeout, between requests.
    Closed,
    /// The client started a head and did not finish it in time.
    TimedOut,
    Invalid(HeadError),
}

/// Waits until `rbuf` holds a complete request head. While nothing of a request has arrived,
/// the wait also ends when the worker starts draining.
async fn read_request_head<R: Runtime>(
    worker: &Worker<R>,
    client: &mut R::Stream,
    rbuf: &mut Vec<u8>,
    listener: &Listener,
    first: bool,
) -> HeadRead {
    let limits = &listener.limits;
    let mut scanner = HeadScanner::default();
    // The first request must start within the header timeout; later ones may idle longer.
    let mut deadline = first.then(|| Instant::now() + listener.header_timeout);
    loop {
        if !rbuf.is_empty() {
            match scanner.scan(rbuf, limits.max_request_line, limits.max_head) {
                Ok(Some(end)) => return HeadRead::Ready(end),
                Ok(None) => {}
                Err(e) => return HeadRead::Invalid(e),
            }
            deadline.get_or_insert_with(|| Instant::now() + listener.header_timeout);
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => listener.keepalive_timeout,
        };
        let started = !rbuf.is_empty();
        // Waiting for a new request, read into the small idle buffer; grow only for long heads.
        let spare = if started { MIN_READ } else { IDLE_READ };
        let result = if started {
            // Part of a head is in: a runtime timer, boxed so that its space is not part of
            // every idle connection's task.
            let read =
                R::timeout(wait.max(Duration::from_millis(1)), read_some(client, rbuf, spare));
            Box::pin(read).await
        } else {
            // Nothing yet: the worker's coarse idle deadline, and the drain.
            let idle = worker.idle.until(Instant::now() + wait);
            match race(read_some(client, rbuf, spare), race(worker.drain.wait(), idle)).await {
                Either::Left(r) => Some(r),
                Either::Right(_) => return HeadRead::Closed,
            }
        };
        match result {
            None if started => return HeadRead::TimedOut,
            None | Some(Ok(0)) | Some(Err(_)) => return HeadRead::Closed,
            Some(Ok(_)) => {}
        }
    }
}

/// Parses the head at the start of `rbuf`, routes it and, for a forwarded request, encodes the
/// head to send upstream into `uhead`.
fn prepare_request(
    rbuf: &[u8],
    end: HeadEnd,
    limits: &HeadLimits,
    view: &WorkerView,
    peer: SocketAddr,
    uhead: &mut Vec<u8>,
    logged: Option<&mut Logged>,
) -> Result<(RequestInfo, Plan), HeadError> {
    let mut fields = crate::http::fields();
    let head = parse_request_head_at(rbuf, end, &mut fields, limits)?;
    if let Some(l) = logged {
        l.capture(&head);
    }
    let info = RequestInfo {
        head_len: head.len,
        framing: head.framing,
        version: head.version,
        keep_alive: head.keep_alive,
        expect_continue: head.expect_continue,
        idempotent: head.is_idempotent(),
        is_head: head.is_head(),
    };
    let snap = &view.snap;
    let plan = match snap.router.route(head.host, head.path(), head.method) {
        None => Plan::NotFound,
        Some(i) => match &snap.config.routes[i].action {
            Action::Respond(_) => Plan::Respond(i),
            Action::Forward(c) => {
                uhead.clear();
                let default_host = snap.config.clusters[*c].endpoints[0];
                encode_upstream_head(uhead, &head, peer.ip(), &default_host);
                let hash_key = match &snap.config.clusters[*c].policy {
                    Policy::ConsistentHash(on) => hash_key(&head, on, peer),
                    _ => None,
                };
                Plan::Forward(Target { route: i, cluster: *c, hash_key })
            }
        },
    };
    Ok((info, plan))
}

/// The consistent-hash key of a request: a field's value, a cookie's value or the client's
/// address; `None` when the request lacks the field or cookie (it is then balanced at random).
fn hash_key(head: &RequestHead<'_, '_>, on: &HashOn, peer: SocketAddr) -> Option<u64> {
    match on {
        HashOn::ClientAddress => Some(hash64(peer.ip())),
        HashOn::Header(name) => {
            head.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| hash64(h.value))
        }
        HashOn::Cookie(name) => head
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .flat_map(|h| h.value.split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = crate::http::fields::trim_ows(pair);
                let rest = pair.strip_prefix(name.as_bytes())?;
                rest.strip_prefix(b"=").map(hash64)
            }),
    }
}

/// Drops the head and any body that already arrived with it; `false` when part of the body is
/// still on the wire, in which case the connection cannot carry another request.
fn discard_request(rbuf: &mut Vec<u8>, info: &RequestInfo, scratch: &mut Vec<u8>) -> bool {
    let mut body = BodyRelay::new(info.framing, Framing::Length(u64::MAX));
    let taken = body.relay(&rbuf[info.head_len..], scratch).unwrap_or(0);
    scratch.clear();
    if !body.is_done() {
        return false;
    }
    rbuf.drain(..info.head_len + taken);
    true
}

/// Serves one client connection until it closes, errs or times out. `_guard` counts the
/// connection against the worker's cap until this returns.
pub async fn serve_downstream<R: Runtime>(
    worker: Rc<Worker<R>>,
    mut client: R::Stream,
    peer: SocketAddr,
    listener: Rc<Listener>,
    _guard: ConnGuard<R>,
) {
    let mut bufs = Buffers { rbuf: Vec::with_capacity(IDLE_READ), ..Buffers::default() };
    let mut first = true;
    let limits = listener.limits;
    loop {
        let head = read_request_head::<R>(&worker, &mut client, &mut bufs.rbuf, &listener, first);
        let end = match head.await {
            HeadRead::Ready(end) => end,
            HeadRead::Closed => return,
            HeadRead::TimedOut => {
                worker.view().unrouted.record(408);
                Box::pin(send_error::<R>(&mut client, &mut bufs.out, 408, false, false)).await;
                return;
            }
            HeadRead::Invalid(e) => {
                debug!(client = %peer, reason = e.reason(), "refused request head");
                worker.view().unrouted.record(e.status());
                Box::pin(send_error::<R>(&mut client, &mut bufs.out, e.status(), false, false))
                    .await;
                return;
            }
        };
        first = false;
        // Borrow the large buffers for this request; they go back when the connection idles.
        for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead] {
            if b.capacity() == 0 {
                *b = worker.buffers.take();
            }
        }
        let view = worker.view();
        let started = Instant::now();
        let logged = worker.access.is_some().then_some(&mut bufs.logged);
        let prepared =
            prepare_request(&bufs.rbuf, end, &limits, &view, peer, &mut bufs.uhead, logged);
        let (info, plan) = match prepared {
            Ok(p) => p,
            Err(e) => {
                debug!(client = %peer, reason = e.reason(), "refused request head");
                view.unrouted.record(e.status());
                Box::pin(send_error::<R>(&mut client, &mut bufs.out, e.status(), false, false))
                    .await;
                return;
            }
        };
        if let (Some(max), Framing::Length(n)) = (listener.max_request_body, info.framing) {
            if n > max {
                // Refused before reading any of it; the lingering close bounds what we read.
                view.unrouted.record(413);
                Box::pin(send_error::<R>(&mut client, &mut bufs.out, 413, false, false)).await;
                return;
            }
        }
        let (keep_open, status, bytes, upstream, route) = match plan {
            Plan::Forward(target) => {
                let route = target.route;
                let request = forward_request::<R>(
                    &worker,
                    &view,
                    target,
                    &mut client,
                    &mut bufs,
                    &info,
                    &listener,
                );
                // Boxed: the forwarding state machine is large, and unboxed it would be part of
                // every idle connection's task (a future is as large as its largest await point).
                let served = Box::pin(request).await;
                view.route_stats[route].record(served.status);
                (served.keep_open, served.status, served.body_bytes, served.upstream, Some(route))
            }
            Plan::Respond(route) => {
                let whole = discard_request(&mut bufs.rbuf, &info, &mut bufs.out);
                let keep = whole && info.keep_alive && !worker.is_draining();
                let direct = view.snap.direct[route].as_ref().expect("respond route is encoded");
                let bytes = match (keep, info.needs_keep_alive_header()) {
                    (false, _) => &direct.close,
                    (true, false) => &direct.keep_alive,
                    (true, true) => &direct.keep_alive_10,
                };
                let len = if info.is_head { bytes.len() - direct.body_len } else { bytes.len() };
                bufs.out.extend_from_slice(&bytes[..len]);
                view.route_stats[route].record(direct.status);
                let sent = flush(&mut client, &mut bufs.out).await && keep;
                let body = if info.is_head { 0 } else { direct.body_len as u64 };
                (sent, direct.status, body, None, Some(route))
            }
            Plan::NotFound => {
                let whole = discard_request(&mut bufs.rbuf, &info, &mut bufs.out);
                let keep = whole && info.keep_alive && !worker.is_draining();
                let ka = info.needs_keep_alive_header();
                view.unrouted.record(404);
                let sent =
                    Box::pin(send_error::<R>(&mut client, &mut bufs.out, 404, keep, ka)).await;
                (sent, 404, 0, None, None)
            }
        };
        if let Some(log) = &worker.access {
            let route = route.map(|i| view.snap.config.routes[i].name.as_str()).unwrap_or("");
            let l = &bufs.logged;
            log.record(&Entry {
                time: SystemTime::now(),
                client: peer,
                method: &l.method,
                target: &l.target,
                version: l.version,
                status,
                bytes,
                duration: started.elapsed(),
                upstream,
                route,
                referer: &l.referer,
                user_agent: &l.user_agent,
            });
        }
        if !keep_open {
            return;
        }
        // Going idle: give the large buffers back to the worker and wait with a small one.
        for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead] {
            worker.buffers.give(std::mem::take(b));
        }
        if bufs.rbuf.is_empty() && bufs.rbuf.capacity() > IDLE_READ {
            worker.buffers.give(std::mem::replace(&mut bufs.rbuf, Vec::with_capacity(IDLE_READ)));
        }
    }
}
