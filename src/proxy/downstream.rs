//! One downstream (client) connection: read request heads, route them, answer or forward, and
//! keep the connection alive between requests. This is where a request's journey starts:
//! `serve_downstream` → `route` → `forward::forward_request` → `relay::relay_response`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use tracing::debug;

use super::buffers::IDLE_READ;
use super::conn::{flush, read_some, send_error, MIN_READ};
use super::forward::forward_request;
use super::io::Runtime;
use super::request::{body_over_limit, Buffers, Logged, RequestInfo, Served, Target};
use super::tunnel::tunnel;
use super::wait::{race, Either};
use super::{ConnGuard, Forward, Worker, WorkerView};
use crate::access_log::Entry;
use crate::balance::hash64;
use crate::config::lb::{HashOn, Policy};
use crate::config::{Action, Listener};
use crate::http::body::BodyRelay;
use crate::http::request::RequestHead;
use crate::http::request::{add_upgrade, encode_upstream_head, parse_request_head_at};
use crate::http::scan::{HeadEnd, HeadScanner};
use crate::http::{Framing, HeadError, HeadLimits};

enum Plan {
    Forward(Target),
    Respond(usize),
    NotFound,
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
fn route(
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
    let mut info = RequestInfo {
        head_len: head.len,
        framing: head.framing,
        version: head.version,
        keep_alive: head.keep_alive,
        expect_continue: head.expect_continue,
        idempotent: head.is_idempotent(),
        is_head: head.is_head(),
        upgrade: false,
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
                // An upgrade the route forwards keeps its fields; any other is dropped, like
                // every hop-by-hop field, and the request goes on as plain HTTP.
                let route = &snap.config.routes[i];
                if let Some(protocol) = head.upgrade().filter(|p| route.allows_upgrade(p)) {
                    add_upgrade(uhead, protocol);
                    info.upgrade = true;
                }
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
                route(&bufs.rbuf, end, &limits, &view, peer, &mut bufs.uhead, logged)
            }
        };
        let (info, plan) = match routed {
            // Refused before reading any of the body; the lingering close bounds what we read.
            Ok((info, _)) if body_over_limit(listener.max_request_body, info.framing, 0) => {
                let refused = refuse(&worker, &view, &mut client, &mut bufs, peer, started, 413);
                return Box::pin(refused).await;
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
                    bufs: &mut bufs,
                    tunnel: None,
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
                let body_bytes = if info.is_head { 0 } else { direct.body_len as u64 };
                let served =
                    Served { keep_open: sent, status: direct.status, body_bytes, upstream: None };
                (served, Some(route))
            }
            Plan::NotFound => {
                let whole = discard_request(&mut bufs.rbuf, &info, &mut bufs.out);
                let keep = whole && info.keep_alive && !worker.is_draining();
                let ka = info.needs_keep_alive_header();
                view.unrouted.record(404);
                let sent =
                    Box::pin(send_error::<R>(&mut client, &mut bufs.out, 404, keep, ka)).await;
                (Served::generated(404, sent, None), None)
            }
        };
        log_request(&worker, &view, peer, &bufs.logged, started, served, route);
        if !served.keep_open {
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

/// Refuses a request with `status` and closes the connection: counted as unrouted and logged.
async fn refuse<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    peer: SocketAddr,
    started: Instant,
    status: u16,
) {
    view.unrouted.record(status);
    send_error::<R>(client, &mut bufs.out, status, false, false).await;
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
    });
}
