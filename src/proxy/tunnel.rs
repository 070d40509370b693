//! After a `101 Switching Protocols` (a WebSocket handshake, say), the client connection and
//! its upstream connection become a tunnel: bytes are copied both ways, each direction through
//! one bounded buffer, until both sides have closed (a half-close is passed on as FIN), either
//! side fails, the tunnel stays idle for the route's `tunnel_idle_timeout`, or the worker
//! drains. The upstream connection never returns to the pool.

use std::cell::Cell;
use std::time::{Duration, Instant};

use super::conn::{flush, BODY_READ};
use super::io::{ReadHalf, Runtime, Stream, WriteHalf};
use super::request::Buffers;
use super::wait::{join_both, race, Either};
use super::Worker;

/// How a tunnel ended, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct TunnelEnd {
    /// Bytes sent to the client through the tunnel.
    pub to_client: u64,
}

/// Counts one open tunnel in `apex_tunnels_open` until dropped, however the tunnel ends (a
/// panic in the connection's task included).
struct OpenTunnel<'a>(&'a crate::stats::WorkerStats);

impl<'a> OpenTunnel<'a> {
    fn count(stats: &'a crate::stats::WorkerStats) -> Self {
        stats.tunnels_open.set(stats.tunnels_open.get() + 1);
        OpenTunnel(stats)
    }
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.tunnels_open.set(self.0.tunnels_open.get().saturating_sub(1));
    }
}

/// Copies `from` to `to` through `buf` until `from` ends (then `to` gets a FIN: `Ok`) or
/// either side fails (`Err`: the tunnel ends).
async fn copy<F: ReadHalf, T: WriteHalf>(
    mut from: F,
    mut to: T,
    mut buf: Vec<u8>,
    active: &Cell<Instant>,
    moved: &Cell<u64>,
) -> Result<(), ()> {
    loop {
        buf.clear();
        buf.reserve(BODY_READ);
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return to.shutdown_write().await.map_err(|_| ()),
            Ok(n) => {
                active.set(crate::clock::now());
                moved.set(moved.get() + n as u64);
            }
            Err(_) => return Err(()),
        }
        let (res, b) = to.write_all(buf).await;
        buf = b;
        res.map_err(|_| ())?;
    }
}

/// Runs the tunnel between `client` and `up` to its end. `bufs.ubuf` holds bytes the upstream
/// sent after its `101` head, `bufs.rbuf` bytes the client sent after its request head: each
/// is passed on first.
pub async fn tunnel<R: Runtime>(
    worker: &Worker<R>,
    mut client: super::transport::Transport<R::Stream>,
    mut up: super::transport::Transport<R::Stream>,
    bufs: &mut Buffers,
    idle: Duration,
) -> TunnelEnd {
    let stats = &worker.stats;
    let _open = OpenTunnel::count(stats);
    let to_client = Cell::new(bufs.ubuf.len() as u64);
    let to_upstream = Cell::new(bufs.rbuf.len() as u64);
    let active = Cell::new(crate::clock::now());
    let run = async {
        // The bytes that came with the two heads go first, under the idle watch too: a client
        // that reads nothing must not hold the tunnel and its upstream.
        let early =
            flush(&mut client, &mut bufs.ubuf).await && flush(&mut up, &mut bufs.rbuf).await;
        if !early {
            return;
        }
        let (client_r, client_w) = client.into_split();
        let (up_r, up_w) = up.into_split();
        let down = copy(up_r, client_w, std::mem::take(&mut bufs.ubuf), &active, &to_client);
        let upward = copy(client_r, up_w, std::mem::take(&mut bufs.out), &active, &to_upstream);
        join_both(down, upward).await
    };
    // Idle: no byte either way for `idle`, checked on the worker's coarse idle deadlines.
    let watch = async {
        loop {
            let deadline = active.get() + idle;
            if crate::clock::now() >= deadline {
                return;
            }
            worker.idle.until(deadline).await;
        }
    };
    // Whichever ends first: both directions done, or idle, or the drain; then both
    // connections close as the halves drop.
    let stop = race(worker.drain.wait(), watch);
    let _: Either<(), Either<(), ()>> = race(run, stop).await;
    let moved = to_client.get() + to_upstream.get();
    stats.tunnel_bytes.set(stats.tunnel_bytes.get() + moved);
    TunnelEnd { to_client: to_client.get() }
}
