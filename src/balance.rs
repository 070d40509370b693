//! Picking an endpoint within a cluster: the balancing policies and passive outlier ejection,
//! each on the worker's own state (`Cell`s; never shared between threads).

use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::lb::{Outlier, Policy};
use crate::config::Cluster;

/// Virtual nodes per unit of weight on the hash ring: enough that removing one of ten
/// endpoints moves close to the ideal tenth of the keys.
const VNODES: u32 = 160;

/// A consistent-hash ring, built once per config snapshot and shared read-only.
#[derive(Debug, Clone)]
pub struct Ring {
    /// `(position, endpoint index)`, sorted by position.
    points: Vec<(u64, usize)>,
}

pub fn hash64(data: impl Hash) -> u64 {
    // DefaultHasher::new() has fixed keys: positions are the same in every process and worker.
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

impl Ring {
    /// Points depend on the endpoint's address, not its index, so removing an endpoint moves
    /// only the keys that were on it.
    pub fn new(endpoints: &[SocketAddr], weights: &[u32]) -> Ring {
        let mut points = Vec::new();
        for (i, (addr, w)) in endpoints.iter().zip(weights).enumerate() {
            for v in 0..VNODES * w {
                points.push((hash64((addr, v)), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Endpoints in ring order from `key`'s position, each once; the caller takes the first
    /// usable one.
    pub fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < key);
        let n = self.points.len();
        (0..n).map(move |k| self.points[(start + k) % n].1)
    }
}

/// Passive health of one endpoint as this worker sees it.
#[derive(Debug, Default)]
struct Passive {
    failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    ejections: Cell<u32>,
}

/// One worker's balancing state for one cluster.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    weights: Vec<u32>,
    /// Smooth weighted round robin's current weights.
    current: Vec<Cell<i64>>,
    /// Requests this worker has in flight per endpoint (least_request).
    inflight: Vec<Cell<u32>>,
    rng: Cell<u64>,
    outlier: Option<Outlier>,
    passive: Vec<Passive>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoHealthyEndpoint;

impl Balancer {
    /// `seed` spreads workers over different first picks.
    pub fn new(cluster: &Cluster, seed: usize) -> Balancer {
        let n = cluster.endpoints.len();
        let current: Vec<Cell<i64>> = (0..n).map(|_| Cell::new(0)).collect();
        // Start each worker at a different point of the smooth round robin sequence.
        let b = Balancer {
            policy: cluster.policy.clone(),
            weights: cluster.weights.clone(),
            current,
            inflight: (0..n).map(|_| Cell::new(0)).collect(),
            rng: Cell::new(hash64(("apex-rng", seed, Instant::now())) | 1),
            outlier: cluster.outlier.clone(),
            passive: (0..n).map(|_| Passive::default()).collect(),
        };
        if matches!(b.policy, Policy::RoundRobin) {
            for _ in 0..seed % n.max(1) {
                b.smooth_round_robin(&|_| true);
            }
        }
        b
    }

    fn next_random(&self) -> u64 {
        // xorshift64*: fast and good enough to spread load.
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn ejected(&self, i: usize, now: Instant) -> bool {
        self.passive[i].ejected_until.get().is_some_and(|t| t > now)
    }

    /// Picks an endpoint index. `ring` is the consistent-hash ring and the request's key, when
    /// the cluster hashes; `healthy` is the active health check's verdict per endpoint (`None`:
    /// no health check); `tried` are endpoints this request already failed on; `fail_open` says
    /// what to do when no endpoint is healthy.
    pub fn pick(
        &self,
        ring: Option<(&Ring, u64)>,
        healthy: Option<&[bool]>,
        fail_open: bool,
        tried: &[usize],
    ) -> Result<usize, NoHealthyEndpoint> {
        let n = self.weights.len();
        let now = Instant::now();
        let is_healthy = |i: usize| healthy.is_none_or(|h| h.get(i).copied().unwrap_or(true));
        let any_healthy = (0..n).any(is_healthy);
        if !any_healthy && !fail_open {
            return Err(NoHealthyEndpoint);
        }
        // Usable: healthy (or everything is down and we fail open), not ejected, not tried.
        // Each restriction is dropped in turn when it would leave nothing.
        let base = |i: usize| !any_healthy || is_healthy(i);
        let fresh = |i: usize| base(i) && !tried.contains(&i);
        let best = |i: usize| fresh(i) && !self.ejected(i, now);
        if let Some((ring, key)) = ring {
            // The first usable endpoint on the ring from the key's position.
            return ring
                .walk(key)
                .find(|&i| best(i))
                .or_else(|| ring.walk(key).find(|&i| base(i)))
                .ok_or(NoHealthyEndpoint);
        }
        // No allocation per request: the policies take the predicate itself.
        let usable: &dyn Fn(usize) -> bool = if (0..n).any(best) {
            &best
        } else if (0..n).any(fresh) {
            &fresh
        } else {
            &base
        };
        Ok(match &self.policy {
            Policy::RoundRobin => self.smooth_round_robin(usable),
            // Without a key a consistent-hash request is balanced at random.
            Policy::Random | Policy::ConsistentHash(_) => self.weighted_random(usable),
            Policy::LeastRequest => {
                let a = self.weighted_random(usable);
                let b = self.weighted_random(usable);
                // Fewer in flight per unit of weight wins.
                let load = |i: usize| {
                    u64::from(self.inflight[i].get()) * 1000 / u64::from(self.weights[i])
                };
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        })
    }

    fn smooth_round_robin(&self, usable: &dyn Fn(usize) -> bool) -> usize {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in (0..self.weights.len()).filter(|&i| usable(i)) {
            let w = i64::from(self.weights[i]);
            let c = self.current[i].get() + w;
            self.current[i].set(c);
            total += w;
            if best.is_none_or(|b| c > self.current[b].get()) {
                best = Some(i);
            }
        }
        let b = best.unwrap_or(0);
        self.current[b].set(self.current[b].get() - total);
        b
    }

    fn weighted_random(&self, usable: &dyn Fn(usize) -> bool) -> usize {
        let n = self.weights.len();
        let total: u64 = (0..n).filter(|&i| usable(i)).map(|i| u64::from(self.weights[i])).sum();
        if total == 0 {
            return 0;
        }
        let mut r = self.next_random() % total;
        for i in (0..n).filter(|&i| usable(i)) {
            let w = u64::from(self.weights[i]);
            if r < w {
                return i;
            }
            r -= w;
        }
        0
    }

    /// A request to endpoint `i` starts (least_request counts it until `finished`).
    pub fn started(&self, i: usize) {
        self.inflight[i].set(self.inflight[i].get() + 1);
    }

    pub fn finished(&self, i: usize) {
        self.inflight[i].set(self.inflight[i].get().saturating_sub(1));
    }

    /// Passive health: records whether an attempt on endpoint `i` failed (connect failure or
    /// 5xx). Returns the ejection time when this failure ejected it.
    pub fn report(&self, i: usize, failed: bool) -> Option<Duration> {
        let o = self.outlier.as_ref()?;
        let p = &self.passive[i];
        if !failed {
            p.failures.set(0);
            return None;
        }
        p.failures.set(p.failures.get() + 1);
        if p.failures.get() < o.consecutive_failures {
            return None;
        }
        let now = Instant::now();
        let n = self.passive.len();
        let ejected = (0..n).filter(|&j| self.ejected(j, now)).count();
        // Never more than max_ejection_percent of the cluster (rounded down, at least one
        // endpoint always stays).
        let allowed = (n * o.max_ejection_percent as usize / 100).min(n.saturating_sub(1));
        if ejected >= allowed {
            return None;
        }
        let factor = 1u32 << p.ejections.get().min(16);
        let time = (o.base_ejection * factor).min(o.max_ejection);
        p.ejected_until.set(Some(now + time));
        p.ejections.set(p.ejections.get() + 1);
        p.failures.set(0);
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(weights: &[u32], policy: Policy) -> Cluster {
        let endpoints = (0..weights.len())
            .map(|i| format!("127.0.0.1:{}", 9000 + i).parse().unwrap())
            .collect();
        let mut c = Cluster::with_defaults("c", endpoints);
        c.weights = weights.to_vec();
        c.policy = policy;
        c
    }

    #[test]
    fn smooth_round_robin_follows_weights_and_interleaves() {
        let b = Balancer::new(&cluster(&[5, 1, 1], Policy::RoundRobin), 0);
        let picks: Vec<usize> = (0..7).map(|_| b.pick(None, None, true, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0], "nginx's smooth sequence for 5:1:1");
    }

    #[test]
    fn random_and_least_request_follow_weights() {
        for policy in [Policy::Random, Policy::LeastRequest] {
            let b = Balancer::new(&cluster(&[1, 3], policy.clone()), 1);
            let mut counts = [0u32; 2];
            for _ in 0..40_000 {
                counts[b.pick(None, None, true, &[]).unwrap()] += 1;
            }
            let share = f64::from(counts[1]) / 40_000.0;
            if policy == Policy::Random {
                assert!((share - 0.75).abs() < 0.02, "{policy:?}: {share}");
            } else {
                assert!(share > 0.5, "{policy:?}: {share}");
            }
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::new(&cluster(&[1, 1], Policy::LeastRequest), 0);
        for _ in 0..10 {
            b.started(0);
        }
        let picks = (0..100).filter(|_| b.pick(None, None, true, &[]).unwrap() == 1).count();
        assert!(picks >= 70, "{picks}");
    }

    #[test]
    fn unhealthy_tried_and_ejected_endpoints_are_avoided() {
        let mut c = cluster(&[1, 1, 1], Policy::RoundRobin);
        c.outlier = Some(Outlier {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
        });
        let b = Balancer::new(&c, 0);
        let healthy = [true, false, true];
        for _ in 0..10 {
            assert_ne!(b.pick(None, Some(&healthy), true, &[]).unwrap(), 1);
            assert_eq!(b.pick(None, Some(&healthy), true, &[0]).unwrap(), 2);
        }
        assert_eq!(b.report(0, true), None);
        assert_eq!(b.report(0, true), Some(Duration::from_secs(10)));
        for _ in 0..10 {
            assert_eq!(b.pick(None, Some(&healthy), true, &[]).unwrap(), 2);
        }
        // A second endpoint may not be ejected: 50% of 3 is one.
        b.report(2, true);
        assert_eq!(b.report(2, true), None);
        assert_eq!(b.pick(None, Some(&[false, false, false]), false, &[]), Err(NoHealthyEndpoint));
        assert!(b.pick(None, Some(&[false, false, false]), true, &[]).is_ok(), "fail open");
    }

    #[test]
    fn ring_moves_only_the_removed_endpoints_keys() {
        let addrs: Vec<SocketAddr> =
            (0..10).map(|i| format!("10.0.0.{i}:80").parse().unwrap()).collect();
        let full = Ring::new(&addrs, &[1; 10]);
        let less = Ring::new(&addrs[1..], &[1; 9]);
        let kept = (0..10_000u64)
            .filter(|k| {
                let key = hash64(k);
                let a = addrs[full.walk(key).next().unwrap()];
                let b = addrs[1..][less.walk(key).next().unwrap()];
                a == b
            })
            .count();
        assert!(kept >= 8_500, "kept {kept} of 10000");
    }
}
