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
use apex::log_writer::LogWriter;
use apex::reload::{Overrides, Reloader};
use tracing::{error, info, warn};

const DEFAULT_CONFIG: &str = "configs/apex.yaml";
/// How long an upgrade waits for the new process to serve (its DNS names and workers
/// included) before killing it and keeping the old one.
const UPGRADE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Parser)]
#[command(name = "apex", version, about = "A thread-per-core HTTP reverse proxy on io_uring")]
struct Cli {
    /// Config file to run.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Runtime: io_uring, epoll or tokio (overrides the config's `runtime`).
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
    /// Validate a config file: exit 0, or 1 with every error (file, line, key path, problem).
    /// `apex check FILE` and `apex check --config FILE` are the same.
    Check {
        /// The config file (default: configs/apex.yaml).
        file: Option<PathBuf>,
        #[arg(long, conflicts_with = "file")]
        config: Option<PathBuf>,
    },
    /// Proxy without a config file, round robin over the `--to` endpoints.
    Proxy(ProxyArgs),
    /// Upgrade a running Apex to the binary now at its path, without dropping a connection:
    /// sends it SIGUSR2 and waits until it has handed its sockets over and drained.
    Upgrade {
        /// The running process.
        #[arg(long)]
        pid: i32,
        /// How long to wait for the old process to exit (default 60s).
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
}

/// `apex proxy`'s settings.
#[derive(clap::Args)]
struct ProxyArgs {
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
    /// Runtime: io_uring, epoll or tokio.
    #[arg(long)]
    runtime: Option<String>,
    /// Attempts per request in all (1 = no retry); connect failures and stale pooled
    /// connections are retried, like a route's default `retry`.
    #[arg(long, default_value_t = config::defaults::RETRY_ATTEMPTS)]
    retries: u32,
    /// Probe every endpoint with `GET PATH` (default interval and thresholds) and send no
    /// requests to endpoints that fail.
    #[arg(long, value_name = "PATH")]
    health_check: Option<String>,
    /// Balancing policy: round_robin, least_request or random.
    #[arg(long, default_value = "round_robin")]
    policy: String,
}

/// Logs go to standard error through a writer thread, so no worker ever waits on the
/// terminal or the journal (see `log_writer`). The returned writer flushes before exit.
fn init_logging() -> Option<LogWriter> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    match LogWriter::stderr() {
        Ok(writer) => {
            builder.with_writer(writer.clone()).init();
            Some(writer)
        }
        Err(_) => {
            builder.with_writer(std::io::stderr).init();
            None
        }
    }
}

/// Logs what a loaded config says without failing: warnings, and host names it resolved.
pub fn log_config_notes(c: &Config) {
    for w in &c.warnings {
        warn!("config warning: {w}");
    }
    for r in &c.resolved {
        info!(cluster = %r.cluster, endpoint = %r.name, address = %r.address, "endpoint resolved");
    }
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
fn quick_proxy_config(q: &ProxyArgs) -> anyhow::Result<Config> {
    let ProxyArgs { listen, to, workers, upstream_timeout, runtime, retries, health_check, policy } =
        q;
    let (retries, workers, listen) = (*retries, *workers, *listen);
    let (policy, runtime, health_check) =
        (policy.as_str(), runtime.as_deref(), health_check.as_deref());
    let timeout =
        config::parse_duration(upstream_timeout).filter(|d| !d.is_zero()).ok_or_else(|| {
            anyhow!("--upstream-timeout `{upstream_timeout}` is not a duration like 2s")
        })?;
    if !(1..=10).contains(&retries) {
        return Err(anyhow!("--retries must be from 1 to 10 (attempts in all)"));
    }
    let policy = match policy {
        "round_robin" => config::lb::Policy::RoundRobin,
        "least_request" => config::lb::Policy::LeastRequest,
        "random" => config::lb::Policy::Random,
        other => {
            return Err(anyhow!(
                "--policy `{other}`: use round_robin, least_request or random (consistent_hash needs a config file)"
            ))
        }
    };
    let mut endpoints = Vec::new();
    let mut resolved = Vec::new();
    for t in to {
        use std::net::ToSocketAddrs;
        let addr = t
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| anyhow!("--to `{t}` is not host:port or does not resolve"))?;
        if t.parse::<SocketAddr>().is_err() {
            let (cluster, name) = ("upstream".to_string(), t.clone());
            resolved.push(config::Resolved { cluster, name, address: addr });
        }
        endpoints.push(addr);
    }
    let mut cluster = Cluster::with_defaults("upstream", endpoints);
    cluster.connect_timeout = timeout;
    cluster.response_timeout = timeout;
    cluster.policy = policy;
    if let Some(path) = health_check {
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(anyhow!("--health-check `{path}` must be a path starting with /"));
        }
        cluster.health_check = Some(config::lb::HealthCheck {
            path: path.to_string(),
            interval: config::defaults::HEALTH_INTERVAL,
            timeout: config::defaults::HEALTH_TIMEOUT,
            healthy_threshold: config::defaults::HEALTHY_THRESHOLD,
            unhealthy_threshold: config::defaults::UNHEALTHY_THRESHOLD,
            expected_statuses: Vec::new(),
            fail_open: true,
        });
    }
    let retry = config::lb::RetryPolicy { attempts: retries, ..Default::default() };
    Ok(Config {
        source: None,
        workers: workers.map(workers_from).transpose()?.unwrap_or(Workers::Auto),
        runtime: runtime.map(parse_runtime).transpose()?.unwrap_or(RuntimeKind::IoUring),
        worker_connections: config::defaults::WORKER_CONNECTIONS,
        drain_timeout: config::defaults::DRAIN_TIMEOUT,
        admin: None,
        access_log: None,
        dns: config::DnsSettings::default(),
        max_endpoint_series: config::defaults::MAX_ENDPOINT_SERIES,
        listeners: vec![Listener::with_defaults("proxy", listen)],
        routes: vec![Route {
            name: "proxy".into(),
            retry,
            upgrade: config::defaults::UPGRADE.iter().map(|u| u.to_string()).collect(),
            tunnel_idle_timeout: config::defaults::TUNNEL_IDLE_TIMEOUT,
            allow: Vec::new(),
            deny: Vec::new(),
            request_edits: None,
            response_edits: None,
            path_edit: None,
            host_rewrite: None,
            compression: None,
            timeouts: Default::default(),
            host: config::HostMatch::Any,
            path: PathMatch::Prefix("/".into()),
            method: None,
            action: Action::Forward(0),
        }],
        clusters: vec![cluster],
        warnings: Vec::new(),
        resolved,
    })
}

