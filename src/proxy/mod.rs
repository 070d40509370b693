//! The proxy loop shared by every runtime: a worker's state and the journey of a request.
//!
//! Nothing here imports a runtime; `io::Runtime` is the seam. A worker's state is `!Send` on
//! purpose (`Rc`, `RefCell`, `Cell`): it lives on one pinned thread and is never locked.

pub mod buffers;
pub mod conn;
pub mod downstream;
pub mod error;
pub mod failure_log;
pub mod forward;
pub mod http2;
pub mod io;
pub mod isolate;
pub mod limits;
pub mod park;
pub mod poll_io;
pub mod pool;
pub mod relay;
pub mod request;
pub mod retry;
pub mod splice;
pub mod transport;
pub mod tunnel;
pub mod wait;
pub mod worker_tasks;

use std::cell::{Cell, RefCell};
use std::fmt::Display;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use arc_swap::cache::Cache;

use crate::access_log::WorkerLog;
use crate::balance::{hash64, Balancer};
use crate::config::{Action, Listener};
use crate::health::{HealthMap, SharedHealth};
use crate::http::HeadLimits;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::stats::{ClusterStats, RouteStats, WorkerStats};
use io::Runtime;
use pool::Pool;
use request::{Buffers, RequestInfo, Target};
use wait::{Event, WakeList};

/// One forwarded request's context, borrowed for its whole journey through `forward` and
/// `relay`: the worker and view it is served from, its listener, where it goes, what its head
/// said, the client connection and the connection's buffers.
pub struct Forward<'a, R: Runtime> {
    pub worker: &'a Worker<R>,
    pub view: &'a WorkerView,
    pub listener: &'a Listener,
    pub target: Target,
    pub info: &'a RequestInfo,
    pub client: &'a mut transport::Transport<R::Stream>,
    /// The client's address (the PROXY protocol's when the listener takes it).
    pub client_addr: SocketAddr,
    pub bufs: &'a mut Buffers,
    /// After a `101`: the upstream connection that becomes a tunnel with the client.
    pub tunnel: Option<transport::Transport<R::Stream>>,
    /// Requests the current upstream connection has carried, this one included.
    pub upstream_uses: u32,
}

/// What one worker serves from: the snapshot plus this worker's own per-snapshot state.
pub struct WorkerView {
    pub snap: Arc<Snapshot>,
    /// One per cluster of `snap`.
    pub balancers: Vec<Balancer>,
    /// The snapshot's listener settings, shared by the connections accepted under it.
    pub listeners: Vec<Rc<crate::config::Listener>>,
    /// Counters per route of `snap` (by index), per cluster, and for requests no route took.
    pub route_stats: Vec<Rc<RouteStats>>,
    pub cluster_stats: Vec<Rc<ClusterStats>>,
    pub unrouted: Rc<RouteStats>,
    /// One per route of `snap`.
    /// Shared with the previous view for routes of the same name, so that neither a reload
    /// nor a DNS change (a new snapshot every few seconds, perhaps) resets a retry budget.
    pub retry_budgets: Vec<Rc<retry::RetryBudget>>,
    /// This worker's own TLS server config per TLS listener, by listener name: its own
    /// session cache, so no handshake writes memory another worker reads.
    pub tls: Vec<(String, Arc<rustls::ServerConfig>)>,
    /// This worker's own TLS client config per cluster of `snap` that speaks TLS upstream (its
    /// own resumption cache).
    pub upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
}

impl WorkerView {
    pub fn listener(&self, name: &str) -> Option<Rc<crate::config::Listener>> {
        self.listeners.iter().find(|l| l.name == name).cloned()
    }

    /// This worker's TLS config for a listener.
    pub fn tls_config(&self, listener: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.iter().find(|(n, _)| n == listener).map(|(_, c)| Arc::clone(c))
    }
}

