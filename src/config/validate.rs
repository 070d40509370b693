//! Validation: the raw serde shape becomes a [`Config`], or every problem in it is listed.
//! The load-balancer half of the clusters and routes is in `validate_lb.rs`.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::defaults;
use super::error::{ConfigError, ConfigErrors, Problem};
use super::lb;
use super::model::*;
use super::raw::{
    RawCluster, RawConfig, RawEndpoint, RawListener, RawRespond, RawRoute, RawSize, RawWorkers,
};
use super::units::{is_token, parse_duration, parse_size};
use crate::http::{HeadLimits, MAX_FIELDS_CAP};

pub(super) struct Validator<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    resolved: Vec<Resolved>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(file: &'a str) -> Self {
        Validator { file, errors: Vec::new(), warnings: Vec::new(), resolved: Vec::new() }
    }

    pub(super) fn err(&mut self, key: String, problem: Problem) {
        self.errors.push(ConfigError { file: self.file.to_string(), line: None, key, problem });
    }

    /// A problem that does not stop the config from loading.
    pub(super) fn warn(&mut self, key: String, problem: Problem) {
        self.warnings.push(ConfigError { file: self.file.to_string(), line: None, key, problem });
    }

    pub(super) fn duration(
        &mut self,
        key: String,
        raw: &Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(s) = raw else { return default };
        match parse_duration(s) {
            Some(d) if d.is_zero() => {
                self.err(key, Problem::ZeroDuration);
                default
            }
            Some(d) => d,
            None => {
                self.err(key, Problem::BadDuration(s.clone()));
                default
            }
        }
    }

    pub(super) fn size(&mut self, key: String, raw: &Option<RawSize>) -> Option<u64> {
        let parsed = match raw.as_ref()? {
            RawSize::Bytes(n) if *n > 0 => Some(*n as u64),
            RawSize::Bytes(n) => {
                self.err(key, Problem::BadSize(n.to_string()));
                return None;
            }
            RawSize::Text(t) => parse_size(t).filter(|&n| n > 0).or_else(|| {
                self.err(key, Problem::BadSize(t.clone()));
                None
            }),
        };
        parsed
    }

    pub(super) fn config(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let workers = match &raw.workers {
            None => Workers::Auto,
            Some(RawWorkers::Word(w)) if w == "auto" => Workers::Auto,
            Some(RawWorkers::Count(n)) if (1..=1024).contains(n) => Workers::Count(*n as usize),
            Some(_) => {
                self.err("workers".into(), Problem::BadWorkers);
                Workers::Auto
            }
        };
        let runtime = match raw.runtime.as_deref() {
            None => RuntimeKind::IoUring,
            Some(r) => RuntimeKind::parse(r).unwrap_or_else(|| {
                self.err("runtime".into(), Problem::BadRuntime(r.to_string()));
                RuntimeKind::IoUring
            }),
        };
        let worker_connections = match raw.worker_connections {
            None => defaults::WORKER_CONNECTIONS,
            Some(n) if (1..=1_000_000).contains(&n) => n as usize,
            Some(_) => {
                self.err("worker_connections".into(), Problem::BadConnections);
                defaults::WORKER_CONNECTIONS
            }
        };
        let drain_timeout =
            self.duration("drain_timeout".into(), &raw.drain_timeout, defaults::DRAIN_TIMEOUT);
        let admin = match &raw.admin {
            None => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_loopback() && !raw.admin_allow_remote => {
                    self.err("admin".into(), Problem::AdminNotLoopback(addr));
                    None
                }
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.err("admin".into(), Problem::BadAddress(a.clone()));
                    None
                }
            },
        };
        let access_log = raw.access_log.as_ref().and_then(|a| {
            let format = match a.format.as_deref() {
                None | Some("combined") => LogFormat::Combined,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    self.err("access_log.format".into(), Problem::BadLogFormat(other.into()));
                    return None;
                }
            };
            let target = match a.path.as_str() {
                "stdout" | "-" => LogTarget::Stdout,
                p => LogTarget::File(p.into()),
            };
            let buffer = self
                .size("access_log.buffer".into(), &a.buffer)
                .unwrap_or(defaults::ACCESS_LOG_BUFFER);
            Some(AccessLogConfig { target, format, buffer })
        });
        let dns = self.dns(&raw);
        let max_endpoint_series = self.count(
            "max_endpoint_series".into(),
            raw.max_endpoint_series,
            defaults::MAX_ENDPOINT_SERIES as u32,
            0,
            100_000,
            "from 0 to 100000",
        ) as usize;
        if raw.listeners.is_empty() {
            self.err("listeners".into(), Problem::NoListeners);
        }
        let listeners: Vec<Listener> =
            raw.listeners.iter().enumerate().filter_map(|(i, l)| self.listener(i, l)).collect();
        self.unique_names("listeners", raw.listeners.iter().map(|l| l.name.as_str()));
        self.unique_names("clusters", raw.clusters.iter().map(|c| c.name.as_str()));
        let clusters: Vec<Cluster> =
            raw.clusters.iter().enumerate().map(|(i, c)| self.cluster(i, c)).collect();
        let mut routes = Vec::new();
        let mut seen: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(route) = self.route(i, r, &clusters) {
                let key = (
                    format!("{:?}", route.host),
                    format!("{:?}", route.path),
                    format!("{:?}", route.method),
                );
                if let Some(first) = seen.get(&key) {
                    self.err(format!("routes[{i}].match"), Problem::DuplicateRoute(*first));
                } else {
                    seen.insert(key, i);
                }
                routes.push(route);
            }
        }
        for (i, c) in clusters.iter().enumerate() {
            let used = routes.iter().any(|r| matches!(r.action, Action::Forward(k) if k == i));
            if !used {
                self.warn(format!("clusters[{i}]"), Problem::UnusedCluster(c.name.clone()));
            }
        }
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        Ok(Config {
            source: None,
            workers,
            runtime,
            worker_connections,
            drain_timeout,
            admin,
            access_log,
            listeners,
            routes,
            clusters,
            warnings: self.warnings,
            resolved: self.resolved,
            dns,
            max_endpoint_series,
        })
    }

    /// An endpoint's weight, 1 to 1000 (default 1).
    fn weight(&mut self, key: &str, raw: Option<i64>) -> u32 {
        match raw {
            None => 1,
            Some(w) if (1..=1000).contains(&w) => w as u32,
            Some(_) => {
                self.err(format!("{key}.weight"), Problem::BadWeight);
                1
            }
        }
    }

    /// The top-level DNS settings for `dns` and `srv` endpoints.
    fn dns(&mut self, raw: &RawConfig) -> DnsSettings {
        let mut resolvers = Vec::new();
        for (i, r) in raw.resolvers.iter().flatten().enumerate() {
            // A bare IP means port 53.
            let parsed = r
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| r.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) => resolvers.push(a),
                None => self.err(format!("resolvers[{i}]"), Problem::BadAddress(r.clone())),
            }
        }
        let min_ttl = self.duration("dns_min_ttl".into(), &raw.dns_min_ttl, defaults::DNS_MIN_TTL);
        let max_ttl = self.duration("dns_max_ttl".into(), &raw.dns_max_ttl, defaults::DNS_MAX_TTL);
        if min_ttl > max_ttl {
            self.err("dns_min_ttl".into(), Problem::TtlBounds);
        }
        DnsSettings { resolvers, min_ttl, max_ttl }
    }

    fn unique_names<'n>(&mut self, section: &str, names: impl Iterator<Item = &'n str>) {
        let mut seen = HashSet::new();
        for (i, n) in names.enumerate() {
            if !seen.insert(n) {
                self.err(format!("{section}[{i}].name"), Problem::DuplicateName(n.to_string()));
            }
        }
    }

    fn listener(&mut self, i: usize, l: &RawListener) -> Option<Listener> {
        let p = format!("listeners[{i}]");
        let address = match l.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(format!("{p}.address"), Problem::BadAddress(l.address.clone()));
                None
            }
        };
        let header_timeout = self.duration(
            format!("{p}.header_timeout"),
            &l.header_timeout,
            defaults::HEADER_TIMEOUT,
        );
        let keepalive_timeout = self.duration(
            format!("{p}.keepalive_timeout"),
            &l.keepalive_timeout,
            defaults::KEEPALIVE_TIMEOUT,
        );
        let body_timeout =
            self.duration(format!("{p}.body_timeout"), &l.body_timeout, defaults::BODY_TIMEOUT);
        let send_timeout =
            self.duration(format!("{p}.send_timeout"), &l.send_timeout, defaults::SEND_TIMEOUT);
        let park_after =
            self.duration(format!("{p}.park_after"), &l.park_after, defaults::PARK_AFTER);
        let mut limits = HeadLimits::default();
        if let Some(n) = self.size(format!("{p}.max_request_line"), &l.max_request_line) {
            limits.max_request_line = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = self.size(format!("{p}.max_header_bytes"), &l.max_header_bytes) {
            limits.max_head = usize::try_from(n).unwrap_or(usize::MAX);
        }
        match l.max_header_fields {
            None => {}
            Some(n) if (1..=MAX_FIELDS_CAP as i64).contains(&n) => limits.max_fields = n as usize,
            Some(_) => self.err(format!("{p}.max_header_fields"), Problem::BadFieldCount),
        }
        let max_request_body = self.size(format!("{p}.max_request_body"), &l.max_request_body);
        let proxy_protocol = self.proxy_protocol_in(&p, &l.proxy_protocol);
        let trusted_proxies = self.cidrs(&format!("{p}.trusted_proxies"), &l.trusted_proxies);
        let forwarded = self.forwarded_style(&p, &l.forwarded_headers);
        let max_connections_per_client = l.max_connections_per_client.map(|n| {
            let key = format!("{p}.max_connections_per_client");
            self.count(key, Some(n), 1, 1, 1_000_000, "from 1 to 1000000")
        });
        let rate_limit = self.rate_limit(&p, &l.rate_limit);
        let tls = self.tls(&p, &l.tls);
        let http2 = self.http2(&p, &l.http2);
        Some(Listener {
            tls,
            http2,
            name: l.name.clone(),
            address: address?,
            header_timeout,
            keepalive_timeout,
            body_timeout,
            send_timeout,
            limits,
            max_request_body,
            proxy_protocol,
            trusted_proxies,
            forwarded,
            request_id: l.request_id.unwrap_or(false),
            release_idle_buffer: l.release_idle_buffer.unwrap_or(true),
            park_after,
            max_connections_per_client,
            rate_limit,
        })
    }

    fn cluster(&mut self, i: usize, c: &RawCluster) -> Cluster {
        let p = format!("clusters[{i}]");
        if c.endpoints.is_empty() {
            self.err(format!("{p}.endpoints"), Problem::NoEndpoints);
        }
        let mut fixed = Vec::new();
        let mut discovery = Vec::new();
        for (j, e) in c.endpoints.iter().enumerate() {
            let key = format!("{p}.endpoints[{j}]");
            let (address, weight) = match e {
                RawEndpoint::Plain(a) => (a, None),
                RawEndpoint::Weighted(w) => {
                    let weight = w.weight;
                    match (&w.address, &w.dns, &w.srv) {
                        (Some(a), None, None) => (a, weight),
                        (None, Some(d), None) => {
                            let weight = self.weight(&key, weight);
                            match parse_dns_target(d) {
                                Some((host, port)) => {
                                    discovery.push(Discovery::Dns { host, port, weight })
                                }
                                None => {
                                    self.err(format!("{key}.dns"), Problem::BadDnsName(d.clone()))
                                }
                            }
                            continue;
                        }
                        (None, None, Some(name)) => {
                            if weight.is_some() {
                                self.err(format!("{key}.weight"), Problem::SrvWeight);
                            }
                            if is_dns_name(name) {
                                discovery.push(Discovery::Srv { name: name.clone() });
                            } else {
                                self.err(format!("{key}.srv"), Problem::BadDnsName(name.clone()));
                            }
                            continue;
                        }
                        _ => {
                            self.err(key, Problem::EndpointSource);
                            continue;
                        }
                    }
                }
            };
            let weight = self.weight(&key, weight);
            // Host names resolve here, once per config load, never per request.
            match address.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                Some(addr) => {
                    if address.parse::<SocketAddr>().is_err() {
                        let (cluster, name) = (c.name.clone(), address.clone());
                        self.resolved.push(Resolved { cluster, name, address: addr });
                    }
                    fixed.push((addr, weight));
                }
                None => self.err(key, Problem::BadEndpoint(address.clone())),
            }
        }
        let endpoints = fixed.iter().map(|e| e.0).collect();
        let weights = fixed.iter().map(|e| e.1).collect();
        let policy = self.policy(&p, c);
        let health_check = c.health_check.as_ref().map(|h| self.health_check(&p, h));
        let outlier = self.outlier(&p, c.outlier_detection.as_ref());
        let pool_max_idle = match c.pool_max_idle {
            None => defaults::POOL_MAX_IDLE,
            Some(n) if (0..=65536).contains(&n) => n as usize,
            Some(_) => {
                self.err(format!("{p}.pool_max_idle"), Problem::BadPoolSize);
                defaults::POOL_MAX_IDLE
            }
        };
        let send_proxy_protocol = match c.proxy_protocol.as_deref() {
            None => false,
            Some("v2") => true,
            Some(other) => {
                self.err(format!("{p}.proxy_protocol"), Problem::BadProxyVersion(other.into()));
                false
            }
        };
        let tls = self.upstream_tls(&p, &c.tls);
        let max_connections = c.max_connections.map(|_| {
            self.count(
                format!("{p}.max_connections"),
                c.max_connections,
                1,
                1,
                1_000_000,
                "from 1 to 1000000",
            )
        });
        let max_queue = self.count(
            format!("{p}.max_queue"),
            c.max_queue,
            defaults::MAX_QUEUE as u32,
            0,
            1_000_000,
            "from 0 to 1000000",
        ) as usize;
        let queue_timeout =
            self.duration(format!("{p}.queue_timeout"), &c.queue_timeout, defaults::QUEUE_TIMEOUT);
        let max_requests_per_connection = c.max_requests_per_connection.map(|_| {
            self.count(
                format!("{p}.max_requests_per_connection"),
                c.max_requests_per_connection,
                1,
                1,
                i64::from(u32::MAX),
                "from 1 to 4294967295",
            )
        });
        let slow_start = c
            .slow_start
            .as_ref()
            .map(|_| self.duration(format!("{p}.slow_start"), &c.slow_start, Duration::ZERO));
        Cluster {
            max_connections,
            max_queue,
            queue_timeout,
            max_requests_per_connection,
            slow_start,
            splice: c.splice.unwrap_or(true),
            tls,
            send_proxy_protocol,
            name: c.name.clone(),
            endpoints,
            weights,
            fixed,
            discovery,
            policy,
            health_check,
            outlier,
            connect_timeout: self.duration(
                format!("{p}.connect_timeout"),
                &c.connect_timeout,
                defaults::CONNECT_TIMEOUT,
            ),
            response_timeout: self.duration(
                format!("{p}.response_timeout"),
                &c.response_timeout,
                defaults::RESPONSE_TIMEOUT,
            ),
            read_timeout: self.duration(
                format!("{p}.read_timeout"),
                &c.read_timeout,
                defaults::READ_TIMEOUT,
            ),
            pool_max_idle,
            pool_idle_timeout: self.duration(
                format!("{p}.pool_idle_timeout"),
                &c.pool_idle_timeout,
                defaults::POOL_IDLE_TIMEOUT,
            ),
        }
    }

    fn route(&mut self, i: usize, r: &RawRoute, clusters: &[Cluster]) -> Option<Route> {
        let p = format!("routes[{i}]");
        let m = &r.matcher;
        let mut ok = true;
        let host = match m.host.as_deref() {
            None | Some("*") => HostMatch::Any,
            Some(h) => match parse_host_match(h) {
                Some(hm) => hm,
                None => {
                    self.err(format!("{p}.match.host"), Problem::BadHost(h.to_string()));
                    ok = false;
                    HostMatch::Any
                }
            },
        };
        let path = match (&m.path, &m.path_prefix) {
            (Some(_), Some(_)) => {
                self.err(format!("{p}.match"), Problem::PathAndPrefix);
                ok = false;
                PathMatch::Prefix("/".into())
            }
            (Some(x), None) => {
                ok &= self.check_path(format!("{p}.match.path"), x);
                PathMatch::Exact(x.clone())
            }
            (None, Some(x)) => {
                ok &= self.check_path(format!("{p}.match.path_prefix"), x);
                PathMatch::Prefix(x.clone())
            }
            (None, None) => PathMatch::Prefix("/".into()),
        };
        let method = match &m.method {
            None => None,
            Some(x) if is_token(x) => Some(x.to_ascii_uppercase()),
            Some(x) => {
                self.err(format!("{p}.match.method"), Problem::BadMethod(x.clone()));
                ok = false;
                None
            }
        };
        let actions = [r.cluster.is_some(), r.respond.is_some(), r.redirect.is_some()];
        let action = match (&r.cluster, &r.respond) {
            _ if actions.iter().filter(|&&a| a).count() > 1 => {
                self.err(p.clone(), Problem::TwoActions);
                None
            }
            (None, None) => match &r.redirect {
                Some(rd) => self.redirect(&format!("{p}.redirect"), rd).map(Action::Redirect),
                None => {
                    self.err(p.clone(), Problem::NoAction);
                    None
                }
            },
            (Some(_), Some(_)) => None,
            (Some(c), None) => match clusters.iter().position(|k| &k.name == c) {
                Some(idx) => Some(Action::Forward(idx)),
                None => {
                    self.err(format!("{p}.cluster"), Problem::UnknownCluster(c.clone()));
                    None
                }
            },
            (None, Some(resp)) => self.respond(&format!("{p}.respond"), resp).map(Action::Respond),
        };
        if !ok {
            return None;
        }
        let name = r.name.clone().unwrap_or_else(|| format!("routes[{i}]"));
        let retry = self.retry(&p, r.retry.as_ref());
        let timeouts = match &r.timeouts {
            None => lb::RouteTimeouts::default(),
            Some(t) => lb::RouteTimeouts {
                connect: self.opt_duration(format!("{p}.timeouts.connect"), &t.connect),
                response: self.opt_duration(format!("{p}.timeouts.response"), &t.response),
                read: self.opt_duration(format!("{p}.timeouts.read"), &t.read),
            },
        };
        let upgrade = match &r.upgrade {
            None => defaults::UPGRADE.iter().map(|u| u.to_string()).collect(),
            Some(list) => {
                let mut tokens = Vec::new();
                for (j, u) in list.iter().enumerate() {
                    if is_token(u) {
                        tokens.push(u.to_ascii_lowercase());
                    } else {
                        self.err(format!("{p}.upgrade[{j}]"), Problem::BadUpgrade(u.clone()));
                    }
                }
                tokens
            }
        };
        let tunnel_idle_timeout = self.duration(
            format!("{p}.tunnel_idle_timeout"),
            &r.tunnel_idle_timeout,
            defaults::TUNNEL_IDLE_TIMEOUT,
        );
        let allow = self.cidrs(&format!("{p}.allow"), &r.allow);
        let deny = self.cidrs(&format!("{p}.deny"), &r.deny);
        let request_edits = self.edits(&format!("{p}.request_headers"), &r.request_headers);
        let response_edits = self.edits(&format!("{p}.response_headers"), &r.response_headers);
        let path_edit = self.path_edit(&p, &r.strip_prefix, &r.replace_prefix);
        let host_rewrite = r.host_rewrite.as_ref().and_then(|h| {
            let key = format!("{p}.host_rewrite");
            let t = self.template(&key, h)?;
            // Literal text must be something a Host field can hold.
            let literal_ok = t.0.iter().all(|part| match part {
                TemplatePart::Text(s) => s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b)),
                _ => true,
            });
            if !literal_ok {
                self.err(key, Problem::BadHost(h.clone()));
                return None;
            }
            Some(t)
        });
        let compression = self.compression(&p, &r.compression);
        Some(Route {
            compression,
            name,
            retry,
            upgrade,
            tunnel_idle_timeout,
            allow,
            deny,
            request_edits,
            response_edits,
            path_edit,
            host_rewrite,
            timeouts,
            host,
            path,
            method,
            action: action?,
        })
    }

    fn opt_duration(&mut self, key: String, raw: &Option<String>) -> Option<Duration> {
        raw.as_ref()?;
        Some(self.duration(key, raw, Duration::from_secs(1)))
    }

    pub(super) fn count(
        &mut self,
        key: String,
        raw: Option<i64>,
        default: u32,
        lo: i64,
        hi: i64,
        range: &'static str,
    ) -> u32 {
        match raw {
            None => default,
            Some(n) if (lo..=hi).contains(&n) => n as u32,
            Some(_) => {
                self.err(key, Problem::BadCount(range));
                default
            }
        }
    }

    pub(super) fn check_path(&mut self, key: String, path: &str) -> bool {
        let good = path.starts_with('/') && path.bytes().all(|b| b > b' ' && b != 0x7f);
        if !good {
            self.err(key, Problem::BadPath(path.to_string()));
        }
        good
    }

    fn redirect(&mut self, p: &str, r: &super::raw::RawRedirect) -> Option<Redirect> {
        let scheme = match r.scheme.as_deref() {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(other) => {
                self.err(format!("{p}.scheme"), Problem::BadScheme(other.into()));
                return None;
            }
        };
        let status = r.status.unwrap_or(301);
        if ![301, 302, 307, 308].contains(&status) {
            self.err(format!("{p}.status"), Problem::BadRedirectStatus(status));
            return None;
        }
        let port = match r.port {
            None => None,
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            Some(_) => {
                self.err(format!("{p}.port"), Problem::BadCount("from 1 to 65535"));
                return None;
            }
        };
        Some(Redirect { scheme, status, port })
    }

    fn respond(&mut self, p: &str, r: &RawRespond) -> Option<DirectResponse> {
        let mut ok = true;
        if !(200..=599).contains(&r.status) {
            self.err(format!("{p}.status"), Problem::BadStatus(r.status));
            ok = false;
        }
        let mut headers = Vec::new();
        for (name, value) in &r.headers {
            let lname = name.to_ascii_lowercase();
            let framing = matches!(
                lname.as_str(),
                "content-length" | "transfer-encoding" | "connection" | "keep-alive"
            );
            let value_ok = value.bytes().all(|b| b == b'\t' || (b >= b' ' && b != 0x7f));
            if !is_token(name) || framing || !value_ok {
                self.err(format!("{p}.headers.{name}"), Problem::BadHeader(name.clone()));
                ok = false;
            } else {
                headers.push((name.clone(), value.clone()));
            }
        }
        ok.then(|| DirectResponse { status: r.status, headers, body: r.body.clone().into_bytes() })
    }
}

