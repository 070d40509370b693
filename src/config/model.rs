//! The validated configuration: what workers and the control plane run from. Nothing here can
//! hold a bad state; [`super::validate`] builds it from the raw serde shape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::defaults;
use super::error::ConfigError;
use super::lb;
use crate::http::request::ForwardedStyle;
use crate::http::rewrite::{Cidr, PathEdit};
use crate::http::HeadLimits;

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
    pub access_log: Option<AccessLogConfig>,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    pub clusters: Vec<Cluster>,
    /// Problems that do not stop the config from loading (a cluster no route uses).
    pub warnings: Vec<ConfigError>,
    /// Endpoints written as host names, with the address each resolved to when loaded.
    pub resolved: Vec<Resolved>,
    /// How `dns` and `srv` endpoints are resolved.
    pub dns: DnsSettings,
    /// Clusters with more endpoints than this get cluster totals only, no per-endpoint series.
    pub max_endpoint_series: usize,
}

/// The resolver thread's settings (top-level `resolvers`, `dns_min_ttl`, `dns_max_ttl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers; empty: the system's (/etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
    /// A record's TTL is clamped to `[min_ttl, max_ttl]` to decide when to ask again; a
    /// failed lookup is retried after `min_ttl`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            resolvers: Vec::new(),
            min_ttl: defaults::DNS_MIN_TTL,
            max_ttl: defaults::DNS_MAX_TTL,
        }
    }
}

/// A cluster's endpoints that come from DNS, refreshed while Apex runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Discovery {
    /// Every A and AAAA address of `host`, at `port`, each with `weight`.
    Dns { host: String, port: u16, weight: u32 },
    /// The SRV records of `name`: their targets' addresses, ports and weights; only the records
    /// of the lowest priority are used.
    Srv { name: String },
}

/// A host-name endpoint and the address it resolved to (once, at load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub cluster: String,
    pub name: String,
    pub address: SocketAddr,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// nginx's `combined`, plus `rt=`, `upstream=` and `route=`.
    Combined,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub target: LogTarget,
    pub format: LogFormat,
    /// Most bytes of lines waiting for the writer thread; more are dropped and counted.
    pub buffer: u64,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
    /// Longest a write to the client may wait (a response's head, a read's worth of its body,
    /// an error answer: at most 64 KiB each); a client that takes none of it for this long is
    /// cut, and its upstream connection closed (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Request line, head and field-count limits (414, 431).
    pub limits: HeadLimits,
    /// Larger request bodies get 413; `None`: no limit.
    pub max_request_body: Option<u64>,
    /// Take the client's address from a PROXY protocol header (from trusted sources).
    pub proxy_protocol: Option<ProxyProtocolIn>,
    /// Clients whose forwarding fields are kept and extended; everyone else's are replaced.
    pub trusted_proxies: Vec<Cidr>,
    pub forwarded: ForwardedStyle,
    /// Keep a valid `X-Request-Id` or make one; forward it and log it.
    pub request_id: bool,
    /// Between requests a keep-alive connection waits for readability with no read buffer
    /// (on io_uring: one poll operation more per request, for about 0.45 KiB less per idle
    /// connection); plaintext connections only.
    pub release_idle_buffer: bool,
    /// A keep-alive connection idle this long (with `release_idle_buffer`, plaintext, HTTP/1.1)
    /// is parked in the worker's epoll set, holding no task; never when it is not shorter than
    /// `keepalive_timeout`.
    pub park_after: Duration,
    /// Open connections per client address, this worker's share (refused beyond it).
    pub max_connections_per_client: Option<u32>,
    /// Requests per client address, a token bucket, this worker's share (429 beyond it).
    pub rate_limit: Option<RateLimit>,
    /// TLS on this listener.
    pub tls: Option<TlsListener>,
    pub http2: Http2,
}

/// A listener's HTTP/2 settings. h2 is spoken when a TLS client picks it by ALPN (when the
/// listener's `alpn` offers `h2`), or on a plaintext listener with `prior_knowledge` when a
/// connection starts with the h2 preface. Each limit is on something a peer controls.
#[derive(Debug, Clone, Copy)]
pub struct Http2 {
    pub prior_knowledge: bool,
    /// Streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Decoded header list size per request, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// Streams reset by the client before Apex accepted them, at once (rapid reset,
    /// CVE-2023-44487); beyond it: GOAWAY ENHANCE_YOUR_CALM.
    pub max_pending_resets: u32,
    /// Streams Apex resets because of the client's errors, per connection (MadeYouReset,
    /// CVE-2025-8671); beyond it: GOAWAY ENHANCE_YOUR_CALM.
    pub max_resets_sent: u32,
    /// Streams per connection; then GOAWAY, and the client opens a new connection.
    pub max_requests_per_connection: u32,
    /// Frames per second a client may send of the kinds `h2` itself does not bound, and
    /// CONTINUATION frames per header block; beyond: GOAWAY ENHANCE_YOUR_CALM.
    pub floods: crate::http::h2_guard::FloodLimits,
}

