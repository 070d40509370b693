//! The worker's idle upstream connections: one LIFO stack per endpoint, capped, with an idle
//! timeout. Owned by one worker thread; never locked.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::io::Stream;

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

    /// Returns a connection that finished a response cleanly. At the cap the oldest idle
    /// connection is closed: it is the one most likely to be closed by the upstream anyway.
    pub fn checkin(&self, addr: SocketAddr, stream: S, uses: u32, max_idle: usize) {
        if max_idle == 0 {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let stack = idle.entry(addr).or_default();
        if stack.len() >= max_idle {
            stack.remove(0);
        }
        stack.push(Idle { stream, since: Instant::now(), uses });
    }

    /// Housekeeping: closes idle connections older than `keep_for(addr)`, those the upstream
    /// closed (or sent unrequested bytes on), and every one to an endpoint for which
    /// `keep_for` is `None` (no cluster has it since a reload). Nothing is left in CLOSE_WAIT
    /// waiting for the next checkout.
    pub fn sweep(&self, now: Instant, keep_for: impl Fn(SocketAddr) -> Option<Duration>) {
        self.idle.borrow_mut().retain(|addr, stack| {
            match keep_for(*addr) {
                None => stack.clear(),
                Some(max) => {
                    stack.retain(|c| now.duration_since(c.since) < max && !c.stream.is_stale())
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
