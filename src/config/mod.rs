//! The validated configuration: built from the raw serde shape, it cannot hold a bad state.
//!
//! `Config::load` reads a YAML file, deserialises it into [`raw::RawConfig`] and validates every
//! key, collecting all problems at once so that `apex check` can list them together. Each
//! [`ConfigError`] names the file, the key path (`clusters[1].endpoints[0]`) and what is wrong.

pub mod lb;
pub mod lines;
pub mod raw;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::{
    RawCluster, RawConfig, RawEndpoint, RawHashOn, RawHealthCheck, RawListener, RawOutlier,
    RawRespond, RawRetry, RawRetryOn, RawRoute, RawSize, RawWorkers,
};

use crate::http::{HeadLimits, MAX_FIELDS_CAP};

/// Defaults shared by the config file and `apex proxy`, so both modes behave alike.
pub mod defaults {
    use std::time::Duration;
    /// Upstream TCP connect; an unreachable backend answers 504 after this.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    /// From the request fully sent to the upstream's response head.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Between two reads of a response body: a slow stream is not cut while bytes keep coming.
    pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
    /// Idle pooled upstream connections per endpoint and worker.
    pub const POOL_MAX_IDLE: usize = 64;
    /// Shorter than common upstream keep-alive timeouts (Node.js and Apache: 5 s), or reuse
    /// races the upstream's close.
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
    /// A client must finish sending a request head within this (slowloris).
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// An idle keep-alive client connection is closed after this.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Between two reads of a request body.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
    /// Open client connections per worker; at the cap a worker stops accepting until one closes.
    pub const WORKER_CONNECTIONS: usize = 10_000;
    /// After SIGTERM/SIGINT, in-flight requests get this long before the process exits anyway.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
}

/// How many worker threads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One per core in this process's CPU affinity mask.
    Auto,
    Count(usize),
}

/// Which event driver a worker's runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// monoio on io_uring; falls back to `Epoll` when the kernel refuses io_uring.
    IoUring,
    /// monoio's legacy (epoll) driver.
    Epoll,
    /// The Tokio build: one current-thread Tokio runtime per core (for comparison).
    Tokio,
}

impl RuntimeKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "io_uring" | "iouring" | "uring" => Some(Self::IoUring),
            "epoll" | "legacy" => Some(Self::Epoll),
            "tokio" => Some(Self::Tokio),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
            Self::Tokio => "tokio",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; `None` for `apex proxy`'s built config.
    pub source: Option<PathBuf>,
    pub workers: Workers,
    pub runtime: RuntimeKind,
    pub worker_connections: usize,
    pub drain_timeout: Duration,
    /// Where the admin API listens; `None`: no admin API.
    pub admin: Option<SocketAddr>,
    /// `None`: no access log.
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    /// Request line, head and field-count limits (414, 431).
    pub limits: HeadLimits,
    /// Larger request bodies get 413; `None`: no limit.
    pub max_request_body: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The `name` key, or `routes[i]`: the label in metrics and access logs.
    pub name: String,
    pub retry: Option<lb::RetryPolicy>,
    pub timeouts: lb::RouteTimeouts,
    pub host: HostMatch,
    pub path: PathMatch,
    /// Upper-case method token; `None` matches every method.
    pub method: Option<String>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// Lower-case host name without port.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches any name ending with it.
    Suffix(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathMatch {
    Exact(String),
    /// Byte prefix, like nginx's `location /v1` and Envoy's `prefix`: `/v1` also matches `/v10`.
    Prefix(String),
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Index into `Config::clusters`.
    Forward(usize),
    Respond(DirectResponse),
}

#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    /// Never empty: validation refuses a cluster with no endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// One per endpoint, at least 1.
    pub weights: Vec<u32>,
    pub policy: lb::Policy,
    pub health_check: Option<lb::HealthCheck>,
    pub outlier: Option<lb::Outlier>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub read_timeout: Duration,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
}

impl Cluster {
    /// A cluster with every setting at its default.
    pub fn with_defaults(name: &str, endpoints: Vec<SocketAddr>) -> Self {
        Cluster {
            name: name.to_string(),
            weights: vec![1; endpoints.len()],
            endpoints,
            policy: lb::Policy::RoundRobin,
            health_check: None,
            outlier: None,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            response_timeout: defaults::RESPONSE_TIMEOUT,
            read_timeout: defaults::READ_TIMEOUT,
            pool_max_idle: defaults::POOL_MAX_IDLE,
            pool_idle_timeout: defaults::POOL_IDLE_TIMEOUT,
        }
    }
}

