//! Upstream failures logged per worker at most once a second per upstream and reason.
//!
//! During an outage every request fails the same way; a log line for each would cost every
//! worker a formatted line per request. Instead the first failure of each second is logged
//! with its detail, the rest are counted, and the worker's housekeeping tick logs the count.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::warn;

/// One line per upstream and reason per this long.
pub const WINDOW: Duration = Duration::from_secs(1);

struct Window {
    opened: Instant,
    suppressed: u64,
}

/// A worker's failure log limiter; never shared.
#[derive(Default)]
pub struct FailureLog {
    windows: RefCell<HashMap<(SocketAddr, &'static str), Window>>,
}

impl FailureLog {
    /// Whether a failure of `upstream` for `reason` should be logged now: `true` for the first
    /// one of a window, after which the rest of the window is only counted.
    pub fn admit(&self, upstream: SocketAddr, reason: &'static str, now: Instant) -> bool {
        use std::collections::hash_map::Entry;
        match self.windows.borrow_mut().entry((upstream, reason)) {
            Entry::Vacant(v) => {
                v.insert(Window { opened: now, suppressed: 0 });
                true
            }
            // A finished window whose count the tick has not reported yet keeps counting.
            Entry::Occupied(mut o) => {
                let w = o.get_mut();
                if now.duration_since(w.opened) >= WINDOW && w.suppressed == 0 {
                    w.opened = now;
                    return true;
                }
                w.suppressed += 1;
                false
            }
        }
    }

    /// Called by the housekeeping tick: logs how many failures each finished window
    /// suppressed, and forgets finished windows. Returns the number of lines logged.
    pub fn flush(&self, now: Instant) -> usize {
        let mut logged = 0;
        self.windows.borrow_mut().retain(|(upstream, reason), w| {
            if now.duration_since(w.opened) < WINDOW {
                return true;
            }
            if w.suppressed > 0 {
                warn!(upstream = %upstream, reason, suppressed = w.suppressed, "more upstream failures like the last one");
                logged += 1;
            }
            false
        });
        logged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_then_the_count() {
        let log = FailureLog::default();
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let t0 = Instant::now();
        assert!(log.admit(up, "connect failed", t0));
        let t = t0 + Duration::from_millis(10);
        assert!(!(0..99).any(|_| log.admit(up, "connect failed", t)), "suppressed in the window");
        assert!(log.admit(up, "no response head in time", t), "another reason has its own window");
        assert_eq!(log.flush(t), 0, "nothing to report before the window ends");
        assert_eq!(log.flush(t0 + WINDOW), 1, "the 99 suppressed failures are reported");
        assert!(log.admit(up, "connect failed", t0 + WINDOW), "a new window logs again");
    }
}