/// A TLS listener's settings: certificates (loaded and checked when the config loads), the
/// lowest version, ALPN protocols, the handshake timeout.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub certs: std::sync::Arc<crate::tls::CertStore>,
    pub tls13_only: bool,
    pub alpn: Vec<String>,
    pub handshake_timeout: Duration,
    /// Verifies client certificates (mTLS), when the listener asks for them.
    pub client_auth: Option<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    /// Each certificate's first name and its notAfter (seconds since the epoch), for the
    /// expiry metric.
    pub expiry: Vec<(String, Option<i64>)>,
}

/// A listener's PROXY protocol settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolIn {
    pub v1: bool,
    pub v2: bool,
    /// Sources allowed to send a header; a header from anyone else closes the connection.
    pub trusted: Vec<Cidr>,
    /// A trusted source must send a header (a connection without one is closed).
    pub required: bool,
}

/// A route's response compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    pub encodings: Vec<crate::http::encoding::Encoding>,
    pub gzip_level: u32,
    pub brotli_quality: u32,
    pub min_size: u64,
    /// Lower-case media types; `text/*` matches a whole top-level type.
    pub types: Vec<String>,
}

impl Compression {
    /// Whether a `Content-Type` value names a type this route compresses.
    pub fn compresses(&self, content_type: &[u8]) -> bool {
        let media = content_type.split(|&b| b == b';').next().unwrap_or_default();
        let media = crate::http::fields::trim_ows(media);
        self.types.iter().any(|t| match t.strip_suffix("/*") {
            Some(top) => {
                media.len() > top.len()
                    && media[..top.len()].eq_ignore_ascii_case(top.as_bytes())
                    && media[top.len()] == b'/'
            }
            None => media.eq_ignore_ascii_case(t.as_bytes()),
        })
    }

    pub fn level(&self, e: crate::http::encoding::Encoding) -> u32 {
        match e {
            crate::http::encoding::Encoding::Gzip => self.gzip_level,
            crate::http::encoding::Encoding::Brotli => self.brotli_quality,
        }
    }
}

/// A token bucket: `per_second` tokens refill per second, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// A field value that may use `${client_ip}`, `${request_id}` and `${host}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<TemplatePart>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Text(String),
    ClientIp,
    RequestId,
    Host,
}

/// What a template's variables stand for in one request.
pub struct TemplateVars<'a> {
    pub client_ip: std::net::IpAddr,
    pub request_id: &'a str,
    pub host: &'a str,
}

impl Template {
    pub fn uses_request_id(&self) -> bool {
        self.0.contains(&TemplatePart::RequestId)
    }

    pub fn render(&self, vars: &TemplateVars<'_>) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for part in &self.0 {
            match part {
                TemplatePart::Text(t) => s.push_str(t),
                TemplatePart::ClientIp => {
                    let _ = write!(s, "{}", vars.client_ip);
                }
                TemplatePart::RequestId => s.push_str(vars.request_id),
                TemplatePart::Host => s.push_str(vars.host),
            }
        }
        s
    }
}

/// A route's field edits, with values as templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, Template)>,
    pub add: Vec<(String, Template)>,
}

impl RouteEdits {
    pub fn uses_request_id(&self) -> bool {
        self.set.iter().chain(&self.add).any(|(_, t)| t.uses_request_id())
    }

