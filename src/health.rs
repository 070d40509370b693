//! Active health checks: one thread for the whole process runs a single-threaded Tokio runtime
//! on which every checked endpoint has its own probe task on its own interval, so slow or
//! black-holed endpoints never delay the others' probes. Verdicts are published as an
//! immutable map through `arc-swap`; workers read it without writing anything.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::lb::HealthCheck;
use crate::proxy::io::Stream;
use crate::proxy::transport::Transport;
use crate::runtime::tokio::TokioStream;
use crate::snapshot::SharedSnapshot;
use crate::tls::TlsStream;

/// Health verdicts by cluster name and endpoint; endpoints not listed count as healthy.
#[derive(Debug, Default, Clone)]
pub struct HealthMap {
    /// Increases with every publication: what workers' caches of this map are keyed on.
    pub generation: u64,
    pub clusters: HashMap<String, HashMap<SocketAddr, bool>>,
}

pub type SharedHealth = Arc<ArcSwap<HealthMap>>;

/// The last probe of each checked endpoint, for the status page: whether it passed and when.
/// Apart from the verdicts (workers never read this, so publishing it per probe costs them
/// nothing).
pub type SharedProbes = Arc<ArcSwap<HashMap<(String, SocketAddr), (bool, std::time::SystemTime)>>>;

/// How often the checker looks for config changes (new, changed or removed checks) and for
/// the order to stop.
const LOOK_EVERY: Duration = Duration::from_millis(250);

type Key = (String, SocketAddr);

/// One checked endpoint: its probe task and the verdict its results add up to.
struct Prober {
    check: HealthCheck,
    task: tokio::task::JoinHandle<()>,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

/// How a probe speaks TLS to an endpoint of a cluster with `tls`: the cluster's client config
/// (built once per probe task) and the name to verify.
type ProbeTls = (Arc<rustls::ClientConfig>, Option<ServerName<'static>>);

/// Sends one probe; `true` if the endpoint answered with an expected status in time. Over TLS
/// when the cluster speaks TLS to its endpoints, through the same TLS layer as requests.
async fn probe(addr: SocketAddr, hc: &HealthCheck, tls: Option<&ProbeTls>) -> bool {
    let attempt = async {
        let plain = TokioStream(tokio::net::TcpStream::connect(addr).await.ok()?);
        let mut s = match tls {
            None => Transport::Plain(plain),
            Some((config, name)) => {
                let name = name.clone().unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
                let t = TlsStream::connect(Arc::clone(config), name, plain).await.ok()?;
                Transport::Tls(Box::new(t))
            }
        };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: apex-health-check\r\nConnection: close\r\n\r\n",
            hc.path
        );
        s.write_all(req.into_bytes()).await.0.ok()?;
        let mut buf = Vec::with_capacity(64);
        while buf.len() < 12 {
            let (res, b) = s.read(buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let line = String::from_utf8_lossy(&buf);
        line.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|s| s.parse::<u16>().ok())
    };
    match tokio::time::timeout(hc.timeout, attempt).await {
        Ok(Some(s)) if hc.expected_statuses.is_empty() => (200..400).contains(&s),
        Ok(Some(s)) => hc.expected_statuses.contains(&s),
        _ => false,
    }
}

/// Probes one endpoint every `interval`, from now on, until the checker drops the results'
/// receiver or aborts the task.
async fn probe_loop(
    key: Key,
    check: HealthCheck,
    tls: Option<ProbeTls>,
    results: UnboundedSender<(Key, bool)>,
) {
    let mut next = Instant::now();
    loop {
        let ok = probe(key.1, &check, tls.as_ref()).await;
        if results.send((key.clone(), ok)).is_err() {
            return;
        }
        // Probes are never early; a probe that took longer than the interval is followed by
        // the next one at once, not by a burst of the ones it missed.
        next = (next + check.interval).max(Instant::now());
        tokio::time::sleep_until(next).await;
    }
}

/// Starts the checker thread. It follows config reloads (it reads the published snapshot every
/// `LOOK_EVERY`) and ends when `stop` is dropped.
pub fn start(
    config: SharedSnapshot,
    health: SharedHealth,
    probes: SharedProbes,
) -> std::io::Result<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("apex-health".into())
        // Probe tasks are local to this thread: a probe's stream (the proxy's `Transport`)
        // need not be `Send`.
        .spawn(move || {
            tokio::task::LocalSet::new().block_on(&rt, check(config, health, probes, stopped))
        })?;
    Ok(stop)
}

async fn check(
    config: SharedSnapshot,
    health: SharedHealth,
    probes: SharedProbes,
    stopped: mpsc::Receiver<()>,
) {
    let mut last: HashMap<(String, SocketAddr), (bool, std::time::SystemTime)> = HashMap::new();
    let (results_tx, mut results) = unbounded_channel::<(Key, bool)>();
    let mut probers: HashMap<Key, Prober> = HashMap::new();
    let mut generation = 0u64;
    let publish = |probers: &HashMap<Key, Prober>, generation: &mut u64| {
        *generation += 1;
        let mut map = HealthMap { generation: *generation, ..HealthMap::default() };
        for ((cluster, addr), p) in probers {
            map.clusters.entry(cluster.clone()).or_default().insert(*addr, p.healthy);
        }
        health.store(Arc::new(map));
    };
    loop {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
            probers.values().for_each(|p| p.task.abort());
            return;
        }
        // Follow the config: a probe task per checked endpoint; a changed check restarts it.
        let snap = config.load_full();
        let mut live = HashSet::new();
        let mut changed = false;
        for c in &snap.config.clusters {
            let Some(hc) = &c.health_check else { continue };
            for &addr in &c.endpoints {
                let key = (c.name.clone(), addr);
                live.insert(key.clone());
                if probers.get(&key).is_some_and(|p| p.check == *hc) {
                    continue;
                }
                let healthy = match probers.remove(&key) {
                    Some(old) => {
                        old.task.abort();
                        old.healthy
                    }
                    None => true,
                };
                let tls = c.tls.as_ref().and_then(|t| {
                    let config = crate::tls::client_config(t).ok()?;
                    Some((config, t.server_name.clone()))
                });
                let probe = probe_loop(key.clone(), hc.clone(), tls, results_tx.clone());
                let task = tokio::task::spawn_local(probe);
                probers.insert(key, Prober { check: hc.clone(), task, healthy, streak: 0 });
            }
        }
        probers.retain(|k, p| {
            let keep = live.contains(k);
            if !keep {
                p.task.abort();
                changed = true;
            }
            keep
        });
        if changed {
            publish(&probers, &mut generation);
        }
        // Results until the next look at the config.
        let until = Instant::now() + LOOK_EVERY;
        while let Ok(Some((key, ok))) = tokio::time::timeout_at(until, results.recv()).await {
            let Some(p) = probers.get_mut(&key) else { continue };
            last.insert(key.clone(), (ok, std::time::SystemTime::now()));
            last.retain(|k, _| live.contains(k));
            probes.store(Arc::new(last.clone()));
            if ok == p.healthy {
                p.streak = 0;
                continue;
            }
            p.streak += 1;
            let needed = if ok { p.check.healthy_threshold } else { p.check.unhealthy_threshold };
            if p.streak < needed {
                continue;
            }
            p.healthy = ok;
            p.streak = 0;
            publish(&probers, &mut generation);
            // Logged after the new verdict is published, so a log reader can rely on it.
            if ok {
                info!(cluster = %key.0, upstream = %key.1, "endpoint healthy again");
            } else {
                warn!(cluster = %key.0, upstream = %key.1, "endpoint unhealthy");
            }
        }
    }
}
