//! HTTP/2 to clients: a layer at the edge of the journey. The `h2` crate runs the connection
//! (over [`PollIo`], so on every runtime and over TLS); each stream becomes an [`H2Stream`], a
//! stream that reads as one HTTP/1.1 request and takes an HTTP/1.1 response, so the same
//! `serve_requests` loop (routing, limits, balancing, retries, the per-worker HTTP/1.1 upstream
//! pool, compression, the access log) serves it. The translation is `http::h2_bridge`.
//!
//! Flow control follows the other side: a request's DATA is released to the client's window
//! only as Apex reads it (and Apex reads only as the upstream takes it), and a response write
//! waits for window from the client, so the relay stops reading the upstream meanwhile.
//!
//! `h2` keeps each connection's state behind its own `Arc<Mutex>`; only this worker's tasks
//! touch it, so the lock is never contended and no memory is written by two threads.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, error};

use super::io::{ReadHalf, Runtime, Stream, WriteHalf};
use super::isolate::isolate;
use super::poll_io::{PollIo, Watch};
use super::wait::{race, Either, Event};
use super::Worker;
use crate::config::Http2;
use crate::http::body::BodyRelay;
use crate::http::h2_bridge::{
    encode_chunk, encode_last_chunk, encode_request_head, parse_response_head, RequestBody,
};
use crate::http::h2_guard::{Flood, FrameGuard};
use crate::http::Framing;

/// The client connection preface (RFC 9113 §3.4) that starts h2 with prior knowledge.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The `h2` server settings of a listener (shared with the h2 fuzz target).
pub fn h2_builder(settings: &Http2) -> ::h2::server::Builder {
    let mut builder = ::h2::server::Builder::new();
    builder
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .max_pending_accept_reset_streams(settings.max_pending_resets as usize)
        .max_local_error_reset_streams(Some(settings.max_resets_sent as usize));
    builder
}

