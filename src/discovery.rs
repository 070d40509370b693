//! Endpoints from DNS: one resolver thread for the whole process looks up every `dns` (A/AAAA)
//! and `srv` name the config lists, again when each answer's TTL runs out (clamped to
//! `dns_min_ttl`..`dns_max_ttl`), and publishes what it learned as a new immutable snapshot
//! through `arc-swap`, as a reload does. Workers never resolve anything on the request path:
//! a new endpoint set reaches them as a new view (balancers keep the state of endpoints that
//! stay; a removed endpoint's in-flight requests finish on the view they started with, and its
//! idle pooled connections are closed by the next pool sweep).
//!
//! A name that stops resolving (timeout, SERVFAIL, NXDOMAIN, no records) keeps its last good
//! set; the failure is logged once per streak and shown in `/metrics`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Cluster, Config, Discovery, DnsSettings};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// A name the resolver looks up: the hosts of `dns` endpoints (A and AAAA) and `srv` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NameKey {
    Host(String),
    Srv(String),
}

impl NameKey {
    pub fn of(d: &Discovery) -> NameKey {
        match d {
            Discovery::Dns { host, .. } => NameKey::Host(host.clone()),
            Discovery::Srv { name } => NameKey::Srv(name.clone()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            NameKey::Host(n) | NameKey::Srv(n) => n,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            NameKey::Host(_) => "dns",
            NameKey::Srv(_) => "srv",
        }
    }
}

/// What the resolver knows about one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameState {
    /// The last good answer, sorted: for a host, its addresses (port 0, weight 1; the cluster's
    /// `dns` entry gives both); for an SRV name, each target address with its record's port
    /// and weight (lowest priority only).
    pub endpoints: Vec<(SocketAddr, u32)>,
    /// Whether any lookup of the name has succeeded yet.
    pub resolved: bool,
    /// The last lookup's error, while the name fails (its last good set is still served).
    pub failing: Option<String>,
    /// Failed lookups since the name was first looked up.
    pub failures: u64,
}

/// Every looked-up name's state, published by the resolver thread.
#[derive(Debug, Default, Clone)]
pub struct DnsMap {
    pub names: HashMap<NameKey, NameState>,
}

pub type SharedDns = Arc<ArcSwap<DnsMap>>;

/// `config` with each cluster's endpoints set to its fixed ones followed by those `map` gives
/// its DNS names. An address listed twice keeps its first place and weight.
pub fn compose(mut config: Config, map: &DnsMap) -> Config {
    for c in &mut config.clusters {
        compose_cluster(c, map);
    }
    config
}

fn compose_cluster(c: &mut Cluster, map: &DnsMap) {
    if c.discovery.is_empty() {
        return;
    }
    let mut all = c.fixed.clone();
    for d in &c.discovery {
        let Some(state) = map.names.get(&NameKey::of(d)) else { continue };
        for &(addr, w) in &state.endpoints {
            all.push(match d {
                Discovery::Dns { port, weight, .. } => (SocketAddr::new(addr.ip(), *port), *weight),
                Discovery::Srv { .. } => (addr, w),
            });
        }
    }
    let mut seen = HashSet::new();
    all.retain(|(a, _)| seen.insert(*a));
    c.endpoints = all.iter().map(|e| e.0).collect();
    c.weights = all.iter().map(|e| e.1).collect();
}

/// Publishes a snapshot of `config` with the endpoints `dns` holds now. Compare-and-swap, so a
/// reload and a DNS change that race both land: whichever swaps second is recomposed from the
/// other's result.
pub fn publish(shared: &SharedSnapshot, dns: &SharedDns, config: &Config) {
    shared.rcu(|_| composed(config, dns));
}

/// A snapshot of `config` with the endpoints `dns` holds now.
fn composed(config: &Config, dns: &SharedDns) -> Arc<Snapshot> {
    Arc::new(Snapshot::new(compose(config.clone(), &dns.load())))
}

