//! Worker threads: one pinned OS thread per core, each with its own monoio runtime, its own
//! listeners and its own pool. Choosing the driver (io_uring, or epoll) happens here.

pub mod monoio;
pub mod tokio;

use std::collections::HashMap;
use std::io;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::mpsc::{self, Sender, SyncSender};
use std::time::Duration;

use ::monoio::time::TimeDriver;
use ::monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use tracing::{error, info, warn};

use self::monoio::Monoio;
use self::tokio::Tokio;
use crate::access_log::{start_writer, Format, LogMessage};
use crate::config::{Config, Listener, RuntimeKind, Workers};
use crate::health::{HealthMap, SharedHealth};
use crate::lifecycle::Lifecycle;
use crate::listener::{bind_more, bind_reuseport, serves_address, BindError};
use crate::proxy::worker_tasks::{self, Control};
use crate::snapshot::{publish_first, SharedSnapshot};
use arc_swap::ArcSwap;
use std::sync::Arc;

/// io_uring submission queue size per worker.
const RING_ENTRIES: u32 = 1024;

#[derive(Debug)]
pub enum StartError {
    Bind(BindError),
    Worker(usize, String),
    Spawn(io::Error),
    AccessLog(io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind(e) => write!(f, "{e}"),
            StartError::Worker(id, e) => write!(f, "worker {id} failed to start: {e}"),
            StartError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
            StartError::AccessLog(e) => write!(f, "cannot open the access log: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A started proxy. Its workers run until told to drain (or until this is dropped, which
/// closes their control sockets and so drains them too).
pub struct Server {
    /// Each configured listener's name and the address it is bound to (port 0 resolved).
    pub listeners: Vec<(String, SocketAddr)>,
    /// A copy of each listener's sockets (one per worker), for an upgrade to hand over.
    pub sockets: Vec<(String, Vec<TcpListener>)>,
    pub shared: SharedSnapshot,
    pub workers: usize,
    controls: Vec<WorkerControl>,
    /// The access-log writer, for SIGUSR1's reopen.
    pub access_log: Option<SyncSender<LogMessage>>,
    access_log_thread: Option<std::thread::JoinHandle<()>>,
    /// The health checker's verdicts (for `/metrics`).
    pub health: SharedHealth,
    /// Each checked endpoint's last probe (for the status page).
    pub probes: crate::health::SharedProbes,
    /// Dropping it stops the health checker.
    _health_stop: Sender<()>,
    /// Dropping it stops the ticket-key rotation.
    _tickets_stop: Sender<()>,
    /// What the resolver thread knows of each DNS name (for `/metrics` and reloads).
    pub dns: crate::discovery::SharedDns,
    /// Dropping it stops the resolver thread.
    _dns_stop: Sender<()>,
    /// Counts from the last status page, for its rates.
    status_sample: crate::status::Sample,
    /// Each worker's last counters: a scrape that a busy worker does not answer in time uses
    /// them, so no counter ever goes backwards (Prometheus would read that as a reset).
    last_reports: Vec<crate::stats::StatsReport>,
}

/// How long a scrape waits for each worker's counters.
const SCRAPE_WAIT: Duration = Duration::from_secs(2);

/// The control plane's line to one worker: orders go on the channel, a byte on the socket wakes
/// the worker's runtime to read them.
struct WorkerControl {
    wake: StdUnixStream,
    orders: Sender<Control>,
}

impl Server {
    /// Sends an order to one worker.
    pub fn order(&self, worker: usize, order: Control) {
        let c = &self.controls[worker];
        if c.orders.send(order).is_ok() {
            let _ = (&c.wake).write_all(b"o");
        }
    }

    /// After every worker has exited: waits until the access log has written every line.
    pub fn finish(mut self) {
        self.access_log = None;
        if let Some(t) = self.access_log_thread.take() {
            let _ = t.join();
        }
    }

    /// Asks every worker for its counters and sums them, with the health checker's verdicts.
    /// A worker that does not answer in time contributes its last report.
    pub fn scrape(&mut self) -> crate::stats::StatsReport {
        let (tx, rx) = mpsc::channel();
        for w in 0..self.workers {
            self.order(w, Control::Scrape(tx.clone()));
        }
        drop(tx);
        let deadline = std::time::Instant::now() + SCRAPE_WAIT;
        let answers = (0..self.workers).map_while(|_| {
            rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).ok()
        });
        let mut total = crate::stats::sum_reports(&mut self.last_reports, answers);
        let snap = self.shared.load();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for l in &snap.config.listeners {
            for (name, not_after) in l.tls.iter().flat_map(|t| &t.expiry) {
                if let Some(t) = not_after {
                    total.cert_expiry.insert((l.name.clone(), name.clone()), t - now);
                }
            }
        }
        for (key, state) in &self.dns.load().names {
            let failing = u64::from(state.failing.is_some());
            let v = [state.endpoints.len() as u64, failing, state.failures];
            total.dns.insert((key.kind().to_string(), key.name().to_string()), v);
        }
        let verdicts = self.health.load();
        let guarded =
            |c: &&crate::config::Cluster| c.endpoints.len() <= snap.config.max_endpoint_series;
        for c in snap.config.clusters.iter().filter(|c| c.health_check.is_some()).filter(guarded) {
            let known = verdicts.clusters.get(&c.name);
            for addr in &c.endpoints {
                let ok = known.and_then(|v| v.get(addr)).copied().unwrap_or(true);
                total.healthy.insert((c.name.clone(), addr.to_string()), u64::from(ok));
            }
        }
        total
    }

    /// The status page's data: a scrape, with the snapshot, health checks and DNS names.
    pub fn status(&mut self) -> crate::status::Status {
        let report = self.scrape();
        let snap = self.shared.load();
        crate::status::build(
            &snap.config,
            &report,
            &self.health.load(),
            &self.probes.load(),
            &self.dns.load(),
            &mut self.status_sample,
            std::time::Instant::now(),
        )
    }

    /// Tells every worker to drain: stop accepting, finish in-flight requests, close idle
    /// connections, then exit (each reports `Lifecycle::WorkerExited`).
    pub fn drain(&self) {
        for w in 0..self.workers {
            self.order(w, Control::Drain);
        }
    }
}

/// TLS session-ticket keys for every worker, rotated every `TICKET_ROTATION` by a thread of
/// the control plane and published through `arc-swap` (workers only read them). The thread
/// ends when the returned sender is dropped.
fn start_ticket_rotation() -> io::Result<(crate::tls::SharedTicketKeys, Sender<()>)> {
    use crate::tls::{TicketKeys, TICKET_ROTATION};
    let keys = Arc::new(ArcSwap::from_pointee(TicketKeys::generate()));
    let (stop, stopped) = mpsc::channel::<()>();
    let published = Arc::clone(&keys);
    std::thread::Builder::new().name("apex-tickets".into()).spawn(move || {
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICKET_ROTATION) {
            published.store(Arc::new(published.load().rotated()));
        }
    })?;
    Ok((keys, stop))
}

/// Reports a worker's end to the main thread even when the worker panics.
struct ExitReport {
    id: usize,
    events: Sender<Lifecycle>,
}

impl Drop for ExitReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(worker = self.id, "worker thread panicked");
        }
        let _ = self.events.send(Lifecycle::WorkerExited(self.id));
    }
}

