//! The process's lifecycle outside the data plane: signals, and what the main thread waits for.
//!
//! Signals are blocked in every thread (the mask is inherited by the workers) and received
//! synchronously by one thread with `sigwait`, so no handler ever runs inside a worker.

use std::io;
use std::sync::mpsc::Sender;

/// What the main thread reacts to.
#[derive(Debug)]
pub enum Lifecycle {
    /// SIGTERM or SIGINT: drain; a second one: exit at once.
    Stop(i32),
    /// A worker thread ended (drained, or died).
    WorkerExited(usize),
    /// SIGHUP, or `POST /reload` (which waits for the outcome on the sender).
    Reload(Option<Sender<Result<String, String>>>),
    /// `GET /metrics`: the summed counters of every worker, as Prometheus text.
    Scrape(Sender<String>),
    /// `GET /` and `GET /endpoints`: every cluster's endpoints with state and traffic.
    Status(Sender<crate::status::Status>),
    /// `GET /config`: the active config's text, hash and load time.
    ShowConfig(Sender<String>),
    /// SIGUSR1: reopen the access log file (after logrotate moved it).
    ReopenLogs,
    /// SIGUSR2: start the binary again and hand it the listening sockets.
    Upgrade,
    /// How an upgrade ended: the new process's PID once it serves, or why it failed.
    UpgradeDone(Result<u32, String>),
}

/// The signals Apex handles itself.
const HANDLED: [i32; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set they are given, which lives on the stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the handled signals in the calling thread; call before starting any other thread.
pub fn block_signals() -> io::Result<()> {
    let set = handled_set();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a thread that waits for the handled signals and reports each one.
pub fn forward_signals(events: Sender<Lifecycle>) -> io::Result<()> {
    std::thread::Builder::new().name("apex-signals".into()).spawn(move || {
        let set = handled_set();
        loop {
            let mut sig = 0;
            // SAFETY: `set` is valid and blocked in every thread; `sig` is a valid out-pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            let event = match sig {
                libc::SIGHUP => Lifecycle::Reload(None),
                libc::SIGUSR1 => Lifecycle::ReopenLogs,
                libc::SIGUSR2 => Lifecycle::Upgrade,
                _ => Lifecycle::Stop(sig),
            };
            if events.send(event).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}