/// How often the resolver thread looks for config changes and for the order to stop.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// One lookup (with the resolver's own retries) gives up after this.
const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

type Answer = Result<(Vec<(SocketAddr, u32)>, Instant), String>;

/// Starts the resolver thread. It follows reloads (it reads the published snapshot every
/// `LOOK_EVERY`) and ends when the returned sender is dropped. The receiver gets one message
/// once every name of the first config has been looked up once (successfully or not).
pub fn start(
    shared: SharedSnapshot,
    dns: SharedDns,
) -> std::io::Result<(mpsc::Sender<()>, mpsc::Receiver<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let (first_tx, first_rx) = mpsc::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("apex-dns".into()).spawn(move || {
        tokio::task::LocalSet::new().block_on(&rt, resolve(shared, dns, stopped, first_tx))
    })?;
    Ok((stop, first_rx))
}

/// A resolver with `settings`' name servers (or the system's), without a cache: Apex asks
/// again exactly when it wants a fresh answer.
fn resolver(settings: &DnsSettings) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.resolvers.is_empty() {
        TokioResolver::builder(provider).map_err(|e| format!("/etc/resolv.conf: {e}"))?
    } else {
        let servers = settings
            .resolvers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            provider,
        );
        let opts: &mut ResolverOpts = b.options_mut();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        b
    };
    builder.options_mut().cache_size = 0;
    builder.build().map_err(|e| e.to_string())
}

