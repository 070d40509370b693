//! Per-client limits of a listener, on this worker's own state: open connections per client
//! address, and a token bucket of requests per client address.
//!
//! Shared nothing: each worker enforces its share of a configured limit (the limit divided by
//! the number of workers, rounded up). A client whose connections all land on one worker is
//! held to that share; one whose connections spread evenly over every worker gets the whole
//! limit. So a client is refused somewhere between `limit / workers` and `limit`. With one
//! worker the limit is exact.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Clients tracked per worker for rate limiting; beyond this, new clients share one bucket
/// (memory stays bounded whatever the number of source addresses).
const MAX_TRACKED: usize = 65_536;

/// A listener (by a hash of its name, stable across reloads) and a client address.
pub type ClientKey = (u64, IpAddr);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
pub struct ClientLimits {
    conns: RefCell<HashMap<ClientKey, u32>>,
    buckets: RefCell<HashMap<ClientKey, Bucket>>,
}

/// This worker's share of `limit`.
pub fn share(limit: u32, workers: usize) -> u32 {
    let w = u32::try_from(workers.max(1)).unwrap_or(u32::MAX);
    limit.div_ceil(w).max(1)
}

/// This worker's share of a listener's rate limit: the rate and the burst divided by the
/// number of workers (the burst rounded up, at least one request).
pub fn worker_rate(r: RateLimit, workers: usize) -> RateLimit {
    RateLimit { per_second: r.per_second / workers.max(1) as f64, burst: share(r.burst, workers) }
}

/// Holds one of a client's connection slots until dropped.
pub struct ClientConn {
    limits: Rc<ClientLimits>,
    key: ClientKey,
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        let mut conns = self.limits.conns.borrow_mut();
        if let Some(n) = conns.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.key);
            }
        }
    }
}

impl ClientLimits {
    /// Takes a connection slot for `key` if it has fewer than `max` open here.
    pub fn connect(self: &Rc<Self>, key: ClientKey, max: u32) -> Option<ClientConn> {
        let mut conns = self.conns.borrow_mut();
        let n = conns.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientConn { limits: Rc::clone(self), key })
    }

    /// Takes one request token for `key` from a bucket of `rate` (this worker's share);
    /// `Err(wait)` when empty, with how long until the next token.
    pub fn request(&self, key: ClientKey, rate: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.borrow_mut();
        let key = if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            (key.0, IpAddr::from([0, 0, 0, 0]))
        } else {
            key
        };
        let burst = f64::from(rate.burst);
        let b = buckets.entry(key).or_insert(Bucket { tokens: burst, at: now });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate.per_second;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second))
    }

    /// Housekeeping: forgets buckets that have refilled (they would start full anyway).
    pub fn sweep(&self, now: Instant, rate_of: impl Fn(u64) -> Option<RateLimit>) {
        self.buckets.borrow_mut().retain(|(listener, _), b| match rate_of(*listener) {
            None => false,
            Some(r) => {
                let refill = now.saturating_duration_since(b.at).as_secs_f64() * r.per_second;
                b.tokens + refill < f64::from(r.burst)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_up() {
        assert_eq!(share(10, 1), 10);
        assert_eq!(share(10, 4), 3);
        assert_eq!(share(1, 8), 1);
    }

    #[test]
    fn connection_slots_are_released_on_drop() {
        let l = Rc::new(ClientLimits::default());
        let key = (1, IpAddr::from([10, 0, 0, 1]));
        let a = l.connect(key, 2).unwrap();
        let _b = l.connect(key, 2).unwrap();
        assert!(l.connect(key, 2).is_none(), "the third is refused");
        assert!(l.connect((1, IpAddr::from([10, 0, 0, 2])), 2).is_some(), "per client");
        drop(a);
        assert!(l.connect(key, 2).is_some(), "a closed connection frees its slot");
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let l = ClientLimits::default();
        let key = (1, IpAddr::from([10, 0, 0, 1]));
        let rate = RateLimit { per_second: 10.0, burst: 5 };
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| l.request(key, rate, t0).is_ok()).count(), 5);
        let wait = l.request(key, rate, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // One second later: ten more tokens, capped at the burst of five.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| l.request(key, rate, t1).is_ok()).count(), 5);
        let t2 = t1 + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| l.request(key, rate, t2).is_ok()).count(), 3);
    }
}