/// Serves one HTTP/2 connection until it closes: accepts streams and hands each, as an
/// [`H2Stream`], to `serve` on its own task, which ends early if the client resets the stream
/// (dropping the request's journey closes its upstream connection). `preface` are bytes
/// already read from `client`. On drain, when a reload removes the listener (`removed`
/// fires), after `keepalive_timeout` with no open stream, and after
/// `max_requests_per_connection` streams: GOAWAY, then the open streams finish. `timeouts`:
/// the listener's header, keep-alive and send timeouts; a closing connection the client does
/// not let finish (it reads nothing: GOAWAY and its PING stay unsent or unanswered) is dropped
/// once it has had no stream for the send timeout.
pub async fn serve_h2<R, C, F, Fut>(
    worker: &Worker<R>,
    removed: &Event,
    client: C,
    preface: Vec<u8>,
    settings: &Http2,
    timeouts: (Duration, Duration, Duration),
    serve: F,
) where
    R: Runtime,
    C: Stream,
    F: Fn(H2Stream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let (header_timeout, keepalive_timeout, send_timeout) = timeouts;
    let local = client.local_addr().ok();
    let (watch, watched) = Watch::new(FrameGuard::new(settings.floods), PREFACE.len());
    let (tripped, block_since) = (watched.tripped, watched.block_since);
    let (io, sender) = PollIo::new(client, preface, watch);
    // Every poll of the connection is followed by sending what it queued (see `poll_io`).
    let mut handshake = Box::pin(h2_builder(settings).handshake::<_, Bytes>(io));
    let handshake = poll_fn(|cx| {
        let polled = handshake.as_mut().poll(cx);
        sender.send_queued(cx);
        polled
    });
    let mut conn = match Box::pin(R::timeout(header_timeout, handshake)).await {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            debug!(error = %e, "h2 handshake failed");
            return;
        }
        None => return,
    };
    let mut accepted: u32 = 0;
    // Header bytes decoded so far on this connection (see `FloodLimits::decoded_header_bytes`).
    let mut decoded: u64 = 0;
    let mut closing = false;
    let stats = &worker.stats;
    // GOAWAY (graceful: streams in flight finish), counted by reason.
    let go_away = |conn: &mut ::h2::server::Connection<_, Bytes>, reason: usize| {
        conn.graceful_shutdown();
        crate::stats::bump(&stats.h2_goaways[reason]);
    };
    loop {
        if !closing && (worker.is_draining() || removed.is_fired()) {
            go_away(&mut conn, 0);
            closing = true;
        } else if !closing && accepted >= settings.max_requests_per_connection {
            go_away(&mut conn, 2);
            closing = true;
        }
        let idle_before = !conn.has_streams();
        // A flood seen in the bytes `h2` was about to read ends the accept at once (`None`).
        let watching = !closing;
        let (tripped, conn_now, sender) = (&tripped, &mut conn, &sender);
        let accept = poll_fn(move |cx| match tripped.get() {
            Some(_) if watching => Poll::Ready(None),
            _ => {
                let polled = conn_now.poll_accept(cx).map(Some);
                sender.send_queued(cx);
                polled
            }
        });
        let next = if closing {
            let until = crate::clock::now() + send_timeout;
            match race(accept, worker.deadlines.until(until)).await {
                Either::Left(next) => next,
                Either::Right(()) if conn.has_streams() => continue,
                Either::Right(()) => {
                    debug!("h2 connection not closed by the client within the send timeout");
                    crate::stats::bump(&stats.send_timeouts);
                    return;
                }
            }
        } else {
            // The worker's coarse idle deadline, and the drain. With streams open the deadline
            // only re-checks; a connection without any is idle (closed within one to two
            // keep-alive timeouts of its last stream). A header block the client started
            // must end within the header timeout (re-read at every poll: the block may start
            // while this waits).
            let idle_until = crate::clock::now() + keepalive_timeout;
            let block = &block_since;
            let idle = worker.idle.until_moving(move || match block.get() {
                Some(t) => idle_until.min(t + header_timeout),
                None => idle_until,
            });
            let drain = race(worker.drain.wait(), removed.wait());
            match race(accept, race(drain, idle)).await {
                Either::Left(next) => next,
                Either::Right(_) => {
                    let stalled =
                        block_since.get().is_some_and(|t| crate::clock::since(t) >= header_timeout);
                    if stalled {
                        // No frame may come between a header block's frames: a client stalled
                        // inside one stalls the connection. Cut, as an HTTP/1.1 head is (408).
                        debug!("h2 header block not finished in time: GOAWAY");
                        conn.abrupt_shutdown(::h2::Reason::NO_ERROR);
                        crate::stats::bump(&stats.h2_goaways[4]);
                        closing = true;
                    } else if worker.is_draining() || removed.is_fired() {
                        go_away(&mut conn, 0);
                        closing = true;
                    } else if idle_before && !conn.has_streams() {
                        go_away(&mut conn, 1);
                        closing = true;
                    }
                    continue;
                }
            }
        };
        let Some(next) = next else {
            let flood = tripped.get().expect("set when the accept ends early");
            debug!(kind = flood.name(), "h2 flood: GOAWAY ENHANCE_YOUR_CALM");
            conn.abrupt_shutdown(::h2::Reason::ENHANCE_YOUR_CALM);
            crate::stats::bump(&stats.h2_goaways[3]);
            crate::stats::bump(&stats.h2_floods[flood.index()]);
            closing = true;
            continue;
        };
        match next {
            Some(Ok((request, respond))) => {
                accepted += 1;
                decoded += header_list_size(&request);
                if decoded > settings.floods.decoded_header_bytes && !closing {
                    debug!("h2 decoded headers over the cap: GOAWAY ENHANCE_YOUR_CALM");
                    conn.abrupt_shutdown(::h2::Reason::ENHANCE_YOUR_CALM);
                    crate::stats::bump(&stats.h2_goaways[3]);
                    crate::stats::bump(&stats.h2_floods[Flood::DecodedHeaders.index()]);
                    closing = true;
                    continue;
                }
                let stream = H2Stream::new(request, respond, local);
                let reset = stream.reset_watch();
                let served = serve(stream);
                let open = OpenStream::count(&worker.stats.h2_streams_open);
                let id = worker.id;
                // Isolated as a connection's task is: a panic in one stream's journey resets
                // that stream (its `H2Stream` drops) instead of unwinding the worker.
                let task = async move {
                    let _open = open;
                    if let Either::Right(reason) = race(served, reset).await {
                        debug!(?reason, "h2 stream reset by the client; request abandoned");
                    }
                };
                R::spawn(isolate(task, move |msg| {
                    error!(worker = id, panic = %msg, "h2 stream task panicked; reset it");
                }));
            }
            Some(Err(e)) => {
                let calm = Some(::h2::Reason::ENHANCE_YOUR_CALM);
                if e.is_go_away() && e.is_library() && e.reason() == calm {
                    // `h2`'s own reset limits (rapid reset, MadeYouReset): it sent the GOAWAY.
                    debug!(error = %e, "h2 flood: GOAWAY ENHANCE_YOUR_CALM");
                    crate::stats::bump(&stats.h2_goaways[3]);
                    crate::stats::bump(&stats.h2_floods[Flood::ResetLimits.index()]);
                } else {
                    debug!(error = %e, "h2 connection ended");
                }
                return;
            }
            None => return,
        }
    }
}