/// One lookup of `key`: its endpoints (sorted, so a server that rotates its answers is no
/// change) and when the answer expires.
async fn lookup(r: &TokioResolver, key: &NameKey) -> Answer {
    let mut out = Vec::new();
    let valid_until = match key {
        NameKey::Host(host) => {
            let ips = r.lookup_ip(host.as_str()).await.map_err(|e| e.to_string())?;
            out.extend(ips.iter().map(|ip| (SocketAddr::new(ip, 0), 1)));
            ips.valid_until()
        }
        NameKey::Srv(name) => {
            let srv = r.srv_lookup(name.as_str()).await.map_err(|e| e.to_string())?;
            let records: Vec<_> = srv
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::SRV(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            // RFC 2782: the lowest priority first; Apex uses only that group.
            let lowest = records.iter().map(|s| s.priority).min();
            let mut until = srv.valid_until();
            let mut resolved_any = false;
            let mut last_error = None;
            for s in records.iter().filter(|s| Some(s.priority) == lowest) {
                // A target of "." means the service is not offered there (RFC 2782).
                if s.target.is_root() {
                    continue;
                }
                match r.lookup_ip(s.target.clone()).await {
                    Ok(ips) => {
                        resolved_any = true;
                        until = until.min(ips.valid_until());
                        // SRV weight 0 is "rarely"; Apex's weights start at 1.
                        let w = u32::from(s.weight).clamp(1, 1000);
                        out.extend(ips.iter().map(|ip| (SocketAddr::new(ip, s.port), w)));
                    }
                    Err(e) => last_error = Some(format!("{}: {e}", s.target)),
                }
            }
            if !resolved_any {
                return Err(last_error.unwrap_or_else(|| "no usable SRV records".into()));
            }
            until
        }
    };
    out.sort();
    out.dedup_by_key(|e| e.0);
    Ok((out, valid_until.into()))
}

/// Looks `key` up now and again whenever the answer expires (clamped to the settings' TTL
/// bounds; a failure is retried after `min_ttl`), until the results' receiver is dropped.
async fn resolve_loop(
    key: NameKey,
    r: Arc<TokioResolver>,
    settings: DnsSettings,
    results: UnboundedSender<(NameKey, Answer)>,
) {
    loop {
        let answer = match tokio::time::timeout(LOOKUP_LIMIT, lookup(&r, &key)).await {
            Ok(a) => a,
            Err(_) => Err(format!("no answer within {LOOKUP_LIMIT:?}")),
        };
        let now = Instant::now();
        let wait = match &answer {
            Ok((_, until)) => until.saturating_duration_since(now),
            Err(_) => settings.min_ttl,
        }
        .clamp(settings.min_ttl, settings.max_ttl);
        if results.send((key.clone(), answer)).is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

async fn resolve(
    shared: SharedSnapshot,
    dns: SharedDns,
    stopped: mpsc::Receiver<()>,
    first: mpsc::Sender<()>,
) {
    let (results_tx, mut results) = unbounded_channel::<(NameKey, Answer)>();
    let mut tasks: HashMap<NameKey, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut map = DnsMap::default();
    let mut settings: Option<DnsSettings> = None;
    let mut first = Some(first);
    let mut resolver_failed = false;
    loop {
        if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
            tasks.values().for_each(|t| t.abort());
            return;
        }
        let snap = shared.load_full();
        let wanted: HashSet<NameKey> =
            snap.config.clusters.iter().flat_map(|c| c.discovery.iter().map(NameKey::of)).collect();
        // New name servers or TTL bounds: every name starts over with them (states are kept).
        if settings.as_ref() != Some(&snap.config.dns) {
            tasks.drain().for_each(|(_, t)| t.abort());
            settings = Some(snap.config.dns.clone());
            resolver_failed = false;
        }
        let s = settings.as_ref().expect("set above");
        let mut r = None;
        for key in &wanted {
            if tasks.contains_key(key) {
                continue;
            }
            if r.is_none() {
                match resolver(s) {
                    Ok(built) => r = Some(Arc::new(built)),
                    Err(e) => {
                        // Said once per settings; tried again every LOOK_EVERY. Each name
                        // counts as failing, so that the startup does not wait for it.
                        if !resolver_failed {
                            warn!(error = %e, "cannot build the DNS resolver; DNS endpoints keep their last addresses");
                            resolver_failed = true;
                            for k in &wanted {
                                let state = map.names.entry(k.clone()).or_default();
                                state.failing = Some(e.clone());
                                state.failures += 1;
                            }
                            dns.store(Arc::new(map.clone()));
                        }
                        break;
                    }
                }
            }
            let r = Arc::clone(r.as_ref().expect("built above"));
            let task = resolve_loop(key.clone(), r, s.clone(), results_tx.clone());
            tasks.insert(key.clone(), tokio::task::spawn_local(task));
        }
        let before = map.names.len();
        tasks.retain(|k, t| {
            let keep = wanted.contains(k);
            if !keep {
                t.abort();
            }
            keep
        });
        map.names.retain(|k, _| wanted.contains(k));
        if map.names.len() != before {
            dns.store(Arc::new(map.clone()));
        }
        // Results until the next look at the config.
        let until = Instant::now() + LOOK_EVERY;
        let mut changed = false;
        while let Ok(Some((key, answer))) = tokio::time::timeout_at(until, results.recv()).await {
            if !wanted.contains(&key) {
                continue;
            }
            let state = map.names.entry(key.clone()).or_default();
            let was = state.clone();
            match answer {
                Ok((endpoints, _)) => {
                    if state.failing.is_some() {
                        info!(kind = key.kind(), name = key.name(), "name resolves again");
                    }
                    state.failing = None;
                    state.resolved = true;
                    if state.endpoints != endpoints {
                        let list: Vec<String> =
                            endpoints.iter().map(|(a, _)| a.to_string()).collect();
                        info!(kind = key.kind(), name = key.name(), endpoints = %list.join(","), "endpoints from DNS");
                        state.endpoints = endpoints;
                        changed = true;
                    }
                }
                Err(e) => {
                    state.failures += 1;
                    if state.failing.is_none() {
                        warn!(kind = key.kind(), name = key.name(), error = %e, kept = state.endpoints.len(), "name does not resolve; keeping its last endpoints");
                    }
                    state.failing = Some(e);
                }
            }
            if *state != was {
                dns.store(Arc::new(map.clone()));
            }
        }
        if changed {
            // Republished from the snapshot's own config (the file's, or the last reload's):
            // the fixed endpoints and settings stay, the DNS ones are replaced.
            shared.rcu(|cur| composed(&cur.config, &dns));
        }
        if first.is_some() && wanted.iter().all(|k| map.names.contains_key(k)) {
            let _ = first.take().map(|f| f.send(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml_endpoints: &str) -> Config {
        let yaml = format!(
            "listeners: [ {{ name: l, address: \"127.0.0.1:1\" }} ]\nroutes: [ {{ match: {{ path_prefix: / }}, cluster: c }} ]\nclusters:\n  - name: c\n    endpoints: {yaml_endpoints}\n"
        );
        Config::from_yaml(&yaml, "t.yaml").unwrap()
    }

    fn state(endpoints: &[(&str, u32)]) -> NameState {
        NameState {
            endpoints: endpoints.iter().map(|(a, w)| (a.parse().unwrap(), *w)).collect(),
            resolved: true,
            ..NameState::default()
        }
    }

    #[test]
    fn a_cluster_gets_its_fixed_endpoints_then_those_its_names_resolve_to() {
        let c = cluster(
            "[ \"127.0.0.9:80\", { dns: \"api.test:8080\", weight: 3 }, { srv: _http._tcp.api.test } ]",
        );
        assert_eq!(c.clusters[0].endpoints.len(), 1, "nothing resolved yet: the fixed one");
        let mut map = DnsMap::default();
        map.names.insert(
            NameKey::Host("api.test".into()),
            state(&[("10.0.0.1:0", 1), ("10.0.0.2:0", 1)]),
        );
        map.names.insert(
            NameKey::Srv("_http._tcp.api.test".into()),
            state(&[("10.0.0.3:9000", 5), ("10.0.0.1:8080", 7)]),
        );
        let c = compose(c, &map);
        let got: Vec<(String, u32)> = c.clusters[0]
            .endpoints
            .iter()
            .zip(&c.clusters[0].weights)
            .map(|(a, w)| (a.to_string(), *w))
            .collect();
        let want =
            [("127.0.0.9:80", 1), ("10.0.0.1:8080", 3), ("10.0.0.2:8080", 3), ("10.0.0.3:9000", 5)];
        let want: Vec<(String, u32)> = want.iter().map(|(a, w)| (a.to_string(), *w)).collect();
        assert_eq!(got, want, "the port and weight of a `dns` entry; an address listed twice once");
    }

    #[test]
    fn dns_endpoints_are_validated() {
        let errors = |eps: &str| {
            let yaml = format!(
                "listeners: [ {{ name: l, address: \"127.0.0.1:1\" }} ]\nroutes: [ {{ match: {{ path_prefix: / }}, cluster: c }} ]\nclusters: [ {{ name: c, endpoints: {eps} }} ]\nresolvers: [\"10.0.0.2\", \"nope\"]\ndns_min_ttl: 2m\ndns_max_ttl: 1m\n"
            );
            Config::from_yaml(&yaml, "t.yaml").unwrap_err().to_string()
        };
        let e = errors("[ { dns: \"api.test\" }, { srv: \"bad name!\" }, { srv: _a._tcp.x, weight: 2 }, { address: \"127.0.0.1:1\", dns: \"a.test:1\" } ]");
        for needle in [
            "clusters[0].endpoints[0].dns",
            "clusters[0].endpoints[1].srv",
            "clusters[0].endpoints[2].weight",
            "clusters[0].endpoints[3]",
            "resolvers[1]",
            "dns_min_ttl",
        ] {
            assert!(e.contains(needle), "{needle} in {e}");
        }
        assert!(!e.contains("resolvers[0]"), "a bare IP is port 53: {e}");
    }
}
