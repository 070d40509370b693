//! A forwarded request's journey after routing: pick an upstream, send the request (one
//! attempt per endpoint, retried as the route allows), then hand the response to `relay`.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, warn};

use super::conn::{read_some, send, send_error, BODY_READ};
use super::error::ProxyError;
use super::io::{Runtime, Stream};
use super::relay::{read_response_head, relay_response, ResponsePlan};
use super::request::{body_over_limit, Served, Timeouts};
use super::transport::Transport;
use super::wait::{before, IdleTimers};
use super::Forward;
use crate::balance::{Outcome, Unavailable};
use crate::config::lb::RetryOn;
use crate::http::body::BodyRelay;
use crate::proxy_protocol::encode_v2;
use crate::tls::TlsStream;
use rustls::pki_types::ServerName;
use std::sync::Arc;

/// Most attempts a retry policy allows (the config caps `attempts` at 10).
const MAX_ATTEMPTS: usize = 10;

/// Forwards the request whose head is at the start of `bufs.rbuf` (already encoded into
/// `bufs.uhead`) and relays the response, retrying on another endpoint where the route's retry
/// policy allows.
pub async fn forward_request<R: Runtime>(f: &mut Forward<'_, R>) -> Served {
    let started = crate::clock::now();
    let served = forward(f).await;
    f.view.cluster_stats[f.target.cluster].record(served.status, crate::clock::since(started));
    served
}

/// Answers the client with an error Apex generated and reports how the request ended. A body
/// still on the wire cannot be skipped safely, so then the connection closes.
async fn answer<R: Runtime>(
    f: &mut Forward<'_, R>,
    status: u16,
    body_done: bool,
    upstream: Option<SocketAddr>,
) -> Served {
    let keep = body_done && f.info.keep_alive && !f.worker.is_draining();
    let ka = f.info.needs_keep_alive_header();
    let bound = f.worker.send_bound(f.listener);
    let kept = send_error::<R, _>(f.client, &mut f.bufs.out, bound, status, keep, ka).await;
    Served::generated(status, kept, upstream)
}