/// The driver a worker ended up with, and the io_uring setup flags or the reason for epoll.
struct Driver {
    name: &'static str,
    detail: String,
}

type UringRuntime = ::monoio::Runtime<TimeDriver<IoUringDriver>>;
type EpollRuntime = ::monoio::Runtime<TimeDriver<LegacyDriver>>;

/// Builds an io_uring runtime with the ring flags that matter for a proxy, falling back to
/// weaker setups on older kernels: SINGLE_ISSUER + DEFER_TASKRUN (6.1+), then COOP_TASKRUN
/// (5.19+), then the default ring (see `shared/perf-notes.md`: the default costs 1.2–1.6x the
/// CPU per request of the tuned ring).
fn build_uring() -> Result<(UringRuntime, &'static str), io::Error> {
    type Setup = fn(&mut io_uring::Builder);
    let setups: [(&'static str, Setup); 3] = [
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer();
            b.setup_defer_taskrun();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun();
            b.setup_taskrun_flag();
        }),
        ("default", |_| {}),
    ];
    let mut last = io::Error::other("no io_uring setup tried");
    for (name, setup) in setups {
        let mut urb = io_uring::IoUring::builder();
        setup(&mut urb);
        match RuntimeBuilder::<IoUringDriver>::new()
            .uring_builder(urb)
            .with_entries(RING_ENTRIES)
            .enable_timer()
            .build()
        {
            Ok(rt) => return Ok((rt, name)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn build_epoll() -> Result<EpollRuntime, io::Error> {
    RuntimeBuilder::<LegacyDriver>::new().enable_timer().build()
}

/// Whether inherited sockets are bound where `want` says (any port when it says port 0).
fn same_address(socks: &[TcpListener], want: SocketAddr) -> bool {
    socks.first().and_then(|s| s.local_addr().ok()).is_some_and(|at| serves_address(at, want))
}

/// How many workers `workers` means on this machine.
pub fn worker_count(workers: Workers) -> usize {
    match workers {
        Workers::Count(n) => n,
        Workers::Auto => core_affinity::get_core_ids()
            .map(|c| c.len())
            .filter(|&n| n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1),
    }
}

/// Binds every listener once per worker, starts the workers and returns once each is serving.
/// Each worker's end is reported on `events`.
///
/// `inherited` holds the listening sockets an upgrade handed over, by listener name: a
/// listener of the same name and address (any port when the config says port 0) serves on them
/// instead of new sockets, so no connection queued on them is lost.
pub fn start(
    config: Config,
    events: Sender<Lifecycle>,
    mut inherited: HashMap<String, Vec<TcpListener>>,
) -> Result<Server, StartError> {
    let count = worker_count(config.workers);
    let mut per_worker: Vec<Vec<(Listener, TcpListener)>> =
        (0..count).map(|_| Vec::new()).collect();
    let mut listeners = Vec::new();
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socks = match inherited.remove(&l.name).filter(|s| same_address(s, l.address)) {
            Some(mut socks) => {
                // More workers than the old process had: more sockets in the same group.
                if socks.len() < count {
                    let at = socks[0].local_addr().map_err(StartError::Spawn)?;
                    let more = bind_more(at, count - socks.len()).map_err(StartError::Bind)?;
                    socks.extend(more);
                }
                socks
            }
            None => bind_reuseport(l.address, count).map_err(StartError::Bind)?,
        };
        let bound = socks[0].local_addr().map_err(StartError::Spawn)?;
        let mut resolved = l.clone();
        resolved.address = bound;
        // Kept by the control plane to hand over on an upgrade (the same sockets, not new ones).
        let copies = socks.iter().map(TcpListener::try_clone).collect::<Result<Vec<_>, _>>();
        sockets.push((l.name.clone(), copies.map_err(StartError::Spawn)?));
        // Fewer workers than the old process had: some take two of its sockets, so that every
        // socket of the group keeps being accepted from.
        for (i, s) in socks.into_iter().enumerate() {
            per_worker[i % count].push((resolved.clone(), s));
        }
        listeners.push((l.name.clone(), bound));
    }
    let kind = config.runtime;
    let access_format = config.access_log.as_ref().map(|a| a.format);
    let (access_writer, access_thread) = match &config.access_log {
        Some(a) => {
            let (tx, thread) = start_writer(&a.target, a.buffer).map_err(StartError::AccessLog)?;
            (Some(tx), Some(thread))
        }
        None => (None, None),
    };
    let source = config.source.as_ref().map(|p| p.display().to_string());
    let shared = publish_first(config);
    // DNS endpoints are looked up before the workers start, so that a cluster made only of
    // names does not answer 503 to its first requests; a slow or dead name server delays the
    // start by at most the lookup limit, then the names are served as they resolve.
    let dns: crate::discovery::SharedDns = Arc::default();
    let (dns_stop, first_lookups) =
        crate::discovery::start(shared.clone(), dns.clone()).map_err(StartError::Spawn)?;
    if first_lookups.recv_timeout(Duration::from_secs(6)).is_err() {
        tracing::warn!("starting before every DNS name was looked up once");
    }
    let health: SharedHealth = Arc::new(ArcSwap::from_pointee(HealthMap::default()));
    let probes: crate::health::SharedProbes = Arc::default();
    let health_stop = crate::health::start(shared.clone(), health.clone(), probes.clone())
        .map_err(StartError::Spawn)?;
    let (tickets, tickets_stop) = start_ticket_rotation().map_err(StartError::Spawn)?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut controls = Vec::new();
    for (id, socks) in per_worker.into_iter().enumerate() {
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let (ours, theirs) = StdUnixStream::pair().map_err(StartError::Spawn)?;
        theirs.set_nonblocking(true).map_err(StartError::Spawn)?;
        let (orders_tx, orders) = mpsc::channel();
        controls.push(WorkerControl { wake: ours, orders: orders_tx });
        let exit = ExitReport { id, events: events.clone() };
        let access = access_writer.as_ref().zip(access_format).map(|(tx, f)| (f, tx.clone()));
        let health = health.clone();
        let tickets = tickets.clone();
        let w = WorkerStart {
            tickets,
            id,
            workers: count,
            core,
            kind,
            socks,
            shared,
            control: theirs,
            orders,
            ready,
            access,
            health,
        };
        std::thread::Builder::new()
            .name(format!("apex-worker-{id}"))
            .spawn(move || {
                let _exit = exit;
                run_worker(w)
            })
            .map_err(StartError::Spawn)?;
    }
    drop(ready_tx);
    for id in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Worker(id, e)),
            Err(_) => return Err(StartError::Worker(id, "exited during startup".into())),
        }
    }
    for (name, addr) in &listeners {
        info!(listener = %name, address = %addr, "listening");
    }
    // Last startup line: everything is bound and every worker is serving.
    info!(
        workers = count,
        runtime = kind.as_str(),
        config = source.as_deref().unwrap_or("(command line)"),
        "apex started"
    );
    for (name, _) in inherited {
        info!(listener = %name, "a listener the new config does not have: its sockets close");
    }
    Ok(Server {
        sockets,
        listeners,
        shared,
        workers: count,
        controls,
        access_log: access_writer,
        access_log_thread: access_thread,
        health,
        probes,
        _health_stop: health_stop,
        _tickets_stop: tickets_stop,
        dns,
        _dns_stop: dns_stop,
        last_reports: vec![crate::stats::StatsReport::default(); count],
        status_sample: Default::default(),
    })
}

