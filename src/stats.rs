//! Per-worker counters and their Prometheus rendering.
//!
//! Each worker owns its counters (`Cell`s: no atomics, no sharing). A scrape asks every worker
//! for a [`StatsReport`] over its control channel and the control plane sums them, so nothing
//! is written by two threads and nothing on the hot path is shared.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt::Write;
use std::rc::Rc;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// One endpoint's counters on one worker (kept with the balancer's endpoint state, so they
/// follow the endpoint across reloads and vanish with it).
#[derive(Debug, Default)]
pub struct EndpointCounters {
    requests: Cell<u64>,
    /// 5xx answers and failed attempts (connect, timeout, broken response).
    errors: Cell<u64>,
    latency: [Cell<u64>; 13],
    latency_sum_us: Cell<u64>,
}

impl EndpointCounters {
    /// One attempt on the endpoint, from its start to its end (the last response byte, or the
    /// failure).
    pub fn record(&self, failed: bool, took: Duration) {
        bump(&self.requests);
        if failed {
            bump(&self.errors);
        }
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        bump(&self.latency[i]);
        self.latency_sum_us.set(self.latency_sum_us.get() + took.as_micros() as u64);
    }

    pub fn totals(&self) -> EndpointTotals {
        EndpointTotals {
            requests: self.requests.get(),
            errors: self.errors.get(),
            latency: self.latency.each_ref().map(Cell::get),
            latency_sum_us: self.latency_sum_us.get(),
        }
    }
}

/// An endpoint's counters summed over workers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointTotals {
    pub requests: u64,
    pub errors: u64,
    /// Per bucket of [`LATENCY_BUCKETS`] (not cumulative), plus +Inf at the end.
    pub latency: [u64; 13],
    pub latency_sum_us: u64,
}

impl EndpointTotals {
    fn merge(&mut self, o: &EndpointTotals) {
        self.requests += o.requests;
        self.errors += o.errors;
        for i in 0..13 {
            self.latency[i] += o.latency[i];
        }
        self.latency_sum_us += o.latency_sum_us;
    }