async fn forward<R: Runtime>(f: &mut Forward<'_, R>) -> Served {
    let view = f.view;
    let route = &view.snap.config.routes[f.target.route];
    let cluster = &view.snap.config.clusters[f.target.cluster];
    let stats = &view.cluster_stats[f.target.cluster];
    let balancer = &view.balancers[f.target.cluster];
    let budget = &view.retry_budgets[f.target.route];
    let policy = &route.retry;
    let timeouts = Timeouts::of(route, cluster);

    // The part of the body that arrived with the head joins the head: one write, and a request
    // that is whole in `uhead` can be replayed.
    let mut body = BodyRelay::new(f.info.framing, f.info.framing);
    let taken = match body.relay(&f.bufs.rbuf[f.info.head_len..], &mut f.bufs.uhead) {
        Ok(n) => n,
        Err(e) => {
            debug!(reason = e.reason(), "refused request body");
            return answer(f, 400, false, None).await;
        }
    };
    f.bufs.rbuf.drain(..f.info.head_len + taken);
    if body_over_limit(f.listener.max_request_body, f.info.framing, body.body_bytes()) {
        return answer(f, 413, false, None).await;
    }
    let replayable = f.info.idempotent && body.is_done();
    budget.request();

    let health = f.worker.health(view);
    let healthy = health[f.target.cluster].as_deref();
    let fail_open = cluster.health_check.as_ref().is_none_or(|h| h.fail_open);
    let ring = view.snap.rings[f.target.cluster].as_ref();
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut attempts = 0;
    loop {
        // pick_upstream
        let on_ring = ring.zip(f.target.hash_key);
        let mut queued_until = None;
        let i = loop {
            match balancer.pick(on_ring, healthy, fail_open, &tried[..attempts]) {
                Ok(i) => break i,
                Err(Unavailable::NoHealthyEndpoint) => {
                    if cluster_warning_due(f, "no healthy endpoint") {
                        warn!(cluster = %cluster.name, "no healthy endpoint: answering 503");
                    }
                    return answer(f, ProxyError::NoHealthyEndpoint.status(), body.is_done(), None)
                        .await;
                }
                Err(Unavailable::Full) => {
                    // Every endpoint is at max_connections on this worker: wait in the
                    // cluster's queue (one deadline for the whole wait), then 503.
                    let until = *queued_until
                        .get_or_insert_with(|| crate::clock::now() + cluster.queue_timeout);
                    if !balancer.wait_for_room(&f.worker.idle, until).await {
                        stats.queue_rejected();
                        if cluster_warning_due(f, "endpoints full") {
                            warn!(cluster = %cluster.name, "every endpoint at max_connections and the queue full or timed out: answering 503");
                        }
                        return answer(f, 503, body.is_done(), None).await;
                    }
                }
            }
        };
        tried[attempts] = i;
        attempts += 1;
        let addr = cluster.endpoints[i];
        // May this failure be tried again on another endpoint? A failed connect sent nothing:
        // any method may go again, and the budget (meant to bound replays of requests an
        // upstream saw) does not apply. Anything else needs a replayable request and budget.
        let may_retry = |on: RetryOn| {
            if attempts >= policy.attempts as usize || !policy.retries_on(on) {
                return false;
            }
            if on == RetryOn::ConnectFailure {
                // Only to an endpoint not tried yet: trying a refused one again at once is
                // no retry (a one-endpoint cluster answers 502 at once, as nginx does).
                return cluster.endpoints.len() > attempts;
            }
            if !replayable {
                return false;
            }
            let allowed = budget.allow(policy);
            if !allowed {
                stats.retry_skipped();
            }
            allowed
        };
        let in_flight = balancer.started(i);
        let attempt_started = crate::clock::now();
        let stale_replay = replayable && policy.retries_on(RetryOn::StaleConnection);
        match attempt(f, addr, &timeouts, &mut body, stale_replay).await {
            Attempt::Response(up, plan) => {
                let status = plan.status;
                let failed = status >= 500;
                if failed && may_retry(RetryOn::Status(status)) {
                    drop(in_flight);
                    balancer.record(i, true, crate::clock::since(attempt_started));
                    note_ejection(balancer.report(i, Outcome::Failed), &cluster.name, addr);
                    debug!(upstream = %addr, status, "retrying on another endpoint");
                    stats.retry();
                    f.bufs.out.clear();
                    continue;
                }
                let relayed = relay_response(f, up, addr, timeouts.read, plan).await;
                drop(in_flight);
                balancer.record(i, failed, crate::clock::since(attempt_started));
                let outcome = if failed { Outcome::Failed } else { Outcome::Ok };
                note_ejection(balancer.report(i, outcome), &cluster.name, addr);
                return Served {
                    keep_open: relayed.keep_client,
                    status,
                    body_bytes: relayed.body_bytes,
                    upstream: Some(addr),
                    whole: relayed.whole,
                };
            }
            Attempt::Failed(e) => {
                drop(in_flight);
                balancer.record(i, true, crate::clock::since(attempt_started));
                let (outcome, on) = match e {
                    // A failed TLS handshake also sent nothing of the request.
                    ProxyError::ConnectFailed(_)
                    | ProxyError::ConnectTimeout
                    | ProxyError::TlsFailed(_) => (Outcome::ConnectFailed, RetryOn::ConnectFailure),
                    ProxyError::ResponseTimeout => (Outcome::Failed, RetryOn::Status(504)),
                    _ => (Outcome::Failed, RetryOn::Status(502)),
                };
                note_ejection(balancer.report(i, outcome), &cluster.name, addr);
                // A failed connect happened before any of a streamed body was read, so even
                // then the request can go elsewhere; other failures need the body whole.
                if (body.is_done() || on == RetryOn::ConnectFailure) && may_retry(on) {
                    debug!(upstream = %addr, error = %e, "retrying on another endpoint");
                    stats.retry();
                    continue;
                }
                f.worker.failure(addr, e.kind(), &e);
                return answer(f, e.status(), body.is_done(), Some(addr)).await;
            }
            Attempt::Answered(served) => {
                // The client side ended it: counted, not as the endpoint's error.
                balancer.record(i, false, crate::clock::since(attempt_started));
                return Served { upstream: Some(addr), ..served };
            }
        }
    }
}

