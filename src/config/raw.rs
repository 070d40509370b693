//! The config file's serde shape, exactly as an operator writes it; nothing here is validated yet.
//!
//! A typo (`endpionts:`) is an error that names the key instead of a silently ignored setting:
//! the loader collects every key these types do not have (with `serde_ignored`) and reports
//! them with the other problems. The two shapes inside untagged enums deny unknown fields
//! themselves, since an untagged enum hides what it ignores.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub workers: Option<RawWorkers>,
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub worker_connections: Option<i64>,
    #[serde(default)]
    pub drain_timeout: Option<String>,
    #[serde(default)]
    pub admin: Option<String>,
    #[serde(default)]
    pub admin_allow_remote: bool,
    #[serde(default)]
    pub access_log: Option<RawAccessLog>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    /// Name servers for `dns`/`srv` endpoints (`ip:port`); default: /etc/resolv.conf's.
    #[serde(default)]
    pub resolvers: Option<Vec<String>>,
    #[serde(default)]
    pub dns_min_ttl: Option<String>,
    #[serde(default)]
    pub dns_max_ttl: Option<String>,
    /// Per-endpoint metric series only for clusters with at most this many endpoints.
    #[serde(default)]
    pub max_endpoint_series: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawAccessLog {
    pub path: String,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub buffer: Option<RawSize>,
}

/// `"10.0.0.1:80"`, `{ address: "10.0.0.1:80", weight: 3 }`, `{ dns: "api.internal:8080" }`
/// (every A/AAAA address of the name) or `{ srv: "_http._tcp.api.service.consul" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    Plain(String),
    Weighted(RawWeighted),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeighted {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub dns: Option<String>,
    #[serde(default)]
    pub srv: Option<String>,
    #[serde(default)]
    pub weight: Option<i64>,
}

