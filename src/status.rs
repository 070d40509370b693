//! The fleet view of the admin API: every cluster's endpoints with their state, weight, traffic
//! and latency, as JSON (`/endpoints`) and as a self-contained HTML page (`/`) that refreshes
//! itself (HAProxy's stats page is what operators expect). Built by the control plane from a
//! scrape of the workers, the health checker's results and the resolver's state; nothing here
//! touches a worker. Pure functions from data to text, so the page is testable without a
//! browser.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime};

use crate::config::lb::Policy;
use crate::config::Config;
use crate::discovery::DnsMap;
use crate::health::HealthMap;
use crate::stats::{EndpointTotals, StatsReport};

/// How often the HTML page reloads itself.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Counts kept from the previous page, to turn totals into rates.
#[derive(Debug, Default)]
pub struct Sample {
    at: Option<Instant>,
    /// `(cluster, endpoint)` → (requests, errors); endpoint `""` is the cluster's total.
    counts: BTreeMap<(String, String), (u64, u64)>,
}

/// Rates need at least this much time between two samples to mean something.
const MIN_RATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Passing its health check.
    Up,
    /// Not health-checked, and not ejected.
    Unchecked,
    /// Ejected by outlier detection on at least one worker.
    Ejected,
    /// Failing its health check.
    Down,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Unchecked => "unchecked",
            State::Ejected => "ejected",
            State::Down => "down",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EndpointStatus {
    pub address: String,
    /// `fixed` (the file) or `dns` (a `dns`/`srv` name).
    pub source: &'static str,
    pub weight: u32,
    pub state: State,
    /// The active health check's verdict; `None`: no health check.
    pub healthy: Option<bool>,
    pub ejected_workers: u64,
    /// `None` when the cluster is over `max_endpoint_series` (no per-endpoint counters).
    pub counters: Option<EndpointTotals>,
    pub requests_per_second: Option<f64>,
    pub errors_per_second: Option<f64>,
    /// The last health probe: passed, and when.
    pub last_check: Option<(bool, SystemTime)>,
}

#[derive(Debug, Clone)]
pub struct DnsStatus {
    pub kind: &'static str,
    pub name: String,
    pub endpoints: usize,
    pub failing: Option<String>,
    pub lookup_failures: u64,
}

#[derive(Debug, Clone)]
pub struct ClusterStatus {
    pub name: String,
    pub policy: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: Option<f64>,
    pub per_endpoint_series: bool,
    pub endpoints: Vec<EndpointStatus>,
    pub dns: Vec<DnsStatus>,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub generated_at: SystemTime,
    pub clusters: Vec<ClusterStatus>,
}

fn policy_name(p: &Policy) -> &'static str {
    match p {
        Policy::RoundRobin => "round_robin",
        Policy::LeastRequest => "least_request",
        Policy::Random => "random",
        Policy::ConsistentHash(_) => "consistent_hash",
    }
}

