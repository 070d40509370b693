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
use std::hash::{BuildHasherDefault, Hasher};
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
    idle: RefCell<HashMap<SocketAddr, Vec<Idle<S>>, BuildHasherDefault<AddrHasher>>>,
}

impl<S: Stream> Default for Pool<S> {
    fn default() -> Self {
        Pool { idle: RefCell::new(HashMap::default()) }
    }
}

/// The pool's hasher: a multiply-rotate fold (the Fx hash) instead of SipHash, which cost about
/// 300 instructions per lookup, two lookups per request (callgrind, 64 B requests): 3% of the
/// total. SipHash's keying defends a map against keys an attacker chooses; these keys are the
/// configured (or DNS-given) endpoints, never a client's input.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
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
        let now = crate::clock::now();
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
        stack.push(Idle { stream, since: crate::clock::now(), uses });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn endpoint_addresses_spread_over_the_hash() {
        let hasher = BuildHasherDefault::<AddrHasher>::default();
        let mut seen = std::collections::HashSet::new();
        for port in 1..=500u16 {
            seen.insert(hasher.hash_one(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        for host in 0..=255u8 {
            for net in 0..2u8 {
                seen.insert(hasher.hash_one(SocketAddr::from(([10, net, 0, host], 80))));
            }
        }
        seen.insert(hasher.hash_one("[::1]:80".parse::<SocketAddr>().unwrap()));
        seen.insert(hasher.hash_one("[::2]:80".parse::<SocketAddr>().unwrap()));
        // Ports, hosts and families all reach the hash: no two of these 1,014 collide.
        assert_eq!(seen.len(), 500 + 512 + 2);
    }
}
