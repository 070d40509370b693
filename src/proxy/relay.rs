//! The response side of a forwarded request: read the upstream's response head, then relay
//! the body to the client, re-framed where the two sides differ, one bounded read at a time.

use std::net::SocketAddr;
use std::time::Duration;

use super::conn::{read_at_most, read_some, send, RELAY_READ};
use super::error::ProxyError;
use super::io::{Runtime, Stream};
use super::request::{Buffers, RequestInfo};
use super::splice::{splice_body, Pipe, Spliced, SPLICE_MIN};
use super::transport::Transport;
use super::wait::before;
use super::{Forward, Worker};
use crate::config::{Cluster, Compression, Route};
use crate::http::body::BodyRelay;
use crate::http::encoding::{Compressor, Encoding};
use crate::http::fields;
use crate::http::response::{
    encode_downstream_head, encode_switching_head, parse_response_head, switched_to, ResponseHead,
};
use crate::http::rewrite::FieldEdits;
use crate::http::{Framing, HeadLimits, Status, Version};

/// What the response head says, once it is out of the upstream buffer.
pub struct ResponsePlan {
    head_len: usize,
    framing: Framing,
    down_framing: Framing,
    /// The upstream allows another request on this connection.
    reusable: bool,
    close_client: bool,
    pub status: u16,
    /// A `101` to an upgrade the request asked for: the connection becomes a tunnel.
    upgraded: bool,
    /// The body is compressed on its way to the client.
    compress: Option<Encoding>,
}

/// Whether a response may be compressed: a 2xx with a body (not 204 or 206), not encoded
/// already, no range, no `Cache-Control: no-transform`, a media type the route compresses, and
/// not known to be shorter than the route's minimum.
fn compressible(resp: &ResponseHead<'_, '_>, c: &Compression) -> bool {
    if !(200..300).contains(&resp.status) || matches!(resp.status, 204 | 206) {
        return false;
    }
    if matches!(resp.framing, Framing::None) || resp.content_length.is_some_and(|n| n < c.min_size)
    {
        return false;
    }
    let mut typed = false;
    for h in resp.headers {
        let (name, value) = (h.name, fields::trim_ows(h.value));
        if name.eq_ignore_ascii_case("content-encoding") && !value.eq_ignore_ascii_case(b"identity")
            || name.eq_ignore_ascii_case("content-range")
            || name.eq_ignore_ascii_case("cache-control")
                && fields::list_elements(value).any(|e| e.eq_ignore_ascii_case(b"no-transform"))
        {
            return false;
        }
        typed |= name.eq_ignore_ascii_case("content-type") && c.compresses(value);
    }
    typed
}

/// The fields a compressed response changes: `Content-Encoding`, `Vary` (extended with
/// `Accept-Encoding`), and a strong `ETag` made weak (the bytes differ from the upstream's).
fn compression_edits(
    resp: &ResponseHead<'_, '_>,
    e: Encoding,
    route: Option<&FieldEdits>,
) -> FieldEdits {
    let mut edits = route.cloned().unwrap_or_default();
    let field = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(fields::trim_ows(h.value)).into_owned())
    };
    edits.set.push(("content-encoding".into(), e.token().into()));
    let vary = match field("vary") {
        Some(v) if v.trim() == "*" || v.to_ascii_lowercase().contains("accept-encoding") => v,
        Some(v) if !v.is_empty() => format!("{v}, Accept-Encoding"),
        _ => "Accept-Encoding".into(),
    };
    edits.set.push(("vary".into(), vary));
    if let Some(tag) = field("etag").filter(|t| t.starts_with('"')) {
        edits.set.push(("etag".into(), format!("W/{tag}")));
    }
    edits
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
    route: &Route,
    limits: &HeadLimits,
    draining: bool,
    out: &mut Vec<u8>,
    edits: Option<&FieldEdits>,
) -> Result<HeadParse, ProxyError> {
    let mut fields = crate::http::fields();
    let resp = match parse_response_head(ubuf, &mut fields, limits, info.is_head) {
        Ok(Status::Complete(r)) => r,
        Ok(Status::Partial) => return Ok(HeadParse::Partial),
        Err(e) => return Err(ProxyError::BadResponse(e)),
    };
    if resp.status == 101 {
        if !info.upgrade {
            return Err(ProxyError::BadResponse("protocol switch was not requested"));
        }
        // The upstream may only switch to a protocol this route forwards.
        let protocol = switched_to(&resp)
            .filter(|p| route.allows_upgrade(p))
            .ok_or(ProxyError::BadResponse("switch to a protocol the route does not allow"))?;
        encode_switching_head(out, &resp, protocol);
        return Ok(HeadParse::Final(ResponsePlan {
            head_len: resp.len,
            framing: Framing::None,
            down_framing: Framing::None,
            reusable: false,
            close_client: false,
            status: 101,
            upgraded: true,
            compress: None,
        }));
    }
    if resp.is_interim() {
        return Ok(HeadParse::Interim(resp.len));
    }
    let compress = info
        .accept
        .zip(route.compression.as_ref())
        .filter(|(_, c)| compressible(&resp, c))
        .map(|(e, _)| e);
    // A compressed body's length is not known ahead: it goes chunked (close-delimited to an
    // HTTP/1.0 client).
    let down_framing = match resp.framing {
        _ if compress.is_some() && info.version == Version::Http10 => Framing::UntilClose,
        _ if compress.is_some() => Framing::Chunked,
        Framing::Chunked | Framing::UntilClose if info.version == Version::Http10 => {
            Framing::UntilClose
        }
        Framing::Chunked | Framing::UntilClose => Framing::Chunked,
        f => f,
    };
    let close_client = !info.keep_alive || down_framing == Framing::UntilClose || draining;
    let ka = info.needs_keep_alive_header();
    match compress {
        Some(e) => {
            let edits = compression_edits(&resp, e, edits);
            encode_downstream_head(out, &resp, down_framing, close_client, ka, Some(&edits));
        }
        None => encode_downstream_head(out, &resp, down_framing, close_client, ka, edits),
    }
    Ok(HeadParse::Final(ResponsePlan {
        head_len: resp.len,
        framing: resp.framing,
        down_framing,
        reusable: resp.reusable,
        close_client,
        status: resp.status,
        upgraded: false,
        compress,
    }))
}