/// Everything the page shows, from the control plane's sources; `sample` keeps the counts for
/// the next call's rates.
pub fn build(
    config: &Config,
    report: &StatsReport,
    health: &HealthMap,
    probes: &std::collections::HashMap<(String, std::net::SocketAddr), (bool, SystemTime)>,
    dns: &DnsMap,
    sample: &mut Sample,
    now: Instant,
) -> Status {
    let window = sample.at.map(|t| now.saturating_duration_since(t));
    let rated = window.filter(|w| *w >= MIN_RATE_WINDOW);
    let rate = |key: &(String, String), n: u64, pick: fn(&(u64, u64)) -> u64| {
        let w = rated?;
        let before = sample.counts.get(key).map_or(0, pick);
        Some(n.saturating_sub(before) as f64 / w.as_secs_f64())
    };
    let mut next = BTreeMap::new();
    let mut clusters = Vec::new();
    for c in &config.clusters {
        let totals = report.clusters.get(&c.name).cloned().unwrap_or_default();
        let requests: u64 = totals.by_class.iter().sum();
        let errors = totals.by_class[4];
        let ckey = (c.name.clone(), String::new());
        let cluster_rps = rate(&ckey, requests, |s| s.0);
        next.insert(ckey, (requests, errors));
        let verdicts = health.clusters.get(&c.name);
        let endpoints = c
            .endpoints
            .iter()
            .zip(&c.weights)
            .map(|(addr, &weight)| {
                let key = (c.name.clone(), addr.to_string());
                let counters = report.endpoints.get(&key).cloned();
                let (rps, eps) = match &counters {
                    Some(t) => (rate(&key, t.requests, |s| s.0), rate(&key, t.errors, |s| s.1)),
                    None => (None, None),
                };
                if let Some(t) = &counters {
                    next.insert(key.clone(), (t.requests, t.errors));
                }
                let ejected_workers = report.ejected.get(&key).copied().unwrap_or(0);
                let healthy = c
                    .health_check
                    .as_ref()
                    .map(|_| verdicts.and_then(|v| v.get(addr)).copied().unwrap_or(true));
                let state = match healthy {
                    Some(false) => State::Down,
                    _ if ejected_workers > 0 => State::Ejected,
                    Some(true) => State::Up,
                    None => State::Unchecked,
                };
                EndpointStatus {
                    address: key.1,
                    source: if c.fixed.iter().any(|f| f.0 == *addr) { "fixed" } else { "dns" },
                    weight,
                    state,
                    healthy,
                    ejected_workers,
                    counters,
                    requests_per_second: rps,
                    errors_per_second: eps,
                    last_check: probes.get(&(c.name.clone(), *addr)).copied(),
                }
            })
            .collect();
        let dns_names = c
            .discovery
            .iter()
            .map(|d| {
                let key = crate::discovery::NameKey::of(d);
                let state = dns.names.get(&key);
                DnsStatus {
                    kind: key.kind(),
                    name: key.name().to_string(),
                    endpoints: state.map_or(0, |s| s.endpoints.len()),
                    failing: state.and_then(|s| s.failing.clone()),
                    lookup_failures: state.map_or(0, |s| s.failures),
                }
            })
            .collect();
        clusters.push(ClusterStatus {
            name: c.name.clone(),
            policy: policy_name(&c.policy),
            requests,
            errors,
            requests_per_second: cluster_rps,
            per_endpoint_series: c.endpoints.len() <= config.max_endpoint_series,
            endpoints,
            dns: dns_names,
        });
    }
    // A new sample only once the old one is old enough to rate against.
    if rated.is_some() || sample.at.is_none() {
        *sample = Sample { at: Some(now), counts: next };
    }
    Status { generated_at: SystemTime::now(), clusters }
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    crate::access_log::push_json(&mut o, s);
    o.push('"');
    o
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "null".into(),
    }
}

/// HTML text, escaped.
fn h(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("≤ {:.1} ms", x * 1e3),
        Some(_) => "> 5 s".into(),
        None => "–".into(),
    }
}

fn per_second(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.1}"))
}

impl Status {
    pub fn to_json(&self) -> String {
        let mut o = String::new();
        let _ = write!(
            o,
            "{{\"generated_at\":{},\"clusters\":[",
            js(&crate::timefmt::rfc3339(self.generated_at))
        );
        for (ci, c) in self.clusters.iter().enumerate() {
            if ci > 0 {
                o.push(',');
            }
            let _ = write!(
                o,
                "{{\"name\":{},\"policy\":{},\"requests\":{},\"errors\":{},\"requests_per_second\":{},\"per_endpoint_series\":{},\"endpoints\":[",
                js(&c.name),
                js(c.policy),
                c.requests,
                c.errors,
                num(c.requests_per_second),
                c.per_endpoint_series
            );
            for (ei, e) in c.endpoints.iter().enumerate() {
                if ei > 0 {
                    o.push(',');
                }
                let healthy = e.healthy.map_or("null".to_string(), |b| b.to_string());
                let last = match e.last_check {
                    Some((ok, at)) => {
                        format!("{{\"ok\":{ok},\"at\":{}}}", js(&crate::timefmt::rfc3339(at)))
                    }
                    None => "null".into(),
                };
                let (req, err, p50, p99) = match &e.counters {
                    Some(t) => (
                        t.requests.to_string(),
                        t.errors.to_string(),
                        num(t.quantile(0.5)),
                        num(t.quantile(0.99)),
                    ),
                    None => ("null".into(), "null".into(), "null".into(), "null".into()),
                };
                let _ = write!(
                    o,
                    "{{\"address\":{},\"source\":{},\"weight\":{},\"state\":{},\"healthy\":{healthy},\"ejected_workers\":{},\"requests\":{req},\"errors\":{err},\"requests_per_second\":{},\"errors_per_second\":{},\"latency_p50_seconds\":{p50},\"latency_p99_seconds\":{p99},\"last_check\":{last}}}",
                    js(&e.address),
                    js(e.source),
                    e.weight,
                    js(e.state.name()),
                    e.ejected_workers,
                    num(e.requests_per_second),
                    num(e.errors_per_second),
                );
            }
            o.push_str("],\"dns\":[");
            for (di, d) in c.dns.iter().enumerate() {
                if di > 0 {
                    o.push(',');
                }
                let failing = d.failing.as_deref().map_or("null".into(), js);
                let _ = write!(
                    o,
                    "{{\"kind\":{},\"name\":{},\"endpoints\":{},\"failing\":{failing},\"lookup_failures\":{}}}",
                    js(d.kind),
                    js(&d.name),
                    d.endpoints,
                    d.lookup_failures
                );
            }
            o.push_str("]}");
        }
        o.push_str("]}\n");
        o
    }