/// `client_address`, or `{ header: NAME }`, or `{ cookie: NAME }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawHashOn {
    Word(String),
    Field(RawHashField),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHashField {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawHealthCheck {
    pub path: String,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub healthy_threshold: Option<i64>,
    #[serde(default)]
    pub unhealthy_threshold: Option<i64>,
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
    /// `fail_open` (default) or `reject`.
    #[serde(default)]
    pub all_unhealthy: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawOutlier {
    /// `false` turns passive ejection off for the cluster.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub consecutive_failures: Option<i64>,
    #[serde(default)]
    pub consecutive_connect_failures: Option<i64>,
    #[serde(default)]
    pub base_ejection: Option<String>,
    #[serde(default)]
    pub max_ejection: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawRetry {
    #[serde(default)]
    pub attempts: Option<i64>,
    #[serde(default)]
    pub on: Option<Vec<RawRetryOn>>,
    #[serde(default)]
    pub budget: Option<f64>,
    #[serde(default)]
    pub min_retries: Option<i64>,
}

/// `connect_failure`, `stale_connection`, or a status (502, 503, 504).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRetryOn {
    Status(u16),
    Word(String),
}

#[derive(Debug, Deserialize)]
pub struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub response: Option<String>,
    #[serde(default)]
    pub read: Option<String>,
}

/// `workers: auto` or `workers: 4`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawWorkers {
    Count(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
pub struct RawListener {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub header_timeout: Option<String>,
    #[serde(default)]
    pub keepalive_timeout: Option<String>,
    #[serde(default)]
    pub body_timeout: Option<String>,
    #[serde(default)]
    pub send_timeout: Option<String>,
    #[serde(default)]
    pub max_request_line: Option<RawSize>,
    #[serde(default)]
    pub max_header_bytes: Option<RawSize>,
    #[serde(default)]
    pub max_header_fields: Option<i64>,
    #[serde(default)]
    pub max_request_body: Option<RawSize>,
    #[serde(default)]
    pub proxy_protocol: Option<RawProxyProtocol>,
    /// Networks whose `X-Forwarded-For`/`Forwarded` is kept and extended.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// `x_forwarded` (default) or `forwarded` (RFC 7239).
    #[serde(default)]
    pub forwarded_headers: Option<String>,
    #[serde(default)]
    pub request_id: Option<bool>,
    /// Between requests a keep-alive connection holds no read buffer (default true).
    #[serde(default)]
    pub release_idle_buffer: Option<bool>,
    /// Idle this long, a keep-alive connection parks in the worker's epoll set (default 1s).
    #[serde(default)]
    pub park_after: Option<String>,
    #[serde(default)]
    pub max_connections_per_client: Option<i64>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// HTTP/2 to clients: `prior_knowledge` (h2c on a plaintext listener), or its settings.
    #[serde(default)]
    pub http2: Option<RawHttp2>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawHttp2 {
    /// `prior_knowledge` or `off`.
    Mode(String),
    Settings(RawHttp2Settings),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHttp2Settings {
    #[serde(default)]
    pub prior_knowledge: Option<bool>,
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
    #[serde(default)]
    pub max_header_list_size: Option<RawSize>,
    #[serde(default)]
    pub max_pending_resets: Option<i64>,
    #[serde(default)]
    pub max_resets_sent: Option<i64>,
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub max_pings_per_second: Option<i64>,
    #[serde(default)]
    pub max_settings_per_second: Option<i64>,
    #[serde(default)]
    pub max_empty_data_per_second: Option<i64>,
    #[serde(default)]
    pub max_window_updates_per_second: Option<i64>,
    #[serde(default)]
    pub max_resets_per_second: Option<i64>,
    #[serde(default)]
    pub max_continuations: Option<i64>,
    #[serde(default)]
    pub max_decoded_header_bytes: Option<RawSize>,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    #[serde(default)]
    pub certificates: Vec<RawCertPair>,
    #[serde(default)]
    pub default_certificate: Option<i64>,
    /// `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    #[serde(default)]
    pub handshake_timeout: Option<String>,
    #[serde(default)]
    pub client_auth: Option<RawClientAuth>,
}

#[derive(Debug, Deserialize)]
pub struct RawClientAuth {
    pub ca: String,
    #[serde(default)]
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawCertPair {
    pub cert: String,
    pub key: String,
    /// A DER OCSP response to staple (listener certificates only), e.g. from `openssl ocsp
    /// -respout`; read again on every reload.
    #[serde(default)]
    pub ocsp: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawProxyProtocol {
    #[serde(default)]
    pub accept: Vec<String>,
    #[serde(default)]
    pub trusted: Vec<String>,
    #[serde(default)]
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawRateLimit {
    pub requests_per_second: f64,
    #[serde(default)]
    pub burst: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawHeaderEdits {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawCompression {
    /// In order of preference: `br`, `gzip`.
    #[serde(default)]
    pub encodings: Option<Vec<String>>,
    #[serde(default)]
    pub gzip_level: Option<i64>,
    #[serde(default)]
    pub brotli_quality: Option<i64>,
    #[serde(default)]
    pub min_size: Option<RawSize>,
    /// Media types compressed (`text/html`, or `text/*`).
    #[serde(default)]
    pub types: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawReplacePrefix {
    pub from: String,
    pub to: String,
}

/// A byte size: `65536`, or a number with a unit, `64KiB`, `8k`, `10MiB`, `1g`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub retry: Option<RawRetry>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    /// Upgrade tokens forwarded (`[websocket]` by default; `[]` refuses every upgrade).
    #[serde(default)]
    pub upgrade: Option<Vec<String>>,
    #[serde(default)]
    pub tunnel_idle_timeout: Option<String>,
    /// Client networks allowed (empty: all) and denied; the rest get 403.
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub request_headers: Option<RawHeaderEdits>,
    #[serde(default)]
    pub response_headers: Option<RawHeaderEdits>,
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub replace_prefix: Option<RawReplacePrefix>,
    #[serde(default)]
    pub host_rewrite: Option<String>,
    #[serde(default)]
    pub compression: Option<RawCompression>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub respond: Option<RawRespond>,
    #[serde(default)]
    pub redirect: Option<RawRedirect>,
}

#[derive(Debug, Deserialize)]
pub struct RawRedirect {
    /// `https` (default) or `http`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// 301 (default), 302, 307 or 308.
    #[serde(default)]
    pub status: Option<u16>,
    /// The port in the new URL; without it the port is left out (the scheme's default).
    #[serde(default)]
    pub port: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMatch {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawRespond {
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Deserialize)]
pub struct RawCluster {
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub hash_on: Option<RawHashOn>,
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub outlier_detection: Option<RawOutlier>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub response_timeout: Option<String>,
    #[serde(default)]
    pub read_timeout: Option<String>,
    #[serde(default)]
    pub pool_max_idle: Option<i64>,
    #[serde(default)]
    pub pool_idle_timeout: Option<String>,
    /// `v2`: send a PROXY protocol v2 header on every upstream connection.
    #[serde(default)]
    pub proxy_protocol: Option<String>,
    #[serde(default)]
    pub tls: Option<RawUpstreamTls>,
    /// Requests in flight per endpoint and worker; more wait in the cluster's queue.
    #[serde(default)]
    pub max_connections: Option<i64>,
    #[serde(default)]
    pub max_queue: Option<i64>,
    #[serde(default)]
    pub queue_timeout: Option<String>,
    /// Requests per upstream connection before it is closed instead of pooled.
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    #[serde(default)]
    pub slow_start: Option<String>,
    /// Large response bodies from this cluster move to plaintext clients by `splice(2)`.
    #[serde(default)]
    pub splice: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawUpstreamTls {
    /// The name to send (SNI) and to verify; default: the endpoint's host name, else its IP.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the CAs that sign the upstreams' certificates (required when verifying).
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub verify: Option<bool>,
    #[serde(default)]
    pub client_cert: Option<RawCertPair>,
}