/// One worker thread's state.
pub struct Worker<R: Runtime> {
    pub id: usize,
    /// Seeds this worker's random balancing choices (different per worker and per process).
    seed: u64,
    /// Reads the published snapshot with one atomic load and no write while it is unchanged.
    snapshots: RefCell<Cache<SharedSnapshot, Arc<Snapshot>>>,
    view: RefCell<Rc<WorkerView>>,
    pub pool: Pool<transport::Transport<R::Stream>>,
    /// Limits on upstream response heads (request limits are per listener).
    pub response_limits: HeadLimits,
    /// Open client connections on this worker.
    open: Cell<usize>,
    /// Fired once on SIGTERM/SIGINT: stop accepting, close idle connections.
    pub drain: Event,
    /// Tasks waiting for a client connection to close.
    pub closed: WakeList,
    pub stats: WorkerStats,
    /// Deadlines of connections waiting for their next request (brought forward by the drain).
    pub idle: wait::IdleTimers,
    /// Deadlines of requests in progress (response, body reads, connects); never cut short by
    /// the drain, whose in-flight requests must finish.
    pub deadlines: wait::IdleTimers,
    /// Keep-alive connections idle past their listener's `park_after`, holding no task.
    pub parked: park::Parked<ParkedConn<R>>,
    /// `None` when the access log is off.
    pub access: Option<WorkerLog>,
    /// Large buffers lent to connections for the length of a request.
    pub buffers: buffers::BufferPool,
    /// gzip compressors, reset, for the next compressed response.
    pub compressors: buffers::CompressorPool,
    /// Pipes lent to responses whose bodies are spliced.
    pub pipes: splice::Pipes,
    /// The health checker's verdicts, read like the config snapshot: no write while unchanged.
    health: RefCell<Cache<SharedHealth, Arc<HealthMap>>>,
    /// Verdicts per cluster of the current view, keyed by the generations of the health map
    /// and the snapshot they were built from, rebuilt when either changes.
    health_view: RefCell<Option<(Generations, Rc<HealthView>)>>,
    /// Upstream failures logged at most once a second per upstream and reason.
    pub failures: failure_log::FailureLog,
    /// Worker threads in the process: each enforces its share of per-client limits.
    pub workers: usize,
    pub limits: Rc<limits::ClientLimits>,
    /// Request ids made on this worker so far (the id is the worker's seed and this count).
    ids: Cell<u64>,
    /// TLS session-ticket keys, published by the control plane.
    tickets: crate::tls::SharedTicketKeys,
}