/// Why reading a response head failed, and whether any byte of it had arrived (a pooled
/// connection that fails before any byte may be stale; after one, it answered).
pub struct HeadFailure {
    pub error: ProxyError,
    pub got_bytes: bool,
}

/// Most a response-head read takes, as with a new buffer, whatever the size of the spare
/// buffer lent as `ubuf`. Invariant: a body of HEAD_READ + SPLICE_MIN (32 KiB) or more leaves
/// enough in the socket to be spliced (a head read that took a whole large body would leave
/// nothing to splice).
const HEAD_READ: usize = 16 * 1024;
/// The same on a route that compresses, where no body is spliced: a page of up to 64 KiB comes
/// in one read and is compressed in one go. (Split over two reads, on io_uring each wait for
/// the rest left a compressor's 300 KiB of state in use: 64 clients kept 64 of them busy on a
/// worker, and a 16 KiB page cost 124-135 instead of 40-52 µs, by hand.)
const COMPRESSING_HEAD_READ: usize = RELAY_READ;

/// Reads until a final response head is in `bufs.ubuf`, dropping interim responses; encodes
/// the downstream head into `bufs.out`.
pub async fn read_response_head<R: Runtime>(
    up: &mut Transport<R::Stream>,
    bufs: &mut Buffers,
    info: &RequestInfo,
    route: &Route,
    worker: &Worker<R>,
    timeout: Duration,
) -> Result<ResponsePlan, HeadFailure> {
    let deadline = crate::clock::now() + timeout;
    bufs.ubuf.clear();
    let mut got_bytes = false;
    let fail = |error, got_bytes| Err(HeadFailure { error, got_bytes });
    loop {
        let max = if route.compression.is_some() { COMPRESSING_HEAD_READ } else { HEAD_READ };
        let read = read_at_most(up, &mut bufs.ubuf, max);
        match before(&worker.deadlines, deadline, read).await {
            None => return fail(ProxyError::ResponseTimeout, got_bytes),
            Some(Ok(0)) | Some(Err(_)) => return fail(ProxyError::UpstreamClosed, got_bytes),
            Some(Ok(_)) => got_bytes = true,
        }
        loop {
            let edits = bufs.response_edits.as_deref();
            match prepare_response(
                &bufs.ubuf,
                info,
                route,
                &worker.response_limits,
                worker.is_draining(),
                &mut bufs.out,
                edits,
            ) {
                Err(e) => return fail(e, true),
                Ok(HeadParse::Partial) => break,
                Ok(HeadParse::Interim(n)) => {
                    bufs.ubuf.drain(..n);
                }
                Ok(HeadParse::Final(plan)) => return Ok(plan),
            }
        }
    }
}

/// How relaying a response body ended.
pub struct Relayed {
    /// The client connection may carry another request.
    pub keep_client: bool,
    /// The response reached the client whole.
    pub whole: bool,
    pub body_bytes: u64,
}