/// `api.example.com` → exact, `*.example.com` → suffix. Lower-cased; ports are not allowed.
/// A DNS name: dot-separated labels of letters, digits, `-` and `_` (SRV's `_http._tcp`), each
/// 1 to 63 bytes, at most 253 in all; a final dot is allowed.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `host:port` for a `dns` endpoint.
fn parse_dns_target(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    is_dns_name(host).then(|| (host.to_string(), port))
}

fn parse_host_match(h: &str) -> Option<HostMatch> {
    let h = h.to_ascii_lowercase();
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !s.starts_with('.')
    };
    if let Some(rest) = h.strip_prefix("*.") {
        valid(rest).then(|| HostMatch::Suffix(format!(".{rest}")))
    } else {
        valid(&h).then_some(HostMatch::Exact(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::defaults;

    const GOOD: &str = r#"
workers: 2
runtime: epoll
listeners:
  - name: public
    address: 127.0.0.1:8080
routes:
  - match: { host: "api.example.com", path_prefix: "/v1", method: get }
    cluster: api
  - match: { path: "/" }
    respond: { status: 200, headers: { content-type: text/plain }, body: "hello\n" }
clusters:
  - name: api
    endpoints: [ "127.0.0.1:9000", "localhost:9001" ]
    connect_timeout: 500ms
"#;

    #[test]
    fn good_config_validates_into_typed_values() {
        let c = Config::from_yaml(GOOD, "good.yaml").unwrap();
        assert_eq!(c.workers, Workers::Count(2));
        assert_eq!(c.runtime, RuntimeKind::Epoll);
        assert_eq!(c.clusters[0].endpoints.len(), 2);
        assert_eq!(c.clusters[0].connect_timeout, Duration::from_millis(500));
        assert_eq!(c.clusters[0].response_timeout, defaults::RESPONSE_TIMEOUT);
        assert_eq!(c.routes[0].method.as_deref(), Some("GET"));
        assert_eq!(c.routes[0].host, HostMatch::Exact("api.example.com".into()));
        assert!(matches!(c.routes[0].action, Action::Forward(0)));
    }

    fn errors(yaml: &str) -> Vec<String> {
        Config::from_yaml(yaml, "bad.yaml").unwrap_err().0.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn unknown_key_is_named_with_file_line_and_path() {
        let e = errors("listeners:\n  - name: a\n    adress: 1.2.3.4:5\n");
        assert_eq!(
            e[0],
            "bad.yaml:3: listeners[0].adress: unknown key `adress`; did you mean `address`?"
        );
        assert!(e[1].contains("missing field `address`"), "{e:?}");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn unknown_keys_are_reported_with_every_other_problem() {
        let e = errors(
            r#"
listeners:
  - { name: a, address: "127.0.0.1:1", keepalive: 5s }
routes:
  - match: { path: "/" }
    cluster: missing
clusters:
  - { name: c, endpionts: [], connect_timeout: 0s }
"#,
        );
        let joined = e.join("\n");
        assert!(joined.contains("bad.yaml:3: listeners[0].keepalive: unknown key `keepalive`"));
        assert!(
            joined.contains(
                "clusters[0].endpionts: unknown key `endpionts`; did you mean `endpoints`?"
            ),
            "{joined}"
        );
        assert!(joined.contains("routes[0].cluster: no cluster is named `missing`"), "{joined}");
        assert!(joined.contains("clusters[0].connect_timeout: must be greater than zero"));
        assert!(joined.contains("clusters[0].endpoints: a cluster needs at least one"));
        // Each problem once: the key path is not repeated inside the message.
        assert_eq!(joined.matches("endpionts").count(), 2, "{joined}");
        assert_eq!(e.len(), 5, "{joined}");
    }

    #[test]
    fn a_cluster_no_route_uses_is_a_warning_not_an_error() {
        let c = Config::from_yaml(
            "listeners: [ { name: a, address: \"127.0.0.1:1\" } ]\nclusters:\n  - { name: spare, endpoints: [\"127.0.0.1:2\"] }\n",
            "w.yaml",
        )
        .unwrap();
        let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(w, vec!["w.yaml:3: clusters[0]: no route uses cluster `spare`"]);
    }

    #[test]
    fn defaults_retry_connect_failures_and_eject_outliers() {
        let c = Config::from_yaml(GOOD, "good.yaml").unwrap();
        assert_eq!(c.routes[0].retry, lb::RetryPolicy::default());
        assert_eq!(c.routes[0].retry.attempts, defaults::RETRY_ATTEMPTS);
        assert!(c.routes[0].retry.retries_on(lb::RetryOn::ConnectFailure));
        assert_eq!(c.clusters[0].outlier, Some(lb::Outlier::default()));
        let off = Config::from_yaml(
            &GOOD.replace("connect_timeout: 500ms", "outlier_detection: { enabled: false }"),
            "off.yaml",
        )
        .unwrap();
        assert_eq!(off.clusters[0].outlier, None);
        assert_eq!(
            c.resolved,
            vec![Resolved {
                cluster: "api".into(),
                name: "localhost:9001".into(),
                address: c.clusters[0].endpoints[1]
            }]
        );
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let e = errors(
            r#"
listeners:
  - { name: a, address: "nope" }
routes:
  - match: { path: "/" }
    cluster: missing
clusters:
  - { name: empty, endpoints: [], connect_timeout: 0s, response_timeout: soon }
"#,
        );
        let joined = e.join("\n");
        assert!(joined.contains("listeners[0].address"), "{joined}");
        assert!(joined.contains("routes[0].cluster: no cluster is named `missing`"), "{joined}");
        assert!(joined.contains("clusters[0].endpoints: a cluster needs at least one"), "{joined}");
        assert!(joined.contains("clusters[0].connect_timeout: must be greater than zero"));
        assert!(joined.contains("clusters[0].response_timeout: `soon` is not a duration"));
        assert_eq!(e.len(), 5, "{joined}");
    }

    #[test]
    fn identical_routes_are_refused() {
        let e = errors(
            r#"
listeners: [ { name: a, address: "127.0.0.1:1" } ]
routes:
  - { match: { path: "/x" }, respond: { status: 200 } }
  - { match: { path: "/x" }, respond: { status: 204 } }
"#,
        );
        assert_eq!(
            e,
            vec!["bad.yaml:5: routes[1].match: matches exactly the same requests as routes[0]"]
        );
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("150ms"), Some(Duration::from_millis(150)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1.5s"), None);
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("8k"), Some(8192));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1.5m"), None);
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn listener_limits_are_validated() {
        let ok = Config::from_yaml(
            "listeners: [ { name: a, address: \"127.0.0.1:1\", max_header_bytes: 16KiB, max_header_fields: 20, max_request_body: 1MiB } ]\n",
            "t.yaml",
        )
        .unwrap();
        let l = &ok.listeners[0];
        assert_eq!((l.limits.max_head, l.limits.max_fields), (16384, 20));
        assert_eq!(l.max_request_body, Some(1 << 20));
        let e = errors("listeners: [ { name: a, address: \"127.0.0.1:1\", max_header_fields: 1000, max_request_body: huge } ]\n");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    /// A listener's duration `key`: `default` when absent, `set` (as YAML) read as `value`,
    /// and zero refused with an error naming the key.
    fn listener_duration(key: &str, read: fn(&Listener) -> Duration, default: Duration) {
        let l = |extra: &str| {
            format!("listeners: [ {{ name: a, address: \"127.0.0.1:1\"{extra} }} ]\n")
        };
        let c = Config::from_yaml(&l(""), "t.yaml").unwrap();
        assert_eq!(read(&c.listeners[0]), default, "{key}'s default");
        let c = Config::from_yaml(&l(&format!(", {key}: 250ms")), "t.yaml").unwrap();
        assert_eq!(read(&c.listeners[0]), Duration::from_millis(250), "{key} as set");
        let e = errors(&l(&format!(", {key}: 0s")));
        assert!(e.len() == 1 && e[0].contains(&format!("listeners[0].{key}")), "{e:?}");
    }

    #[test]
    fn send_timeout_defaults_to_a_minute_and_refuses_zero() {
        listener_duration("send_timeout", |l| l.send_timeout, Duration::from_secs(60));
    }

    #[test]
    fn park_after_defaults_to_a_second_and_refuses_zero() {
        listener_duration("park_after", |l| l.park_after, Duration::from_secs(1));
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            parse_host_match("*.Example.com"),
            Some(HostMatch::Suffix(".example.com".into()))
        );
        assert_eq!(parse_host_match("a.b"), Some(HostMatch::Exact("a.b".into())));
        assert_eq!(parse_host_match("a.b:80"), None);
        assert_eq!(parse_host_match("*"), None);
    }
}
