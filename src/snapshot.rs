//! The immutable per-config snapshot that workers serve from, published through `arc-swap`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::Ring;
use crate::config::lb::Policy;
use crate::config::{Action, Config};
use crate::http::encode_simple_response;
use crate::routing::Router;

/// Everything a worker needs to serve one request that does not change until the next reload.
#[derive(Debug)]
pub struct Snapshot {
    /// Unique per snapshot in this process: what per-worker caches built from a snapshot are
    /// keyed on (an address could be reused by a later snapshot).
    pub generation: u64,
    pub config: Config,
    pub router: Router,
    /// For each route with a `respond` action, its response head and body pre-encoded, in the
    /// two forms a connection needs: staying open, and closing.
    pub direct: Vec<Option<DirectBytes>>,
    /// For each cluster with `policy: consistent_hash`, its hash ring.
    pub rings: Vec<Option<Ring>>,
}

#[derive(Debug)]
pub struct DirectBytes {
    pub keep_alive: Vec<u8>,
    /// For HTTP/1.0 clients that asked for keep-alive: adds `Connection: keep-alive`.
    pub keep_alive_10: Vec<u8>,
    pub close: Vec<u8>,
    /// Length of the body at the end of each form; a HEAD request gets the rest.
    pub body_len: usize,
    pub status: u16,
}

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        let router = Router::new(&config.routes);
        let direct = config
            .routes
            .iter()
            .map(|r| match &r.action {
                Action::Respond(d) => {
                    let enc = |close, ka| {
                        let mut v = Vec::new();
                        encode_simple_response(&mut v, d.status, &d.headers, &d.body, close, ka);
                        v
                    };
                    Some(DirectBytes {
                        keep_alive: enc(false, false),
                        keep_alive_10: enc(false, true),
                        close: enc(true, false),
                        body_len: d.body.len(),
                        status: d.status,
                    })
                }
                Action::Forward(_) | Action::Redirect(_) => None,
            })
            .collect();
        let rings = config
            .clusters
            .iter()
            .map(|c| match c.policy {
                Policy::ConsistentHash(_) => Some(Ring::new(&c.endpoints, &c.weights)),
                _ => None,
            })
            .collect();
        // Written by the control plane once per load, never on the request path.
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        Snapshot { generation, config, router, direct, rings }
    }
}

/// Where the control plane publishes snapshots and workers pick them up.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub fn publish_first(config: Config) -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(Snapshot::new(config)))
}
