//! One downstream (client) connection: read request heads, route them, answer or forward, and
//! keep the connection alive between requests. This is where a request's journey starts:
//! `serve_downstream` → `route` → `forward::forward_request` → `relay::relay_response`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use tracing::debug;

use super::buffers::IDLE_READ;
use super::conn::{flush, read_some, send_error, send_error_with, MIN_READ};
use super::forward::forward_request;
use super::http2::{serve_h2, H2Stream, PREFACE};
use super::io::{Runtime, Stream};
use super::limits::{share, worker_rate};
use super::request::{body_over_limit, Buffers, Logged, RequestInfo, Served, Target};
use super::transport::Transport;
use super::tunnel::tunnel;
use super::wait::{race, Either};
use super::{ConnGuard, Forward, Worker, WorkerView};
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
            // Nothing yet: the worker's coarse idle deadline, which the drain brings forward
            // (a request that arrives meanwhile is still served, with `Connection: close`).
            let idle = worker.idle.until(Instant::now() + wait);
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
    response_edits: &mut Option<FieldEdits>,
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
            *response_edits = route.response_edits.as_ref().map(|e| e.render(&vars));
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
    let deadline = Instant::now() + listener.header_timeout;
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
        let wait = deadline.saturating_duration_since(Instant::now());
        match R::timeout(wait, read_some(client, rbuf, IDLE_READ)).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Serves one client connection until it closes, errs or times out. `_guard` counts the
