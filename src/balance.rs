//! Picking an endpoint within a cluster: the balancing policies and passive outlier ejection,
//! each on the worker's own state (`Cell`s; never shared between threads).

use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::config::lb::{Outlier, Policy};
use crate::config::Cluster;
use crate::proxy::wait::{race, Either, IdleTimers, WakeList};

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

/// One endpoint as this worker sees it: requests in flight and passive health. Shared (`Rc`)
/// between the balancer of the current view and the one it replaced, so a reload keeps an
/// ejection and the in-flight counts of endpoints that remain (and a request that started
/// before the reload releases the count it took).
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests this worker has in flight to the endpoint (least_request).
    inflight: Cell<u32>,
    /// Consecutive failures of any kind (connect failures and 5xx answers).
    failures: Cell<u32>,
    /// Consecutive connect failures (refused, unreachable, timed out).
    connect_failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    ejections: Cell<u32>,
    /// When the endpoint's slow start began (added, back from unhealthy, or ejection over).
    ramp_from: Cell<Option<Instant>>,
    /// The active health verdict last seen, to notice a recovery (slow start).
    was_unhealthy: Cell<bool>,
    pub counters: crate::stats::EndpointCounters,
}

/// Requests waiting for an endpoint below `max_connections`, per cluster and worker; shared
/// by the balancers of a cluster across reloads, like the endpoints' state.
#[derive(Default)]
pub struct Queue {
    waiters: WakeList,
    queued: Cell<usize>,
}

/// Counts one request in flight to an endpoint until dropped, however the request ends (a
/// response relayed, an error, a client gone, or a panic unwinding the connection task);
/// the drop lets a queued request look for room again.
#[derive(Debug)]
pub struct InFlight(Rc<EndpointState>, Rc<Queue>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get().saturating_sub(1));
        if self.1.queued.get() > 0 {
            self.1.waiters.wake_all();
        }
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queue({} waiting)", self.queued.get())
    }
}

/// A place in the queue, given back however the wait ends (the client may go away).
struct Queued<'a>(&'a Queue);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.set(self.0.queued.get() - 1);
    }
}

/// How an attempt on an endpoint went, for passive health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A 5xx answer, or a failure after the connection was made.
    Failed,
    /// The connection itself failed: nothing reached the endpoint.
    ConnectFailed,
}

/// One worker's balancing state for one cluster.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    addrs: Vec<SocketAddr>,
    weights: Vec<u32>,
    /// Smooth weighted round robin's current weights.
    current: Vec<Cell<i64>>,
    rng: Cell<u64>,
    outlier: Option<Outlier>,
    endpoints: Vec<Rc<EndpointState>>,
    max_connections: Option<u32>,
    max_queue: usize,
    queue: Rc<Queue>,
    slow_start: Option<Duration>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No endpoint is healthy (and the cluster does not fail open), or there is none yet.
    NoHealthyEndpoint,
    /// Every usable endpoint has `max_connections` requests in flight on this worker.
    Full,
}

/// Weights are scaled by this internally, so that slow start can ramp a weight of 1.
const WEIGHT_SCALE: u64 = 100;