    /// The latency below which a fraction `q` of the attempts fell, in seconds: the upper
    /// bound of the bucket where the quantile lies (`None` without attempts; +Inf as 5 s+).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// A per-endpoint counter: its name, help, and how to read it.
type EndpointSeries = (&'static str, &'static str, fn(&EndpointTotals) -> u64);

/// Status classes 1xx..5xx, indexed 0..5.
fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

#[derive(Debug, Default)]
pub struct RouteStats {
    pub by_class: [Cell<u64>; 5],
}

impl RouteStats {
    pub fn record(&self, status: u16) {
        bump(&self.by_class[class_index(status)]);
    }
}

#[derive(Debug, Default)]
pub struct ClusterStats {
    pub by_class: [Cell<u64>; 5],
    pub connect_errors: Cell<u64>,
    pub timeouts: Cell<u64>,
    pub retries: Cell<u64>,
    /// Retries the retry budget refused.
    pub retries_skipped: Cell<u64>,
    pub pool_hits: Cell<u64>,
    pub pool_misses: Cell<u64>,
    /// Requests answered 503 because every endpoint was at `max_connections` and the queue
    /// was full or the wait timed out.
    pub queue_rejected: Cell<u64>,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`], plus +Inf at the end.
    pub latency: [Cell<u64>; 13],
    pub latency_sum_us: Cell<u64>,
}

impl ClusterStats {
    pub fn record(&self, status: u16, took: Duration) {
        bump(&self.by_class[class_index(status)]);
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        bump(&self.latency[i]);
        self.latency_sum_us.set(self.latency_sum_us.get() + took.as_micros() as u64);
    }
    pub fn connect_error(&self) {
        bump(&self.connect_errors);
    }
    pub fn queue_rejected(&self) {
        bump(&self.queue_rejected);
    }
    pub fn timeout(&self) {
        bump(&self.timeouts);
    }
    pub fn retry(&self) {
        bump(&self.retries);
    }
    pub fn retry_skipped(&self) {
        bump(&self.retries_skipped);
    }
    pub fn pool(&self, hit: bool) {
        bump(if hit { &self.pool_hits } else { &self.pool_misses });
    }
}

/// One worker's counters, by name so they outlive reloads that keep the route or cluster.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// `(route, cluster)` → counters; cluster is empty for direct responses and no-route.
    routes: RefCell<HashMap<(String, String), Rc<RouteStats>>>,
    clusters: RefCell<HashMap<String, Rc<ClusterStats>>>,
    /// Tunnels (after a `101`) open now, and bytes moved through tunnels in both directions.
    pub tunnels_open: Cell<u64>,
    pub tunnel_bytes: Cell<u64>,
    /// Response body bytes moved upstream → client by `splice(2)`, never copied through Apex.
    pub spliced_bytes: Cell<u64>,
    /// Client connections cut because a write to the client waited `send_timeout`.
    pub send_timeouts: Cell<u64>,
    /// TLS handshakes completed and failed (bad ClientHello, timeout, client gone).
    pub tls_ok: Cell<u64>,
    pub tls_failed: Cell<u64>,
    /// TLS connections by version and ALPN protocol (counted once per connection).
    pub tls_connections: RefCell<HashMap<(&'static str, String), u64>>,
    /// Requests served, by protocol: HTTP/1.x, h2.
    pub requests_by_protocol: [Cell<u64>; 2],
    /// h2 streams being served now.
    pub h2_streams_open: Rc<Cell<u64>>,
    /// GOAWAYs Apex sent, by reason (see [`GOAWAY_REASONS`]).
    pub h2_goaways: [Cell<u64>; 5],
    /// h2 connections closed for a flood, by kind (`h2_guard::Flood::index`).
    pub h2_floods: [Cell<u64>; 8],
}

/// Why Apex sent GOAWAY: the worker drains, the connection idled, it served its
/// `max_requests_per_connection`, the client flooded (ENHANCE_YOUR_CALM).
pub const GOAWAY_REASONS: [&str; 5] = ["drain", "idle", "max_requests", "flood", "header_timeout"];

impl WorkerStats {
    pub fn tls_handshake(&self, ok: bool) {
        bump(if ok { &self.tls_ok } else { &self.tls_failed });
    }

    pub fn tls_connection(&self, version: &'static str, alpn: &str) {
        *self.tls_connections.borrow_mut().entry((version, alpn.to_string())).or_default() += 1;
    }

    pub fn route(&self, route: &str, cluster: &str) -> Rc<RouteStats> {
        let key = (route.to_string(), cluster.to_string());
        Rc::clone(self.routes.borrow_mut().entry(key).or_default())
    }

    pub fn cluster(&self, name: &str) -> Rc<ClusterStats> {
        Rc::clone(self.clusters.borrow_mut().entry(name.to_string()).or_default())
    }

    /// Copies the counters out, for the control plane to sum.
    pub fn report(&self, open_connections: usize, idle_pooled: usize) -> StatsReport {
        let mut r = StatsReport { open_connections, idle_pooled, ..StatsReport::default() };
        r.tunnels_open = self.tunnels_open.get();
        r.tunnel_bytes = self.tunnel_bytes.get();
        r.spliced_bytes = self.spliced_bytes.get();
        r.send_timeouts = self.send_timeouts.get();
        r.tls_handshakes = [self.tls_ok.get(), self.tls_failed.get()];
        r.requests_by_protocol = self.requests_by_protocol.each_ref().map(Cell::get);
        r.h2_streams_open = self.h2_streams_open.get();
        r.h2_goaways = self.h2_goaways.each_ref().map(Cell::get);
        r.h2_floods = self.h2_floods.each_ref().map(Cell::get);
        for ((v, a), n) in self.tls_connections.borrow().iter() {
            r.tls_connections.insert((v.to_string(), a.clone()), *n);
        }
        for ((route, cluster), s) in self.routes.borrow().iter() {
            let e = r.requests.entry((route.clone(), cluster.clone())).or_default();
            for (i, c) in s.by_class.iter().enumerate() {
                e[i] += c.get();
            }
        }
        for (name, s) in self.clusters.borrow().iter() {
            let e = r.clusters.entry(name.clone()).or_default();
            e.add(s);
        }
        r
    }
}

/// Plain counter values, sent between threads and summed over workers.
#[derive(Debug, Default, Clone)]
pub struct StatsReport {
    pub requests: BTreeMap<(String, String), [u64; 5]>,
    pub clusters: BTreeMap<String, ClusterTotals>,
    pub open_connections: usize,
    /// Of the open client connections, those parked (idle, holding no task).
    pub parked_connections: usize,
    pub idle_pooled: usize,
    pub access_log_dropped: u64,
    pub tunnels_open: u64,
    pub tunnel_bytes: u64,
    pub spliced_bytes: u64,
    pub send_timeouts: u64,
    /// Completed, failed.
    pub tls_handshakes: [u64; 2],
    /// `(version, alpn)` → TLS connections.
    pub tls_connections: BTreeMap<(String, String), u64>,
    /// HTTP/1.x, h2.
    pub requests_by_protocol: [u64; 2],
    pub h2_streams_open: u64,
    /// By [`GOAWAY_REASONS`].
    pub h2_goaways: [u64; 5],
    /// By `h2_guard::Flood::ALL`.
    pub h2_floods: [u64; 8],
    /// `(listener, certificate)` → seconds until the certificate expires (negative: expired).
    /// Filled by the control plane.
    pub cert_expiry: BTreeMap<(String, String), i64>,
    /// `(cluster, endpoint)` → workers that have the endpoint ejected now.
    pub ejected: BTreeMap<(String, String), u64>,
    /// Cluster → requests waiting for an endpoint below `max_connections`, over all workers.
    pub queue_depth: BTreeMap<String, u64>,
    /// `(cluster, endpoint)` → the endpoint's counters; only for clusters with at most
    /// `max_endpoint_series` endpoints (the cardinality guard).
    pub endpoints: BTreeMap<(String, String), EndpointTotals>,
    /// `(cluster, endpoint)` → the active health check's verdict (1 healthy, 0 not); only for
    /// clusters with health checks. Filled by the control plane, not by workers.
    pub healthy: BTreeMap<(String, String), u64>,
    /// `(kind, name)` of each DNS name → (endpoints it gives now, 1 while its lookups fail,
    /// failed lookups). Filled by the control plane.
    pub dns: BTreeMap<(String, String), [u64; 3]>,
}

#[derive(Debug, Default, Clone)]
pub struct ClusterTotals {
    pub by_class: [u64; 5],
    pub connect_errors: u64,
    pub timeouts: u64,
    pub retries: u64,
    pub retries_skipped: u64,
    pub pool_hits: u64,
    pub pool_misses: u64,
    pub queue_rejected: u64,
    pub latency: [u64; 13],
    pub latency_sum_us: u64,
}

impl ClusterTotals {
    fn add(&mut self, s: &ClusterStats) {
        for i in 0..5 {
            self.by_class[i] += s.by_class[i].get();
        }
        for i in 0..13 {
            self.latency[i] += s.latency[i].get();
        }
        self.connect_errors += s.connect_errors.get();
        self.timeouts += s.timeouts.get();
        self.retries += s.retries.get();
        self.retries_skipped += s.retries_skipped.get();
        self.pool_hits += s.pool_hits.get();
        self.pool_misses += s.pool_misses.get();
        self.queue_rejected += s.queue_rejected.get();
        self.latency_sum_us += s.latency_sum_us.get();
    }

    fn merge(&mut self, o: &ClusterTotals) {
        for i in 0..5 {
            self.by_class[i] += o.by_class[i];
        }
        for i in 0..13 {
            self.latency[i] += o.latency[i];
        }
        self.connect_errors += o.connect_errors;
        self.timeouts += o.timeouts;
        self.retries += o.retries;
        self.retries_skipped += o.retries_skipped;
        self.pool_hits += o.pool_hits;
        self.pool_misses += o.pool_misses;
        self.queue_rejected += o.queue_rejected;
        self.latency_sum_us += o.latency_sum_us;
    }
}

/// Sums the workers' reports for a scrape: `answers` are the `(worker, report)` pairs that came
/// in time, `last` every worker's latest report (updated here). A worker that did not answer
/// counts with its last report, so no counter ever goes backwards between scrapes.
pub fn sum_reports(
    last: &mut [StatsReport],
    answers: impl IntoIterator<Item = (usize, StatsReport)>,
) -> StatsReport {
    for (id, report) in answers {
        last[id] = report;
    }
    let mut total = StatsReport::default();
    for r in last.iter() {
        total.merge(r);
    }
    total
}

/// A per-cluster counter: its metric name, help text and how to read it.
type CounterSeries = (&'static str, &'static str, fn(&ClusterTotals) -> u64);

impl StatsReport {
    pub fn merge(&mut self, o: &StatsReport) {
        for (k, v) in &o.requests {
            let e = self.requests.entry(k.clone()).or_default();
            for i in 0..5 {
                e[i] += v[i];
            }
        }
        for (k, v) in &o.clusters {
            self.clusters.entry(k.clone()).or_default().merge(v);
        }
        self.open_connections += o.open_connections;
        self.parked_connections += o.parked_connections;
        self.idle_pooled += o.idle_pooled;
        self.access_log_dropped += o.access_log_dropped;
        self.tunnels_open += o.tunnels_open;
        self.tunnel_bytes += o.tunnel_bytes;
        self.spliced_bytes += o.spliced_bytes;
        self.send_timeouts += o.send_timeouts;
        self.tls_handshakes[0] += o.tls_handshakes[0];
        self.tls_handshakes[1] += o.tls_handshakes[1];
        for (k, v) in &o.tls_connections {
            *self.tls_connections.entry(k.clone()).or_default() += v;
        }
        for i in 0..2 {
            self.requests_by_protocol[i] += o.requests_by_protocol[i];
        }
        self.h2_streams_open += o.h2_streams_open;
        for (sum, n) in self.h2_goaways.iter_mut().zip(o.h2_goaways) {
            *sum += n;
        }
        for (sum, n) in self.h2_floods.iter_mut().zip(o.h2_floods) {
            *sum += n;
        }
        for (k, v) in &o.cert_expiry {
            self.cert_expiry.insert(k.clone(), *v);
        }
        for (k, v) in &o.ejected {
            *self.ejected.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.queue_depth {
            *self.queue_depth.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.endpoints {
            self.endpoints.entry(k.clone()).or_default().merge(v);
        }
        for (k, v) in &o.healthy {
            self.healthy.insert(k.clone(), *v);
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut o = String::new();
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        o.push_str("# HELP apex_requests_total Requests answered, by route, cluster and status class.\n# TYPE apex_requests_total counter\n");
        for ((route, cluster), v) in &self.requests {
            for (i, n) in v.iter().enumerate() {
                if *n > 0 {
                    let _ = writeln!(
                        o,
                        "apex_requests_total{{route=\"{}\",cluster=\"{}\",class=\"{}\"}} {n}",
                        esc(route),
                        esc(cluster),
                        CLASSES[i]
                    );
                }
            }
        }
        let counters: [CounterSeries; 7] = [
            ("apex_upstream_connect_errors_total", "Failed upstream connects.", |c| {
                c.connect_errors
            }),
            ("apex_upstream_timeouts_total", "Upstream connect and response timeouts.", |c| {
                c.timeouts
            }),
            (
                "apex_upstream_retries_total",
                "Requests sent again, to another endpoint or on a fresh connection.",
                |c| c.retries,
            ),
            ("apex_upstream_retries_skipped_total", "Retries the retry budget refused.", |c| {
                c.retries_skipped
            }),
            ("apex_pool_hits_total", "Requests that reused a pooled upstream connection.", |c| {
                c.pool_hits
            }),
            ("apex_pool_misses_total", "Requests that opened a new upstream connection.", |c| {
                c.pool_misses
            }),
            (
                "apex_upstream_queue_rejected_total",
                "Requests answered 503: every endpoint at max_connections, and the queue full or the wait over.",
                |c| c.queue_rejected,
            ),
        ];
        for (name, help, get) in counters {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (cluster, c) in &self.clusters {
                let _ = writeln!(o, "{name}{{cluster=\"{}\"}} {}", esc(cluster), get(c));
            }
        }
        o.push_str("# HELP apex_upstream_latency_seconds From request start to the response's last byte, per cluster.\n# TYPE apex_upstream_latency_seconds histogram\n");
        for (cluster, c) in &self.clusters {
            let mut cumulative = 0;
            for (i, n) in c.latency.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map(|b| b.to_string()).unwrap_or("+Inf".into());
                let _ = writeln!(
                    o,
                    "apex_upstream_latency_seconds_bucket{{cluster=\"{}\",le=\"{le}\"}} {cumulative}",
                    esc(cluster)
                );
            }
            let _ = writeln!(
                o,
                "apex_upstream_latency_seconds_sum{{cluster=\"{}\"}} {}\napex_upstream_latency_seconds_count{{cluster=\"{}\"}} {cumulative}",
                esc(cluster),
                c.latency_sum_us as f64 / 1e6,
                esc(cluster)
            );
        }
        let _ = writeln!(
            o,
            "# HELP apex_downstream_connections Open client connections.\n# TYPE apex_downstream_connections gauge\napex_downstream_connections {}",
            self.open_connections
        );
        let _ = writeln!(
            o,
            "# HELP apex_downstream_connections_parked Open client connections parked: idle past park_after, holding no task.\n# TYPE apex_downstream_connections_parked gauge\napex_downstream_connections_parked {}",
            self.parked_connections
        );
        let _ = writeln!(
            o,
            "# HELP apex_pool_idle_connections Idle pooled upstream connections.\n# TYPE apex_pool_idle_connections gauge\napex_pool_idle_connections {}",
            self.idle_pooled
        );
        let _ = writeln!(
            o,
            "# HELP apex_access_log_dropped_total Access-log lines dropped because the writer fell behind.\n# TYPE apex_access_log_dropped_total counter\napex_access_log_dropped_total {}",
            self.access_log_dropped
        );
        let _ = writeln!(
            o,
            "# HELP apex_tunnels_open Tunnels (upgraded connections, e.g. WebSocket) open now.\n# TYPE apex_tunnels_open gauge\napex_tunnels_open {}",
            self.tunnels_open
        );
        let _ = writeln!(
            o,
            "# HELP apex_tunnel_bytes_total Bytes moved through tunnels, both directions.\n# TYPE apex_tunnel_bytes_total counter\napex_tunnel_bytes_total {}",
            self.tunnel_bytes
        );
        let _ = writeln!(
            o,
            "# HELP apex_spliced_bytes_total Response body bytes moved to clients by splice(2), not copied through Apex.\n# TYPE apex_spliced_bytes_total counter\napex_spliced_bytes_total {}",
            self.spliced_bytes
        );
        let _ = writeln!(
            o,
            "# HELP apex_client_send_timeouts_total Client connections cut because a write to the client waited send_timeout.\n# TYPE apex_client_send_timeouts_total counter\napex_client_send_timeouts_total {}",
            self.send_timeouts
        );
        let _ = writeln!(
            o,
            "# HELP apex_tls_handshakes_total TLS handshakes with clients, by result.\n# TYPE apex_tls_handshakes_total counter\napex_tls_handshakes_total{{result=\"ok\"}} {}\napex_tls_handshakes_total{{result=\"failed\"}} {}",
            self.tls_handshakes[0], self.tls_handshakes[1]
        );
        let _ = writeln!(
            o,
            "# HELP apex_requests_by_protocol_total Requests served, by client protocol.\n# TYPE apex_requests_by_protocol_total counter\napex_requests_by_protocol_total{{protocol=\"http1\"}} {}\napex_requests_by_protocol_total{{protocol=\"h2\"}} {}",
            self.requests_by_protocol[0], self.requests_by_protocol[1]
        );
        let _ = writeln!(
            o,
            "# HELP apex_h2_streams_open HTTP/2 streams being served now.\n# TYPE apex_h2_streams_open gauge\napex_h2_streams_open {}",
            self.h2_streams_open
        );
        o.push_str("# HELP apex_h2_goaways_total GOAWAY frames Apex sent, by reason.\n# TYPE apex_h2_goaways_total counter\n");
        for (reason, n) in GOAWAY_REASONS.iter().zip(self.h2_goaways) {
            let _ = writeln!(o, "apex_h2_goaways_total{{reason=\"{reason}\"}} {n}");
        }
        o.push_str("# HELP apex_h2_floods_total HTTP/2 connections closed (GOAWAY ENHANCE_YOUR_CALM) for sending too many frames of a kind.\n# TYPE apex_h2_floods_total counter\n");
        for (kind, n) in crate::http::h2_guard::Flood::ALL.iter().zip(self.h2_floods) {
            let _ = writeln!(o, "apex_h2_floods_total{{kind=\"{}\"}} {n}", kind.name());
        }
        o.push_str("# HELP apex_tls_connections_total TLS client connections by version and ALPN protocol.\n# TYPE apex_tls_connections_total counter\n");
        for ((version, alpn), n) in &self.tls_connections {
            let _ = writeln!(
                o,
                "apex_tls_connections_total{{version=\"{}\",alpn=\"{}\"}} {n}",
                esc(version),
                esc(alpn)
            );
        }
        o.push_str("# HELP apex_tls_certificate_expiry_seconds Seconds until a listener's certificate expires.\n# TYPE apex_tls_certificate_expiry_seconds gauge\n");
        for ((listener, cert), secs) in &self.cert_expiry {
            let _ = writeln!(
                o,
                "apex_tls_certificate_expiry_seconds{{listener=\"{}\",certificate=\"{}\"}} {secs}",
                esc(listener),
                esc(cert)
            );
        }
        let per_endpoint: [EndpointSeries; 2] = [
            (
                "apex_endpoint_requests_total",
                "Attempts on an endpoint (retries count on each endpoint tried).",
                |e| e.requests,
            ),
            (
                "apex_endpoint_errors_total",
                "Attempts on an endpoint that failed or got a 5xx answer.",
                |e| e.errors,
            ),
        ];
        for (name, help, get) in per_endpoint {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((cluster, endpoint), e) in &self.endpoints {
                let _ = writeln!(
                    o,
                    "{name}{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                    esc(cluster),
                    esc(endpoint),
                    get(e)
                );
            }
        }
        o.push_str("# HELP apex_endpoint_latency_seconds From an attempt's start to its end, per endpoint.\n# TYPE apex_endpoint_latency_seconds histogram\n");
        for ((cluster, endpoint), e) in &self.endpoints {
            let labels = format!("cluster=\"{}\",endpoint=\"{}\"", esc(cluster), esc(endpoint));
            let mut cumulative = 0;
            for (i, n) in e.latency.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    o,
                    "apex_endpoint_latency_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "apex_endpoint_latency_seconds_sum{{{labels}}} {}",
                e.latency_sum_us as f64 / 1e6
            );
            let _ = writeln!(o, "apex_endpoint_latency_seconds_count{{{labels}}} {cumulative}");
        }
        o.push_str("# HELP apex_upstream_queue_depth Requests waiting for an endpoint below max_connections.\n# TYPE apex_upstream_queue_depth gauge\n");
        for (cluster, n) in &self.queue_depth {
            let _ = writeln!(o, "apex_upstream_queue_depth{{cluster=\"{}\"}} {n}", esc(cluster));
        }
        let dns = [
            (
                "apex_dns_endpoints",
                "gauge",
                "Endpoints a DNS name gives now (its last good answer).",
            ),
            (
                "apex_dns_failing",
                "gauge",
                "1 while a DNS name does not resolve (its last good endpoints are kept).",
            ),
            ("apex_dns_lookup_failures_total", "counter", "Failed lookups of a DNS name."),
        ];
        for (i, (name, kind, help)) in dns.iter().enumerate() {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for ((k, n), v) in &self.dns {
                let _ = writeln!(o, "{name}{{kind=\"{k}\",name=\"{}\"}} {}", esc(n), v[i]);
            }
        }
        let gauges = [
            (
                "apex_endpoint_healthy",
                "Active health check verdict per endpoint (1 healthy).",
                &self.healthy,
            ),
            (
                "apex_endpoint_ejected",
                "Workers that have the endpoint ejected by outlier detection.",
                &self.ejected,
            ),
        ];
        for (name, help, series) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for ((cluster, endpoint), v) in series {
                let _ = writeln!(
                    o,
                    "{name}{{cluster=\"{}\",endpoint=\"{}\"}} {v}",
                    esc(cluster),
                    esc(endpoint)
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_does_not_answer_counts_with_its_last_report() {
        let w = WorkerStats::default();
        let route = w.route("api", "backend");
        let mut last = vec![StatsReport::default(), StatsReport::default()];
        route.record(200);
        let first = sum_reports(&mut last, [(0, w.report(0, 0)), (1, w.report(0, 0))]);
        route.record(200);
        // Worker 1 is busy this time: its counters must not drop out of the sum.
        let second = sum_reports(&mut last, [(0, w.report(0, 0))]);
        let count = |r: &StatsReport| r.requests[&("api".to_string(), "backend".to_string())][1];
        assert_eq!((count(&first), count(&second)), (2, 3), "never backwards");
    }

    #[test]
    fn reports_sum_over_workers_and_render() {
        let a = WorkerStats::default();
        let b = WorkerStats::default();
        a.route("api", "backend").record(200);
        b.route("api", "backend").record(204);
        b.route("api", "backend").record(502);
        a.cluster("backend").record(200, Duration::from_millis(3));
        b.cluster("backend").pool(true);
        let mut total = a.report(1, 2);
        total.parked_connections = 1;
        let mut other = b.report(3, 4);
        other.parked_connections = 2;
        total.merge(&other);
        let text = total.to_prometheus();
        assert!(
            text.contains("apex_requests_total{route=\"api\",cluster=\"backend\",class=\"2xx\"} 2")
        );
        assert!(
            text.contains("apex_requests_total{route=\"api\",cluster=\"backend\",class=\"5xx\"} 1")
        );
        assert!(text
            .contains("apex_upstream_latency_seconds_bucket{cluster=\"backend\",le=\"0.005\"} 1"));
        assert!(text.contains("apex_pool_hits_total{cluster=\"backend\"} 1"));
        assert!(text.contains("apex_downstream_connections 4"));
        assert!(text.contains("apex_downstream_connections_parked 3"));
        assert!(text.contains("apex_pool_idle_connections 6"));
    }
}
