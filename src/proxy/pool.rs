//! The worker's idle upstream connections: one LIFO stack per endpoint, capped, with an idle
//! timeout. Owned by one worker thread; never locked.
//!
//! The cap (`pool_max_idle`) is applied by the housekeeping sweep, not at checkin: a burst of
//! more concurrent requests than the cap returns more connections than it, and closing them at
//! once made the next burst open them again (with h2 clients, 640 concurrent streams against a
//! cap of 256 opened about one upstream connection per five requests). Above the cap, a
//! connection idle for [`PURGE_AFTER`] is closed at the next sweep, oldest first; the stack never
//! exceeds [`BURST_FACTOR`] times the cap.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::io::Stream;

/// How long a connection above the cap may stay idle before the sweep closes it.
pub const PURGE_AFTER: Duration = Duration::from_secs(1);
/// The hard bound on a stack, in multiples of the cap: beyond it, checkin closes the oldest
/// idle connection at once.
pub const BURST_FACTOR: usize = 8;

struct Idle<S> {
    stream: S,
    since: Instant,
    /// Requests the connection has carried (for `max_requests_per_connection`).
    uses: u32,
}

/// Keyed by endpoint address, so idle connections outlive a config reload that keeps the
/// endpoint.
pub struct Pool<S> {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle<S>>>>,
}

impl<S: Stream> Default for Pool<S> {
    fn default() -> Self {
        Pool { idle: RefCell::new(HashMap::new()) }
    }
}

impl<S: Stream> Pool<S> {
    /// The most recently used idle connection to `addr` that is younger than `idle_timeout`.
    /// With `check_stale`, one the upstream has closed is dropped and the next one tried; that
    /// check is a syscall, so callers that can replay the request on a failure skip it and let
    /// the replay handle the rare stale connection.
    pub fn checkout(
        &self,
        addr: SocketAddr,
        idle_timeout: Duration,
        check_stale: bool,
    ) -> Option<(S, u32)> {
        let mut idle = self.idle.borrow_mut();
        let stack = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(c) = stack.pop() {
            if now.duration_since(c.since) >= idle_timeout {
                // LIFO: everything below is older still.
                stack.clear();
                return None;
            }
            if !check_stale || !c.stream.is_stale() {
                return Some((c.stream, c.uses));
            }
        }
        None
    }

    /// Returns a connection that finished a response cleanly. Above the cap it stays until
    /// the sweep (see the module notes); at the hard bound the oldest idle connection is
    /// closed: it is the one most likely to be closed by the upstream anyway.
    pub fn checkin(&self, addr: SocketAddr, stream: S, uses: u32, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let stack = idle.entry(addr).or_default();
        if stack.len() >= max_idle.saturating_mul(BURST_FACTOR) {
            stack.remove(0);
        }
        stack.push(Idle { stream, since: Instant::now(), uses });
    }

    /// Housekeeping: closes idle connections older than the idle timeout `keep_for(addr)`
    /// gives, those the upstream closed (or sent unrequested bytes on), those above the cap it
    /// gives that have been idle for [`PURGE_AFTER`] (oldest first), and every one to an
    /// endpoint for which `keep_for` is `None` (no cluster has it since a reload). Nothing is
    /// left in CLOSE_WAIT waiting for the next checkout.
    pub fn sweep(&self, now: Instant, keep_for: impl Fn(SocketAddr) -> Option<(Duration, usize)>) {
        self.idle.borrow_mut().retain(|addr, stack| {
            match keep_for(*addr) {
                None => stack.clear(),
                Some((max_age, max_idle)) => {
                    stack.retain(|c| now.duration_since(c.since) < max_age && !c.stream.is_stale());
                    // The stack is oldest first: purge from the bottom while over the cap.
                    let over = stack.len().saturating_sub(max_idle);
                    let purge = stack[..over]
                        .iter()
                        .take_while(|c| now.duration_since(c.since) >= PURGE_AFTER)
                        .count();
                    stack.drain(..purge);
                }
            }
            !stack.is_empty()
        });
    }

    /// Idle connections held, over all endpoints.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}
