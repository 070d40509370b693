//! Every default of the config file in one place, shared by the file, `apex proxy` and the
//! README's table: change a default here and nowhere else.

use std::time::Duration;

use super::lb::RetryOn;

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
/// A keep-alive client connection idle this long is parked: it gives up its task and waits in
/// the worker's epoll set (`src/proxy/park.rs`). A busy connection's next request comes
/// within milliseconds, so it never parks; an idle one costs about 0.1 KiB instead of 0.7.
pub const PARK_AFTER: Duration = Duration::from_secs(1);
/// Between two reads of a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one write to a client may wait for the client to take bytes (nginx's `send_timeout`
/// default): a client that stops reading does not hold its connection and upstream forever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Open client connections per worker; at the cap a worker stops accepting until one closes.
pub const WORKER_CONNECTIONS: usize = 10_000;
/// After SIGTERM/SIGINT, in-flight requests get this long before the process exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// With `max_connections`: requests per cluster and worker that may wait for a free endpoint,
/// and for how long (HAProxy's `timeout queue` defaults to the connect timeout; so does this).
pub const MAX_QUEUE: usize = 128;
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-endpoint metric series (requests, errors, latency histogram: 17 series each) stop above
/// this many endpoints in a cluster; a large DNS-discovered cluster then has cluster totals only.
pub const MAX_ENDPOINT_SERIES: usize = 100;
/// DNS endpoints: a record's TTL is raised to `DNS_MIN_TTL` (Consul answers with TTL 0; this
/// keeps it at one query per name every 5 s, Envoy's refresh rate) and lowered to
/// `DNS_MAX_TTL` (a removed endpoint keeps traffic at most this long).
pub const DNS_MIN_TTL: Duration = Duration::from_secs(5);
pub const DNS_MAX_TTL: Duration = Duration::from_secs(60);
/// Health checks: probe every endpoint this often, give each probe this long.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive probe results that flip an endpoint's verdict.
pub const HEALTHY_THRESHOLD: u32 = 2;
pub const UNHEALTHY_THRESHOLD: u32 = 2;

/// Passive outlier ejection is on unless a cluster turns it off. One connect failure ejects
/// (nginx's `max_fails=1 fail_timeout=10s`: nothing reached the endpoint, so trying it again
/// at once only adds a failed attempt); 5xx answers need five in a row, since one failing
/// request says little about the endpoint.
pub const OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
pub const OUTLIER_CONSECUTIVE_CONNECT_FAILURES: u32 = 1;
pub const OUTLIER_BASE_EJECTION: Duration = Duration::from_secs(10);
pub const OUTLIER_MAX_EJECTION: Duration = Duration::from_secs(300);
pub const OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;

/// Every route retries unless told otherwise: a failed connect on another endpoint (nothing
/// was sent, so any method) and a stale pooled connection once (replayable requests only).
pub const RETRY_ATTEMPTS: u32 = 2;
pub const RETRY_ON: [RetryOn; 2] = [RetryOn::ConnectFailure, RetryOn::StaleConnection];
/// Retries after a request was sent are at most this fraction of the route's recent requests.
pub const RETRY_BUDGET: f64 = 0.2;
/// Retries always allowed per 10 s window, however little traffic there was.
pub const RETRY_MIN_RETRIES: u32 = 3;

/// Bytes of access-log lines that may wait for the writer thread; beyond this, lines are
/// dropped and counted (`apex_access_log_dropped_total`) instead of blocking a worker.
pub const ACCESS_LOG_BUFFER: u64 = 1 << 20;

/// Upgrades a route forwards when it does not say: WebSocket only (an `h2c` upgrade, say, is
/// refused unless a route allows it).
pub const UPGRADE: [&str; 1] = ["websocket"];
/// A tunnel (after a `101 Switching Protocols`) with no byte in either direction for this long
/// is closed.
pub const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Compression (off unless a route has a `compression` block): encodings in order of
/// preference, levels, the smallest body worth it, and the media types compressed.
pub const COMPRESSION_ENCODINGS: [crate::http::encoding::Encoding; 2] =
    [crate::http::encoding::Encoding::Brotli, crate::http::encoding::Encoding::Gzip];
pub const GZIP_LEVEL: u32 = 6;
pub const BROTLI_QUALITY: u32 = 4;
/// Bodies shorter than this (when their length is known) are sent as they are: the encoding's
/// overhead would eat the gain.
pub const COMPRESSION_MIN_SIZE: u64 = 256;
pub const COMPRESSION_TYPES: [&str; 10] = [
    "text/html",
    "text/css",
    "text/plain",
    "text/xml",
    "text/javascript",
    "application/javascript",
    "application/json",
    "application/xml",
    "application/wasm",
    "image/svg+xml",
];

/// A TLS client must finish its handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 limits (per connection): 100 concurrent streams (nginx's and RFC 9113's suggested floor); a header
/// list as large as an HTTP/1.1 head may be (64 KiB); 20 streams reset before they were
/// accepted (h2's own default); 500 streams reset by Apex per connection (Sōzu's cap for
/// MadeYouReset); 10,000 streams per connection (nginx's keepalive_requests is 1,000 for
/// HTTP/1.1; a stream costs far less than a connection).
pub const HTTP2: crate::config::Http2 = crate::config::Http2 {
    prior_knowledge: false,
    max_concurrent_streams: 100,
    max_header_list_size: 64 * 1024,
    max_pending_resets: 20,
    max_resets_sent: 500,
    max_requests_per_connection: 10_000,
    // Sōzu's caps: 100 PINGs, 50 SETTINGS, 100 empty DATA frames, 100 RST_STREAMs and 20
    // CONTINUATIONs per header block; stream-0 WINDOW_UPDATE at 1,000 a second, because a
    // client with a small connection window sends one per 64 KiB it reads.
    floods: crate::http::h2_guard::FloodLimits {
        pings: 100,
        settings: 50,
        empty_data: 100,
        window_updates: 1000,
        resets: 100,
        continuations: 20,
        // A thousand header lists at the 64 KiB cap: far beyond what browsers send on one
        // connection, while an HPACK bomb (one byte on the wire per indexed field) stops here.
        decoded_header_bytes: 64 * 1024 * 1024,
    },
};