/// connection against the worker's cap until this returns.
pub async fn serve_downstream<R: Runtime>(
    worker: Rc<Worker<R>>,
    mut client: R::Stream,
    peer: SocketAddr,
    listener: Rc<Listener>,
    _guard: ConnGuard<R>,
    removed: Rc<super::wait::Event>,
) {
    // Only the read buffer until the request loop starts: it builds the rest.
    let mut rbuf = Vec::with_capacity(IDLE_READ);
    // The client's address: carried by a PROXY protocol header when the listener takes one
    // from this peer, else the peer itself.
    let peer = match &listener.proxy_protocol {
        None => peer,
        Some(pp) => {
            let established = establish_client::<R>(&mut client, &mut rbuf, peer, &listener, pp);
            match Box::pin(established).await {
                Some(addr) => addr,
                None => return,
            }
        }
    };
    let listener_key = hash64(&listener.name);
    // Open connections per client: this worker's share of the listener's limit. Beyond it the
    // connection is closed before anything is read.
    let _slot = match listener.max_connections_per_client {
        Some(max) => {
            match worker.limits.connect((listener_key, peer.ip()), share(max, worker.workers)) {
                Some(slot) => Some(slot),
                None => {
                    debug!(client = %peer, "over max_connections_per_client; closed");
                    return;
                }
            }
        }
        None => None,
    };
    // TLS: the handshake, within its timeout, before anything else is read.
    let mut client = match &listener.tls {
        None => Transport::Plain(client),
        Some(tls) => {
            let Some(config) = worker.view().tls_config(&listener.name) else { return };
            // Boxed: a runtime timer is large (monoio pads its entries to 128 B) and, unboxed,
            // would be part of every connection's task.
            let accept = TlsStream::accept(config, client);
            match Box::pin(R::timeout(tls.handshake_timeout, accept)).await {
                Some(Ok(s)) => Transport::Tls(Box::new(s)),
                Some(Err(e)) => {
                    debug!(client = %peer, error = %e, "TLS handshake failed");
                    worker.stats.tls_handshake(false);
                    return;
                }
                None => {
                    debug!(client = %peer, "TLS handshake timed out");
                    worker.stats.tls_handshake(false);
                    return;
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
            let sniff = sniff_preface::<R>(&mut client, &mut rbuf, listener.header_timeout);
            Box::pin(sniff).await
        }
        _ => false,
    };
    if h2 {
        let scheme = client.scheme();
        let preface = std::mem::take(&mut rbuf);
        // Each stream is served as one request on its own task, with its own buffers.
        let serve = |stream: H2Stream| {
            let client = Transport::H2(Box::new(stream), scheme);
            let (rbuf, tls) = (Vec::with_capacity(IDLE_READ), tls.clone());
            serve_requests(
                Rc::clone(&worker),
                client,
                peer,
                Rc::clone(&listener),
                (rbuf, tls, true),
            )
        };
        let timeouts = (listener.header_timeout, listener.keepalive_timeout);
        let h2 = serve_h2(&worker, &removed, client, preface, &listener.http2, timeouts, serve);
        return Box::pin(h2).await;
    }
    // Only the read buffer and the TLS summary cross into the request loop, which builds its
    // own `Buffers`: a local moved into an awaited future keeps its slot in this one, and with
    // the whole `Buffers` passed in (and the loop's own copy) a connection's task measured
    // 4,120 bytes; this way 2,816 (release build, size_of_val of the task).
    serve_requests(worker, client, peer, listener, (rbuf, tls, false)).await
}

/// On a prior-knowledge listener, reads until the first bytes either are the HTTP/2 preface
/// or cannot become it (an HTTP/1.1 request differs by its first or second byte), within the
/// header timeout. The bytes stay in `rbuf` for whichever protocol reads them.
async fn sniff_preface<R: Runtime>(
    client: &mut Transport<R::Stream>,
    rbuf: &mut Vec<u8>,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while rbuf.len() < PREFACE.len() && PREFACE.starts_with(rbuf) {
        let wait = deadline.saturating_duration_since(Instant::now());
        match R::timeout(wait, read_some(client, rbuf, IDLE_READ)).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
    rbuf.starts_with(PREFACE)
}

/// Serves the requests of one client connection (or of one HTTP/2 stream) in order until it
/// closes, errs or times out. `start`: bytes already read, the connection's TLS parameters
/// (for the access log), and whether this is an h2 stream.
pub async fn serve_requests<R: Runtime>(
    worker: Rc<Worker<R>>,
    mut client: Transport<R::Stream>,
    peer: SocketAddr,
    listener: Rc<Listener>,
    start: (Vec<u8>, Option<crate::tls::TlsSummary>, bool),
) {
    let (rbuf, tls, h2) = start;
    let mut bufs = Buffers { rbuf, ..Buffers::default() };
    bufs.logged.tls = tls;
    bufs.logged.h2 = h2;
    let listener_key = hash64(&listener.name);
    let rate = listener.rate_limit.map(|r| worker_rate(r, worker.workers));
    let mut first = true;
    loop {
        let head = read_request_head::<R>(&worker, &mut client, &mut bufs.rbuf, &listener, first);
        let head = head.await;
        let started = Instant::now();
        let view = worker.view();
        // The request's head, routed; or the status that refuses it (and closes).
        let routed = match head {
            HeadRead::Closed => return,
            HeadRead::TimedOut => Err(HeadError::TimedOut),
            HeadRead::Invalid(e) => Err(e),
            HeadRead::Ready(end) => {
                first = false;
                // Borrow the large buffers for this request; they go back when the connection
                // idles.
                for b in [&mut bufs.out, &mut bufs.ubuf, &mut bufs.uhead] {
                    if b.capacity() == 0 {
                        *b = worker.buffers.take();
                    }
                }
                let logged = worker.access.is_some().then_some(&mut bufs.logged);
                let ctx = RouteCtx {
                    worker: &worker,
                    view: &view,
                    listener: &listener,
                    client: peer,
                    scheme: client.scheme(),
                };
                let edits = &mut bufs.response_edits;
                route(&ctx, &bufs.rbuf, end, &mut bufs.uhead, logged, edits)
            }
        };
        let (info, plan) = match routed {
            // Refused before reading any of the body; the lingering close bounds what we read.
            Ok((info, _)) if body_over_limit(listener.max_request_body, info.framing, 0) => {
                let refused = refuse(&worker, &view, &mut client, &mut bufs, peer, started, 413);
                return Box::pin(refused).await;
            }
            // Over the client's request rate: 429, and the connection stays usable.
            Ok((info, _))
                if rate.is_some_and(|r| {
                    let key = (listener_key, peer.ip());
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
                    &mut client,
                    &mut bufs.out,
                    429,
                    keep,
                    ka,
                    retry.as_bytes(),
                );
                let kept = Box::pin(answer).await;
                let served = Served::generated(429, kept, None);
                log_request(&worker, &view, peer, &bufs.logged, started, served, None);
                if !kept {
                    return;
                }
                continue;
            }
            Ok(p) => p,
            Err(e) => {
                debug!(client = %peer, reason = e.reason(), "refused request head");
                bufs.logged.unparsed();
                let refused =
                    refuse(&worker, &view, &mut client, &mut bufs, peer, started, e.status());
                return Box::pin(refused).await;
            }
        };
        let (served, route) = match plan {
            Plan::Forward(target) => {
                let mut f = Forward {
                    worker: &worker,
                    view: &view,
                    listener: &listener,
                    target,
                    info: &info,
                    client: &mut client,
                    client_addr: peer,
                    bufs: &mut bufs,
                    tunnel: None,
                    upstream_uses: 0,
                };
                // Boxed: the forwarding state machine is large, and unboxed it would be part of
                // every idle connection's task (a future is as large as its largest await point).
                let served = Box::pin(forward_request(&mut f)).await;
                let upgraded = f.tunnel.take();
                view.route_stats[target.route].record(served.status);
                if let Some(up) = upgraded {
                    // The connection is a tunnel now, to its end; logged when it ends.
                    let idle = view.snap.config.routes[target.route].tunnel_idle_timeout;
                    let end = Box::pin(tunnel::<R>(&worker, client, up, &mut bufs, idle)).await;
                    let served = Served { body_bytes: end.to_client, ..served };
                    log_request(
                        &worker,
                        &view,
                        peer,
                        &bufs.logged,
                        started,
                        served,
                        Some(target.route),
                    );
                    return;
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
                // Boxed, like every answer: a write future is large, and unboxed it would be
                // part of every idle connection's task.
                let sent = Box::pin(flush(&mut client, &mut bufs.out)).await;
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
                let answer = send_error_with::<R, _>(
                    &mut client,
                    &mut bufs.out,
                    status,
                    keep,
                    ka,
                    field.as_bytes(),
                );
                let sent = Box::pin(answer).await;
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
                let sent =
                    Box::pin(send_error::<R, _>(&mut client, &mut bufs.out, status, keep, ka))
                        .await;
                (Served::generated(status, sent, None), route)
            }
        };
        log_request(&worker, &view, peer, &bufs.logged, started, served, route);
        if !served.keep_open {
            if served.whole {
                Box::pin(close_notify::<R>(&mut client)).await;
            }
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

/// Longest Apex waits to hand a closing TLS client its close_notify: 24 bytes, which fit in the
/// socket buffer unless the client stopped reading.
const CLOSE_NOTIFY_TIME: Duration = Duration::from_secs(1);

/// Ends a TLS connection after a whole response with close_notify, then FIN. (A plaintext
/// connection is just dropped: FIN.)
async fn close_notify<R: Runtime>(client: &mut Transport<R::Stream>) {
    if let Transport::Tls(_) = client {
        let _ = R::timeout(CLOSE_NOTIFY_TIME, client.shutdown_write()).await;
    }
}

/// Refuses a request with `status` and closes the connection: counted as unrouted and logged.
async fn refuse<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    client: &mut Transport<R::Stream>,
    bufs: &mut Buffers,
    peer: SocketAddr,
    started: Instant,
    status: u16,
) {
    view.unrouted.record(status);
    send_error::<R, _>(client, &mut bufs.out, status, false, false).await;
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
    let route = route.map(|i| view.snap.config.routes[i].name.as_str()).unwrap_or("");
    log.record(&Entry {
        time: SystemTime::now(),
        client: peer,
        method: &l.method,
        target: &l.target,
        version: l.version,
        status: served.status,
        bytes: served.body_bytes,
        duration: started.elapsed(),
        upstream: served.upstream,
        route,
        referer: &l.referer,
        user_agent: &l.user_agent,
        request_id: &l.request_id,
        tls: l.tls.as_ref(),
    });
}