impl Balancer {
    /// `worker` spreads workers over different first picks of the round robin; `seed` starts
    /// the random policies (fixed in tests, so they are deterministic). `previous` is this
    /// worker's balancer of the same cluster before a reload: endpoints that remain keep
    /// their state.
    pub fn new(cluster: &Cluster, worker: usize, seed: u64, previous: Option<&Balancer>) -> Self {
        let n = cluster.endpoints.len();
        let now = crate::clock::now();
        let endpoints = cluster
            .endpoints
            .iter()
            .map(|addr| {
                let kept = previous
                    .and_then(|p| p.addrs.iter().position(|a| a == addr).map(|j| &p.endpoints[j]))
                    .map(Rc::clone);
                kept.unwrap_or_else(|| {
                    let e = EndpointState::default();
                    // New since the last view (a reload or DNS added it): slow start. Not at
                    // startup, where every endpoint is new.
                    if previous.is_some() && cluster.slow_start.is_some() {
                        e.ramp_from.set(Some(now));
                    }
                    Rc::new(e)
                })
            })
            .collect();
        let b = Balancer {
            policy: cluster.policy.clone(),
            addrs: cluster.endpoints.clone(),
            weights: cluster.weights.clone(),
            current: (0..n).map(|_| Cell::new(0)).collect(),
            // xorshift must not start at zero.
            rng: Cell::new(hash64(("apex-rng", worker, seed)) | 1),
            outlier: cluster.outlier.clone(),
            endpoints,
            max_connections: cluster.max_connections,
            max_queue: cluster.max_queue,
            queue: previous.map(|p| Rc::clone(&p.queue)).unwrap_or_default(),
            slow_start: cluster.slow_start,
        };
        // Start each worker at a different point of the smooth round robin sequence.
        if matches!(b.policy, Policy::RoundRobin) && n > 0 {
            for _ in 0..worker % n.max(1) {
                b.smooth_round_robin(&|_| true, now);
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
        self.endpoints[i].ejected_until.get().is_some_and(|t| t > now)
    }

    /// Whether outlier detection has endpoint `i` ejected now (for metrics).
    pub fn is_ejected(&self, i: usize) -> bool {
        self.ejected(i, crate::clock::now())
    }

    /// The endpoints' addresses, by index.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
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
    ) -> Result<usize, Unavailable> {
        let n = self.weights.len();
        if n == 0 {
            // A cluster whose DNS names have not resolved yet.
            return Err(Unavailable::NoHealthyEndpoint);
        }
        let now = crate::clock::now();
        let is_healthy = |i: usize| healthy.is_none_or(|h| h.get(i).copied().unwrap_or(true));
        if self.slow_start.is_some() && healthy.is_some() {
            // A recovery starts a slow start.
            for i in 0..n {
                let down = !is_healthy(i);
                let e = &self.endpoints[i];
                if e.was_unhealthy.get() && !down {
                    e.ramp_from.set(Some(now));
                }
                e.was_unhealthy.set(down);
            }
        }
        let any_healthy = (0..n).any(is_healthy);
        if !any_healthy && !fail_open {
            return Err(Unavailable::NoHealthyEndpoint);
        }
        // Usable: healthy (or everything is down and we fail open) and below max_connections,
        // then not ejected, not tried. Each of the last two restrictions is dropped in turn
        // when it would leave nothing; max_connections never is.
        let room = |i: usize| self.has_room(i);
        if !(0..n).any(|i| (!any_healthy || is_healthy(i)) && room(i)) {
            return Err(Unavailable::Full);
        }
        let base = |i: usize| (!any_healthy || is_healthy(i)) && room(i);
        let fresh = |i: usize| base(i) && !tried.contains(&i);
        let best = |i: usize| fresh(i) && !self.ejected(i, now);
        if let Some((ring, key)) = ring {
            // The first usable endpoint on the ring from the key's position.
            return ring
                .walk(key)
                .find(|&i| best(i))
                .or_else(|| ring.walk(key).find(|&i| base(i)))
                .ok_or(Unavailable::NoHealthyEndpoint);
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
            Policy::RoundRobin => self.smooth_round_robin(usable, now),
            // Without a key a consistent-hash request is balanced at random.
            Policy::Random | Policy::ConsistentHash(_) => self.weighted_random(usable, now),
            Policy::LeastRequest => {
                let a = self.weighted_random(usable, now);
                let b = self.weighted_random(usable, now);
                // Fewer in flight per unit of weight wins.
                let load = |i: usize| {
                    u64::from(self.endpoints[i].inflight.get()) * 1000 * WEIGHT_SCALE
                        / self.weight(i, now)
                };
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        })
    }

    /// Endpoint `i`'s weight now (scaled by `WEIGHT_SCALE`): during a slow start, from 10% of
    /// its configured weight to all of it, linearly.
    fn weight(&self, i: usize, now: Instant) -> u64 {
        let full = u64::from(self.weights[i]) * WEIGHT_SCALE;
        let (Some(window), Some(from)) = (self.slow_start, self.endpoints[i].ramp_from.get())
        else {
            return full;
        };
        let elapsed = now.saturating_duration_since(from);
        if elapsed >= window {
            return full;
        }
        let permille = 100 + 900 * elapsed.as_micros() as u64 / window.as_micros().max(1) as u64;
        (full * permille / 1000).max(1)
    }

    /// Counts an attempt on endpoint `i` in its per-endpoint series.
    pub fn record(&self, i: usize, failed: bool, took: Duration) {
        self.endpoints[i].counters.record(failed, took);
    }

    /// Endpoint `i`'s counters on this worker.
    pub fn totals(&self, i: usize) -> crate::stats::EndpointTotals {
        self.endpoints[i].counters.totals()
    }

    /// Endpoint `i`'s weight now, slow start included (for the status page).
    pub fn current_weight(&self, i: usize) -> f64 {
        self.weight(i, crate::clock::now()) as f64 / WEIGHT_SCALE as f64
    }

    /// Requests waiting in this cluster's queue on this worker.
    pub fn queued(&self) -> usize {
        self.queue.queued.get()
    }

    /// Whether endpoint `i` is below `max_connections` on this worker.
    fn has_room(&self, i: usize) -> bool {
        self.max_connections.is_none_or(|m| self.endpoints[i].inflight.get() < m)
    }

    /// Waits, in the cluster's queue, until an endpoint may have room (then the caller picks
    /// again) or until `deadline`. `false` at once when the queue is full, and at the deadline.
    pub async fn wait_for_room(&self, timers: &IdleTimers, deadline: Instant) -> bool {
        let q = &self.queue;
        if q.queued.get() >= self.max_queue {
            return false;
        }
        q.queued.set(q.queued.get() + 1);
        let _place = Queued(q);
        let room = q.waiters.until(|| (0..self.endpoints.len()).any(|i| self.has_room(i)));
        matches!(race(room, timers.until(deadline)).await, Either::Left(()))
    }

    fn smooth_round_robin(&self, usable: &dyn Fn(usize) -> bool, now: Instant) -> usize {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in (0..self.weights.len()).filter(|&i| usable(i)) {
            let w = self.weight(i, now) as i64;
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

    fn weighted_random(&self, usable: &dyn Fn(usize) -> bool, now: Instant) -> usize {
        let n = self.weights.len();
        let total: u64 = (0..n).filter(|&i| usable(i)).map(|i| self.weight(i, now)).sum();
        if total == 0 {
            return 0;
        }
        let mut r = self.next_random() % total;
        for i in (0..n).filter(|&i| usable(i)) {
            let w = self.weight(i, now);
            if r < w {
                return i;
            }
            r -= w;
        }
        0
    }

    /// A request to endpoint `i` starts; least_request counts it until the guard is dropped.
    pub fn started(&self, i: usize) -> InFlight {
        let e = &self.endpoints[i];
        e.inflight.set(e.inflight.get() + 1);
        InFlight(Rc::clone(e), Rc::clone(&self.queue))
    }

    /// Passive health: records how an attempt on endpoint `i` went. Returns the ejection time
    /// when this failure ejected it.
    pub fn report(&self, i: usize, outcome: Outcome) -> Option<Duration> {
        let o = self.outlier.as_ref()?;
        let p = &self.endpoints[i];
        match outcome {
            Outcome::Ok => {
                p.failures.set(0);
                p.connect_failures.set(0);
                return None;
            }
            Outcome::Failed => p.connect_failures.set(0),
            Outcome::ConnectFailed => p.connect_failures.set(p.connect_failures.get() + 1),
        }
        p.failures.set(p.failures.get() + 1);
        if p.failures.get() < o.consecutive_failures
            && p.connect_failures.get() < o.consecutive_connect_failures
        {
            return None;
        }
        let now = crate::clock::now();
        let n = self.endpoints.len();
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
        // Back after the ejection: slow start from then.
        if self.slow_start.is_some() {
            p.ramp_from.set(Some(now + time));
        }
        p.ejections.set(p.ejections.get() + 1);
        p.failures.set(0);
        p.connect_failures.set(0);
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
        let b = Balancer::new(&cluster(&[5, 1, 1], Policy::RoundRobin), 0, 7, None);
        let picks: Vec<usize> = (0..7).map(|_| b.pick(None, None, true, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0], "nginx's smooth sequence for 5:1:1");
    }

    #[test]
    fn random_and_least_request_follow_weights() {
        for policy in [Policy::Random, Policy::LeastRequest] {
            let b = Balancer::new(&cluster(&[1, 3], policy.clone()), 1, 7, None);
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
        // Seeded, so the random draws (and this count) are the same on every run.
        let b = Balancer::new(&cluster(&[1, 1], Policy::LeastRequest), 0, 7, None);
        let busy: Vec<InFlight> = (0..10).map(|_| b.started(0)).collect();
        // Two random choices: only when both draws are the busy endpoint (1 in 4) is it picked.
        let picks = (0..1000).filter(|_| b.pick(None, None, true, &[]).unwrap() == 1).count();
        assert!((700..=800).contains(&picks), "{picks}");
        // Once those requests end, however they end, the endpoints are even again.
        drop(busy);
        let picks = (0..1000).filter(|_| b.pick(None, None, true, &[]).unwrap() == 1).count();
        assert!((400..=600).contains(&picks), "{picks}");
    }

    #[test]
    fn a_reload_keeps_the_state_of_endpoints_that_remain() {
        let mut c = cluster(&[1, 1], Policy::LeastRequest);
        c.outlier = Some(Outlier { consecutive_failures: 1, ..Outlier::default() });
        let before = Balancer::new(&c, 0, 7, None);
        let in_flight = before.started(1);
        assert!(before.report(0, Outcome::Failed).is_some(), "ejected");
        // The reload adds a third endpoint; the first two are the same addresses.
        let mut next = cluster(&[1, 1, 1], Policy::LeastRequest);
        next.outlier = c.outlier.clone();
        let after = Balancer::new(&next, 0, 7, Some(&before));
        assert!(after.is_ejected(0), "an ejection survives the reload");
        assert!(!after.is_ejected(2));
        assert_eq!(after.endpoints[1].inflight.get(), 1, "in-flight count carried over");
        drop(in_flight);
        assert_eq!(after.endpoints[1].inflight.get(), 0, "released by the old request's guard");
    }

    #[test]
    fn one_connect_failure_ejects_by_default_but_one_5xx_does_not() {
        let mut c = cluster(&[1, 1, 1], Policy::RoundRobin);
        c.outlier = Some(Outlier::default());
        let b = Balancer::new(&c, 0, 7, None);
        assert_eq!(b.report(0, Outcome::Failed), None, "one 5xx");
        assert_eq!(b.report(1, Outcome::ConnectFailed), Some(Duration::from_secs(10)));
        for _ in 0..4 {
            assert_eq!(b.report(0, Outcome::Failed), None);
        }
        assert_eq!(b.report(0, Outcome::Failed), None, "50% of 3 is one: no second ejection");
    }

    #[test]
    fn unhealthy_tried_and_ejected_endpoints_are_avoided() {
        let mut c = cluster(&[1, 1, 1], Policy::RoundRobin);
        c.outlier = Some(Outlier {
            consecutive_failures: 2,
            consecutive_connect_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
        });
        let b = Balancer::new(&c, 0, 7, None);
        let healthy = [true, false, true];
        for _ in 0..10 {
            assert_ne!(b.pick(None, Some(&healthy), true, &[]).unwrap(), 1);
            assert_eq!(b.pick(None, Some(&healthy), true, &[0]).unwrap(), 2);
        }
        assert_eq!(b.report(0, Outcome::Failed), None);
        assert_eq!(b.report(0, Outcome::ConnectFailed), Some(Duration::from_secs(10)));
        for _ in 0..10 {
            assert_eq!(b.pick(None, Some(&healthy), true, &[]).unwrap(), 2);
        }
        // A second endpoint may not be ejected: 50% of 3 is one.
        b.report(2, Outcome::Failed);
        assert_eq!(b.report(2, Outcome::Failed), None);
        assert_eq!(
            b.pick(None, Some(&[false, false, false]), false, &[]),
            Err(Unavailable::NoHealthyEndpoint)
        );
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

    #[test]
    fn max_connections_is_a_hard_limit_per_endpoint() {
        let mut c = cluster(&[1, 1], Policy::RoundRobin);
        c.max_connections = Some(1);
        let b = Balancer::new(&c, 0, 7, None);
        let first = b.pick(None, None, true, &[]).unwrap();
        let g1 = b.started(first);
        let second = b.pick(None, None, true, &[]).unwrap();
        assert_ne!(first, second, "the full endpoint is skipped");
        let g2 = b.started(second);
        assert_eq!(b.pick(None, None, true, &[]), Err(Unavailable::Full));
        // Even a retry that tried every endpoint does not go over the limit.
        assert_eq!(b.pick(None, None, true, &[0, 1]), Err(Unavailable::Full));
        drop(g1);
        assert_eq!(b.pick(None, None, true, &[]), Ok(first), "room again once one finishes");
        drop(g2);
    }

    #[test]
    fn slow_start_ramps_an_added_endpoint_from_a_tenth_of_its_weight() {
        let mut c = cluster(&[4], Policy::RoundRobin);
        c.slow_start = Some(Duration::from_secs(10));
        let before = Balancer::new(&c, 0, 7, None);
        assert_eq!(before.weight(0, Instant::now()), 400, "no slow start at startup");
        let mut next = cluster(&[4, 4], Policy::RoundRobin);
        next.slow_start = c.slow_start;
        let after = Balancer::new(&next, 0, 7, Some(&before));
        let from = after.endpoints[1].ramp_from.get().expect("the added one ramps");
        assert_eq!(after.weight(0, from), 400, "the one that stayed does not");
        assert_eq!(after.weight(1, from), 40);
        assert_eq!(after.weight(1, from + Duration::from_secs(5)), 220);
        assert_eq!(after.weight(1, from + Duration::from_secs(10)), 400);
    }

    #[test]
    fn slow_start_follows_a_recovery_from_unhealthy_and_from_an_ejection() {
        let mut c = cluster(&[1, 1], Policy::RoundRobin);
        c.slow_start = Some(Duration::from_secs(10));
        let b = Balancer::new(&c, 0, 7, None);
        b.pick(None, Some(&[true, false]), true, &[]).unwrap();
        assert!(b.endpoints[1].ramp_from.get().is_none(), "down: nothing to ramp yet");
        b.pick(None, Some(&[true, true]), true, &[]).unwrap();
        let from = b.endpoints[1].ramp_from.get().expect("healthy again: ramps");
        assert_eq!(b.weight(1, from), 10);
        let ejected_for = b.report(0, Outcome::ConnectFailed).expect("ejected");
        let back = b.endpoints[0].ramp_from.get().expect("ramps once the ejection ends");
        assert!(back >= Instant::now() + ejected_for - Duration::from_secs(1));
        assert_eq!(b.weight(0, back), 10);
    }
}