/// Whether a cluster-wide refusal (no healthy endpoint, every endpoint full) should be logged
/// now: rate-limited like upstream failures, since in an outage every request comes here.
fn cluster_warning_due<R: Runtime>(f: &Forward<'_, R>, reason: &'static str) -> bool {
    let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
    f.worker.failures.admit(nowhere, reason, crate::clock::now())
}

fn note_ejection(ejected: Option<Duration>, cluster: &str, addr: SocketAddr) {
    if let Some(t) = ejected {
        warn!(cluster = %cluster, upstream = %addr, ejected_for = ?t, "outlier ejected");
    }
}

/// How one attempt on one endpoint ended.
enum Attempt<S> {
    /// A final response head is in `bufs.ubuf` (and its downstream head in `bufs.out`).
    Response(S, ResponsePlan),
    /// The upstream failed before a response head.
    Failed(ProxyError),
    /// The client side ended the request (and was answered, if it could be).
    Answered(Served),
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
    f: &mut Forward<'_, R>,
    up: &mut Transport<R::Stream>,
    body: &mut BodyRelay,
) -> Result<(), BodyStop> {
    let bufs = &mut *f.bufs;
    while !body.is_done() {
        debug_assert!(bufs.rbuf.is_empty());
        let read = read_some(f.client, &mut bufs.rbuf, BODY_READ);
        match before(&f.worker.deadlines, crate::clock::now() + f.listener.body_timeout, read).await
        {
            None => return Err(BodyStop::Timeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(BodyStop::ClientGone),
            Some(Ok(_)) => {}
        }
        let taken = body.relay(&bufs.rbuf, &mut bufs.out).map_err(|e| BodyStop::Bad(e.reason()))?;
        if body_over_limit(f.listener.max_request_body, f.info.framing, body.body_bytes()) {
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

async fn connect_upstream<R: Runtime>(
    timers: &IdleTimers,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<R::Stream, ProxyError> {
    match before(timers, crate::clock::now() + timeout, R::connect(addr)).await {
        None => Err(ProxyError::ConnectTimeout),
        Some(Err(e)) => Err(ProxyError::ConnectFailed(e)),
        Some(Ok(s)) => Ok(s),
    }
}

/// The TLS handshake with an upstream, within `timeout`; the name verified is the cluster's
/// `server_name`, else the endpoint's address.
async fn upstream_tls<R: Runtime>(
    s: R::Stream,
    config: Arc<rustls::ClientConfig>,
    name: Option<&ServerName<'static>>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Transport<R::Stream>, ProxyError> {
    let name = name.cloned().unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
    // Boxed whole: see `linger_close` (a runtime timer inline makes the request's future
    // 128-aligned).
    match Box::pin(R::timeout(timeout, TlsStream::connect(config, name, s))).await {
        None => Err(ProxyError::ConnectTimeout),
        Some(Err(e)) => Err(ProxyError::TlsFailed(e.to_string())),
        Some(Ok(t)) => Ok(Transport::Tls(Box::new(t))),
    }
}

/// One attempt: a pooled or fresh connection to `addr`, the request, the response head. A
/// pooled connection that fails before any response byte is replaced by a fresh one, once,
/// when `stale_replay` allows it (a replayable request on a route that retries stale
/// connections).
async fn attempt<R: Runtime>(
    f: &mut Forward<'_, R>,
    addr: SocketAddr,
    timeouts: &Timeouts,
    body: &mut BodyRelay,
    stale_replay: bool,
) -> Attempt<Transport<R::Stream>> {
    let cluster = &f.view.snap.config.clusters[f.target.cluster];
    let stats = &f.view.cluster_stats[f.target.cluster];
    let mut retried = false;
    loop {
        // A connection that told its upstream one client's address (PROXY protocol) carries
        // that client's requests only: never from or to the pool.
        let pooled = if retried || cluster.send_proxy_protocol {
            None
        } else {
            // A request that cannot be replayed is only sent on a connection checked first.
            f.worker.pool.checkout(addr, cluster.pool_idle_timeout, !stale_replay)
        };
        let reused = pooled.is_some();
        if !retried {
            stats.pool(reused);
        }
        let may_replay = reused && stale_replay && !retried;
        f.upstream_uses = pooled.as_ref().map_or(1, |p| p.1.saturating_add(1));
        let mut up = match pooled {
            Some((s, _)) => s,
            None => {
                let connected =
                    connect_upstream::<R>(&f.worker.deadlines, addr, timeouts.connect).await;
                let connected = match connected {
                    Ok(mut s) if cluster.send_proxy_protocol => {
                        let mut header = Vec::with_capacity(52);
                        let local = f.client.local_addr().unwrap_or(f.listener.address);
                        encode_v2(&mut header, f.client_addr, local);
                        match s.write_all(header).await {
                            (Err(e), _) => return Attempt::Failed(ProxyError::UpstreamWrite(e)),
                            _ => Ok(s),
                        }
                    }
                    other => other,
                };
                let tls = f.view.upstream_tls[f.target.cluster].clone();
                let upgraded = match (connected, tls) {
                    (Ok(s), Some(config)) => {
                        let name = cluster.tls.as_ref().and_then(|t| t.server_name.as_ref());
                        upstream_tls::<R>(s, config, name, addr, timeouts.connect).await
                    }
                    (Ok(s), None) => Ok(Transport::Plain(s)),
                    (Err(e), _) => Err(e),
                };
                match upgraded {
                    Ok(s) => s,
                    Err(e) => {
                        match e {
                            ProxyError::ConnectTimeout => stats.timeout(),
                            _ => stats.connect_error(),
                        }
                        return Attempt::Failed(e);
                    }
                }
            }
        };
        let (res, b) = up.write_all(std::mem::take(&mut f.bufs.uhead)).await;
        f.bufs.uhead = b;
        if let Err(e) = res {
            if may_replay {
                debug!(upstream = %addr, "pooled connection failed on write; retrying on a fresh one");
                retried = true;
                stats.retry();
                continue;
            }
            return Attempt::Failed(ProxyError::UpstreamWrite(e));
        }
        if !body.is_done() {
            if f.info.expect_continue {
                f.bufs.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                if !send(f.client, &mut f.bufs.out, f.worker.send_bound(f.listener)).await {
                    return Attempt::Answered(Served::generated(499, false, None));
                }
            }
            let status = match stream_request_body(f, &mut up, body).await {
                Ok(()) => None,
                Err(BodyStop::TooLarge) => Some(413),
                Err(BodyStop::ClientGone) => {
                    return Attempt::Answered(Served::generated(499, false, None))
                }
                Err(BodyStop::Timeout) => Some(408),
                Err(BodyStop::Bad(reason)) => {
                    debug!(reason, "refused request body");
                    Some(400)
                }
                Err(BodyStop::Upstream(e)) => return Attempt::Failed(ProxyError::UpstreamWrite(e)),
            };
            if let Some(status) = status {
                let bound = f.worker.send_bound(f.listener);
                let answer =
                    send_error::<R, _>(f.client, &mut f.bufs.out, bound, status, false, false);
                let kept = answer.await;
                return Attempt::Answered(Served::generated(status, kept, None));
            }
        }
        let worker = f.worker;
        let route = &f.view.snap.config.routes[f.target.route];
        let (bufs, info, wait) = (&mut *f.bufs, f.info, timeouts.response);
        let head = read_response_head::<R>(&mut up, bufs, info, route, worker, wait);
        match head.await {
            Ok(plan) => return Attempt::Response(up, plan),
            Err(h)
                if may_replay && !h.got_bytes && matches!(h.error, ProxyError::UpstreamClosed) =>
            {
                debug!(upstream = %addr, "pooled connection closed before responding; retrying");
                retried = true;
                stats.retry();
            }
            Err(h) => {
                if matches!(h.error, ProxyError::ResponseTimeout) {
                    stats.timeout();
                }
                return Attempt::Failed(h.error);
            }
        }
    }
}
