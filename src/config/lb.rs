//! The load-balancer settings of clusters and routes: policy, weights, health checks, outlier
//! ejection, retries and per-route timeouts, as validated types.

use std::time::Duration;

use super::defaults;

/// How a cluster picks an endpoint for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Smooth weighted round robin (nginx's algorithm).
    RoundRobin,
    /// Power of two random choices on the worker's own in-flight counts, divided by weight.
    LeastRequest,
    /// Weighted random.
    Random,
    /// A hash ring: the same key goes to the same endpoint while it is up.
    ConsistentHash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientAddress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Request target of the probe (`GET PATH HTTP/1.1`).
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passing probes that make an unhealthy endpoint healthy again.
    pub healthy_threshold: u32,
    /// Consecutive failing probes that make an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Statuses that pass; empty means 200–399.
    pub expected_statuses: Vec<u16>,
    /// When every endpoint is unhealthy: send traffic to all of them anyway (`true`) or 503.
    pub fail_open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive failures of any kind (connect failures, 5xx answers) that eject an
    /// endpoint (per worker).
    pub consecutive_failures: u32,
    /// Consecutive connect failures that eject an endpoint (per worker).
    pub consecutive_connect_failures: u32,
    /// First ejection; each repeat doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Never eject more than this share of the cluster at once, in percent.
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: defaults::OUTLIER_CONSECUTIVE_FAILURES,
            consecutive_connect_failures: defaults::OUTLIER_CONSECUTIVE_CONNECT_FAILURES,
            base_ejection: defaults::OUTLIER_BASE_EJECTION,
            max_ejection: defaults::OUTLIER_MAX_EJECTION,
            max_ejection_percent: defaults::OUTLIER_MAX_EJECTION_PERCENT,
        }
    }
}

/// What a retry may be for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// The connection failed (refused, unreachable, timed out): nothing was sent, so a retry
    /// on another endpoint is safe for any method, and the retry budget does not apply.
    ConnectFailure,
    /// A reused pooled connection failed before any response byte: a replayable request is
    /// sent once more on a fresh connection to the same endpoint.
    StaleConnection,
    Status(u16),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2 = one retry).
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    /// Retries may be at most this fraction of the worker's recent requests on the route.
    pub budget: f64,
    /// Retries always allowed per budget window, however few requests there were.
    pub min_retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: defaults::RETRY_ATTEMPTS,
            on: defaults::RETRY_ON.to_vec(),
            budget: defaults::RETRY_BUDGET,
            min_retries: defaults::RETRY_MIN_RETRIES,
        }
    }
}

impl RetryPolicy {
    pub fn retries_on(&self, r: RetryOn) -> bool {
        self.on.contains(&r)
    }
}

/// Per-route overrides of the cluster's timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteTimeouts {
    pub connect: Option<Duration>,
    pub response: Option<Duration>,
    pub read: Option<Duration>,
}
