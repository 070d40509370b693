//! Connection I/O shared by both sides of a request's journey: bounded reads, whole writes,
//! Apex's own error answers and the lingering close. Written against the `io` seam, so every
//! runtime shares it.

use std::time::Duration;

use super::io::{Runtime, Stream};
use super::wait::SendBound;
use crate::http::encode_error_response_with;

/// Smallest free space offered to a read; reads never ask the kernel for less.
pub const MIN_READ: usize = 4 * 1024;
/// Read size while streaming request bodies: the bound on body bytes held per direction.
pub const BODY_READ: usize = 16 * 1024;
/// Read size while relaying a response body after its head: larger than request-side reads
/// because big responses are common; still a fixed bound per connection.
pub const RELAY_READ: usize = 64 * 1024;

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

/// [`read_some`] that takes at most `max` bytes (making room for that many), whatever room
/// `buf` already has: a buffer from the worker's spares may have grown to 64 KiB relaying an
/// earlier body.
pub async fn read_at_most<S: Stream>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < max {
        buf.reserve(max);
    }
    let (res, b) = s.read_at_most(std::mem::take(buf), max).await;
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

/// [`flush`] to a client: `false` too when the client took none of `buf` for the listener's
/// `send_timeout` (the connection is then cut; what `buf` held is dropped with the write).
pub async fn send<S: Stream>(client: &mut S, buf: &mut Vec<u8>, bound: SendBound<'_>) -> bool {
    if buf.is_empty() {
        return true;
    }
    bound.bound(flush(client, buf)).await.unwrap_or(false)
}

/// Answers with an error status produced by Apex and reports whether the connection stays open.
/// When it does not, the close lingers (see [`linger_close`]).
pub async fn send_error<R: Runtime, S: Stream>(
    client: &mut S,
    out: &mut Vec<u8>,
    bound: SendBound<'_>,
    status: u16,
    keep_open: bool,
    keep_alive_header: bool,
) -> bool {
    send_error_with::<R, S>(client, out, bound, status, keep_open, keep_alive_header, b"").await
}

/// [`send_error`] with extra field lines (`Retry-After: 1\r\n`).
pub async fn send_error_with<R: Runtime, S: Stream>(
    client: &mut S,
    out: &mut Vec<u8>,
    bound: SendBound<'_>,
    status: u16,
    keep_open: bool,
    keep_alive_header: bool,
    extra: &[u8],
) -> bool {
    // Whatever was staged for the client (a body half re-framed) is abandoned.
    out.clear();
    encode_error_response_with(out, status, !keep_open, keep_alive_header, extra);
    let sent = send(client, out, bound).await;
    if sent && !keep_open {
        linger_close::<R, S>(client, out).await;
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
pub async fn linger_close<R: Runtime, S: Stream>(client: &mut S, scratch: &mut Vec<u8>) {
    if client.shutdown_write().await.is_err() {
        return;
    }
    let deadline = crate::clock::now() + LINGER_TIME;
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        scratch.clear();
        let wait = deadline.saturating_duration_since(crate::clock::now());
        // Boxed, as every runtime timer off the steady path: monoio's timer entry is aligned to
        // 128 bytes, and inline it made every request's future 128-aligned, which the
        // allocator serves through posix_memalign (callgrind: 4% of a 64 B request).
        match Box::pin(R::timeout(wait, read_some(client, scratch, MIN_READ))).await {
            Some(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
    scratch.clear();
}
