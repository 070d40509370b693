//! What can be wrong with a config: a typed problem, located by file, line and key path.

use std::fmt;
use std::net::SocketAddr;

use crate::http::MAX_FIELDS_CAP;

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
    /// YAML syntax or shape error (wrong type, missing key), as the parser words it.
    Syntax(String),
    /// A key the config does not have; the nearest known key, when one is close.
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },
    /// A warning, not an error: no route sends requests to this cluster.
    UnusedCluster(String),
    NoListeners,
    BadAddress(String),
    DuplicateName(String),
    BadDuration(String),
    ZeroDuration,
    BadWorkers,
    BadRuntime(String),
    NoEndpoints,
    BadEndpoint(String),
    /// An endpoint map must have exactly one of `address`, `dns` and `srv`.
    EndpointSource,
    BadDnsName(String),
    /// A weight on an `srv` endpoint: SRV records carry their own.
    SrvWeight,
    /// `dns_min_ttl` above `dns_max_ttl`.
    TtlBounds,
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
    BadUpgrade(String),
    BadNetwork(String),
    BadProxyVersion(String),
    NoTrustedSources,
    BadForwardedStyle(String),
    BadRate,
    ManagedField(String),
    BadVariable(String),
    StripAndReplace,
    BadEncoding(String),
    BadCertificate(String),
    /// `ocsp` on an upstream client certificate, which nothing staples.
    OcspOnClientCert,
    BadTlsVersion(String),
    BadAlpn(String),
    BadHttp2(String),
    NoCertificates,
    BadIndex,
    BadScheme(String),
    NeedsCa,
    /// A warning: the certificate's validity has ended.
    ExpiredCertificate(String),
    BadRedirectStatus(u16),
    BadMediaType(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            Problem::Syntax(e) => write!(f, "{e}"),
            Problem::UnknownKey { key, suggestion: Some(s) } => {
                write!(f, "unknown key `{key}`; did you mean `{s}`?")
            }
            Problem::UnknownKey { key, suggestion: None } => write!(f, "unknown key `{key}`"),
            Problem::UnusedCluster(c) => write!(f, "no route uses cluster `{c}`"),
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
            Problem::EndpointSource => {
                write!(f, "an endpoint needs exactly one of `address`, `dns` and `srv`")
            }
            Problem::BadDnsName(n) => write!(f, "`{n}` is not a DNS name (with `:port` for `dns`)"),
            Problem::SrvWeight => write!(f, "SRV records carry their own weights; remove `weight`"),
            Problem::TtlBounds => write!(f, "`dns_min_ttl` is above `dns_max_ttl`"),
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
            Problem::NoAction => write!(f, "a route needs `cluster`, `respond` or `redirect`"),
            Problem::TwoActions => {
                write!(f, "a route takes one of `cluster`, `respond` and `redirect`")
            }
            Problem::PathAndPrefix => write!(f, "use `path` or `path_prefix`, not both"),
            Problem::BadPath(p) => write!(f, "`{p}` must start with `/` and hold no spaces"),
            Problem::BadHost(h) => {
                write!(f, "`{h}` is not a host name (exact, or `*.suffix`), without port or spaces")
            }
            Problem::BadMethod(m) => write!(f, "`{m}` is not an HTTP method token"),
            Problem::BadStatus(s) => write!(f, "status {s} is not between 200 and 599"),
            Problem::BadHeader(h) => write!(f, "`{h}` is not a valid header name or value"),
            Problem::BadNetwork(n) => {
                write!(f, "`{n}` is not a network: write an address or address/prefix, e.g. 10.0.0.0/8")
            }
            Problem::BadProxyVersion(v) => write!(f, "unknown PROXY protocol version `{v}`: use v1 or v2"),
            Problem::NoTrustedSources => write!(
                f,
                "list the networks allowed to send PROXY headers (an empty list would trust nobody)"
            ),
            Problem::BadForwardedStyle(s) => {
                write!(f, "unknown `{s}`: use x_forwarded or forwarded")
            }
            Problem::BadRate => write!(f, "must be a number of requests per second above 0"),
            Problem::ManagedField(n) => write!(
                f,
                "`{n}` cannot be rewritten: it is not a field name, or it is hop-by-hop or framing, which Apex manages (use host_rewrite for Host)"
            ),
            Problem::BadVariable(v) => write!(
                f,
                "unknown variable `{v}`: use ${{client_ip}}, ${{request_id}} or ${{host}}"
            ),
            Problem::BadCertificate(e) => write!(f, "{e}"),
            Problem::OcspOnClientCert => {
                write!(f, "only a listener's certificates staple an OCSP response")
            }
            Problem::BadTlsVersion(v) => write!(f, "unknown TLS version `{v}`: use \"1.2\" or \"1.3\""),
            Problem::BadAlpn(p) => {
                write!(f, "ALPN protocol `{p}` is not served (use h2 and/or http/1.1)")
            }
            Problem::BadHttp2(m) => {
                write!(f, "`{m}` is not an http2 mode (prior_knowledge, off, or a map of settings)")
            }
            Problem::NoCertificates => write!(f, "a TLS listener needs at least one certificate"),
            Problem::ExpiredCertificate(c) => write!(f, "the certificate in {c} has expired"),
            Problem::NeedsCa => write!(
                f,
                "verifying upstream certificates needs `ca` (a PEM file of CAs; no system roots are loaded), or `verify: false`"
            ),
            Problem::BadScheme(x) => write!(f, "unknown scheme `{x}`: use https or http"),
            Problem::BadRedirectStatus(x) => write!(f, "{x} is not a redirect status: use 301, 302, 307 or 308"),
            Problem::BadIndex => write!(f, "no certificate has this index"),
            Problem::BadEncoding(e) => write!(f, "`{e}` is not an encoding Apex produces (br, gzip), or is listed twice"),
            Problem::BadMediaType(t) => write!(f, "`{t}` is not a media type like text/html or text/*"),
            Problem::StripAndReplace => write!(f, "use strip_prefix or replace_prefix, not both"),
            Problem::BadUpgrade(u) => write!(f, "`{u}` is not an upgrade token (e.g. websocket)"),
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