/// Counts one stream in `apex_h2_streams_open` until dropped, however its task ends (a panic
/// included).
struct OpenStream(Rc<std::cell::Cell<u64>>);

impl OpenStream {
    fn count(open: &Rc<std::cell::Cell<u64>>) -> OpenStream {
        open.set(open.get() + 1);
        OpenStream(Rc::clone(open))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A request's header list size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2):
/// each field's name and value plus 32, pseudo-header fields included.
fn header_list_size<B>(request: &http::Request<B>) -> u64 {
    let fields: usize =
        request.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
    let uri = request.uri();
    let authority = uri.authority().map_or(0, |a| a.as_str().len() + 10 + 32);
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len() + 5 + 32);
    let pseudo = request.method().as_str().len() + 7 + 32 + 6 + 5 + 32 + authority + path;
    (fields + pseudo) as u64
}

/// One h2 stream as an Apex stream: reads give the request as HTTP/1.1 bytes (head, then the
/// body, chunked when it has no length), writes take the HTTP/1.1 response Apex produces and
/// send it as HEADERS and DATA.
pub struct H2Stream {
    recv: ::h2::RecvStream,
    body: RequestBody,
    body_done: bool,
    /// Request bytes not yet read by Apex: at most the head or one DATA frame.
    pending: Vec<u8>,
    pos: usize,
    /// The sending side, shared with the stream's reset watch (borrowed only within a
    /// poll, never across an await).
    out: Rc<RefCell<Sending>>,
    /// Response bytes until the head is whole.
    head: Vec<u8>,
    is_head: bool,
    decode: Option<BodyRelay>,
    /// The response body runs until the stream ends (no length, not chunked).
    until_close: bool,
    local: Option<SocketAddr>,
}

/// An h2 stream's sending side: before the response head, then its body.
#[derive(Default)]
struct Sending {
    respond: Option<::h2::server::SendResponse<Bytes>>,
    send: Option<::h2::SendStream<Bytes>>,
    /// The response went out whole.
    ended: bool,
}

impl H2Stream {
    fn new(
        request: http::Request<::h2::RecvStream>,
        respond: ::h2::server::SendResponse<Bytes>,
        local: Option<SocketAddr>,
    ) -> H2Stream {
        let (parts, recv) = request.into_parts();
        let mut pending = Vec::new();
        let is_head = parts.method == http::Method::HEAD;
        let mut stream = H2Stream {
            body: RequestBody::None,
            body_done: true,
            pending: Vec::new(),
            pos: 0,
            out: Rc::new(RefCell::new(Sending { respond: Some(respond), ..Sending::default() })),
            head: Vec::new(),
            is_head,
            decode: None,
            until_close: false,
            local,
            recv,
        };
        match encode_request_head(&parts, stream.recv.is_end_stream(), &mut pending) {
            Ok(body) => {
                stream.body = body;
                stream.body_done = body == RequestBody::None;
                stream.pending = pending;
            }
            Err(e) => {
                // Answered here; Apex reads nothing and the stream ends.
                let status = e.status();
                debug!(status, "h2 request not translatable");
                let response = http::Response::builder().status(status).body(()).expect("status");
                let mut out = stream.out.borrow_mut();
                if let Some(mut r) = out.respond.take() {
                    let _ = r.send_response(response, true);
                }
                out.ended = true;
            }
        }
        stream
    }

