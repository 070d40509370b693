//! Apex: a thread-per-core HTTP/1.1 reverse proxy and load balancer on io_uring.
//!
//! The sans-IO core (`http`, `routing`, `balance`, `config`, `snapshot`) imports no runtime;
//! `proxy` is the request's journey written against the `proxy::io` seam; `runtime` holds the
//! worker threads and the three runtime adapters (monoio on io_uring, monoio on epoll, and the
//! Tokio build).

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod health;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod log_writer;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod routing;
pub mod runtime;
pub mod snapshot;
pub mod stats;
pub mod status;
pub mod timefmt;
pub mod tls;
pub mod upgrade;
