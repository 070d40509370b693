//! A forwarded request's journey: pick an upstream, send the request, relay the response.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::downstream::{flush, read_some, send_error, Buffers, RequestInfo, BODY_READ};
use super::error::ProxyError;
use super::io::{Runtime, Stream};
use super::{Worker, WorkerView};
use crate::config::lb::RetryOn;
use crate::config::{Cluster, Listener};
use crate::http::body::BodyRelay;
use crate::http::response::{encode_downstream_head, parse_response_head};
use crate::http::{Framing, HeadLimits, Status, Version};

/// What the response head says, once it is out of the upstream buffer.
struct ResponsePlan {
    head_len: usize,
    framing: Framing,
    down_framing: Framing,
    /// The upstream allows another request on this connection.
    reusable: bool,
    close_client: bool,
    status: u16,
}

enum HeadParse {
    Partial,
    /// An interim (1xx) response of this many bytes: dropped, since Apex answers
    /// `Expect: 100-continue` itself and strips `Upgrade`.
    Interim(usize),
    Final(ResponsePlan),
}

/// Parses the response head in `ubuf` and, when final, encodes the downstream head into `out`.
fn prepare_response(
    ubuf: &[u8],
    info: &RequestInfo,
    limits: &HeadLimits,
    draining: bool,
    out: &mut Vec<u8>,
) -> Result<HeadParse, ProxyError> {
    let mut fields = crate::http::fields();
    let resp = match parse_response_head(ubuf, &mut fields, limits, info.is_head) {
        Ok(Status::Complete(r)) => r,
        Ok(Status::Partial) => return Ok(HeadParse::Partial),
        Err(e) => return Err(ProxyError::BadResponse(e)),
    };
    if resp.status == 101 {
        return Err(ProxyError::BadResponse("protocol switch was not requested"));
    }
    if resp.is_interim() {
        return Ok(HeadParse::Interim(resp.len));
    }
    let down_framing = match resp.framing {
        Framing::Chunked | Framing::UntilClose if info.version == Version::Http10 => {
            Framing::UntilClose
        }
        Framing::Chunked | Framing::UntilClose => Framing::Chunked,
        f => f,
    };
    let close_client = !info.keep_alive || down_framing == Framing::UntilClose || draining;
    encode_downstream_head(out, &resp, down_framing, close_client, info.needs_keep_alive_header());
    Ok(HeadParse::Final(ResponsePlan {
        head_len: resp.len,
        framing: resp.framing,
        down_framing,
        reusable: resp.reusable,
        close_client,
        status: resp.status,
    }))
}

