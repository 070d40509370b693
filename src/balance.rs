//! Picking an endpoint within a cluster: round robin over the worker's own counter.

use std::cell::Cell;

/// Per-worker round robin; never shared between threads, so a plain `Cell` suffices.
#[derive(Debug)]
pub struct RoundRobin {
    next: Cell<usize>,
}

impl RoundRobin {
    /// `start` spreads workers over different first endpoints so that N workers starting
    /// together do not all hit endpoint 0 first.
    pub fn new(start: usize) -> Self {
        RoundRobin { next: Cell::new(start) }
    }

    /// An index below `n` (`n` > 0).
    pub fn pick(&self, n: usize) -> usize {
        let i = self.next.get() % n;
        self.next.set(i.wrapping_add(1));
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_evenly() {
        let rr = RoundRobin::new(1);
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(3)).collect();
        assert_eq!(picks, vec![1, 2, 0, 1, 2, 0]);
    }
}