    /// Resolves when the client resets the stream (before or during the response).
    fn reset_watch(&self) -> impl Future<Output = ::h2::Reason> + 'static {
        let out = Rc::clone(&self.out);
        poll_fn(move |cx| {
            let mut guard = out.borrow_mut();
            let out = &mut *guard;
            let polled = match (&mut out.respond, &mut out.send) {
                (Some(r), _) => r.poll_reset(cx),
                (None, Some(s)) => s.poll_reset(cx),
                (None, None) => return Poll::Pending,
            };
            match polled {
                Poll::Ready(Ok(reason)) => Poll::Ready(reason),
                Poll::Ready(Err(_)) => Poll::Ready(::h2::Reason::CANCEL),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    async fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.out.borrow().ended {
            return Ok(()); // nothing after a whole response (Apex writes none)
        }
        if self.out.borrow().send.is_some() {
            return self.send_body(bytes).await;
        }
        // The head is parsed where it lies: in `bytes`, or, when it came in pieces, behind the
        // pieces before. Only a partial head is copied (the body after a head never is).
        let pieces = std::mem::take(&mut self.head);
        let joined;
        let mut input: &[u8] = if pieces.is_empty() {
            bytes
        } else {
            let mut all = pieces;
            all.extend_from_slice(bytes);
            joined = all;
            &joined
        };
        loop {
            let start = match parse_response_head(input, self.is_head) {
                Ok(None) => {
                    self.head = input.to_vec();
                    return Ok(());
                }
                Ok(Some(s)) => s,
                Err(e) => return Err(io::Error::other(format!("{e:?}"))),
            };
            input = &input[start.head_len..];
            if start.informational {
                // 100 Continue: h2 clients send the body anyway.
                if input.is_empty() {
                    return Ok(());
                }
                continue;
            }
            let end = start.framing == Framing::None;
            {
                let mut out = self.out.borrow_mut();
                let Some(mut respond) = out.respond.take() else {
                    return Err(io::ErrorKind::BrokenPipe.into());
                };
                let send = respond.send_response(start.response, end).map_err(io::Error::other)?;
                if end {
                    out.ended = true;
                    return Ok(());
                }
                out.send = Some(send);
            }
            self.until_close = start.framing == Framing::UntilClose;
            self.decode = Some(BodyRelay::new(start.framing, Framing::UntilClose));
            return self.send_body(input).await;
        }
    }

    /// Decodes the HTTP/1.1 body framing and sends the bytes as DATA, within the window.
    async fn send_body(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(decode) = self.decode.as_mut() else { return Ok(()) };
        // Decoding never lengthens the body (at most it drops chunk framing): one allocation.
        let mut raw = Vec::with_capacity(bytes.len());
        decode.relay(bytes, &mut raw).map_err(|e| io::Error::other(e.reason()))?;
        let done = decode.is_done();
        self.send_data(Bytes::from(raw), done).await
    }

    async fn send_data(&mut self, mut data: Bytes, end: bool) -> io::Result<()> {
        let out = &self.out;
        let no_stream = || io::Error::from(io::ErrorKind::BrokenPipe);
        if end && data.is_empty() {
            let mut o = out.borrow_mut();
            o.send
                .as_mut()
                .ok_or_else(no_stream)?
                .send_data(data, true)
                .map_err(io::Error::other)?;
            o.ended = true;
            return Ok(());
        }
        while !data.is_empty() {
            out.borrow_mut().send.as_mut().ok_or_else(no_stream)?.reserve_capacity(data.len());
            let granted = poll_fn(|cx| match out.borrow_mut().send.as_mut() {
                Some(s) => s.poll_capacity(cx),
                None => Poll::Ready(None),
            });
            let granted = match granted.await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Err(no_stream()),
            };
            if granted == 0 {
                continue;
            }
            // Whole when the window allows (splitting a Bytes made from a Vec allocates).
            let chunk = if granted >= data.len() {
                std::mem::take(&mut data)
            } else {
                data.split_to(granted)
            };
            let last = end && data.is_empty();
            let mut o = out.borrow_mut();
            o.send
                .as_mut()
                .ok_or_else(no_stream)?
                .send_data(chunk, last)
                .map_err(io::Error::other)?;
            o.ended |= last;
        }
        Ok(())
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // A response never started, or cut short: the client must not take it as whole.
        let mut out = self.out.borrow_mut();
        if let Some(r) = out.respond.as_mut() {
            r.send_reset(::h2::Reason::INTERNAL_ERROR);
        } else if !out.ended {
            if let Some(s) = out.send.as_mut() {
                s.send_reset(::h2::Reason::INTERNAL_ERROR);
            }
        }
    }
}

impl Stream for H2Stream {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            if self.pos < self.pending.len() {
                let spare = buf.capacity() - buf.len();
                let n = spare.min(self.pending.len() - self.pos);
                buf.extend_from_slice(&self.pending[self.pos..self.pos + n]);
                self.pos += n;
                if self.pos == self.pending.len() {
                    self.pending.clear();
                    self.pos = 0;
                }
                return (Ok(n), buf);
            }
            if self.body_done {
                return (Ok(0), buf);
            }
            match poll_fn(|cx| self.recv.poll_data(cx)).await {
                Some(Ok(data)) => {
                    // The client may send this much more: Apex has taken these bytes.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    match self.body {
                        RequestBody::Chunked => encode_chunk(&data, &mut self.pending),
                        _ => self.pending.extend_from_slice(&data),
                    }
                }
                Some(Err(e)) => return (Err(io::Error::other(e)), buf),
                None => {
                    self.body_done = true;
                    if self.body == RequestBody::Chunked {
                        let trailers = poll_fn(|cx| self.recv.poll_trailers(cx)).await;
                        encode_last_chunk(trailers.ok().flatten().as_ref(), &mut self.pending);
                    }
                }
            }
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let res = self.write_bytes(&buf).await;
        (res, buf)
    }

    /// The response ends here: a body that runs until close ends its stream. (Any other
    /// unfinished response is reset when the stream is dropped.)
    async fn shutdown_write(&mut self) -> io::Result<()> {
        if !self.out.borrow().ended && self.until_close {
            return self.send_data(Bytes::new(), true).await;
        }
        Ok(())
    }

    fn is_stale(&self) -> bool {
        false
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local.ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    type Read = NoHalf;
    type Write = NoHalf;
    /// Only tunnels split a client stream, and no h2 stream becomes one (no extended CONNECT).
    fn into_split(self) -> (NoHalf, NoHalf) {
        (NoHalf, NoHalf)
    }
}

/// The halves of a stream that cannot be split: every operation fails.
pub struct NoHalf;

impl ReadHalf for NoHalf {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }
}

impl WriteHalf for NoHalf {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        (Err(io::ErrorKind::Unsupported.into()), buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