    /// The status page: one table per cluster, one row per endpoint, the state in colour.
    /// Inline CSS only: no external asset, no script (it reloads with a meta refresh).
    pub fn to_html(&self) -> String {
        let mut o = String::with_capacity(4096);
        let _ = write!(
            o,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta http-equiv=\"refresh\" content=\"{}\">\n<title>Apex status</title>\n<style>\n{}\n</style>\n</head>\n<body>\n<h1>Apex</h1>\n<p class=\"meta\">{} clusters · generated {} · refreshes every {} s · <a href=\"/endpoints\">JSON</a> · <a href=\"/metrics\">metrics</a></p>\n",
            REFRESH.as_secs(),
            CSS,
            self.clusters.len(),
            h(&crate::timefmt::rfc3339(self.generated_at)),
            REFRESH.as_secs()
        );
        for c in &self.clusters {
            let _ = write!(
                o,
                "<section class=\"cluster\" data-cluster=\"{}\">\n<h2>{} <small>{} · {} requests · {} errors · {} req/s</small></h2>\n",
                h(&c.name),
                h(&c.name),
                c.policy,
                c.requests,
                c.errors,
                per_second(c.requests_per_second)
            );
            if !c.dns.is_empty() {
                o.push_str("<ul class=\"dns\">\n");
                for d in &c.dns {
                    let (class, what) = match &d.failing {
                        Some(e) => {
                            ("dns-failing", format!("not resolving, last good set kept: {}", h(e)))
                        }
                        None => ("dns-ok", "resolving".to_string()),
                    };
                    let _ = writeln!(
                        o,
                        "<li class=\"{class}\" data-name=\"{}\">{} <code>{}</code>: {} endpoints, {what}, {} failed lookups</li>",
                        h(&d.name),
                        d.kind,
                        h(&d.name),
                        d.endpoints,
                        d.lookup_failures
                    );
                }
                o.push_str("</ul>\n");
            }
            if !c.per_endpoint_series {
                o.push_str("<p class=\"meta\">More endpoints than <code>max_endpoint_series</code>: per-endpoint traffic is not counted.</p>\n");
            }
            o.push_str("<table>\n<thead><tr><th>Endpoint</th><th>Source</th><th>State</th><th>Weight</th><th>Req/s</th><th>Requests</th><th>Errors</th><th>Err/s</th><th>p50</th><th>p99</th><th>Last check</th></tr></thead>\n<tbody>\n");
            for e in &c.endpoints {
                let state = match e.state {
                    State::Ejected => format!("ejected ({} workers)", e.ejected_workers),
                    s => s.name().to_string(),
                };
                let (req, err, p50, p99) = match &e.counters {
                    Some(t) => (
                        t.requests.to_string(),
                        t.errors.to_string(),
                        ms(t.quantile(0.5)),
                        ms(t.quantile(0.99)),
                    ),
                    None => ("–".into(), "–".into(), "–".into(), "–".into()),
                };
                let last = match e.last_check {
                    Some((ok, at)) => format!(
                        "{} at {}",
                        if ok { "passed" } else { "failed" },
                        h(&crate::timefmt::rfc3339(at))
                    ),
                    None => "–".into(),
                };
                let _ = writeln!(
                    o,
                    "<tr class=\"state-{}\" data-endpoint=\"{}\"><td><code>{}</code></td><td>{}</td><td class=\"state\">{}</td><td>{}</td><td>{}</td><td>{req}</td><td>{err}</td><td>{}</td><td>{p50}</td><td>{p99}</td><td>{last}</td></tr>",
                    e.state.name(),
                    h(&e.address),
                    h(&e.address),
                    e.source,
                    state,
                    e.weight,
                    per_second(e.requests_per_second),
                    per_second(e.errors_per_second),
                );
            }
            if c.endpoints.is_empty() {
                o.push_str("<tr class=\"empty\"><td colspan=\"11\">no endpoint yet: requests get 503</td></tr>\n");
            }
            o.push_str("</tbody>\n</table>\n</section>\n");
        }
        o.push_str("</body>\n</html>\n");
        o
    }
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.2em 0 .4em}h2 small{font-weight:normal;color:#666}\
.meta{color:#666;margin:.2em 0}table{border-collapse:collapse;width:100%;background:#fff}\
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;white-space:nowrap}th{background:#eee}\
tr.state-up td.state{background:#b7e4b0}tr.state-unchecked td.state{background:#dcefd8}\
tr.state-ejected td.state{background:#ffd27f}tr.state-down td.state{background:#f4a3a3}\
tr.state-down{color:#900}ul.dns{margin:.2em 0;padding-left:1.2em}li.dns-failing{color:#900}";

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_yaml(
            "listeners: [ { name: l, address: \"127.0.0.1:1\" } ]\nroutes: [ { match: { path_prefix: / }, cluster: api } ]\nclusters:\n  - name: api\n    endpoints: [ \"10.0.0.1:80\", { address: \"10.0.0.2:80\", weight: 3 } ]\n    health_check: { path: /h }\n",
            "t.yaml",
        )
        .unwrap()
    }

    #[test]
    fn rates_come_from_two_samples_a_second_or_more_apart() {
        let c = config();
        let mut report = StatsReport::default();
        let key = ("api".to_string(), "10.0.0.1:80".to_string());
        report
            .endpoints
            .insert(key.clone(), EndpointTotals { requests: 100, ..Default::default() });
        let mut sample = Sample::default();
        let t0 = Instant::now();
        let none = Default::default();
        let s =
            build(&c, &report, &HealthMap::default(), &none, &DnsMap::default(), &mut sample, t0);
        assert_eq!(s.clusters[0].endpoints[0].requests_per_second, None, "one sample: no rate");
        report.endpoints.get_mut(&key).unwrap().requests = 400;
        let s = build(
            &c,
            &report,
            &HealthMap::default(),
            &none,
            &DnsMap::default(),
            &mut sample,
            t0 + Duration::from_secs(2),
        );
        assert_eq!(s.clusters[0].endpoints[0].requests_per_second, Some(150.0));
    }

    #[test]
    fn the_page_marks_each_state_and_escapes_what_it_shows() {
        let c = config();
        let mut health = HealthMap::default();
        health.clusters.insert("api".into(), [("10.0.0.2:80".parse().unwrap(), false)].into());
        let mut sample = Sample::default();
        let s = build(
            &c,
            &StatsReport::default(),
            &health,
            &Default::default(),
            &DnsMap::default(),
            &mut sample,
            Instant::now(),
        );
        let html = s.to_html();
        assert!(html.contains("<tr class=\"state-up\" data-endpoint=\"10.0.0.1:80\">"), "{html}");
        assert!(html.contains("<tr class=\"state-down\" data-endpoint=\"10.0.0.2:80\">"), "{html}");
        assert_eq!(h("<a href=\"x\">&"), "&lt;a href=&quot;x&quot;&gt;&amp;");
        assert_eq!(js("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        let json = s.to_json();
        assert!(json.contains("\"address\":\"10.0.0.2:80\",\"source\":\"fixed\",\"weight\":3,\"state\":\"down\",\"healthy\":false"), "{json}");
    }
}