impl Listener {
    pub fn with_defaults(name: &str, address: SocketAddr) -> Self {
        Listener {
            name: name.to_string(),
            address,
            header_timeout: defaults::HEADER_TIMEOUT,
            keepalive_timeout: defaults::KEEPALIVE_TIMEOUT,
            body_timeout: defaults::BODY_TIMEOUT,
            limits: HeadLimits::default(),
            max_request_body: None,
        }
    }
}

/// One thing wrong with a config, located by file, line (when the parser knows it) and key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    /// Dotted key path, e.g. `clusters[0].endpoints[1]`; empty for the whole document.
    pub key: String,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Unreadable(String),
    /// YAML syntax or shape error (unknown key, wrong type), as the parser words it.
    Syntax(String),
    NoListeners,
    BadAddress(String),
    DuplicateName(String),
    BadDuration(String),
    ZeroDuration,
    BadWorkers,
    BadRuntime(String),
    NoEndpoints,
    BadEndpoint(String),
    BadPoolSize,
    BadSize(String),
    BadFieldCount,
    BadConnections,
    AdminNotLoopback(SocketAddr),
    BadPolicy(String),
    BadHashOn,
    HashOnWithoutConsistentHash,
    BadWeight,
    BadCount(&'static str),
    BadRetryOn(String),
    BadBudget,
    BadAllUnhealthy(String),
    BadLogFormat(String),
    UnknownCluster(String),
    NoAction,
    TwoActions,
    PathAndPrefix,
    BadPath(String),
    BadHost(String),
    BadMethod(String),
    BadStatus(u16),
    BadHeader(String),
    DuplicateRoute(usize),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            Problem::Syntax(e) => write!(f, "{e}"),
            Problem::NoListeners => write!(f, "at least one listener is required"),
            Problem::BadAddress(a) => write!(f, "`{a}` is not an ip:port socket address"),
            Problem::DuplicateName(n) => write!(f, "the name `{n}` is used twice"),
            Problem::BadDuration(d) => write!(
                f,
                "`{d}` is not a duration: write a number with a unit, e.g. 500ms, 2s, 1m, 1h"
            ),
            Problem::ZeroDuration => write!(f, "must be greater than zero"),
            Problem::BadWorkers => write!(f, "must be `auto` or a number from 1 to 1024"),
            Problem::BadRuntime(r) => {
                write!(f, "unknown runtime `{r}`: use io_uring, epoll or tokio")
            }
            Problem::NoEndpoints => write!(f, "a cluster needs at least one endpoint"),
            Problem::BadEndpoint(e) => write!(f, "`{e}` is not host:port or does not resolve"),
            Problem::BadPoolSize => write!(f, "must be a number from 0 to 65536"),
            Problem::BadSize(v) => write!(
                f,
                "`{v}` is not a size: write bytes, or a number with a unit, e.g. 64KiB, 10MiB"
            ),
            Problem::BadFieldCount => write!(f, "must be a number from 1 to {MAX_FIELDS_CAP}"),
            Problem::BadConnections => write!(f, "must be a number from 1 to 1000000"),
            Problem::BadPolicy(x) => write!(
                f,
                "unknown policy `{x}`: use round_robin, least_request, random or consistent_hash"
            ),
            Problem::BadHashOn => write!(
                f,
                "consistent_hash needs `hash_on`: client_address, {{ header: NAME }} or {{ cookie: NAME }}"
            ),
            Problem::HashOnWithoutConsistentHash => {
                write!(f, "`hash_on` only applies to `policy: consistent_hash`")
            }
            Problem::BadWeight => write!(f, "a weight is a number from 1 to 1000"),
            Problem::BadCount(range) => write!(f, "must be a number {range}"),
            Problem::BadRetryOn(x) => write!(
                f,
                "cannot retry on `{x}`: use connect_failure, stale_connection, 502, 503 or 504"
            ),
            Problem::BadBudget => write!(f, "a budget is a fraction from 0.0 to 1.0"),
            Problem::BadAllUnhealthy(x) => {
                write!(f, "unknown `{x}`: use fail_open or reject")
            }
            Problem::BadLogFormat(x) => write!(f, "unknown format `{x}`: use combined or json"),
            Problem::AdminNotLoopback(a) => write!(
                f,
                "{a} is not a loopback address; set `admin_allow_remote: true` to expose the admin API"
            ),
            Problem::UnknownCluster(c) => write!(f, "no cluster is named `{c}`"),
            Problem::NoAction => write!(f, "a route needs `cluster` or `respond`"),
            Problem::TwoActions => write!(f, "a route takes `cluster` or `respond`, not both"),
            Problem::PathAndPrefix => write!(f, "use `path` or `path_prefix`, not both"),
            Problem::BadPath(p) => write!(f, "`{p}` must start with `/` and hold no spaces"),
            Problem::BadHost(h) => {
                write!(f, "`{h}` is not a host name (exact, or `*.suffix`), without port or spaces")
            }
            Problem::BadMethod(m) => write!(f, "`{m}` is not an HTTP method token"),
            Problem::BadStatus(s) => write!(f, "status {s} is not between 200 and 599"),
            Problem::BadHeader(h) => write!(f, "`{h}` is not a valid header name or value"),
            Problem::DuplicateRoute(i) => {
                write!(f, "matches exactly the same requests as routes[{i}]")
            }
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// All problems found in one config; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses a byte size: `65536`, `64k`/`64KiB`, `10m`/`10MiB`, `1g`/`1GiB` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `500ms`, `2s`, `1m`, `1h` (integer count, one unit).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                line: None,
                key: String::new(),
                problem: Problem::Unreadable(e.to_string()),
            }])
        })?;
        let mut config = Config::from_yaml(&text, &file)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates YAML text; `file` only labels the errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigErrors> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.location().map(|l| l.line());
            // The parser's message repeats the location; keep only its words.
            let msg = inner.to_string();
            let msg = match msg.find(" at line ") {
                Some(i) => msg[..i].to_string(),
                None => msg,
            };
            ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                key: if key == "." { String::new() } else { key },
                problem: Problem::Syntax(msg),
            }])
        })?;
        Validator { file, errors: Vec::new() }.config(raw).map_err(|mut errors| {
            let lines = lines::key_lines(text);
            for e in &mut errors.0 {
                e.line = e.line.or_else(|| lines::line_of(&lines, &e.key));
            }
            errors
        })
    }
}