/// What a worker thread starts with.
struct WorkerStart {
    tickets: crate::tls::SharedTicketKeys,
    id: usize,
    /// Worker threads in all.
    workers: usize,
    core: Option<core_affinity::CoreId>,
    kind: RuntimeKind,
    socks: Vec<(Listener, TcpListener)>,
    shared: SharedSnapshot,
    control: StdUnixStream,
    orders: mpsc::Receiver<Control>,
    ready: mpsc::Sender<Result<(), String>>,
    access: Option<(Format, SyncSender<LogMessage>)>,
    health: SharedHealth,
}

fn run_worker(w: WorkerStart) {
    let WorkerStart {
        tickets,
        id,
        workers,
        core,
        kind,
        socks,
        shared,
        control,
        orders,
        ready,
        access,
        health,
    } = w;
    let pinned = core.map(|c| (c.id, core_affinity::set_for_current(c)));
    let pin = match pinned {
        Some((cpu, true)) => format!("cpu {cpu}"),
        Some((cpu, false)) => format!("unpinned (pinning to cpu {cpu} failed)"),
        None => "unpinned (no core list)".to_string(),
    };
    if kind == RuntimeKind::Tokio {
        info!(worker = id, driver = "tokio", detail = "current-thread runtime", pin = %pin, "worker starting");
        match self::tokio::build() {
            Ok(rt) => self::tokio::block_on(
                &rt,
                worker_tasks::run::<Tokio>(
                    id, workers, shared, socks, control, orders, ready, access, health, tickets,
                ),
            ),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot build a Tokio runtime: {e}")));
            }
        }
        return;
    }
    let uring = match kind {
        RuntimeKind::IoUring => Some(build_uring()),
        RuntimeKind::Epoll | RuntimeKind::Tokio => None,
    };
    let (driver, result) = match uring {
        Some(Ok((rt, flags))) => {
            let driver = Driver { name: "io_uring", detail: format!("ring setup {flags}") };
            (driver, Ok(rt))
        }
        Some(Err(e)) => {
            let driver =
                Driver { name: "epoll", detail: format!("io_uring unavailable ({e}); fell back") };
            (driver, Err(Some(e)))
        }
        None => (Driver { name: "epoll", detail: "chosen by config".into() }, Err(None)),
    };
    if driver.name == "epoll" && kind == RuntimeKind::IoUring {
        warn!(worker = id, driver = driver.name, reason = %driver.detail, pin = %pin, "worker starting");
    } else {
        info!(worker = id, driver = driver.name, detail = %driver.detail, pin = %pin, "worker starting");
    }
    let main = worker_tasks::run::<Monoio>(
        id,
        workers,
        shared,
        socks,
        control,
        orders,
        ready.clone(),
        access,
        health,
        tickets,
    );
    match result {
        Ok(mut rt) => rt.block_on(main),
        Err(_) => match build_epoll() {
            Ok(mut rt) => {
                monoio::on_epoll_driver();
                rt.block_on(main)
            }
            Err(e) => {
                let _ = ready.send(Err(format!("cannot build an epoll runtime: {e}")));
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::io::Runtime;
    use crate::proxy::wait::Event;

    /// A connection already queued when an accept is stopped: either that accept returns it
    /// or it stays queued for the next one. (Dropping an io_uring accept in flight instead
    /// loses it: the kernel completes the accept at submission, and monoio discards the result
    /// of an abandoned operation, so the socket stays open and unserved.)
    async fn a_stopped_accept_loses_no_connection() {
        let std_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_l.local_addr().unwrap();
        std_l.set_nonblocking(true).unwrap();
        let l = Monoio::listener_from_std(std_l).unwrap();
        for round in 0..10 {
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let stop = Event::default();
            stop.fire();
            // The accept is polled first (its operation queued), then the stop is seen.
            if Monoio::accept(&l, stop.wait()).await.is_some() {
                continue;
            }
            let next =
                Monoio::timeout(Duration::from_secs(2), Monoio::accept(&l, std::future::pending()));
            assert!(
                matches!(next.await, Some(Some(Ok(_)))),
                "round {round}: the queued connection was lost"
            );
        }
    }

    #[test]
    fn a_stopped_accept_loses_no_connection_on_io_uring() {
        let (mut rt, _) = build_uring().expect("io_uring on this machine");
        rt.block_on(a_stopped_accept_loses_no_connection());
    }

    #[test]
    fn a_stopped_accept_loses_no_connection_on_epoll() {
        build_epoll().unwrap().block_on(a_stopped_accept_loses_no_connection());
    }
}
