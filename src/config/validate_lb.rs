//! Validation of the load-balancer settings of clusters and routes: policy and hashing,
//! health checks, outlier ejection, retries.

use super::defaults;
use super::error::Problem;
use super::lb;
use super::raw::{RawCluster, RawHashOn, RawHealthCheck, RawOutlier, RawRetry, RawRetryOn};
use super::units::is_token;
use super::validate::Validator;

impl Validator<'_> {
    pub(super) fn policy(&mut self, p: &str, c: &RawCluster) -> lb::Policy {
        let hash_on = match &c.hash_on {
            None => None,
            Some(RawHashOn::Word(w)) if w == "client_address" => Some(lb::HashOn::ClientAddress),
            Some(RawHashOn::Field(f)) => match (&f.header, &f.cookie) {
                (Some(h), None) if is_token(h) => Some(lb::HashOn::Header(h.to_ascii_lowercase())),
                (None, Some(c)) if !c.is_empty() => Some(lb::HashOn::Cookie(c.clone())),
                _ => {
                    self.err(format!("{p}.hash_on"), Problem::BadHashOn);
                    None
                }
            },
            Some(_) => {
                self.err(format!("{p}.hash_on"), Problem::BadHashOn);
                None
            }
        };
        match c.policy.as_deref() {
            None | Some("round_robin") | Some("least_request") | Some("random")
                if hash_on.is_some() =>
            {
                self.err(format!("{p}.hash_on"), Problem::HashOnWithoutConsistentHash);
                lb::Policy::RoundRobin
            }
            None | Some("round_robin") => lb::Policy::RoundRobin,
            Some("least_request") => lb::Policy::LeastRequest,
            Some("random") => lb::Policy::Random,
            Some("consistent_hash") => match hash_on {
                Some(h) => lb::Policy::ConsistentHash(h),
                None => {
                    if c.hash_on.is_none() {
                        self.err(format!("{p}.hash_on"), Problem::BadHashOn);
                    }
                    lb::Policy::RoundRobin
                }
            },
            Some(other) => {
                self.err(format!("{p}.policy"), Problem::BadPolicy(other.to_string()));
                lb::Policy::RoundRobin
            }
        }
    }

    pub(super) fn health_check(&mut self, p: &str, h: &RawHealthCheck) -> lb::HealthCheck {
        let p = format!("{p}.health_check");
        self.check_path(format!("{p}.path"), &h.path);
        let fail_open = match h.all_unhealthy.as_deref() {
            None | Some("fail_open") => true,
            Some("reject") => false,
            Some(other) => {
                self.err(format!("{p}.all_unhealthy"), Problem::BadAllUnhealthy(other.into()));
                true
            }
        };
        for (i, s) in h.expected_statuses.iter().enumerate() {
            if !(100..=599).contains(s) {
                self.err(format!("{p}.expected_statuses[{i}]"), Problem::BadStatus(*s));
            }
        }
        lb::HealthCheck {
            path: h.path.clone(),
            interval: self.duration(
                format!("{p}.interval"),
                &h.interval,
                defaults::HEALTH_INTERVAL,
            ),
            timeout: self.duration(format!("{p}.timeout"), &h.timeout, defaults::HEALTH_TIMEOUT),
            healthy_threshold: self.count(
                format!("{p}.healthy_threshold"),
                h.healthy_threshold,
                defaults::HEALTHY_THRESHOLD,
                1,
                100,
                "from 1 to 100",
            ),
            unhealthy_threshold: self.count(
                format!("{p}.unhealthy_threshold"),
                h.unhealthy_threshold,
                defaults::UNHEALTHY_THRESHOLD,
                1,
                100,
                "from 1 to 100",
            ),
            expected_statuses: h.expected_statuses.clone(),
            fail_open,
        }
    }

    /// Passive ejection: on with the defaults unless the cluster says `enabled: false`.
    pub(super) fn outlier(&mut self, p: &str, o: Option<&RawOutlier>) -> Option<lb::Outlier> {
        let Some(o) = o else { return Some(lb::Outlier::default()) };
        let p = format!("{p}.outlier_detection");
        let outlier = lb::Outlier {
            consecutive_failures: self.count(
                format!("{p}.consecutive_failures"),
                o.consecutive_failures,
                defaults::OUTLIER_CONSECUTIVE_FAILURES,
                1,
                1000,
                "from 1 to 1000",
            ),
            consecutive_connect_failures: self.count(
                format!("{p}.consecutive_connect_failures"),
                o.consecutive_connect_failures,
                defaults::OUTLIER_CONSECUTIVE_CONNECT_FAILURES,
                1,
                1000,
                "from 1 to 1000",
            ),
            base_ejection: self.duration(
                format!("{p}.base_ejection"),
                &o.base_ejection,
                defaults::OUTLIER_BASE_EJECTION,
            ),
            max_ejection: self.duration(
                format!("{p}.max_ejection"),
                &o.max_ejection,
                defaults::OUTLIER_MAX_EJECTION,
            ),
            max_ejection_percent: self.count(
                format!("{p}.max_ejection_percent"),
                o.max_ejection_percent,
                defaults::OUTLIER_MAX_EJECTION_PERCENT,
                0,
                100,
                "from 0 to 100",
            ),
        };
        o.enabled.unwrap_or(true).then_some(outlier)
    }

    /// A route's retry policy: the defaults when the route has no `retry` block.
    pub(super) fn retry(&mut self, p: &str, r: Option<&RawRetry>) -> lb::RetryPolicy {
        let Some(r) = r else { return lb::RetryPolicy::default() };
        let p = format!("{p}.retry");
        let mut on = Vec::new();
        let given = r.on.as_deref().unwrap_or(&[]);
        for (i, x) in given.iter().enumerate() {
            match x {
                RawRetryOn::Status(s @ 502..=504) => on.push(lb::RetryOn::Status(*s)),
                RawRetryOn::Word(w) if w == "connect_failure" => {
                    on.push(lb::RetryOn::ConnectFailure)
                }
                RawRetryOn::Word(w) if w == "stale_connection" => {
                    on.push(lb::RetryOn::StaleConnection)
                }
                RawRetryOn::Word(w) => {
                    self.err(format!("{p}.on[{i}]"), Problem::BadRetryOn(w.clone()))
                }
                RawRetryOn::Status(s) => {
                    self.err(format!("{p}.on[{i}]"), Problem::BadRetryOn(s.to_string()))
                }
            }
        }
        if r.on.is_none() {
            on = defaults::RETRY_ON.to_vec();
        }
        let budget = match r.budget {
            None => defaults::RETRY_BUDGET,
            Some(b) if (0.0..=1.0).contains(&b) => b,
            Some(_) => {
                self.err(format!("{p}.budget"), Problem::BadBudget);
                defaults::RETRY_BUDGET
            }
        };
        lb::RetryPolicy {
            attempts: self.count(
                format!("{p}.attempts"),
                r.attempts,
                defaults::RETRY_ATTEMPTS,
                1,
                10,
                "from 1 to 10",
            ),
            on,
            budget,
            min_retries: self.count(
                format!("{p}.min_retries"),
                r.min_retries,
                defaults::RETRY_MIN_RETRIES,
                0,
                1000,
                "from 0 to 1000",
            ),
        }
    }
}
