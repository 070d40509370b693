//! The retry budget: retries stay a bounded fraction of a route's recent requests, per worker,
//! so a failing cluster sees a trickle of retries instead of a retry storm.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::config::lb::RetryPolicy;

/// Counts are kept for this window and the one before it.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RetryBudget {
    started: Cell<Instant>,
    requests: Cell<(u32, u32)>,
    retries: Cell<(u32, u32)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            started: Cell::new(crate::clock::now()),
            requests: Cell::new((0, 0)),
            retries: Cell::new((0, 0)),
        }
    }
}

impl RetryBudget {
    fn roll(&self, now: Instant) {
        let age = now.duration_since(self.started.get());
        if age < WINDOW {
            return;
        }
        let keep = |c: &Cell<(u32, u32)>| {
            let (cur, _) = c.get();
            c.set((0, if age < 2 * WINDOW { cur } else { 0 }));
        };
        keep(&self.requests);
        keep(&self.retries);
        self.started.set(now);
    }

    /// A request (not a retry) started on the route.
    pub fn request(&self) {
        self.roll(crate::clock::now());
        let (c, p) = self.requests.get();
        self.requests.set((c + 1, p));
    }

    /// Whether one more retry fits the budget; if so it is counted.
    pub fn allow(&self, policy: &RetryPolicy) -> bool {
        self.roll(crate::clock::now());
        let (rc, rp) = self.requests.get();
        let (tc, tp) = self.retries.get();
        let limit = f64::from(policy.min_retries).max(policy.budget * f64::from(rc + rp));
        if f64::from(tc + tp) >= limit {
            return false;
        }
        self.retries.set((tc + 1, tp));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_the_budget() {
        let p = RetryPolicy { attempts: 3, on: vec![], budget: 0.1, min_retries: 2 };
        let b = RetryBudget::default();
        for _ in 0..100 {
            b.request();
        }
        let allowed = (0..100).filter(|_| b.allow(&p)).count();
        assert_eq!(allowed, 10, "10% of 100 requests");
        let quiet = RetryBudget::default();
        assert_eq!((0..10).filter(|_| quiet.allow(&p)).count(), 2, "min_retries with no traffic");
    }
}
