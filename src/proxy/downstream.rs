//! One downstream (client) connection: read request heads, route them, answer or forward, and
//! keep the connection alive between requests. This is where a request's journey starts:
//! `serve_downstream` → `route` → `forward::forward_request` → `relay::relay_response`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, error};

use super::buffers::IDLE_READ;
use super::conn::{read_some, send, send_error, send_error_with, MIN_READ};
use super::forward::forward_request;
use super::http2::{serve_h2, H2Stream, PREFACE};
use super::io::{Runtime, Stream};
use super::isolate::isolate;
use super::limits::{share, worker_rate, ClientConn};
use super::request::{body_over_limit, Buffers, Logged, LoggedFields, RequestInfo, Served, Target};
use super::transport::Transport;
use super::tunnel::tunnel;
use super::wait::{race, Either, SendBound};
use super::{ConnGuard, Forward, ParkedConn, Worker, WorkerView};
use crate::access_log::Entry;
use crate::balance::hash64;
use crate::config::lb::{HashOn, Policy};
use crate::config::{Action, Listener};
use crate::config::{ProxyProtocolIn, TemplateVars};
use crate::http::body::BodyRelay;
use crate::http::encoding::negotiate;
use crate::http::request::RequestHead;
use crate::http::request::{add_upgrade, encode_upstream_head, parse_request_head_at, Forwarding};
use crate::http::rewrite::{any_contains, FieldEdits};
use crate::http::scan::{HeadEnd, HeadScanner};
use crate::http::{Framing, HeadError};
use crate::proxy_protocol::{self, Header, Parsed};
use crate::tls::TlsStream;

enum Plan {
    Forward(Target),
    Respond(usize),
    /// A route's redirect: the route, the status and the `Location`.
    Redirect(usize, u16, String),
    NotFound,
    /// The route's allow/deny lists refuse this client: 403.
    Forbidden(usize),
}

enum HeadRead {
    /// A whole head, ending here, with its line endings already checked.
    Ready(HeadEnd),
    /// The client closed, or stayed idle past the keep-alive timeout, between requests (or
    /// sent nothing at all within the header timeout).
    Closed,
    /// The client started a head and did not finish it in time.
    TimedOut,
    Invalid(HeadError),
}

/// How the wait between two requests ended.
enum Woke {
    /// The client's socket is readable: a request (or its close) is coming.
    Request,
    /// The keep-alive timeout (or the drain's cutoff) passed, or the socket failed.
    Close,
    /// Idle for the listener's `park_after`: the connection is to be parked, and closed at
    /// this instant (its keep-alive deadline) unless a request comes first.
    Park(Instant),
}

/// Between requests on a connection that can wait without a buffer (`release_idle_buffer`):
/// waits until the client's socket is readable, holding no buffer, within the keep-alive
/// timeout (which the drain brings forward), or until it has been idle long enough to park.
///
/// A future of its own, and small (a readiness wait and a deadline slot): it is what an idle
/// connection's task holds, while the head reader, several times larger, is boxed by the
/// caller only while a head is read.
async fn wait_for_request<R: Runtime>(
    worker: &Worker<R>,
    client: &mut Transport<R::Stream>,
    listener: &Listener,
) -> Woke {
    let now = crate::clock::now();
    let until = now + listener.keepalive_timeout;
    let parks = worker.parked.enabled() && listener.park_after < listener.keepalive_timeout;
    let mut wake = if parks { now + listener.park_after } else { until };
    loop {
        match race(client.readable(), worker.idle.until(wake)).await {
            Either::Left(Ok(())) => return Woke::Request,
            Either::Left(Err(_)) => return Woke::Close,
            // The park deadline, before the keep-alive one (and the drain's cutoff).
            Either::Right(()) if wake < until && crate::clock::now() < worker.idle.due(until) => {
                if !worker.is_draining() {
                    return Woke::Park(until);
                }
                // Draining: no parking, and the connection keeps the drain's grace for a
                // last request; the cutoff ends the wait.
                wake = until;
            }
            Either::Right(()) => return Woke::Close,
        }
    }
}

