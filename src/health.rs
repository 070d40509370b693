//! Active health checks: one thread probes every checked endpoint once per interval for the
//! whole process, and publishes the verdicts as an immutable map through `arc-swap`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::config::lb::HealthCheck;
use crate::snapshot::SharedSnapshot;

/// Health verdicts by cluster name and endpoint; endpoints not listed count as healthy.
#[derive(Debug, Default, Clone)]
pub struct HealthMap {
    pub clusters: HashMap<String, HashMap<SocketAddr, bool>>,
}

pub type SharedHealth = Arc<ArcSwap<HealthMap>>;

#[derive(Debug)]
struct Probe {
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    due: Instant,
}

/// Sends one probe; `true` if the endpoint answered with an expected status in time.
fn probe(addr: SocketAddr, hc: &HealthCheck) -> bool {
    let deadline = Instant::now() + hc.timeout;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, hc.timeout) else { return false };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = s.set_read_timeout(Some(left));
    let _ = s.set_write_timeout(Some(left));
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: apex-health-check\r\nConnection: close\r\n\r\n",
        hc.path
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let status: Option<u16> =
        line.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|s| s.parse().ok());
    match status {
        Some(s) if hc.expected_statuses.is_empty() => (200..400).contains(&s),
        Some(s) => hc.expected_statuses.contains(&s),
        None => false,
    }
}

/// Starts the checker thread. It follows config reloads (it reads the published snapshot each
/// round) and ends when `stop` is dropped.
pub fn start(config: SharedSnapshot, health: SharedHealth) -> std::io::Result<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new().name("apex-health".into()).spawn(move || {
        let mut probes: HashMap<(String, SocketAddr), Probe> = HashMap::new();
        loop {
            let snap = config.load_full();
            let now = Instant::now();
            let mut changed = false;
            // Logged after the new verdicts are published, so a log reader can rely on them.
            let mut flips: Vec<(String, SocketAddr, bool)> = Vec::new();
            let mut next = now + Duration::from_secs(1);
            let mut live = Vec::new();
            for c in &snap.config.clusters {
                let Some(hc) = &c.health_check else { continue };
                for &addr in &c.endpoints {
                    let key = (c.name.clone(), addr);
                    live.push(key.clone());
                    let p =
                        probes.entry(key).or_insert(Probe { healthy: true, streak: 0, due: now });
                    if p.due <= now {
                        let ok = probe(addr, hc);
                        p.due = Instant::now() + hc.interval;
                        if ok == p.healthy {
                            p.streak = 0;
                        } else {
                            p.streak += 1;
                            let needed =
                                if ok { hc.healthy_threshold } else { hc.unhealthy_threshold };
                            if p.streak >= needed {
                                p.healthy = ok;
                                p.streak = 0;
                                changed = true;
                                flips.push((c.name.clone(), addr, ok));
                            }
                        }
                    }
                    next = next.min(p.due);
                }
            }
            let before = probes.len();
            probes.retain(|k, _| live.contains(k));
            changed |= probes.len() != before;
            if changed {
                let mut map = HealthMap::default();
                for ((cluster, addr), p) in &probes {
                    map.clusters.entry(cluster.clone()).or_default().insert(*addr, p.healthy);
                }
                health.store(Arc::new(map));
            }
            for (cluster, addr, ok) in flips {
                if ok {
                    info!(cluster = %cluster, upstream = %addr, "endpoint healthy again");
                } else {
                    warn!(cluster = %cluster, upstream = %addr, "endpoint unhealthy");
                }
            }
            // The checker's own schedule: wait for the next due probe, or for the stop.
            let wait = next.saturating_duration_since(Instant::now()).max(Duration::from_millis(5));
            match stopped.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    })?;
    Ok(stop)
}