/// How long an idle client connection may still send one request once the drain started.
/// Clients that keep a connection busy send their next request within microseconds; the
/// grace covers them with room to spare, and bounds how long idle connections delay an exit.
pub const DRAIN_IDLE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Both absent, or both the very same allocation (settings a DNS-only snapshot shares with the
/// one before; a reload loads them again).
fn same_arc<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// The generations of a health map and of a snapshot.
type Generations = (u64, u64);

/// Per cluster index of a view: each endpoint's active-health verdict (`None`: no health check).
pub type HealthView = Vec<Option<Vec<bool>>>;

/// Counts one open client connection; dropping it (when the connection ends) wakes whoever
/// waits for a free slot.
pub struct ConnGuard<R: Runtime> {
    worker: Rc<Worker<R>>,
}

/// What a parked connection keeps besides its socket: what serving it again needs, and its
/// places in the worker's connection count and the per-client limit (80 bytes with the
/// socket and deadline the table adds).
pub struct ParkedConn<R: Runtime> {
    /// The client's address (the PROXY protocol's, when the listener takes it).
    pub peer: SocketAddr,
    pub listener: Rc<Listener>,
    pub slot: Option<Box<limits::ClientConn>>,
    pub guard: ConnGuard<R>,
}

impl<R: Runtime> Drop for ConnGuard<R> {
    fn drop(&mut self) {
        self.worker.open.set(self.worker.open.get() - 1);
        self.worker.closed.wake_all();
    }
}

impl<R: Runtime> Worker<R> {
    pub fn new(
        id: usize,
        workers: usize,
        shared: SharedSnapshot,
        access: Option<WorkerLog>,
        health: SharedHealth,
        tickets: crate::tls::SharedTicketKeys,
    ) -> Self {
        let mut cache = Cache::new(shared);
        let snap = Arc::clone(cache.load());
        let stats = WorkerStats::default();
        let seed = hash64((id, std::process::id(), std::time::SystemTime::now()));
        let view = Rc::new(Self::make_view(id, seed, snap, &stats, None, &tickets));
        Worker {
            id,
            seed,
            snapshots: RefCell::new(cache),
            view: RefCell::new(view),
            pool: Pool::default(),
            response_limits: HeadLimits::default(),
            open: Cell::new(0),
            drain: Event::default(),
            closed: WakeList::default(),
            stats,
            idle: wait::IdleTimers::default(),
            deadlines: wait::IdleTimers::default(),
            parked: park::Parked::new(),
            access,
            buffers: buffers::BufferPool::default(),
            compressors: buffers::CompressorPool::default(),
            pipes: splice::Pipes::default(),
            health: RefCell::new(Cache::new(health)),
            health_view: RefCell::new(None),
            failures: failure_log::FailureLog::default(),
            workers,
            limits: Rc::default(),
            ids: Cell::new(0),
            tickets,
        }
    }

    /// A new request id: unique per worker and process (the worker's seed, then a count), 32
    /// hex digits. Not a secret: it only has to tell requests apart in logs.
    pub fn new_request_id(&self) -> String {
        let n = self.ids.get() + 1;
        self.ids.set(n);
        format!("{:016x}{n:016x}", self.seed)
    }

    /// Logs an upstream failure, at most once a second per upstream and reason on this
    /// worker; the rest are counted and reported by the housekeeping tick.
    pub fn failure(&self, upstream: SocketAddr, reason: &'static str, detail: &dyn Display) {
        if self.failures.admit(upstream, reason, crate::clock::now()) {
            tracing::warn!(upstream = %upstream, reason, detail = %detail, "upstream request failed");
        }
    }

    /// The active health verdicts for `view`'s clusters.
    pub fn health(&self, view: &WorkerView) -> Rc<HealthView> {
        let mut cache = self.health.borrow_mut();
        let map = cache.load();
        // Generations, not addresses: a new map or snapshot may be allocated where a freed one
        // was, and must not be mistaken for it.
        let key = (map.generation, view.snap.generation);
        let mut hv = self.health_view.borrow_mut();
        if let Some((k, v)) = hv.as_ref() {
            if *k == key {
                return Rc::clone(v);
            }
        }
        let built: HealthView = view
            .snap
            .config
            .clusters
            .iter()
            .map(|c| {
                c.health_check.as_ref()?;
                let verdicts = map.clusters.get(&c.name);
                Some(
                    c.endpoints
                        .iter()
                        .map(|a| verdicts.and_then(|v| v.get(a)).copied().unwrap_or(true))
                        .collect(),
                )
            })
            .collect();
        let v = Rc::new(built);
        *hv = Some((key, Rc::clone(&v)));
        v
    }

    /// A copy of this worker's counters, for a scrape.
    pub fn report(&self) -> crate::stats::StatsReport {
        let mut r = self.stats.report(self.open_connections(), self.pool.idle_count());
        r.parked_connections = self.parked.len();
        r.access_log_dropped = self.access.as_ref().map_or(0, |l| l.dropped());
        let view = self.view.borrow();
        for (c, b) in view.snap.config.clusters.iter().zip(&view.balancers) {
            if c.max_connections.is_some() {
                r.queue_depth.insert(c.name.clone(), b.queued() as u64);
            }
            // The cardinality guard: a cluster over the limit has cluster totals only.
            if b.addrs().len() > view.snap.config.max_endpoint_series {
                continue;
            }
            for (i, addr) in b.addrs().iter().enumerate() {
                let key = (c.name.clone(), addr.to_string());
                r.ejected.insert(key.clone(), u64::from(b.is_ejected(i)));
                r.endpoints.insert(key, b.totals(i));
            }
        }
        r
    }

    /// Registers a newly accepted client connection.
    pub fn connection_opened(self: &Rc<Self>) -> ConnGuard<R> {
        self.open.set(self.open.get() + 1);
        ConnGuard { worker: Rc::clone(self) }
    }

    /// Open client connections on this worker.
    pub fn open_connections(&self) -> usize {
        self.open.get()
    }

    /// The bound on each write to a client of `listener` (its `send_timeout`).
    pub fn send_bound(&self, listener: &Listener) -> wait::SendBound<'_> {
        wait::SendBound {
            timers: &self.deadlines,
            limit: listener.send_timeout,
            timeouts: &self.stats.send_timeouts,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_fired()
    }

    /// Begins the graceful drain: accept loops stop, idle connections close, and responses in
    /// flight go out with `Connection: close`.
    pub fn start_drain(&self) {
        // An idle keep-alive connection may have its next request on the wire right now:
        // closing it at once would lose that request (or reset the connection, when the
        // request is already in our receive buffer). So idle connections get a short grace in
        // which a request is still answered (with `Connection: close`); then they close.
        self.idle.cut_off(crate::clock::now() + DRAIN_IDLE_GRACE);
        self.drain.fire();
        // Accept loops parked at the connection cap wait on `closed`.
        self.closed.wake_all();
    }

    /// Builds this worker's view of `snap`. Balancers of clusters `previous` also had (by
    /// name) share their endpoints' state, so a reload keeps ejections and in-flight counts.
    fn make_view(
        id: usize,
        seed: u64,
        snap: Arc<Snapshot>,
        stats: &WorkerStats,
        previous: Option<&WorkerView>,
        tickets: &crate::tls::SharedTicketKeys,
    ) -> WorkerView {
        let config = &snap.config;
        let balancers = config
            .clusters
            .iter()
            .map(|c| {
                let before = previous.and_then(|p| {
                    let i = p.snap.config.clusters.iter().position(|o| o.name == c.name)?;
                    Some(&p.balancers[i])
                });
                Balancer::new(c, id, seed ^ hash64(&c.name), before)
            })
            .collect();
        let listeners = config.listeners.iter().cloned().map(Rc::new).collect();
        let route_stats = config
            .routes
            .iter()
            .map(|r| {
                let cluster = match r.action {
                    Action::Forward(c) => config.clusters[c].name.as_str(),
                    Action::Respond(_) | Action::Redirect(_) => "",
                };
                stats.route(&r.name, cluster)
            })
            .collect();
        let cluster_stats = config.clusters.iter().map(|c| stats.cluster(&c.name)).collect();
        let unrouted = stats.route("", "");
        let retry_budgets = config
            .routes
            .iter()
            .map(|r| {
                previous
                    .and_then(|p| {
                        let i = p.snap.config.routes.iter().position(|o| o.name == r.name)?;
                        Some(Rc::clone(&p.retry_budgets[i]))
                    })
                    .unwrap_or_default()
            })
            .collect();
        let tls = config
            .listeners
            .iter()
            .filter_map(|l| {
                let t = l.tls.as_ref()?;
                // The same settings as the previous view (a snapshot that only DNS changed
                // shares them): keep its config, and with it its session cache.
                let kept = previous.and_then(|p| {
                    let before = p.snap.config.listeners.iter().find(|o| o.name == l.name)?;
                    let b = before.tls.as_ref()?;
                    let same = std::sync::Arc::ptr_eq(&b.certs, &t.certs)
                        && b.tls13_only == t.tls13_only
                        && b.alpn == t.alpn
                        && same_arc(&b.client_auth, &t.client_auth);
                    same.then(|| p.tls_config(&l.name)).flatten()
                });
                if let Some(c) = kept {
                    return Some((l.name.clone(), c));
                }
                let auth = t.client_auth.clone();
                match crate::tls::server_config(Arc::clone(&t.certs), t.tls13_only, &t.alpn, tickets, auth) {
                    Ok(c) => Some((l.name.clone(), c)),
                    Err(e) => {
                        tracing::error!(listener = %l.name, error = %e, "cannot build the TLS config");
                        None
                    }
                }
            })
            .collect();
        let upstream_tls = config
            .clusters
            .iter()
            .map(|c| {
                let t = c.tls.as_ref()?;
                // Unchanged since the previous view: keep its config and resumption cache.
                let kept = previous.and_then(|p| {
                    let i = p.snap.config.clusters.iter().position(|o| o.name == c.name)?;
                    let b = p.snap.config.clusters[i].tls.as_ref()?;
                    let same = b.server_name == t.server_name
                        && same_arc(&b.roots, &t.roots)
                        && same_arc(&b.client_cert, &t.client_cert);
                    same.then(|| p.upstream_tls[i].clone()).flatten()
                });
                if kept.is_some() {
                    return kept;
                }
                crate::tls::client_config(t)
                    .map_err(|e| tracing::error!(cluster = %c.name, error = %e, "cannot build the upstream TLS config"))
                    .ok()
            })
            .collect();
        WorkerView {
            upstream_tls,
            snap,
            balancers,
            listeners,
            route_stats,
            cluster_stats,
            unrouted,
            retry_budgets,
            tls,
        }
    }

    /// The view to serve the next request from; a request keeps its view until it ends, so a
    /// reload never changes the rules under a request in flight.
    pub fn view(&self) -> Rc<WorkerView> {
        let mut cache = self.snapshots.borrow_mut();
        let latest = cache.load();
        let mut view = self.view.borrow_mut();
        if !Arc::ptr_eq(latest, &view.snap) {
            let next = Self::make_view(
                self.id,
                self.seed,
                Arc::clone(latest),
                &self.stats,
                Some(&view),
                &self.tickets,
            );
            *view = Rc::new(next);
        }
        Rc::clone(&view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::tokio::Tokio;
    use arc_swap::ArcSwap;
    use std::collections::HashMap;

    fn snapshot(clusters: &[(&str, &[&str])]) -> Arc<Snapshot> {
        let mut yaml =
            String::from("listeners: [ { name: l, address: \"127.0.0.1:1\" } ]\nroutes:\n");
        for (name, _) in clusters {
            yaml += &format!("  - {{ match: {{ host: {name}.test }}, cluster: {name} }}\n");
        }
        yaml += "clusters:\n";
        for (name, eps) in clusters {
            let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
            yaml += &format!(
                "  - {{ name: {name}, endpoints: [{}], health_check: {{ path: /h }} }}\n",
                eps.join(", ")
            );
        }
        Arc::new(Snapshot::new(Config::from_yaml(&yaml, "t.yaml").unwrap()))
    }

    /// Reloads free old snapshots, and the allocator hands their memory to new ones: the
    /// worker's health view must follow the snapshot it serves, never an address. (Keyed on
    /// addresses, this fails: the allocator does reuse the freed snapshot's memory.)
    #[test]
    fn the_health_view_follows_reloads_even_when_memory_is_reused() {
        let shared = Arc::new(ArcSwap::new(snapshot(&[("a", &["127.0.0.1:10"])])));
        let mut verdicts = HealthMap { generation: 1, ..HealthMap::default() };
        let down: HashMap<_, _> = [("127.0.0.1:10".parse().unwrap(), false)].into();
        verdicts.clusters.insert("a".into(), down);
        let health = Arc::new(ArcSwap::from_pointee(verdicts));
        let tickets = Arc::new(ArcSwap::from_pointee(crate::tls::TicketKeys::generate()));
        let worker = Worker::<Tokio>::new(0, 1, Arc::clone(&shared), None, health, tickets);
        let view = worker.view();
        assert_eq!(*worker.health(&view), vec![Some(vec![false])]);
        drop(view);
        for round in 0..50 {
            // Two reloads: the first frees the snapshot above, the second may reuse its memory.
            shared.store(snapshot(&[]));
            drop(worker.view());
            shared.store(snapshot(&[("b", &["127.0.0.1:20", "127.0.0.1:21"])]));
            let view = worker.view();
            assert_eq!(*worker.health(&view), vec![Some(vec![true, true])], "round {round}");
            drop(view);
            shared.store(snapshot(&[("a", &["127.0.0.1:10"])]));
            let view = worker.view();
            assert_eq!(*worker.health(&view), vec![Some(vec![false])], "round {round}");
        }
    }

    /// A snapshot that only DNS changed shares the TLS settings of the one before: each worker
    /// keeps its TLS configs (and their session caches); a reload that reads the certificates
    /// again builds new ones.
    #[test]
    fn tls_configs_survive_a_dns_change_not_a_reload() {
        let dir = std::env::temp_dir().join(format!("apex-tls-view-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        let yaml = format!(
            "listeners: [ {{ name: l, address: \"127.0.0.1:1\", tls: {{ certificates: [ {{ cert: {}, key: {} }} ] }} }} ]\nroutes: [ {{ match: {{ path_prefix: / }}, cluster: c }} ]\nclusters: [ {{ name: c, endpoints: [ \"127.0.0.1:2\", {{ dns: \"api.test:80\" }} ] }} ]\n",
            dir.join("c.pem").display(),
            dir.join("k.pem").display()
        );
        let config = Config::from_yaml(&yaml, "t.yaml").unwrap();
        let shared = Arc::new(ArcSwap::new(Arc::new(Snapshot::new(config.clone()))));
        let health = Arc::new(ArcSwap::from_pointee(HealthMap::default()));
        let tickets = Arc::new(ArcSwap::from_pointee(crate::tls::TicketKeys::generate()));
        let worker = Worker::<Tokio>::new(0, 1, Arc::clone(&shared), None, health, tickets);
        let before = worker.view().tls_config("l").unwrap();
        // DNS gave the name an address: the same config, recomposed.
        let mut dns = crate::discovery::DnsMap::default();
        let state = crate::discovery::NameState {
            endpoints: vec![("10.0.0.1:0".parse().unwrap(), 1)],
            resolved: true,
            ..Default::default()
        };
        dns.names.insert(crate::discovery::NameKey::Host("api.test".into()), state);
        shared.store(Arc::new(Snapshot::new(crate::discovery::compose(config, &dns))));
        let view = worker.view();
        assert_eq!(view.snap.config.clusters[0].endpoints.len(), 2, "the new endpoint is in");
        assert!(Arc::ptr_eq(&before, &view.tls_config("l").unwrap()), "kept across DNS");
        drop(view);
        shared.store(Arc::new(Snapshot::new(Config::from_yaml(&yaml, "t.yaml").unwrap())));
        assert!(
            !Arc::ptr_eq(&before, &worker.view().tls_config("l").unwrap()),
            "rebuilt on reload"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_route_keeps_its_retry_budget_across_new_snapshots() {
        let shared = Arc::new(ArcSwap::new(snapshot(&[("a", &["127.0.0.1:10"])])));
        let health = Arc::new(ArcSwap::from_pointee(HealthMap::default()));
        let tickets = Arc::new(ArcSwap::from_pointee(crate::tls::TicketKeys::generate()));
        let worker = Worker::<Tokio>::new(0, 1, Arc::clone(&shared), None, health, tickets);
        let before = Rc::clone(&worker.view().retry_budgets[0]);
        shared.store(snapshot(&[("a", &["127.0.0.1:10", "127.0.0.1:11"])]));
        assert!(Rc::ptr_eq(&before, &worker.view().retry_budgets[0]), "same route: same budget");
        shared.store(snapshot(&[("b", &["127.0.0.1:10"])]));
        // The route is named after its index, so the one route of a new cluster is the "same"
        // route; a route of a new name starts afresh.
        let renamed = Config::from_yaml(
            "listeners: [ { name: l, address: \"127.0.0.1:1\" } ]\nroutes: [ { name: other, match: { path_prefix: / }, cluster: a } ]\nclusters: [ { name: a, endpoints: [ \"127.0.0.1:10\" ] } ]\n",
            "t.yaml",
        )
        .unwrap();
        shared.store(Arc::new(Snapshot::new(renamed)));
        assert!(!Rc::ptr_eq(&before, &worker.view().retry_budgets[0]), "a new route: a new budget");
    }
}