struct Validator<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, key: String, problem: Problem) {
        self.errors.push(ConfigError { file: self.file.to_string(), line: None, key, problem });
    }

    fn duration(&mut self, key: String, raw: &Option<String>, default: Duration) -> Duration {
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

    fn size(&mut self, key: String, raw: &Option<RawSize>) -> Option<u64> {
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

    fn config(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
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
            use crate::access_log::{AccessLogConfig, Format, Target};
            let format = match a.format.as_deref() {
                None | Some("combined") => Format::Combined,
                Some("json") => Format::Json,
                Some(other) => {
                    self.err("access_log.format".into(), Problem::BadLogFormat(other.into()));
                    return None;
                }
            };
            let target = match a.path.as_str() {
                "stdout" | "-" => Target::Stdout,
                p => Target::File(p.into()),
            };
            Some(AccessLogConfig { target, format })
        });
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
        })
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
        Some(Listener {
            name: l.name.clone(),
            address: address?,
            header_timeout,
            keepalive_timeout,
            body_timeout,
            limits,
            max_request_body,
        })
    }

    fn cluster(&mut self, i: usize, c: &RawCluster) -> Cluster {
        let p = format!("clusters[{i}]");
        if c.endpoints.is_empty() {
            self.err(format!("{p}.endpoints"), Problem::NoEndpoints);
        }
        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
        for (j, e) in c.endpoints.iter().enumerate() {
            let (address, weight) = match e {
                RawEndpoint::Plain(a) => (a, None),
                RawEndpoint::Weighted(w) => (&w.address, w.weight),
            };
            let weight = match weight {
                None => 1,
                Some(w) if (1..=1000).contains(&w) => w as u32,
                Some(_) => {
                    self.err(format!("{p}.endpoints[{j}].weight"), Problem::BadWeight);
                    1
                }
            };
            // Host names resolve here, once per config load, never per request.
            match address.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                Some(addr) => {
                    endpoints.push(addr);
                    weights.push(weight);
                }
                None => {
                    self.err(format!("{p}.endpoints[{j}]"), Problem::BadEndpoint(address.clone()))
                }
            }
        }
        let policy = self.policy(&p, c);
        let health_check = c.health_check.as_ref().map(|h| self.health_check(&p, h));
        let outlier = c.outlier_detection.as_ref().map(|o| self.outlier(&p, o));
        let pool_max_idle = match c.pool_max_idle {
            None => defaults::POOL_MAX_IDLE,
            Some(n) if (0..=65536).contains(&n) => n as usize,
            Some(_) => {
                self.err(format!("{p}.pool_max_idle"), Problem::BadPoolSize);
                defaults::POOL_MAX_IDLE
            }
        };
        Cluster {
            name: c.name.clone(),
            endpoints,
            weights,
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
        let action = match (&r.cluster, &r.respond) {
            (None, None) => {
                self.err(p.clone(), Problem::NoAction);
                None
            }
            (Some(_), Some(_)) => {
                self.err(p.clone(), Problem::TwoActions);
                None
            }
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
        let retry = r.retry.as_ref().map(|x| self.retry(&p, x));
        let timeouts = match &r.timeouts {
            None => lb::RouteTimeouts::default(),
            Some(t) => lb::RouteTimeouts {
                connect: self.opt_duration(format!("{p}.timeouts.connect"), &t.connect),
                response: self.opt_duration(format!("{p}.timeouts.response"), &t.response),
                read: self.opt_duration(format!("{p}.timeouts.read"), &t.read),
            },
        };
        Some(Route { name, retry, timeouts, host, path, method, action: action? })
    }

    fn opt_duration(&mut self, key: String, raw: &Option<String>) -> Option<Duration> {
        raw.as_ref()?;
        Some(self.duration(key, raw, Duration::from_secs(1)))
    }

    fn count(
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

    fn policy(&mut self, p: &str, c: &RawCluster) -> lb::Policy {
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

    fn health_check(&mut self, p: &str, h: &RawHealthCheck) -> lb::HealthCheck {
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
            interval: self.duration(format!("{p}.interval"), &h.interval, Duration::from_secs(5)),
            timeout: self.duration(format!("{p}.timeout"), &h.timeout, Duration::from_secs(1)),
            healthy_threshold: self.count(
                format!("{p}.healthy_threshold"),
                h.healthy_threshold,
                2,
                1,
                100,
                "from 1 to 100",
            ),
            unhealthy_threshold: self.count(
                format!("{p}.unhealthy_threshold"),
                h.unhealthy_threshold,
                2,
                1,
                100,
                "from 1 to 100",
            ),
            expected_statuses: h.expected_statuses.clone(),
            fail_open,
        }
    }

    fn outlier(&mut self, p: &str, o: &RawOutlier) -> lb::Outlier {
        let p = format!("{p}.outlier_detection");
        lb::Outlier {
            consecutive_failures: self.count(
                format!("{p}.consecutive_failures"),
                o.consecutive_failures,
                5,
                1,
                1000,
                "from 1 to 1000",
            ),
            base_ejection: self.duration(
                format!("{p}.base_ejection"),
                &o.base_ejection,
                Duration::from_secs(10),
            ),
            max_ejection: self.duration(
                format!("{p}.max_ejection"),
                &o.max_ejection,
                Duration::from_secs(300),
            ),
            max_ejection_percent: self.count(
                format!("{p}.max_ejection_percent"),
                o.max_ejection_percent,
                50,
                0,
                100,
                "from 0 to 100",
            ),
        }
    }

    fn retry(&mut self, p: &str, r: &RawRetry) -> lb::RetryPolicy {
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
            on = vec![lb::RetryOn::ConnectFailure, lb::RetryOn::StaleConnection];
        }
        let budget = match r.budget {
            None => 0.2,
            Some(b) if (0.0..=1.0).contains(&b) => b,
            Some(_) => {
                self.err(format!("{p}.budget"), Problem::BadBudget);
                0.2
            }
        };
        lb::RetryPolicy {
            attempts: self.count(format!("{p}.attempts"), r.attempts, 2, 1, 10, "from 1 to 10"),
            on,
            budget,
            min_retries: self.count(
                format!("{p}.min_retries"),
                r.min_retries,
                3,
                0,
                1000,
                "from 0 to 1000",
            ),
        }
    }

    fn check_path(&mut self, key: String, path: &str) -> bool {
        let good = path.starts_with('/') && path.bytes().all(|b| b > b' ' && b != 0x7f);
        if !good {
            self.err(key, Problem::BadPath(path.to_string()));
        }
        good
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
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("bad.yaml:"), "{e:?}");
        assert!(e[0].contains("listeners[0]"), "{e:?}");
        assert!(e[0].contains("adress"), "{e:?}");
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
