//! A worker's own tasks besides connections: its accept loops, its control task, and the end
//! of its drain. Written once against the `io::Runtime` seam.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::downstream::{resume, serve_downstream};
use super::io::Runtime;
use super::isolate::isolate;
use super::wait::{race, Either, Event};
use super::Worker;
use crate::access_log::{Format, LogMessage, WorkerLog, FLUSH_EVERY};
use crate::config::Listener;
use crate::health::SharedHealth;
use crate::snapshot::SharedSnapshot;
use crate::stats::StatsReport;

/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS): long enough not to spin, short
/// enough to serve again soon after descriptors free up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the control plane asks of a worker. Sent over a channel, then announced with a byte on
/// the worker's control socket, which is what wakes the worker's runtime.
pub enum Control {
    /// Stop accepting, close idle connections, finish in-flight requests, then exit.
    Drain,
    /// Start accepting on a new listener (bound by the control plane, one socket per worker).
    /// (Boxed: a listener's settings are large, and every order would be as large.)
    AddListener(Box<Listener>, TcpListener),
    /// Stop accepting on a listener; its open connections carry on.
    RemoveListener(String),
    /// Send a copy of this worker's counters, with the worker's id.
    Scrape(Sender<(usize, StatsReport)>),
}

/// The worker's accept loops by listener name, each with the event that stops it. A worker
/// usually has one socket per listener; after an upgrade from a process with more workers it
/// may have several.
#[derive(Default)]
struct Acceptors {
    stops: RefCell<HashMap<String, Vec<Rc<Event>>>>,
    running: Cell<usize>,
}

/// Runs a worker until it has drained: accept loops for `socks`, the control task, and the
/// wait for the last connection. `ready` hears once the worker serves (or why it cannot).
pub async fn worker_main<R: Runtime>(
    worker: Rc<Worker<R>>,
    socks: Vec<(Listener, TcpListener)>,
    control: UnixStream,
    orders: Receiver<Control>,
    ready: Sender<Result<(), String>>,
) {
    let id = worker.id;
    let control = match R::control_from_std(control) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("control socket: {e}")));
            return;
        }
    };
    let acceptors = Rc::new(Acceptors::default());
    for (cfg, sock) in socks {
        if let Err(e) = start_acceptor(&worker, &acceptors, cfg, sock) {
            let _ = ready.send(Err(e));
            return;
        }
    }
    R::spawn(control_task(Rc::clone(&worker), Rc::clone(&acceptors), control, orders));
    let _ = ready.send(Ok(()));
    // Accept loops end when the drain starts, closing this worker's listening sockets.
    worker.drain.wait().await;
    worker.closed.until(|| acceptors.running.get() == 0).await;
    debug!(worker = id, open = worker.open_connections(), "draining: stopped accepting");
    worker.closed.until(|| worker.open_connections() == 0).await;
    info!(worker = id, "drained");
}

fn start_acceptor<R: Runtime>(
    worker: &Rc<Worker<R>>,
    acceptors: &Rc<Acceptors>,
    cfg: Listener,
    sock: TcpListener,
) -> Result<(), String> {
    let l = R::listener_from_std(sock).map_err(|e| format!("listener {}: {e}", cfg.name))?;
    let stop = Rc::new(Event::default());
    acceptors.stops.borrow_mut().entry(cfg.name.clone()).or_default().push(Rc::clone(&stop));
    acceptors.running.set(acceptors.running.get() + 1);
    let (worker, acceptors) = (Rc::clone(worker), Rc::clone(acceptors));
    R::spawn(async move {
        let name = cfg.name.clone();
        accept_loop(&worker, &l, Rc::new(cfg), &stop).await;
        R::close_listener(l);
        debug!(worker = worker.id, listener = %name, "listener closed");
        acceptors.running.set(acceptors.running.get() - 1);
        worker.closed.wake_all();
    });
    Ok(())
}