    /// The edits with values rendered for one request.
    pub fn render(&self, vars: &TemplateVars<'_>) -> crate::http::rewrite::FieldEdits {
        let render = |l: &[(String, Template)]| {
            l.iter().map(|(n, t)| (n.clone(), t.render(vars))).collect::<Vec<_>>()
        };
        crate::http::rewrite::FieldEdits {
            remove: self.remove.clone(),
            set: render(&self.set),
            add: render(&self.add),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The `name` key, or `routes[i]`: the label in metrics and access logs.
    pub name: String,
    pub retry: lb::RetryPolicy,
    /// Lower-case `Upgrade` tokens this route forwards (a `101` then becomes a tunnel).
    pub upgrade: Vec<String>,
    /// A tunnel idle in both directions for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Client networks allowed (empty: everyone) and denied (checked first): others get 403.
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub request_edits: Option<RouteEdits>,
    pub response_edits: Option<RouteEdits>,
    pub path_edit: Option<PathEdit>,
    pub host_rewrite: Option<Template>,
    pub compression: Option<Compression>,
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
    /// Answer with a redirect to the same host, path and query under another scheme.
    Redirect(Redirect),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: &'static str,
    pub status: u16,
    pub port: Option<u16>,
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
    /// The endpoints requests go to: the fixed ones, then those DNS gave (see `discovery`).
    /// Empty only while none of a cluster's names has resolved yet (requests get 503).
    pub endpoints: Vec<SocketAddr>,
    /// One per endpoint, at least 1.
    pub weights: Vec<u32>,
    /// The fixed endpoints (addresses and host names resolved at load) and their weights.
    pub fixed: Vec<(SocketAddr, u32)>,
    /// Endpoints from DNS, resolved by the resolver thread (`crate::discovery`).
    pub discovery: Vec<Discovery>,
    pub policy: lb::Policy,
    pub health_check: Option<lb::HealthCheck>,
    pub outlier: Option<lb::Outlier>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub read_timeout: Duration,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
    /// Send a PROXY protocol v2 header on every upstream connection (such connections carry
    /// one client's address, so they are never pooled).
    pub send_proxy_protocol: bool,
    /// TLS to the endpoints.
    pub tls: Option<UpstreamTls>,
    /// Requests in flight per endpoint on each worker; `None`: no limit.
    pub max_connections: Option<u32>,
    /// Requests a worker lets wait for an endpoint below `max_connections`; more get 503.
    pub max_queue: usize,
    /// How long a request waits in that queue before it gets 503.
    pub queue_timeout: Duration,
    /// Requests an upstream connection carries before it is closed; `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
    /// An endpoint added (by a reload or DNS) or back from unhealthy or ejected ramps its
    /// weight from 10% to 100% over this long; `None`: at once.
    pub slow_start: Option<Duration>,
    /// A response body passing through unchanged with at least 16 KiB still to come moves
    /// from the upstream socket to a plaintext client's by `splice(2)` through a pipe, never
    /// copied through Apex's buffers (default on).
    pub splice: bool,
}

/// How a cluster speaks TLS to its endpoints; each worker builds its own rustls client config
/// from it (its own resumption cache).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// SNI and the name verified; `None`: each endpoint's address.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// `None`: no verification (`verify: false`).
    pub roots: Option<std::sync::Arc<rustls::RootCertStore>>,
    pub client_cert: Option<std::sync::Arc<crate::tls::LoadedCert>>,
}

impl Cluster {
    /// A cluster with every setting at its default.
    pub fn with_defaults(name: &str, endpoints: Vec<SocketAddr>) -> Self {
        Cluster {
            name: name.to_string(),
            weights: vec![1; endpoints.len()],
            fixed: endpoints.iter().map(|&a| (a, 1)).collect(),
            discovery: Vec::new(),
            endpoints,
            policy: lb::Policy::RoundRobin,
            health_check: None,
            outlier: Some(lb::Outlier::default()),
            connect_timeout: defaults::CONNECT_TIMEOUT,
            response_timeout: defaults::RESPONSE_TIMEOUT,
            read_timeout: defaults::READ_TIMEOUT,
            pool_max_idle: defaults::POOL_MAX_IDLE,
            pool_idle_timeout: defaults::POOL_IDLE_TIMEOUT,
            send_proxy_protocol: false,
            tls: None,
            max_connections: None,
            max_queue: defaults::MAX_QUEUE,
            queue_timeout: defaults::QUEUE_TIMEOUT,
            max_requests_per_connection: None,
            slow_start: None,
            splice: true,
        }
    }
}

impl Route {
    /// Whether a client at `ip` may use this route.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        use crate::http::rewrite::any_contains;
        !any_contains(&self.deny, ip) && (self.allow.is_empty() || any_contains(&self.allow, ip))
    }

    /// Whether a request on this route needs a request id for its templates.
    pub fn needs_request_id(&self) -> bool {
        [&self.request_edits, &self.response_edits]
            .iter()
            .any(|e| e.as_ref().is_some_and(|e| e.uses_request_id()))
            || self.host_rewrite.as_ref().is_some_and(|t| t.uses_request_id())
    }

    /// Whether this route forwards an upgrade to `protocol` (an `Upgrade` field value: a
    /// token, optionally `/version`), compared without case.
    pub fn allows_upgrade(&self, protocol: &[u8]) -> bool {
        let name = protocol.split(|&b| b == b'/').next().unwrap_or_default();
        self.upgrade.iter().any(|u| u.as_bytes().eq_ignore_ascii_case(name))
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
            send_timeout: defaults::SEND_TIMEOUT,
            park_after: defaults::PARK_AFTER,
            limits: HeadLimits::default(),
            max_request_body: None,
            proxy_protocol: None,
            trusted_proxies: Vec::new(),
            forwarded: ForwardedStyle::XForwarded,
            request_id: false,
            release_idle_buffer: true,
            max_connections_per_client: None,
            rate_limit: None,
            tls: None,
            http2: defaults::HTTP2,
        }
    }
}