/// Sends the response head (already in `bufs.out`) and streams the body, re-framed, one read
/// at a time. A connection that finished cleanly goes back to the worker's pool.
pub async fn relay_response<R: Runtime>(
    f: &mut Forward<'_, R>,
    mut up: Transport<R::Stream>,
    addr: SocketAddr,
    read_timeout: Duration,
    plan: ResponsePlan,
) -> Relayed {
    let bufs = &mut *f.bufs;
    let client = &mut *f.client;
    let bound = f.worker.send_bound(f.listener);
    if plan.upgraded {
        // The 101 goes out; what the upstream sent after it is the tunnel's first bytes.
        bufs.ubuf.drain(..plan.head_len);
        let sent = send(client, &mut bufs.out, bound).await;
        if sent {
            f.tunnel = Some(up);
        }
        return Relayed { keep_client: false, whole: false, body_bytes: 0 };
    }
    if let Some(e) = plan.compress {
        let level = f.view.snap.config.routes[f.target.route]
            .compression
            .as_ref()
            .map_or(1, |c| c.level(e));
        let encoder = f.worker.compressors.take(e, level);
        return relay_compressed(f, up, addr, read_timeout, plan, encoder).await;
    }
    let mut body = BodyRelay::new(plan.framing, plan.down_framing);
    let cut = |body: &BodyRelay| Relayed {
        keep_client: false,
        whole: false,
        body_bytes: body.body_bytes(),
    };
    let mut leftover = false;
    let mut offset = plan.head_len;
    loop {
        match body.relay(&bufs.ubuf[offset..], &mut bufs.out) {
            Ok(n) => leftover |= body.is_done() && offset + n < bufs.ubuf.len(),
            Err(e) => {
                f.worker.failure(addr, "bad response body", &e.reason());
                return cut(&body);
            }
        }
        bufs.ubuf.clear();
        offset = 0;
        // Each read is passed on at once: a slow stream reaches the client as it is produced.
        if !send(client, &mut bufs.out, bound).await {
            return cut(&body);
        }
        if body.is_done() {
            break;
        }
        let cluster = &f.view.snap.config.clusters[f.target.cluster];
        if let Some(pipe) = splice_pipe(f.worker, cluster, &body, &up, client) {
            let left = body.unchanged_length_left().unwrap_or(0);
            let stats = &f.worker.stats;
            let take = |n: usize| {
                body.pass_through(n);
                stats.spliced_bytes.set(stats.spliced_bytes.get() + n as u64);
            };
            // Boxed: only large bodies pay for this future, and the connection's task stays
            // the size it was.
            let end =
                Box::pin(splice_body(&mut up, client, &pipe, left, bound, read_timeout, take))
                    .await;
            f.worker.pipes.give(pipe, end == Spliced::Whole);
            match end {
                Spliced::Whole => {
                    // The splice stopped at the body's end: bytes already behind it would be
                    // read as the next request's response. A copied body sees them in its
                    // last read; here one peek at the socket does.
                    leftover |= up.is_stale();
                    break;
                }
                Spliced::UpstreamClosed => {
                    f.worker.failure(addr, "upstream closed mid-body", &plan.status)
                }
                Spliced::ReadTimeout => {
                    f.worker.failure(addr, "upstream body read timed out", &plan.status)
                }
                Spliced::ClientGone => {}
            }
            return cut(&body);
        }
        let until = crate::clock::now() + read_timeout;
        match before(&f.worker.deadlines, until, read_some(&mut up, &mut bufs.ubuf, RELAY_READ))
            .await
        {
            Some(Ok(n)) if n > 0 => {
                // A body that passes through unchanged is written from the read buffer itself:
                // no copy into the output buffer.
                if let Some(n) = body.pass_through(bufs.ubuf.len()) {
                    leftover |= n < bufs.ubuf.len();
                    bufs.ubuf.truncate(n);
                    if !send(client, &mut bufs.ubuf, bound).await {
                        return cut(&body);
                    }
                    if body.is_done() {
                        break;
                    }
                    continue;
                }
            }
            Some(Ok(_)) | Some(Err(_)) => {
                if body.end_of_input(&mut bufs.out) {
                    let sent = send(client, &mut bufs.out, bound).await;
                    let keep_client = sent && !plan.close_client;
                    return Relayed { keep_client, whole: sent, body_bytes: body.body_bytes() };
                }
                // Cut mid-body: the client must not mistake a short body for a whole one.
                f.worker.failure(addr, "upstream closed mid-body", &plan.status);
                return cut(&body);
            }
            None => {
                f.worker.failure(addr, "upstream body read timed out", &plan.status);
                return cut(&body);
            }
        }
    }
    if plan.reusable && !leftover {
        give_back(f, addr, up);
    }
    Relayed { keep_client: !plan.close_client, whole: true, body_bytes: body.body_bytes() }
}