/// `apex upgrade --pid PID`: SIGUSR2, then wait until the old process exits (it exits only
/// after the new one serves and the old one has drained).
fn upgrade_command(pid: i32, timeout: &str) -> anyhow::Result<()> {
    let limit =
        config::parse_duration(timeout).ok_or_else(|| anyhow!("bad --timeout `{timeout}`"))?;
    // A pidfd turns "wait until that process exits" into a poll, with no sleep loop.
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(anyhow!("no process {pid}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open succeeded: `fd` is ours.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: kill with a valid signal number.
    if unsafe { libc::kill(pid, libc::SIGUSR2) } != 0 {
        return Err(anyhow!("cannot signal {pid}: {}", std::io::Error::last_os_error()));
    }
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
        println!("apex {pid} handed its sockets over and exited");
        return Ok(());
    }
    Err(anyhow!(
        "apex {pid} is still running after {timeout}: the upgrade failed or its drain is not over (see its log)"
    ))
}

/// Runs until SIGTERM/SIGINT and a graceful drain (at most `drain_timeout`); a second signal
/// exits at once.
fn run(config: Config, overrides: Overrides, logs: Option<&LogWriter>) -> anyhow::Result<()> {
    log_config_notes(&config);
    // Started by an upgrade: the old process's sockets, taken before anything else starts.
    let mut inherited = apex::upgrade::Inherited::from_env()
        .context("cannot take over the listening sockets of the process being upgraded")?;
    let inherited_listeners =
        inherited.as_mut().map(|i| std::mem::take(&mut i.listeners)).unwrap_or_default();
    let inherited_admin = inherited.as_mut().and_then(|i| i.admin.take());
    // The binary to start on an upgrade: this path, whatever file is there by then.
    let exe = std::env::current_exe().context("cannot find apex's own executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (events, lifecycle_events) = mpsc::channel();
    let mut reloader = Reloader::new(config.clone(), overrides);
    let mut server = apex::runtime::start(config, events.clone(), inherited_listeners)
        .context("apex could not start")?;
    let mut admin_socket = None;
    if let Some(admin) = reloader.config.admin {
        let (_, socket) = apex::admin::start(admin, events.clone(), inherited_admin)
            .with_context(|| format!("cannot start the admin API on {admin}"))?;
        admin_socket = Some(socket);
    }
    lifecycle::forward_signals(events.clone()).context("cannot start the signal thread")?;
    if let Some(i) = inherited {
        i.ready().context("cannot tell the old process that this one serves")?;
        info!("upgrade: serving on the sockets of the old process, which now drains");
    }
    // systemd (Type=notify, NotifyAccess=all): this process is the service's main process.
    apex::upgrade::notify_systemd(&format!("READY=1\nMAINPID={}", std::process::id()));
    let mut upgrading = false;
    // The new process of an upgrade in progress.
    let mut upgrade_child: Option<u32> = None;
    let mut alive = server.workers;
    let mut deadline: Option<Instant> = None;
    loop {
        let event = match deadline {
            None => lifecycle_events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => lifecycle_events.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match event {
            Ok(Lifecycle::Stop(sig)) if deadline.is_none() => {
                // A stop during an upgrade cancels it: the new process has the listening
                // sockets, and this drain shuts them down.
                if let Some(pid) = upgrade_child.take() {
                    warn!(
                        new_pid = pid,
                        "stopping during an upgrade: the new process is stopped too"
                    );
                    // SAFETY: kill with a valid signal, to the child this process started.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
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
                if let Some(l) = logs {
                    l.flush();
                }
                std::process::exit(1);
            }
            Ok(Lifecycle::Reload(reply)) => {
                let outcome = if deadline.is_some() {
                    Err("draining: reload refused".to_string())
                } else if upgrading {
                    // The new process has the listeners as they are now, and reads the file
                    // itself: a reload here could only make the two disagree.
                    Err("an upgrade is under way: reload refused".to_string())
                } else {
                    reloader.reload(&mut server).map_err(|e| e.to_string())
                };
                match &outcome {
                    Ok(summary) => {
                        log_config_notes(&reloader.config);
                        info!(config = %reloader.active.hash, "config reloaded: {summary}")
                    }
                    Err(e) => error!("reload refused, the running config keeps serving:\n{e}"),
                }
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }
            Ok(Lifecycle::Upgrade) if deadline.is_some() || upgrading => {
                warn!("upgrade refused: an upgrade or a drain is already under way");
            }
            Ok(Lifecycle::Upgrade) => {
                let admin_fd = admin_socket.as_ref().map(std::os::fd::AsFd::as_fd);
                match apex::upgrade::begin(&exe, &args, &server.sockets, admin_fd) {
                    Ok(h) => {
                        upgrading = true;
                        upgrade_child = Some(h.pid());
                        info!(binary = %exe.display(), new_pid = h.pid(), "upgrade: started the new process; serving until it does");
                        let events = events.clone();
                        let wait = std::thread::Builder::new().name("apex-upgrade".into()).spawn(
                            move || {
                                let r = h.wait_ready(UPGRADE_LIMIT);
                                let _ = events.send(Lifecycle::UpgradeDone(r));
                            },
                        );
                        if let Err(e) = wait {
                            upgrading = false;
                            error!("upgrade failed: {e}; still serving");
                        }
                    }
                    Err(e) => {
                        error!("upgrade failed: cannot start {}: {e}; still serving", exe.display())
                    }
                }
            }
            Ok(Lifecycle::UpgradeDone(Ok(pid))) if deadline.is_some() => {
                upgrading = false;
                warn!(
                    new_pid = pid,
                    "the new process says it serves, but this one was stopped meanwhile"
                );
            }
            Ok(Lifecycle::UpgradeDone(Ok(pid))) => {
                upgrading = false;
                upgrade_child = None;
                apex::upgrade::mark_handed_over();
                info!(
                    new_pid = pid,
                    timeout = ?reloader.config.drain_timeout,
                    "upgrade: the new process serves; draining: no new connections, finishing requests in flight"
                );
                server.drain();
                deadline = Some(Instant::now() + reloader.config.drain_timeout);
            }
            Ok(Lifecycle::UpgradeDone(Err(e))) => {
                upgrading = false;
                upgrade_child = None;
                error!("upgrade failed: {e}; still serving");
            }
            Ok(Lifecycle::ReopenLogs) => {
                if let Some(log) = &server.access_log {
                    let _ = log.send(apex::access_log::LogMessage::Reopen);
                    info!("access log reopened");
                }
            }
            Ok(Lifecycle::Status(reply)) => {
                let _ = reply.send(server.status());
            }
            Ok(Lifecycle::Scrape(reply)) => {
                let _ = reply.send(server.scrape().to_prometheus());
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts (the log writer is the first): every thread inherits the mask,
    // so the handled signals reach only the signal thread's sigwait.
    if let Err(e) = lifecycle::block_signals() {
        eprintln!("apex: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let logs = init_logging();
    let result = match cli.command {
        Some(Command::Check { file, config }) => {
            let config = file.or(config).unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            match Config::load(&config) {
                Ok(c) => {
                    for w in &c.warnings {
                        eprintln!("warning: {w}");
                    }
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
            }
        }
        Some(Command::Upgrade { pid, timeout }) => upgrade_command(pid, &timeout),
        Some(Command::Proxy(args)) => {
            quick_proxy_config(&args).and_then(|c| run(c, Overrides::default(), logs.as_ref()))
        }
        None => (|| {
            let overrides = Overrides {
                runtime: cli.runtime.as_deref().map(parse_runtime).transpose()?,
                workers: cli.workers.map(workers_from).transpose()?,
            };
            let mut config = Config::load(&cli.config).map_err(|e| anyhow!("{e}"))?;
            overrides.apply(&mut config);
            run(config, overrides, logs.as_ref())
        })(),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(l) = &logs {
        l.flush();
    }
    code
}
