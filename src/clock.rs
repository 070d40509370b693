//! The time as a connection's task sees it: read from the system clock at most once per poll of
//! the task, however many deadlines, latencies and rate windows that poll computes.
//!
//! Why: a proxied 64 B request read the clock about 16 times (`clock_gettime` was the hottest
//! user-space symbol, 2% of a worker's CPU under wrk), because each layer (idle wait, header and
//! response deadlines, pool, balancer, latency histograms, retry budget) asks for its own `now`.
//! A poll runs for microseconds: every deadline here is in milliseconds or more, and latencies
//! are recorded in microseconds, so one reading per poll loses nothing that is measured.
//!
//! Outside a poll scope (the control plane, tests, a task not wrapped in [`Scope`]) [`now`]
//! reads the clock each time, as `Instant::now` does.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// `None`: no poll in progress on this thread. `Some(None)`: a poll is in progress and has not
/// read the clock yet. `Some(Some(t))`: the reading this poll took.
#[derive(Clone, Copy)]
struct Reading(Option<Option<Instant>>);

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading(None)) };
}

/// The time now: the reading of the poll in progress, taken on first use.
pub fn now() -> Instant {
    READING.with(|r| match r.get().0 {
        Some(Some(t)) => t,
        Some(None) => {
            let t = Instant::now();
            r.set(Reading(Some(Some(t))));
            t
        }
        None => Instant::now(),
    })
}

/// Time passed since `t`, by [`now`] (zero if `t` is later).
pub fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}

/// One poll of a task: while it lives, [`now`] returns one reading. Scopes nest (a task polled
/// inside another's poll keeps the outer reading); the outermost one ends the reading.
pub struct Scope {
    outer: Reading,
}

impl Scope {
    pub fn enter() -> Scope {
        let outer = READING.with(|r| {
            let outer = r.get();
            if outer.0.is_none() {
                r.set(Reading(Some(None)));
            }
            outer
        });
        Scope { outer }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        READING.with(|r| r.set(self.outer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_reads_the_clock_once_and_only_inside_it() {
        let before = now();
        let scope = Scope::enter();
        let first = now();
        assert!(first >= before);
        // The system clock moves on (nanosecond resolution: a few reads at most).
        while Instant::now() <= first {}
        assert_eq!(now(), first, "one reading per scope");
        {
            let _inner = Scope::enter();
            assert_eq!(now(), first, "a nested scope keeps the outer reading");
        }
        assert_eq!(now(), first, "the inner scope's end does not end the outer reading");
        drop(scope);
        assert!(now() > first, "outside a scope the clock is read each time");
        let _next = Scope::enter();
        assert!(now() > first, "the next scope takes a new reading");
    }
}
