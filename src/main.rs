//! The `apex` command line: run from a config file, check a config, or proxy quickly.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use apex::config::{
    self, Action, Cluster, Config, Listener, PathMatch, Route, RuntimeKind, Workers,
};
use clap::{Parser, Subcommand};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Instant;

use apex::lifecycle::{self, Lifecycle};
use apex::proxy::worker_tasks::Control;
use apex::reload::{Overrides, Reloader};
use tracing::{error, info, warn};

const DEFAULT_CONFIG: &str = "configs/apex.yaml";

#[derive(Parser)]
#[command(name = "apex", version, about = "A thread-per-core HTTP reverse proxy on io_uring")]
struct Cli {
    /// Config file to run.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Event driver: io_uring or epoll (overrides the config's `runtime`).
    #[arg(long)]
    runtime: Option<String>,
    /// Worker threads (overrides the config's `workers`).
    #[arg(long)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0, or 1 with every error (file, key path, problem).
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Proxy without a config file, round robin over the `--to` endpoints.
    Proxy {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: SocketAddr,
        /// Upstream endpoint (ip:port or host:port); repeat for several.
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        #[arg(long)]
        workers: Option<usize>,
        /// Connect and response-head timeout, e.g. 2s or 500ms.
        #[arg(long, default_value = "2s")]
        upstream_timeout: String,
        #[arg(long)]
        runtime: Option<String>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn parse_runtime(s: &str) -> anyhow::Result<RuntimeKind> {
    RuntimeKind::parse(s)
        .ok_or_else(|| anyhow!("unknown runtime `{s}`: use io_uring, epoll or tokio"))
}

fn workers_from(n: usize) -> anyhow::Result<Workers> {
    if (1..=1024).contains(&n) {
        Ok(Workers::Count(n))
    } else {
        Err(anyhow!("--workers must be from 1 to 1024"))
    }
}

/// The config `apex proxy` runs: one listener, one cluster, one catch-all route, with the same
/// defaults as a config file.
fn quick_proxy_config(
    listen: SocketAddr,
    to: &[String],
    workers: Option<usize>,
    upstream_timeout: &str,
    runtime: Option<&str>,
) -> anyhow::Result<Config> {
    let timeout =
        config::parse_duration(upstream_timeout).filter(|d| !d.is_zero()).ok_or_else(|| {
            anyhow!("--upstream-timeout `{upstream_timeout}` is not a duration like 2s")
        })?;
    let mut endpoints = Vec::new();
    for t in to {
        use std::net::ToSocketAddrs;
        let addr = t
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| anyhow!("--to `{t}` is not host:port or does not resolve"))?;
        endpoints.push(addr);
    }
    let mut cluster = Cluster::with_defaults("upstream", endpoints);
    cluster.connect_timeout = timeout;
    cluster.response_timeout = timeout;
    Ok(Config {
        source: None,
        workers: workers.map(workers_from).transpose()?.unwrap_or(Workers::Auto),
        runtime: runtime.map(parse_runtime).transpose()?.unwrap_or(RuntimeKind::IoUring),
        worker_connections: config::defaults::WORKER_CONNECTIONS,
        drain_timeout: config::defaults::DRAIN_TIMEOUT,
        admin: None,
        access_log: None,
        listeners: vec![Listener::with_defaults("proxy", listen)],
        routes: vec![Route {
            name: "proxy".into(),
            retry: None,
            timeouts: Default::default(),
            host: config::HostMatch::Any,
            path: PathMatch::Prefix("/".into()),
            method: None,
            action: Action::Forward(0),
        }],
        clusters: vec![cluster],
    })
}

/// Runs until SIGTERM/SIGINT and a graceful drain (at most `drain_timeout`); a second signal
/// exits at once.
fn run(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    lifecycle::block_signals().context("cannot block signals")?;
    let (events, lifecycle_events) = mpsc::channel();
    let mut reloader = Reloader::new(config.clone(), overrides);
    let mut server =
        apex::runtime::start(config, events.clone()).context("apex could not start")?;
    if let Some(admin) = reloader.config.admin {
        apex::admin::start(admin, events.clone())
            .with_context(|| format!("cannot start the admin API on {admin}"))?;
    }
    lifecycle::forward_signals(events).context("cannot start the signal thread")?;
    let mut alive = server.workers;
    let mut deadline: Option<Instant> = None;
    loop {
        let event = match deadline {
            None => lifecycle_events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => lifecycle_events.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match event {
            Ok(Lifecycle::Stop(sig)) if deadline.is_none() => {
                info!(
                    signal = lifecycle::signal_name(sig),
                    timeout = ?reloader.config.drain_timeout,
                    "draining: no new connections, finishing requests in flight"
                );
                server.drain();
                deadline = Some(Instant::now() + reloader.config.drain_timeout);
            }
            Ok(Lifecycle::Stop(sig)) => {
                warn!(signal = lifecycle::signal_name(sig), "second signal: exiting now");
                std::process::exit(1);
            }
            Ok(Lifecycle::Reload(reply)) => {
                let outcome = if deadline.is_some() {
                    Err("draining: reload refused".to_string())
                } else {
                    reloader.reload(&mut server).map_err(|e| e.to_string())
                };
                match &outcome {
                    Ok(summary) => {
                        info!(config = %reloader.active.hash, "config reloaded: {summary}")
                    }
                    Err(e) => error!("reload refused, the running config keeps serving:\n{e}"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            Ok(Lifecycle::ReopenLogs) => {
                if let Some(log) = &server.access_log {
                    let _ = log.send(apex::access_log::LogMessage::Reopen);
                    info!("access log reopened");
                }
            }
            Ok(Lifecycle::Scrape(reply)) => {
                let _ = reply.send(scrape(&server));
            }
            Ok(Lifecycle::ShowConfig(reply)) => {
                let a = &reloader.active;
                let text = format!(
                    "# hash: {}\n# loaded_at: {}\n{}",
                    a.hash,
                    apex::timefmt::rfc3339(a.loaded_at),
                    a.text
                );
                let _ = reply.send(text);
            }
            Ok(Lifecycle::WorkerExited(id)) => {
                alive -= 1;
                if deadline.is_none() {
                    error!(worker = id, "a worker stopped without being asked to");
                }
                if alive == 0 && deadline.is_none() {
                    return Err(anyhow!("every worker stopped"));
                }
                if alive == 0 {
                    server.finish();
                    info!("all workers drained; exiting");
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                warn!(workers_left = alive, "drain timeout reached; closing remaining connections");
                return Ok(());
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Asks every worker for its counters and renders the sum.
fn scrape(server: &apex::runtime::Server) -> String {
    let (tx, rx) = mpsc::channel();
    for w in 0..server.workers {
        server.order(w, Control::Scrape(tx.clone()));
    }
    let mut total = apex::stats::StatsReport::default();
    for _ in 0..server.workers {
        match rx.recv_timeout(std::time::Duration::from_secs(2)) {
            Ok(r) => total.merge(&r),
            Err(_) => break,
        }
    }
    total.to_prometheus()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Some(Command::Check { config }) => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} clusters)",
                    config.display(),
                    c.listeners.len(),
                    c.routes.len(),
                    c.clusters.len()
                );
                return ExitCode::SUCCESS;
            }
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::FAILURE;
            }
        },
        Some(Command::Proxy { listen, to, workers, upstream_timeout, runtime }) => {
            quick_proxy_config(listen, &to, workers, &upstream_timeout, runtime.as_deref())
                .and_then(|c| run(c, Overrides::default()))
        }
        None => (|| {
            let overrides = Overrides {
                runtime: cli.runtime.as_deref().map(parse_runtime).transpose()?,
                workers: cli.workers.map(workers_from).transpose()?,
            };
            let mut config = Config::load(&cli.config).map_err(|e| anyhow!("{e}"))?;
            overrides.apply(&mut config);
            run(config, overrides)
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