/// A pipe to splice the rest of `body` through, when that is worth it and possible: a body
/// of known length passing through unchanged with at least [`SPLICE_MIN`] bytes to come,
/// between two plaintext sockets, and a pipe to spare on this worker.
fn splice_pipe<R: Runtime>(
    worker: &Worker<R>,
    cluster: &Cluster,
    body: &BodyRelay,
    up: &Transport<R::Stream>,
    client: &Transport<R::Stream>,
) -> Option<Pipe> {
    let left = body.unchanged_length_left()?;
    if left < SPLICE_MIN
        || !cluster.splice
        || up.splice_fd().is_none()
        || client.splice_fd().is_none()
    {
        return None;
    }
    worker.pipes.take()
}

/// [`relay_response`] for a body compressed on its way: each read is decoded from the
/// upstream's framing, compressed (and flushed), and framed for the client; the last read ends
/// the compressed stream. Memory: one read buffer, the encoder's window, one output buffer.
async fn relay_compressed<R: Runtime>(
    f: &mut Forward<'_, R>,
    mut up: Transport<R::Stream>,
    addr: SocketAddr,
    read_timeout: Duration,
    plan: ResponsePlan,
    mut encoder: Compressor,
) -> Relayed {
    let bufs = &mut *f.bufs;
    let client = &mut *f.client;
    let bound = f.worker.send_bound(f.listener);
    let mut decode = BodyRelay::new(plan.framing, Framing::UntilClose);
    let mut frame = BodyRelay::new(Framing::UntilClose, plan.down_framing);
    let (mut raw, mut packed) = (Vec::new(), Vec::new());
    let mut sent: u64 = 0;
    let mut leftover = false;
    let mut offset = plan.head_len;
    loop {
        raw.clear();
        match decode.relay(&bufs.ubuf[offset..], &mut raw) {
            Ok(n) => leftover |= decode.is_done() && offset + n < bufs.ubuf.len(),
            Err(e) => {
                f.worker.failure(addr, "bad response body", &e.reason());
                return Relayed { keep_client: false, whole: false, body_bytes: sent };
            }
        }
        bufs.ubuf.clear();
        offset = 0;
        packed.clear();
        encoder.feed(&raw, &mut packed);
        let done = decode.is_done();
        if !packed.is_empty() {
            sent += packed.len() as u64;
            let _ = frame.relay(&packed, &mut bufs.out);
        }
        if done {
            break;
        }
        if !send(client, &mut bufs.out, bound).await {
            return Relayed { keep_client: false, whole: false, body_bytes: sent };
        }
        let until = crate::clock::now() + read_timeout;
        match before(&f.worker.deadlines, until, read_some(&mut up, &mut bufs.ubuf, RELAY_READ))
            .await
        {
            Some(Ok(n)) if n > 0 => {}
            Some(Ok(_)) | Some(Err(_)) => {
                raw.clear();
                if !decode.end_of_input(&mut raw) {
                    f.worker.failure(addr, "upstream closed mid-body", &plan.status);
                    return Relayed { keep_client: false, whole: false, body_bytes: sent };
                }
                break;
            }
            None => {
                f.worker.failure(addr, "upstream body read timed out", &plan.status);
                return Relayed { keep_client: false, whole: false, body_bytes: sent };
            }
        }
    }
    packed.clear();
    if let Some(reset) = encoder.finish(&mut packed) {
        f.worker.compressors.give(reset);
    }
    sent += packed.len() as u64;
    let _ = frame.relay(&packed, &mut bufs.out);
    frame.end_of_input(&mut bufs.out);
    if !send(client, &mut bufs.out, bound).await {
        return Relayed { keep_client: false, whole: false, body_bytes: sent };
    }
    if plan.reusable && !leftover {
        give_back(f, addr, up);
    }
    Relayed { keep_client: !plan.close_client, whole: true, body_bytes: sent }
}

/// Returns a connection that finished a response cleanly to the worker's pool, unless it
/// carries one client's PROXY header or has carried `max_requests_per_connection` requests
/// (then it closes here).
fn give_back<R: Runtime>(f: &Forward<'_, R>, addr: SocketAddr, up: Transport<R::Stream>) {
    let cluster = &f.view.snap.config.clusters[f.target.cluster];
    let worn_out = cluster.max_requests_per_connection.is_some_and(|m| f.upstream_uses >= m);
    if !cluster.send_proxy_protocol && !worn_out {
        f.worker.pool.checkin(addr, up, f.upstream_uses, cluster.pool_max_idle);
    }
}
