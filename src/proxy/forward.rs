//! A forwarded request's journey: pick an upstream, send the request, relay the response.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::downstream::{flush, read_some, send_error, Buffers, RequestInfo, BODY_READ};
use super::error::ProxyError;
use super::io::{Runtime, Stream};
use super::{Worker, WorkerView};
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

/// Forwards the request whose head is at the start of `bufs.rbuf` (already encoded into
/// `bufs.uhead`) and relays the response. Returns whether the client connection stays open.
pub async fn forward_request<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    cluster_index: usize,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    listener: &Listener,
) -> Served {
    let started = Instant::now();
    let cluster = &view.snap.config.clusters[cluster_index];
    let addr = pick_upstream(view, cluster_index, cluster);
    let (keep_open, status, body_bytes) =
        forward(worker, view, cluster_index, addr, client, bufs, info, listener).await;
    view.cluster_stats[cluster_index].record(status, started.elapsed());
    Served { keep_open, status, body_bytes, upstream: Some(addr) }
}

/// [`forward_request`] without the bookkeeping: returns whether the client connection stays
/// open, the status the client got (499 when the client went away first) and the body bytes
/// relayed.
#[allow(clippy::too_many_arguments)] // the request's whole context; one call site
async fn forward<R: Runtime>(
    worker: &Worker<R>,
    view: &WorkerView,
    cluster_index: usize,
    addr: SocketAddr,
    client: &mut R::Stream,
    bufs: &mut Buffers,
    info: &RequestInfo,
    listener: &Listener,
) -> (bool, u16, u64) {
    let cluster = &view.snap.config.clusters[cluster_index];
    let stats = &view.cluster_stats[cluster_index];

    // The part of the body that arrived with the head joins the head: one write, and a request
    // that is whole in `uhead` can be replayed.
    let mut body = BodyRelay::new(info.framing, info.framing);
    let taken = match body.relay(&bufs.rbuf[info.head_len..], &mut bufs.uhead) {
        Ok(n) => n,
        Err(e) => {
            debug!(reason = e.reason(), "refused request body");
            return (send_error::<R>(client, &mut bufs.out, 400, false, false).await, 400, 0);
        }
    };
    bufs.rbuf.drain(..info.head_len + taken);
    if listener.max_request_body.is_some_and(|max| body.body_bytes() > max) {
        return (send_error::<R>(client, &mut bufs.out, 413, false, false).await, 413, 0);
    }
    let replayable = info.idempotent && body.is_done();

    let mut retried = false;
    let outcome = loop {
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
            None => match connect_upstream::<R>(addr, cluster.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    match e {
                        ProxyError::ConnectTimeout => stats.timeout(),
                        _ => stats.connect_error(),
                    }
                    break Err(e);
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
            break Err(ProxyError::UpstreamWrite(e));
        }
        if !body.is_done() {
            if info.expect_continue {
                bufs.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                if !flush(client, &mut bufs.out).await {
                    return (false, 499, 0);
                }
            }
            let idle = listener.body_timeout;
            let max = listener.max_request_body;
            match stream_request_body::<R>(client, &mut up, bufs, &mut body, idle, max).await {
                Ok(()) => {}
                Err(BodyStop::TooLarge) => {
                    return (
                        send_error::<R>(client, &mut bufs.out, 413, false, false).await,
                        413,
                        0,
                    );
                }
                Err(BodyStop::ClientGone) => return (false, 499, 0),
                Err(BodyStop::Timeout) => {
                    return (
                        send_error::<R>(client, &mut bufs.out, 408, false, false).await,
                        408,
                        0,
                    );
                }
                Err(BodyStop::Bad(reason)) => {
                    debug!(reason, "refused request body");
                    return (
                        send_error::<R>(client, &mut bufs.out, 400, false, false).await,
                        400,
                        0,
                    );
                }
                Err(BodyStop::Upstream(e)) => break Err(ProxyError::UpstreamWrite(e)),
            }
        }
        match read_response_head::<R>(
            &mut up,
            bufs,
            info,
            &worker.response_limits,
            cluster.response_timeout,
            &|| worker.is_draining(),
        )
        .await
        {
            Ok(plan) => break Ok((up, plan)),
            Err(ProxyError::UpstreamClosed) if reused && replayable && !retried => {
                debug!(upstream = %addr, "pooled connection closed before responding; retrying");
                retried = true;
                stats.retry();
            }
            Err(e) => {
                if matches!(e, ProxyError::ResponseTimeout) {
                    stats.timeout();
                }
                break Err(e);
            }
        }
    };

    let (up, plan) = match outcome {
        Ok(x) => x,
        Err(e) => {
            warn!(upstream = %addr, cluster = %cluster.name, error = %e, "upstream request failed");
            bufs.out.clear();
            // A body still on the wire cannot be skipped safely: close after answering.
            let keep = body.is_done() && info.keep_alive && !worker.is_draining();
            let ka = info.needs_keep_alive_header();
            let sent = send_error::<R>(client, &mut bufs.out, e.status(), keep, ka).await;
            return (sent, e.status(), 0);
        }
    };
    let status = plan.status;
    let (keep, bytes) = relay_response::<R>(worker, client, up, addr, cluster, bufs, plan).await;
    (keep, status, bytes)
}

/// Round robin over the cluster's endpoints, on this worker's own counter.
fn pick_upstream(view: &WorkerView, cluster_index: usize, cluster: &Cluster) -> SocketAddr {
    let i = view.balancers[cluster_index].pick(cluster.endpoints.len());
    cluster.endpoints[i]
}

/// Sends the response head (already in `bufs.out`) and streams the body, re-framed, one read
/// at a time. Returns whether the client connection stays open, and the body bytes relayed.
async fn relay_response<R: Runtime>(
    worker: &Worker<R>,
    client: &mut R::Stream,
    mut up: R::Stream,
    addr: SocketAddr,
    cluster: &Cluster,
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
        match R::timeout(cluster.read_timeout, read_some(&mut up, &mut bufs.ubuf, BODY_READ)).await
        {
            Some(Ok(n)) if n > 0 => {}
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