async fn connect_upstream<R: Runtime>(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<R::Stream, ProxyError> {
    match R::timeout(timeout, R::connect(addr)).await {
        None => Err(ProxyError::ConnectTimeout),
        Some(Err(e)) => Err(ProxyError::ConnectFailed(e)),
        Some(Ok(s)) => Ok(s),
    }
}

/// Why streaming the request body stopped early.
enum BodyStop {
    ClientGone,
    Timeout,
    /// Over the listener's `max_request_body`.
    TooLarge,
    Bad(&'static str),
    Upstream(std::io::Error),
}

/// Streams the rest of the request body from the client to the upstream, one bounded read at
/// a time.
async fn stream_request_body<R: Runtime>(
    client: &mut R::Stream,
    up: &mut R::Stream,
    bufs: &mut Buffers,
    body: &mut BodyRelay,
    idle: Duration,
    max_body: Option<u64>,
) -> Result<(), BodyStop> {
    while !body.is_done() {
        debug_assert!(bufs.rbuf.is_empty());
        match R::timeout(idle, read_some(client, &mut bufs.rbuf, BODY_READ)).await {
            None => return Err(BodyStop::Timeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(BodyStop::ClientGone),
            Some(Ok(_)) => {}
        }
        let taken = body.relay(&bufs.rbuf, &mut bufs.out).map_err(|e| BodyStop::Bad(e.reason()))?;
        if max_body.is_some_and(|max| body.body_bytes() > max) {
            return Err(BodyStop::TooLarge);
        }
        bufs.rbuf.drain(..taken);
        let (res, mut b) = up.write_all(std::mem::take(&mut bufs.out)).await;
        b.clear();
        bufs.out = b;
        res.map_err(BodyStop::Upstream)?;
    }
    Ok(())
}

/// Reads until a final response head is in `ubuf`, dropping interim responses; encodes the
/// downstream head into `out`.
async fn read_response_head<R: Runtime>(
    up: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    limits: &HeadLimits,
    timeout: Duration,
    draining: &dyn Fn() -> bool,
) -> Result<ResponsePlan, ProxyError> {
    let deadline = Instant::now() + timeout;
    bufs.ubuf.clear();
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match R::timeout(wait, read_some(up, &mut bufs.ubuf, BODY_READ)).await {
            None => return Err(ProxyError::ResponseTimeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(ProxyError::UpstreamClosed),
            Some(Ok(_)) => {}
        }
        loop {
            match prepare_response(&bufs.ubuf, info, limits, draining(), &mut bufs.out)? {
                HeadParse::Partial => break,
                HeadParse::Interim(n) => {
                    bufs.ubuf.drain(..n);
                }
                HeadParse::Final(plan) => return Ok(plan),
            }
        }
    }
}

/// How a forwarded request ended.
pub struct Served {
    pub keep_open: bool,
    pub status: u16,
    /// Response body bytes relayed to the client.
    pub body_bytes: u64,
    pub upstream: Option<SocketAddr>,
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
struct Timeouts {
    connect: Duration,
    response: Duration,
    read: Duration,
}

/// Read size while relaying a response body after its head: larger than request-side reads
/// because big responses are common; still a fixed bound per connection.
const RELAY_READ: usize = 64 * 1024;

/// Most attempts a retry policy allows (the config caps `attempts` at 10).
const MAX_ATTEMPTS: usize = 10;

/// Forwards the request whose head is at the start of `bufs.rbuf` (already encoded into
/// `bufs.uhead`) and relays the response, retrying on another endpoint where the route's retry
/// policy and budget allow.
#[allow(clippy::too_many_arguments)] // the request's whole context; one call site
pub async fn forward_request<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    target: Target,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    listener: &Listener,
) -> Served {
    let started = Instant::now();
    let served = forward(worker, view, target, client, bufs, info, listener).await;
    view.cluster_stats[target.cluster].record(served.status, started.elapsed());
    served
}

async fn forward<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    target: Target,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    listener: &Listener,
) -> Served {
    let route = &view.snap.config.routes[target.route];
    let cluster = &view.snap.config.clusters[target.cluster];
    let stats = &view.cluster_stats[target.cluster];
    let balancer = &view.balancers[target.cluster];
    let budget = &view.retry_budgets[target.route];
    let timeouts = Timeouts {
        connect: route.timeouts.connect.unwrap_or(cluster.connect_timeout),
        response: route.timeouts.response.unwrap_or(cluster.response_timeout),
        read: route.timeouts.read.unwrap_or(cluster.read_timeout),
    };
    let answered = |keep_open, status| Served { keep_open, status, body_bytes: 0, upstream: None };

    // The part of the body that arrived with the head joins the head: one write, and a request
    // that is whole in `uhead` can be replayed.
    let mut body = BodyRelay::new(info.framing, info.framing);
    let taken = match body.relay(&bufs.rbuf[info.head_len..], &mut bufs.uhead) {
        Ok(n) => n,
        Err(e) => {
            debug!(reason = e.reason(), "refused request body");
            return answered(send_error::<R>(client, &mut bufs.out, 400, false, false).await, 400);
        }
    };
    bufs.rbuf.drain(..info.head_len + taken);
    if listener.max_request_body.is_some_and(|max| body.body_bytes() > max) {
        return answered(send_error::<R>(client, &mut bufs.out, 413, false, false).await, 413);
    }
    let replayable = info.idempotent && body.is_done();
    budget.request();

    let health = worker.health(view);
    let healthy = health[target.cluster].as_deref();
    let fail_open = cluster.health_check.as_ref().is_none_or(|h| h.fail_open);
    let ring = view.snap.rings[target.cluster].as_ref();
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut attempts = 0;
    loop {
        let on_ring = ring.zip(target.hash_key);
        let picked = balancer.pick(on_ring, healthy, fail_open, &tried[..attempts]);
        let Ok(i) = picked else {
            let e = ProxyError::NoHealthyEndpoint;
            warn!(cluster = %cluster.name, "no healthy endpoint: answering 503");
            let keep = body.is_done() && info.keep_alive && !worker.is_draining();
            let ka = info.needs_keep_alive_header();
            return answered(
                send_error::<R>(client, &mut bufs.out, e.status(), keep, ka).await,
                503,
            );
        };
        tried[attempts] = i;
        attempts += 1;
        let addr = cluster.endpoints[i];
        // May this failure be retried, on another endpoint if there is one?
        let may_retry = |on: RetryOn| {
            route.retry.as_ref().is_some_and(|p| {
                replayable && attempts < p.attempts as usize && p.retries_on(on) && budget.allow(p)
            })
        };
        balancer.started(i);
        let exchanged = exchange::<R>(
            worker, cluster, stats, addr, &timeouts, client, bufs, info, listener, &mut body,
            replayable,
        )
        .await;
        match exchanged {
            Exchange::Response(up, plan) => {
                let status = plan.status;
                let failed = status >= 500;
                if failed && may_retry(RetryOn::Status(status)) {
                    balancer.finished(i);
                    note_ejection(balancer.report(i, true), cluster, addr);
                    debug!(upstream = %addr, status, "retrying on another endpoint");
                    stats.retry();
                    bufs.out.clear();
                    continue;
                }
                let (keep, bytes) = relay_response::<R>(
                    worker,
                    client,
                    up,
                    addr,
                    cluster,
                    timeouts.read,
                    bufs,
                    plan,
                )
                .await;
                balancer.finished(i);
                note_ejection(balancer.report(i, failed), cluster, addr);
                return Served { keep_open: keep, status, body_bytes: bytes, upstream: Some(addr) };
            }
            Exchange::Failed(e) => {
                balancer.finished(i);
                note_ejection(balancer.report(i, true), cluster, addr);
                let on = match e {
                    ProxyError::ConnectFailed(_) | ProxyError::ConnectTimeout => {
                        RetryOn::ConnectFailure
                    }
                    ProxyError::ResponseTimeout => RetryOn::Status(504),
                    _ => RetryOn::Status(502),
                };
                if body.is_done() && may_retry(on) {
                    debug!(upstream = %addr, error = %e, "retrying on another endpoint");
                    stats.retry();
                    continue;
                }
                warn!(upstream = %addr, cluster = %cluster.name, error = %e, "upstream request failed");
                // A body still on the wire cannot be skipped safely: close after answering.
                let keep = body.is_done() && info.keep_alive && !worker.is_draining();
                let ka = info.needs_keep_alive_header();
                let sent = send_error::<R>(client, &mut bufs.out, e.status(), keep, ka).await;
                return Served {
                    keep_open: sent,
                    status: e.status(),
                    body_bytes: 0,
                    upstream: Some(addr),
                };
            }
            Exchange::Answered { keep_open, status } => {
                balancer.finished(i);
                return Served { keep_open, status, body_bytes: 0, upstream: Some(addr) };
            }
        }
    }
}

fn note_ejection(ejected: Option<Duration>, cluster: &Cluster, addr: SocketAddr) {
    if let Some(t) = ejected {
        warn!(cluster = %cluster.name, upstream = %addr, ejected_for = ?t, "outlier ejected");
    }
}

/// How one attempt on one endpoint ended.
enum Exchange<S> {
    /// A final response head is in `bufs.ubuf` (and its downstream head in `bufs.out`).
    Response(S, ResponsePlan),
    /// The upstream failed before a response head.
    Failed(ProxyError),
    /// The client side ended the request (and was answered, if it could be).
    Answered { keep_open: bool, status: u16 },
}

/// One attempt: a pooled or fresh connection to `addr`, the request, the response head. A
/// pooled connection that turns out stale is replaced by a fresh one once, for a replayable
/// request.
#[allow(clippy::too_many_arguments)] // the attempt's whole context; one call site
async fn exchange<R: Runtime>(
    worker: &Worker<R>,
    cluster: &Cluster,
    stats: &crate::stats::ClusterStats,
    addr: SocketAddr,
    timeouts: &Timeouts,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    listener: &Listener,
    body: &mut BodyRelay,
    replayable: bool,
) -> Exchange<R::Stream> {
    let mut retried = false;
    loop {
        let pooled = if retried {
            None
        } else {
            worker.pool.checkout(addr, cluster.pool_idle_timeout, !replayable)
        };
        let reused = pooled.is_some();
        if !retried {
            stats.pool(reused);
        }
        let mut up = match pooled {
            Some(s) => s,
            None => match connect_upstream::<R>(addr, timeouts.connect).await {
                Ok(s) => s,
                Err(e) => {
                    match e {
                        ProxyError::ConnectTimeout => stats.timeout(),
                        _ => stats.connect_error(),
                    }
                    return Exchange::Failed(e);
                }
            },
        };
        let (res, b) = up.write_all(std::mem::take(&mut bufs.uhead)).await;
        bufs.uhead = b;
        if let Err(e) = res {
            if reused && replayable && !retried {
                debug!(upstream = %addr, "pooled connection failed on write; retrying on a fresh one");
                retried = true;
                stats.retry();
                continue;
            }
            return Exchange::Failed(ProxyError::UpstreamWrite(e));
        }
        if !body.is_done() {
            if info.expect_continue {
                bufs.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                if !flush(client, &mut bufs.out).await {
                    return Exchange::Answered { keep_open: false, status: 499 };
                }
            }
            let idle = listener.body_timeout;
            let max = listener.max_request_body;
            let answer =
                match stream_request_body::<R>(client, &mut up, bufs, body, idle, max).await {
                    Ok(()) => None,
                    Err(BodyStop::TooLarge) => Some(413),
                    Err(BodyStop::ClientGone) => {
                        return Exchange::Answered { keep_open: false, status: 499 }
                    }
                    Err(BodyStop::Timeout) => Some(408),
                    Err(BodyStop::Bad(reason)) => {
                        debug!(reason, "refused request body");
                        Some(400)
                    }
                    Err(BodyStop::Upstream(e)) => {
                        return Exchange::Failed(ProxyError::UpstreamWrite(e))
                    }
                };
            if let Some(status) = answer {
                let keep_open = send_error::<R>(client, &mut bufs.out, status, false, false).await;
                return Exchange::Answered { keep_open, status };
            }
        }
        let draining = || worker.is_draining();
        let head = read_response_head::<R>(
            &mut up,
            bufs,
            info,
            &worker.response_limits,
            timeouts.response,
            &draining,
        );
        match head.await {
            Ok(plan) => return Exchange::Response(up, plan),
            Err(ProxyError::UpstreamClosed) if reused && replayable && !retried => {
                debug!(upstream = %addr, "pooled connection closed before responding; retrying");
                retried = true;
                stats.retry();
            }
            Err(e) => {
                if matches!(e, ProxyError::ResponseTimeout) {
                    stats.timeout();
                }
                return Exchange::Failed(e);
            }
        }
    }
}

/// Sends the response head (already in `bufs.out`) and streams the body, re-framed, one read
/// at a time. Returns whether the client connection stays open, and the body bytes relayed.
#[allow(clippy::too_many_arguments)] // the response's whole context; one call site
async fn relay_response<R: Runtime>(
    worker: &Worker<R>,
    client: &mut R::Stream,
    mut up: R::Stream,
    addr: SocketAddr,
    cluster: &Cluster,
    read_timeout: Duration,
    bufs: &mut Buffers,
    plan: ResponsePlan,
) -> (bool, u64) {
    let mut body = BodyRelay::new(plan.framing, plan.down_framing);
    let mut leftover = false;
    let mut offset = plan.head_len;
    loop {
        match body.relay(&bufs.ubuf[offset..], &mut bufs.out) {
            Ok(n) => leftover |= body.is_done() && offset + n < bufs.ubuf.len(),
            Err(e) => {
                warn!(upstream = %addr, reason = e.reason(), status = plan.status, "bad response body");
                return (false, body.body_bytes());
            }
        }
        bufs.ubuf.clear();
        offset = 0;
        // Each read is passed on at once: a slow stream reaches the client as it is produced.
        if !flush(client, &mut bufs.out).await {
            return (false, body.body_bytes());
        }
        if body.is_done() {
            break;
        }
        match R::timeout(read_timeout, read_some(&mut up, &mut bufs.ubuf, RELAY_READ)).await {
            Some(Ok(n)) if n > 0 => {
                // A body that passes through unchanged is written from the read buffer itself:
                // no copy into the output buffer.
                if let Some(n) = body.pass_through(bufs.ubuf.len()) {
                    leftover |= n < bufs.ubuf.len();
                    bufs.ubuf.truncate(n);
                    if !flush(client, &mut bufs.ubuf).await {
                        return (false, body.body_bytes());
                    }
                    if body.is_done() {
                        break;
                    }
                    continue;
                }
            }
            Some(Ok(_)) | Some(Err(_)) => {
                if body.end_of_input(&mut bufs.out) {
                    return (
                        flush(client, &mut bufs.out).await && !plan.close_client,
                        body.body_bytes(),
                    );
                }
                // Cut mid-body: the client must not mistake a short body for a whole one.
                warn!(upstream = %addr, status = plan.status, "upstream closed mid-body");
                return (false, body.body_bytes());
            }
            None => {
                warn!(upstream = %addr, status = plan.status, "upstream body read timed out");
                return (false, body.body_bytes());
            }
        }
    }
    if plan.reusable && !leftover {
        worker.pool.checkin(addr, up, cluster.pool_max_idle);
    }
    (!plan.close_client, body.body_bytes())
}