/// Carries out the control plane's orders; the socket closing counts as an order to drain.
async fn control_task<R: Runtime>(
    worker: Rc<Worker<R>>,
    acceptors: Rc<Acceptors>,
    mut control: R::Control,
    orders: Receiver<Control>,
) {
    loop {
        let open = R::control_wait(&mut control).await;
        while let Ok(order) = orders.try_recv() {
            match order {
                Control::Drain => worker.start_drain(),
                Control::AddListener(cfg, sock) => {
                    let name = cfg.name.clone();
                    match start_acceptor(&worker, &acceptors, *cfg, sock) {
                        Ok(()) => debug!(worker = worker.id, listener = %name, "listener added"),
                        Err(e) => error!(worker = worker.id, error = %e, "cannot add listener"),
                    }
                }
                Control::Scrape(reply) => {
                    let _ = reply.send((worker.id, worker.report()));
                }
                Control::RemoveListener(name) => {
                    for stop in acceptors.stops.borrow_mut().remove(&name).unwrap_or_default() {
                        stop.fire();
                    }
                }
            }
        }
        if !open {
            worker.start_drain();
            return;
        }
        if worker.is_draining() {
            return;
        }
    }
}

/// Accepts client connections until the worker drains or `stop` fires.
async fn accept_loop<R: Runtime>(
    worker: &Rc<Worker<R>>,
    l: &R::Listener,
    cfg: Rc<Listener>,
    stop: &Rc<Event>,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        let view = worker.view();
        let cap = view.snap.config.worker_connections;
        // A reload may have changed this listener's timeouts and limits.
        let settings = view.listener(&cfg.name).unwrap_or_else(|| Rc::clone(&cfg));
        drop(view);
        if worker.open_connections() >= cap {
            // At the cap: accept nothing until a connection closes (the kernel queues the rest).
            worker.closed.until(|| worker.open_connections() < cap || worker.is_draining()).await;
        }
        if worker.is_draining() || stop.is_fired() {
            return;
        }
        let stopping = async {
            race(worker.drain.wait(), stop.wait()).await;
        };
        match R::accept(l, stopping).await {
            None => return,
            // Also after a stop, when the connection arrived while the accept was stopping:
            // it is served (a draining worker answers it with `Connection: close`).
            Some(Ok((stream, peer))) => {
                let guard = worker.connection_opened();
                let removed = Rc::clone(stop);
                let conn = serve_downstream::<R>(
                    Rc::clone(worker),
                    stream,
                    peer,
                    settings,
                    guard,
                    removed,
                );
                let id = worker.id;
                R::spawn(isolate(conn, move |msg| {
                    error!(worker = id, client = %peer, panic = %msg, "connection task panicked; closed it");
                }));
            }
            Some(Err(e)) => {
                // EMFILE/ENFILE and the like: back off instead of spinning, and say so at most
                // once a second.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(worker = worker.id, listener = %cfg.name, error = %e, "accept failed; backing off");
                    last_warning = Some(Instant::now());
                }
                R::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Builds a worker for `shared` and runs it to the end of its drain.
#[allow(clippy::too_many_arguments)] // one call site: the worker thread's entry
pub async fn run<R: Runtime>(
    id: usize,
    workers: usize,
    shared: SharedSnapshot,
    socks: Vec<(Listener, TcpListener)>,
    control: UnixStream,
    orders: Receiver<Control>,
    ready: Sender<Result<(), String>>,
    access: Option<(Format, SyncSender<LogMessage>)>,
    health: SharedHealth,
    tickets: crate::tls::SharedTicketKeys,
) {
    let access = access.map(|(format, tx)| WorkerLog::new(format, tx));
    let worker = Rc::new(Worker::<R>::new(id, workers, shared, access, health, tickets));
    if worker.access.is_some() {
        R::spawn(flush_access_log(Rc::clone(&worker)));
    }
    R::spawn(housekeeping(Rc::clone(&worker)));
    R::spawn(unpark(Rc::clone(&worker)));
    worker_main(Rc::clone(&worker), socks, control, orders, ready).await;
    if let Some(log) = &worker.access {
        log.close();
    }
}

/// The housekeeping tick: how often idle deadlines are checked (a keep-alive or
/// first-request timeout fires at most this late).
const TICK: Duration = Duration::from_millis(100);
/// Every this many ticks (one second), the slower chores: the upstream pool's expired, stale
/// and orphaned connections, and the count of suppressed failure logs.
const SLOW_CHORES_EVERY: u32 = 10;

/// The worker's one housekeeping task: wakes idle connections whose deadline passed; once a
/// second, closes pooled upstream connections that expired, that their upstream closed, or
/// whose endpoint a reload removed, and reports failures the log limiter suppressed. During the
/// drain it only ends idle connections (at the drain's cutoff), until none is open.
async fn housekeeping<R: Runtime>(worker: Rc<Worker<R>>) {
    let mut ticks = 0u32;
    loop {
        if worker.is_draining() {
            if worker.open_connections() == 0 {
                return;
            }
            R::sleep(TICK).await;
            sweep_deadlines(&worker, Instant::now());
            continue;
        }
        // The drain wakes this at once, so that the cutoff it sets is swept on time.
        let _ = race(R::sleep(TICK), worker.drain.wait()).await;
        let now = Instant::now();
        sweep_deadlines(&worker, now);
        ticks += 1;
        if ticks % SLOW_CHORES_EVERY == 0 {
            let view = worker.view();
            let clusters = &view.snap.config.clusters;
            // The longest idle timeout and the largest cap of any cluster with the endpoint;
            // `None`: no cluster has it any more. Checkout applies each cluster's own timeout.
            let keep_for = |addr: std::net::SocketAddr| {
                clusters.iter().filter(|c| c.endpoints.contains(&addr)).fold(None, |acc, c| {
                    let (age, cap) = acc.unwrap_or((Duration::ZERO, 0));
                    Some((age.max(c.pool_idle_timeout), cap.max(c.pool_max_idle)))
                })
            };
            worker.pool.sweep(now, keep_for);
            worker.parked.trim();
            worker.failures.flush(now);
            let rate_of = |listener: u64| {
                view.listeners
                    .iter()
                    .find(|l| crate::balance::hash64(&l.name) == listener)
                    .and_then(|l| l.rate_limit)
                    .map(|r| crate::proxy::limits::worker_rate(r, worker.workers))
            };
            worker.limits.sweep(now, rate_of);
        }
    }
}

/// Every tick, draining or not: wakes the idle waits and the requests whose deadline passed,
/// and closes the parked connections whose keep-alive deadline (or the drain's cutoff) passed.
fn sweep_deadlines<R: Runtime>(worker: &Worker<R>, now: Instant) {
    worker.idle.sweep(now);
    worker.deadlines.sweep(now);
    // A scan of the parked table (80 bytes an entry): about 10 µs per 10,000 parked.
    worker.parked.sweep(now, |until| worker.idle.due(until));
}

/// Serves parked connections again: waits for the worker's epoll set of parked sockets to be
/// readable, then gives each connection whose client sent bytes (or closed) a task. Ends once
/// the worker drains and no connection is parked (the housekeeping closes them at the drain's
/// cutoff; one that sends a request before it is served, with `Connection: close`).
///
/// One wake-up takes every ready connection, in batches: each is taken out of the set, so the
/// work is bounded by the number parked, and a client cannot make it come back for more
/// without being served (and idle for `park_after`) first.
async fn unpark<R: Runtime>(worker: Rc<Worker<R>>) {
    let poller = match worker.parked.epoll_fd().map(|fd| fd.and_then(R::poller)) {
        None => return,
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            warn!(worker = worker.id, error = %e, "cannot wait for parked connections; none will park");
            worker.parked.disable();
            return;
        }
    };
    let done = async {
        worker.drain.wait().await;
        worker.closed.until(|| worker.parked.is_empty()).await;
    };
    let mut done = std::pin::pin!(done);
    loop {
        match race(R::poller_wait(&poller), done.as_mut()).await {
            Either::Right(()) => return,
            Either::Left(Err(e)) => {
                // Not expected of an epoll set; parked connections are then closed by their
                // keep-alive timeout, and no more park.
                error!(worker = worker.id, error = %e, "waiting for parked connections failed");
                worker.parked.disable();
                return;
            }
            Either::Left(Ok(())) => {}
        }
        loop {
            let ready = worker.parked.take_ready();
            let full = ready.len() == super::park::BATCH;
            for (fd, conn) in ready {
                resume(&worker, fd, conn);
            }
            if !full {
                break;
            }
        }
    }
}

/// Hands the access-log buffer to the writer thread every `FLUSH_EVERY`, off the request path.
async fn flush_access_log<R: Runtime>(worker: Rc<Worker<R>>) {
    loop {
        if let Either::Right(()) = race(R::sleep(FLUSH_EVERY), worker.drain.wait()).await {
            return;
        }
        if let Some(log) = &worker.access {
            log.flush();
        }
    }
}