/// Waits until `rbuf` holds a complete request head. While nothing of a request has arrived,
/// the wait also ends at the drain's cutoff for idle connections.
async fn read_request_head<R: Runtime>(
    worker: &Worker<R>,
    client: &mut Transport<R::Stream>,
    rbuf: &mut Vec<u8>,
    listener: &Listener,
    first: bool,
) -> HeadRead {
    let limits = &listener.limits;
    let mut scanner = HeadScanner::default();
    // The first request must start within the header timeout; later ones may idle longer.
    let mut deadline = first.then(|| crate::clock::now() + listener.header_timeout);
    loop {
        if !rbuf.is_empty() {
            match scanner.scan(rbuf, limits.max_request_line, limits.max_head) {
                Ok(Some(end)) => return HeadRead::Ready(end),
                Ok(None) => {}
                Err(e) => return HeadRead::Invalid(e),
            }
            deadline.get_or_insert_with(|| crate::clock::now() + listener.header_timeout);
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(crate::clock::now()),
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
            // Nothing yet: the worker's coarse idle deadline, which the drain brings forward
            // (a request that arrives meanwhile is still served, with `Connection: close`).
            let idle = worker.idle.until(crate::clock::now() + wait);
            match race(read_some(client, rbuf, spare), idle).await {
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

/// What routing a request needs besides its head: where it arrived, from whom, and where the
/// request's per-request output goes.
struct RouteCtx<'a, R: Runtime> {
    worker: &'a Worker<R>,
    view: &'a WorkerView,
    listener: &'a Listener,
    /// The client's address: the PROXY protocol's when the listener takes it, else the peer.
    client: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
}

/// A client's own `X-Request-Id`, when it is one Apex can pass on unchanged: 1 to 128 bytes of
/// letters, digits and `-_.:+/=`.
fn client_request_id<'b>(head: &RequestHead<'b, '_>) -> Option<&'b str> {
    let h = head.headers.iter().find(|h| h.name.eq_ignore_ascii_case("x-request-id"))?;
    let v = crate::http::fields::trim_ows(h.value);
    let ok = (1..=128).contains(&v.len())
        && v.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b));
    // Only ASCII was admitted, so this cannot fail.
    ok.then(|| std::str::from_utf8(v).ok()).flatten()
}

/// Parses the head at the start of `rbuf`, routes it and, for a forwarded request, encodes the
/// head to send upstream into `bufs.uhead` (and renders the route's response edits).
fn route<R: Runtime>(
    ctx: &RouteCtx<'_, R>,
    rbuf: &[u8],
    end: HeadEnd,
    uhead: &mut Vec<u8>,
    logged: Option<&mut Logged>,
    response_edits: &mut Option<Box<FieldEdits>>,
) -> Result<(RequestInfo, Plan), HeadError> {
    let mut fields = crate::http::fields();
    let head = parse_request_head_at(rbuf, end, &mut fields, &ctx.listener.limits)?;
    let mut info = RequestInfo {
        head_len: head.len,
        framing: head.framing,
        version: head.version,
        keep_alive: head.keep_alive,
        expect_continue: head.expect_continue,
        idempotent: head.is_idempotent(),
        is_head: head.is_head(),
        upgrade: false,
        accept: None,
    };
    *response_edits = None;
    let snap = &ctx.view.snap;
    let Some(i) = snap.router.route(head.host, head.path(), head.method) else {
        if let Some(l) = logged {
            l.capture(&head, None);
        }
        return Ok((info, Plan::NotFound));
    };
    let route = &snap.config.routes[i];
    let request_id = (ctx.listener.request_id || route.needs_request_id()).then(|| {
        client_request_id(&head).map_or_else(|| ctx.worker.new_request_id(), str::to_string)
    });
    if let Some(l) = logged {
        l.capture(&head, request_id.as_deref());
    }
    if !route.admits(ctx.client.ip()) {
        return Ok((info, Plan::Forbidden(i)));
    }
    let plan = match &route.action {
        Action::Respond(_) => Plan::Respond(i),
        Action::Redirect(r) => {
            // The same host, path and query under the route's scheme (and port, if it names one).
            let host = head.host;
            let target = head.target;
            let path = match target.find("://") {
                Some(i) => target[i + 3..].find('/').map_or("/", |j| &target[i + 3 + j..]),
                None => target,
            };
            let location = match r.port {
                Some(port) => format!("{}://{host}:{port}{path}", r.scheme),
                None => format!("{}://{host}{path}", r.scheme),
            };
            Plan::Redirect(i, r.status, location)
        }
        Action::Forward(c) => {
            let cluster = &snap.config.clusters[*c];
            let vars = TemplateVars {
                client_ip: ctx.client.ip(),
                request_id: request_id.as_deref().unwrap_or(""),
                host: head.host,
            };
            let edits = route.request_edits.as_ref().map(|e| e.render(&vars));
            let host = route.host_rewrite.as_ref().map(|t| t.render(&vars));
            *response_edits = route.response_edits.as_ref().map(|e| Box::new(e.render(&vars)));
            let fwd = Forwarding {
                client: ctx.client.ip(),
                // No endpoint yet (DNS names not resolved): the request gets a 503 anyway.
                default_host: match cluster.endpoints.first() {
                    Some(a) => a,
                    None => &cluster.name,
                },
                trusted: any_contains(&ctx.listener.trusted_proxies, ctx.client.ip()),
                style: ctx.listener.forwarded,
                proto: ctx.scheme,
                edits: edits.as_ref(),
                path: route.path_edit.as_ref(),
                host: host.as_deref(),
                request_id: request_id.as_deref(),
            };
            uhead.clear();
            encode_upstream_head(uhead, &head, &fwd);
            // An upgrade the route forwards keeps its fields; any other is dropped, like
            // every hop-by-hop field, and the request goes on as plain HTTP.
            if let Some(protocol) = head.upgrade().filter(|p| route.allows_upgrade(p)) {
                add_upgrade(uhead, protocol);
                info.upgrade = true;
            }
            if let Some(c) = route.compression.as_ref().filter(|_| !info.is_head) {
                let accept = head
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("accept-encoding"))
                    .map(|h| h.value);
                info.accept = negotiate(accept, &c.encodings);
            }
            let hash_key = match &cluster.policy {
                Policy::ConsistentHash(on) => hash_key(&head, on, ctx.client),
                _ => None,
            };
            Plan::Forward(Target { route: i, cluster: *c, hash_key })
        }
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

/// Drops a request Apex answers itself: its head and any body that already arrived with it.
/// Returns whether the connection may stay open after the answer: not when part of the body is
/// still on the wire (the connection cannot carry another request), the client did not ask for
/// keep-alive, or the worker is draining.
fn discard_request(
    rbuf: &mut Vec<u8>,
    info: &RequestInfo,
    scratch: &mut Vec<u8>,
    draining: bool,
) -> bool {
    let mut body = BodyRelay::new(info.framing, Framing::Length(u64::MAX));
    let taken = body.relay(&rbuf[info.head_len..], scratch).unwrap_or(0);
    scratch.clear();
    if !body.is_done() {
        return false;
    }
    rbuf.drain(..info.head_len + taken);
    info.keep_alive && !draining
}

/// The client's address on a listener with `proxy_protocol`: a header from a trusted peer
/// names it (one is required unless the listener says otherwise); a header from anyone else,
/// a malformed one, or none within the header timeout where one is required closes the
/// connection (`None`). Bytes after the header stay in `rbuf`: the first request.
async fn establish_client<R: Runtime>(
    client: &mut R::Stream,
    rbuf: &mut Vec<u8>,
    peer: SocketAddr,
    listener: &Listener,
    pp: &ProxyProtocolIn,
) -> Option<SocketAddr> {
    let trusted = any_contains(&pp.trusted, peer.ip());
    let accept = proxy_protocol::Accept { v1: pp.v1, v2: pp.v2 };
    let deadline = crate::clock::now() + listener.header_timeout;
    loop {
        if !rbuf.is_empty() {
            match proxy_protocol::parse(rbuf, accept) {
                Ok(Parsed::Complete { header, len }) => {
                    if !trusted {
                        debug!(client = %peer, "PROXY header from an untrusted peer; closed");
                        return None;
                    }
                    rbuf.drain(..len);
                    return Some(match header {
                        Header::Proxied { source, .. } => source,
                        Header::Local => peer,
                    });
                }
                Ok(Parsed::Absent) if trusted && pp.required => {
                    debug!(client = %peer, "no PROXY header from a trusted peer; closed");
                    return None;
                }
                Ok(Parsed::Absent) => return Some(peer),
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    debug!(client = %peer, reason = e.reason(), "bad PROXY header; closed");
                    return None;
                }
            }
        }
        let wait = deadline.saturating_duration_since(crate::clock::now());
        match R::timeout(wait, read_some(client, rbuf, IDLE_READ)).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Serves one client connection until it closes, errs or times out. `_guard` counts the
/// connection against the worker's cap until this returns.
///
/// Two phases, each its own future: [`establish`] (PROXY header, limits, TLS handshake, the
/// protocol) runs boxed and is freed when it is done; then the connection's requests are
/// served from a [`Session`] on the heap. The task itself keeps only the session's pointer and
/// the wait for the next request: a future keeps every slot any of its await points needs, so
/// with the setup and the session inline an idle keep-alive connection's task measured 2,600
/// bytes (release build, `-Zprint-type-sizes`).
pub fn serve_downstream<R: Runtime>(
    worker: Rc<Worker<R>>,
    client: R::Stream,
    peer: SocketAddr,
    listener: Rc<Listener>,
    guard: ConnGuard<R>,
    removed: Rc<super::wait::Event>,
) -> impl std::future::Future<Output = ()> {
    // Not an `async fn`: its arguments would keep their slots in the task for its whole life.
    let setup = Box::pin(establish(worker, client, peer, listener));
    async move {
        let Some((mut session, h2)) = setup.await else { return };
        if h2 {
            let _guard = guard;
            Box::pin(serve_h2_session(session, removed)).await
        } else {
            // The session holds it from here: a parked connection takes it along.
            session.guard = Some(guard);
            serve_requests(session).await
        }
    }
}

/// Everything before a connection's first request: the PROXY protocol header, the per-client
/// connection limit, the TLS handshake, and the choice of HTTP/2 (by ALPN, or by its preface
/// on a prior-knowledge listener). `None`: the connection is to be closed. `true`: HTTP/2.
async fn establish<R: Runtime>(
    worker: Rc<Worker<R>>,
    mut client: R::Stream,
    peer: SocketAddr,
    listener: Rc<Listener>,
) -> Option<(Box<Session<R>>, bool)> {
    // Only the read buffer until the request loop starts: it builds the rest.
    let mut rbuf = Vec::with_capacity(IDLE_READ);
    // The client's address: carried by a PROXY protocol header when the listener takes one
    // from this peer, else the peer itself.
    let peer = match &listener.proxy_protocol {
        None => peer,
        Some(pp) => {
            let established = establish_client::<R>(&mut client, &mut rbuf, peer, &listener, pp);
            Box::pin(established).await?
        }
    };
    let listener_key = hash64(&listener.name);
    // Open connections per client: this worker's share of the listener's limit. Beyond it the
    // connection is closed before anything is read.
    let slot = match listener.max_connections_per_client {
        Some(max) => {
            match worker.limits.connect((listener_key, peer.ip()), share(max, worker.workers)) {
                Some(slot) => Some(slot),
                None => {
                    debug!(client = %peer, "over max_connections_per_client; closed");
                    return None;
                }
            }
        }
        None => None,
    };
    // TLS: the handshake, within its timeout, before anything else is read.
    let mut client = match &listener.tls {
        None => Transport::Plain(client),
        Some(tls) => {
            let config = worker.view().tls_config(&listener.name)?;
            // Boxed: a runtime timer is large (monoio pads its entries to 128 B).
            let accept = TlsStream::accept(config, client);
            match Box::pin(R::timeout(tls.handshake_timeout, accept)).await {
                Some(Ok(s)) => Transport::Tls(Box::new(s)),
                Some(Err(e)) => {
                    debug!(client = %peer, error = %e, "TLS handshake failed");
                    worker.stats.tls_handshake(false);
                    return None;
                }
                None => {
                    debug!(client = %peer, "TLS handshake timed out");
                    worker.stats.tls_handshake(false);
                    return None;
                }
            }
        }
    };
    // The connection's TLS parameters, for the access log.
    let mut tls = None;
    if let Transport::Tls(t) = &client {
        worker.stats.tls_handshake(true);
        let summary = t.summary();
        let alpn = t.alpn().map_or("none".into(), String::from_utf8_lossy);
        worker.stats.tls_connection(summary.version, &alpn);
        if worker.access.is_some() {
            tls = Some(summary);
        }
    }
    // HTTP/2: chosen by ALPN, or by its preface on a prior-knowledge listener.
    let h2 = match &client {
        Transport::Tls(t) => t.alpn() == Some(b"h2".as_slice()),
        _ if listener.http2.prior_knowledge => {
            // Boxed: it waits under a runtime timer, whose 128-byte alignment would otherwise
            // make this whole future 128-aligned (and allocated through posix_memalign) for
            // every connection.
            let sniff = sniff_preface::<R>(&mut client, &mut rbuf, listener.header_timeout);
            Box::pin(sniff).await
        }
        _ => false,
    };
    let session = Session::new(worker, client, peer, listener, (rbuf, tls, h2));
    Some((Box::new(Session { _slot: slot.map(Box::new), ..session }), h2))
}

/// An HTTP/2 connection: each stream is served as one request on its own task, with its own
/// buffers and its own one-request [`Session`].
async fn serve_h2_session<R: Runtime>(session: Box<Session<R>>, removed: Rc<super::wait::Event>) {
    let Session { worker, client, peer, listener, mut bufs, _slot, .. } = *session;
    let scheme = client.scheme();
    let preface = std::mem::take(&mut bufs.rbuf);
    let tls = bufs.logged.fields.as_mut().and_then(|f| f.tls.take());
    let serve = |stream: H2Stream| {
        let client = Transport::H2(Box::new(stream), scheme);
        // The stream's request head arrives whole, so it reads into one of the worker's
        // spare buffers (given back when the stream ends), not a growing small one.
        let start = (worker.buffers.take(), tls.clone(), true);
        let session = Session::new(Rc::clone(&worker), client, peer, Rc::clone(&listener), start);
        serve_requests(Box::new(session))
    };
    let timeouts = (listener.header_timeout, listener.keepalive_timeout, listener.send_timeout);
    serve_h2(&worker, &removed, client, preface, &listener.http2, timeouts, serve).await
}

/// On a prior-knowledge listener, reads until the first bytes either are the HTTP/2 preface
/// or cannot become it (an HTTP/1.1 request differs by its first or second byte), within the
/// header timeout. The bytes stay in `rbuf` for whichever protocol reads them.
async fn sniff_preface<R: Runtime>(
    client: &mut Transport<R::Stream>,
    rbuf: &mut Vec<u8>,
    timeout: Duration,
) -> bool {
    let deadline = crate::clock::now() + timeout;
    while rbuf.len() < PREFACE.len() && PREFACE.starts_with(rbuf) {
        let wait = deadline.saturating_duration_since(crate::clock::now());
        match R::timeout(wait, read_some(client, rbuf, IDLE_READ)).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
    rbuf.starts_with(PREFACE)
}

/// Serves the requests of one client connection (or of one HTTP/2 stream) in order until it
/// closes, errs or times out.
///
/// Between requests this future holds only the session's pointer and the wait for the next
/// head: each request's handling (routing, forwarding, the answer) is one boxed future,
/// allocated while the request is served, so that an idle keep-alive connection's task does
/// not carry the forwarding state machine.
pub async fn serve_requests<R: Runtime>(mut s: Box<Session<R>>) {
    loop {
        let (worker, listener) = (&*s.worker, &*s.listener);
        // Between requests (not before the first, which usually comes with the connection),
        // wait with no buffer where the runtime can; a small one is allocated once bytes come.
        // (Not one of the worker's spares: those are sized by their last use, and a large one
        // lent on as the next upstream read buffer takes a whole large body in its first read,
        // before splicing could start: measured, 64 KiB responses cost 41 instead of 23 µs on
        // io_uring.)
        // (A released buffer has no capacity; a resumed parked connection gets one at once,
        // its bytes being ready.)
        if !s.first
            && s.bufs.rbuf.capacity() == 0
            && listener.release_idle_buffer
            && s.client.waits_without_buffer()
        {
            match wait_for_request(worker, &mut s.client, listener).await {
                Woke::Request => {}
                Woke::Close => return,
                Woke::Park(until) => match park(s, until) {
                    // Parked: this task ends, and the connection lives on in the table.
                    None => return,
                    // Not parked (the kernel refused): the task waits on, as before.
                    Some(back) => {
                        s = back;
                        continue;
                    }
                },
            }
            s.bufs.rbuf = Vec::with_capacity(IDLE_READ);
        }
        // Boxed: an idle connection's task then holds only the wait above.
        let head =
            read_request_head::<R>(worker, &mut s.client, &mut s.bufs.rbuf, listener, s.first);
        let head = Box::pin(head).await;
        if let HeadRead::Closed = head {
            return;
        }
        match Box::pin(serve_request(&mut s, head)).await {
            Next::KeepAlive if s.bufs.logged.h2 => {
                // An h2 stream carries one request: its buffers go back now, and no read
                // waits for a next request that cannot come.
                let (worker, bufs) = (&s.worker, &mut s.bufs);
                for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead, &mut bufs.rbuf] {
                    worker.buffers.give(std::mem::take(b));
                }
                return;
            }
            Next::KeepAlive => {}
            Next::Close => return,
            // Boxed, as the head reader is: the tunnel's state is no part of an idle task.
            Next::Tunnel(u) => return Box::pin(serve_tunnel(s, u)).await,
        }
        // Going idle: give the large buffers back to the worker and wait with a small one.
        let (worker, bufs) = (&s.worker, &mut s.bufs);
        for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead] {
            worker.buffers.give(std::mem::take(b));
        }
        // The read buffer, if it grew for a long head, goes to the spares too; the connection
        // then waits with a small one, or with none (`release_idle_buffer`).
        let release = s.listener.release_idle_buffer && s.client.waits_without_buffer();
        if bufs.rbuf.is_empty() && bufs.rbuf.capacity() > IDLE_READ {
            let small = if release { Vec::new() } else { Vec::with_capacity(IDLE_READ) };
            worker.buffers.give(std::mem::replace(&mut bufs.rbuf, small));
        } else if bufs.rbuf.is_empty() && release {
            bufs.rbuf = Vec::new();
        }
    }
}

/// Parks an idle connection (see `park.rs`): its socket, as a descriptor of its own, joins the
/// worker's epoll set with what serving it again needs, and the session (the runtime's stream
/// with it) is dropped. `Some`: the session back, not parked.
///
/// The descriptor is a duplicate because the runtime may still hold the stream's own (on
/// io_uring, the readiness wait just abandoned is cancelled asynchronously); closing that one
/// leaves the socket open through the duplicate.
fn park<R: Runtime>(mut s: Box<Session<R>>, until: Instant) -> Option<Box<Session<R>>> {
    // The plaintext socket (what splicing uses too); `None` for TLS and HTTP/2, never parked.
    let Some(raw) = s.client.splice_fd() else { return Some(s) };
    // SAFETY: `raw` is the socket of `s.client`, open for as long as `s` lives (all of this
    // call); the borrow ends before `s` is dropped.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
    let Ok(fd) = fd.try_clone_to_owned() else { return Some(s) };
    let Some(guard) = s.guard.take() else { return Some(s) };
    let conn =
        ParkedConn { peer: s.peer, listener: Rc::clone(&s.listener), slot: s._slot.take(), guard };
    match s.worker.parked.park(fd, until, conn) {
        Ok(()) => None,
        Err(conn) => {
            s._slot = conn.slot;
            s.guard = Some(conn.guard);
            Some(s)
        }
    }
}

/// Serves a parked connection again, on a task of its own, once its client sent bytes (or
/// closed). `fd` is its socket, out of the epoll set.
pub fn resume<R: Runtime>(worker: &Rc<Worker<R>>, fd: std::os::fd::OwnedFd, conn: ParkedConn<R>) {
    let ParkedConn { peer, listener, slot, guard } = conn;
    let stream = match R::stream_from_std(std::net::TcpStream::from(fd)) {
        Ok(s) => s,
        Err(e) => {
            debug!(client = %peer, error = %e, "cannot resume a parked connection; closed");
            return;
        }
    };
    // Bytes are ready: a read buffer at once, not a readiness wait first.
    let start = (Vec::with_capacity(IDLE_READ), None, false);
    let session = Session::new(Rc::clone(worker), Transport::Plain(stream), peer, listener, start);
    let session = Session { first: false, _slot: slot, guard: Some(guard), ..session };
    let id = worker.id;
    R::spawn(isolate(serve_requests(Box::new(session)), move |msg| {
        error!(worker = id, client = %peer, panic = %msg, "connection task panicked; closed it");
    }));
}

/// Runs the tunnel a `101` opened to its end, then logs the request that opened it.
async fn serve_tunnel<R: Runtime>(s: Box<Session<R>>, u: Box<Upgraded<R::Stream>>) {
    let Upgraded { up, route, served, started, view } = *u;
    let Session { worker, client, mut bufs, peer, guard: _guard, .. } = *s;
    let idle = view.snap.config.routes[route].tunnel_idle_timeout;
    let end = tunnel::<R>(&worker, client, up, &mut bufs, idle).await;
    let served = Served { body_bytes: end.to_client, ..served };
    log_request(&worker, &view, peer, &bufs.logged, started, served, Some(route));
}

/// A client connection's state that lasts from request to request.
pub struct Session<R: Runtime> {
    worker: Rc<Worker<R>>,
    client: Transport<R::Stream>,
    /// The client's address: the PROXY protocol's when the listener takes it, else the peer.
    peer: SocketAddr,
    listener: Rc<Listener>,
    bufs: Buffers,
    /// No request has been read yet (the first must start within the header timeout).
    first: bool,
    /// The connection's place in the listener's per-client connection limit, when it has one
    /// (boxed: a connection without that limit carries 8 bytes for it, not 40).
    _slot: Option<Box<ClientConn>>,
    /// The connection's place in the worker's count of open connections: here so that a
    /// parked connection takes it along. (`None` for an HTTP/2 stream: its connection holds it.)
    guard: Option<ConnGuard<R>>,
}

impl<R: Runtime> Session<R> {
    /// `start`: bytes already read, the connection's TLS parameters (for the access log), and
    /// whether this is an h2 stream.
    fn new(
        worker: Rc<Worker<R>>,
        client: Transport<R::Stream>,
        peer: SocketAddr,
        listener: Rc<Listener>,
        start: (Vec<u8>, Option<crate::tls::TlsSummary>, bool),
    ) -> Session<R> {
        let (rbuf, tls, h2) = start;
        let mut bufs = Buffers { rbuf, ..Buffers::default() };
        bufs.logged.h2 = h2;
        if tls.is_some() {
            bufs.logged.fields().tls = tls;
        }
        Session { worker, client, peer, listener, bufs, first: true, _slot: None, guard: None }
    }
}

/// What a request's handling leaves the connection to do.
enum Next<S: Stream> {
    KeepAlive,
    Close,
    /// The request was upgraded: the rest of the connection is a tunnel to `up`.
    Tunnel(Box<Upgraded<S>>),
}

/// An upgraded request, for the tunnel that follows it and its access-log line.
struct Upgraded<S: Stream> {
    up: Transport<S>,
    route: usize,
    served: Served,
    started: Instant,
    view: Rc<WorkerView>,
}

/// Answers one request whose head was read (or refuses it): routes it, then forwards it,
/// answers it directly, or refuses it, and logs it.
async fn serve_request<R: Runtime>(s: &mut Session<R>, head: HeadRead) -> Next<R::Stream> {
    let (worker, listener, peer) = (&*s.worker, &*s.listener, s.peer);
    // This worker's share of the listener's per-client request rate (worked out per request,
    // not kept: an idle connection's session would carry 32 bytes for it).
    let rate = listener.rate_limit.map(|r| worker_rate(r, worker.workers));
    let (client, bufs) = (&mut s.client, &mut s.bufs);
    let started = crate::clock::now();
    let view = worker.view();
    let bound = worker.send_bound(listener);
    // The request's head, routed; or the status that refuses it (and closes).
    let routed = match head {
        HeadRead::Closed => return Next::Close,
        HeadRead::TimedOut => Err(HeadError::TimedOut),
        HeadRead::Invalid(e) => Err(e),
        HeadRead::Ready(end) => {
            s.first = false;
            // Borrow the large buffers for this request; they go back when the connection
            // idles.
            for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead] {
                if b.capacity() == 0 {
                    *b = worker.buffers.take();
                }
            }
            let logged = worker.access.is_some().then_some(&mut bufs.logged);
            let ctx =
                RouteCtx { worker, view: &view, listener, client: peer, scheme: client.scheme() };
            let edits = &mut bufs.response_edits;
            route(&ctx, &bufs.rbuf, end, &mut bufs.uhead, logged, edits)
        }
    };
    let (info, plan) = match routed {
        // Refused before reading any of the body; the lingering close bounds what we read.
        Ok((info, _)) if body_over_limit(listener.max_request_body, info.framing, 0) => {
            let refused = refuse(worker, &view, client, bufs, bound, peer, started, 413);
            refused.await;
            return Next::Close;
        }
        // Over the client's request rate: 429, and the connection stays usable.
        Ok((info, _))
            if rate.is_some_and(|r| {
                let key = (hash64(&listener.name), peer.ip());
                worker.limits.request(key, r, started).is_err()
            }) =>
        {
            let wait = rate.map_or(1, |r| (1.0 / r.per_second).ceil().max(1.0) as u64);
            let draining = worker.is_draining();
            let keep = discard_request(&mut bufs.rbuf, &info, &mut bufs.out, draining);
            let ka = info.needs_keep_alive_header();
            view.unrouted.record(429);
            let retry = format!("retry-after: {wait}\r\n");
            let answer = send_error_with::<R, _>(
                client,
                &mut bufs.out,
                bound,
                429,
                keep,
                ka,
                retry.as_bytes(),
            );
            let kept = answer.await;
            let served = Served::generated(429, kept, None);
            log_request(worker, &view, peer, &bufs.logged, started, served, None);
            return if kept { Next::KeepAlive } else { Next::Close };
        }
        Ok(p) => p,
        Err(e) => {
            debug!(client = %peer, reason = e.reason(), "refused request head");
            bufs.logged.unparsed();
            let refused = refuse(worker, &view, client, bufs, bound, peer, started, e.status());
            refused.await;
            return Next::Close;
        }
    };
    let (served, route) = match plan {
        Plan::Forward(target) => {
            let mut f = Forward {
                worker,
                view: &view,
                listener,
                target,
                info: &info,
                client: &mut *client,
                client_addr: peer,
                bufs: &mut *bufs,
                tunnel: None,
                upstream_uses: 0,
            };
            let served = forward_request(&mut f).await;
            let upgraded = f.tunnel.take();
            view.route_stats[target.route].record(served.status);
            if let Some(up) = upgraded {
                // The connection becomes a tunnel: the connection's loop, which owns the
                // client stream, runs it.
                return Next::Tunnel(Box::new(Upgraded {
                    up,
                    route: target.route,
                    served,
                    started,
                    view,
                }));
            }
            (served, Some(target.route))
        }
        Plan::Respond(route) => {
            let draining = worker.is_draining();
            let keep = discard_request(&mut bufs.rbuf, &info, &mut bufs.out, draining);
            let direct = view.snap.direct[route].as_ref().expect("respond route is encoded");
            let bytes = match (keep, info.needs_keep_alive_header()) {
                (false, _) => &direct.close,
                (true, false) => &direct.keep_alive,
                (true, true) => &direct.keep_alive_10,
            };
            let len = if info.is_head { bytes.len() - direct.body_len } else { bytes.len() };
            bufs.out.extend_from_slice(&bytes[..len]);
            view.route_stats[route].record(direct.status);
            let sent = send(client, &mut bufs.out, bound).await;
            let body_bytes = if info.is_head { 0 } else { direct.body_len as u64 };
            let served = Served {
                keep_open: sent && keep,
                status: direct.status,
                body_bytes,
                upstream: None,
                whole: sent,
            };
            (served, Some(route))
        }
        Plan::Redirect(route, status, location) => {
            let draining = worker.is_draining();
            let keep = discard_request(&mut bufs.rbuf, &info, &mut bufs.out, draining);
            let ka = info.needs_keep_alive_header();
            let field = format!("location: {location}\r\n");
            let extra = field.as_bytes();
            let answer =
                send_error_with::<R, _>(client, &mut bufs.out, bound, status, keep, ka, extra);
            let sent = answer.await;
            view.route_stats[route].record(status);
            (Served::generated(status, sent, None), Some(route))
        }
        Plan::NotFound | Plan::Forbidden(_) => {
            let (status, route) = match plan {
                Plan::Forbidden(i) => (403, Some(i)),
                _ => (404, None),
            };
            let draining = worker.is_draining();
            let keep = discard_request(&mut bufs.rbuf, &info, &mut bufs.out, draining);
            let ka = info.needs_keep_alive_header();
            match route {
                Some(i) => view.route_stats[i].record(status),
                None => view.unrouted.record(status),
            }
            let sent = send_error::<R, _>(client, &mut bufs.out, bound, status, keep, ka).await;
            (Served::generated(status, sent, None), route)
        }
    };
    log_request(worker, &view, peer, &bufs.logged, started, served, route);
    if !served.keep_open {
        if served.whole {
            close_notify::<R>(client).await;
        }
        return Next::Close;
    }
    Next::KeepAlive
}

/// Longest Apex waits to hand a closing TLS client its close_notify: 24 bytes, which fit in the
/// socket buffer unless the client stopped reading.
const CLOSE_NOTIFY_TIME: Duration = Duration::from_secs(1);

/// Ends a TLS connection after a whole response with close_notify, then FIN. (A plaintext
/// connection is just dropped: FIN.)
async fn close_notify<R: Runtime>(client: &mut Transport<R::Stream>) {
    if let Transport::Tls(_) = client {
        // Boxed: see `linger_close` (a runtime timer inline makes the request's future
        // 128-aligned).
        let _ = Box::pin(R::timeout(CLOSE_NOTIFY_TIME, client.shutdown_write())).await;
    }
}

/// Refuses a request with `status` and closes the connection: counted as unrouted and logged.
#[allow(clippy::too_many_arguments)] // the request's parts, borrowed apart from its session
async fn refuse<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    client: &mut Transport<R::Stream>,
    bufs: &mut Buffers,
    bound: SendBound<'_>,
    peer: SocketAddr,
    started: Instant,
    status: u16,
) {
    view.unrouted.record(status);
    send_error::<R, _>(client, &mut bufs.out, bound, status, false, false).await;
    let served = Served::generated(status, false, None);
    log_request(worker, view, peer, &bufs.logged, started, served, None);
}

/// One access-log line for a request that ended, when the log is on.
fn log_request<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    peer: SocketAddr,
    l: &Logged,
    started: Instant,
    served: Served,
    route: Option<usize>,
) {
    crate::stats::bump(&worker.stats.requests_by_protocol[usize::from(l.h2)]);
    let Some(log) = &worker.access else { return };
    // Every logged request captured its fields, or was marked unparsed; the fallback is an
    // empty line rather than a lost one.
    let unset = LoggedFields::default();
    let l = l.fields.as_deref().unwrap_or(&unset);
    let route = route.map(|i| view.snap.config.routes[i].name.as_str()).unwrap_or("");
    log.record(&Entry {
        time: SystemTime::now(),
        client: peer,
        method: &l.method,
        target: &l.target,
        version: l.version,
        status: served.status,
        bytes: served.body_bytes,
        duration: crate::clock::since(started),
        upstream: served.upstream,
        route,
        referer: &l.referer,
        user_agent: &l.user_agent,
        request_id: &l.request_id,
        tls: l.tls.as_ref(),
    });
}
