//! Reloading the config while serving: read, validate, open new listeners, publish the new
//! snapshot, close removed listeners. Any failure leaves the running config untouched.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::SystemTime;

use tracing::info;

use crate::config::{Config, ConfigErrors};
use crate::listener::{bind_reuseport, BindError};
use crate::proxy::worker_tasks::Control;
use crate::runtime::Server;

/// The active config, as `/config` reports it.
#[derive(Debug, Clone)]
pub struct Active {
    /// The file's text.
    pub text: String,
    /// 64-bit hash of `text`, hex.
    pub hash: String,
    pub loaded_at: SystemTime,
}

impl Active {
    pub fn new(text: String) -> Active {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        Active { hash: format!("{:016x}", h.finish()), text, loaded_at: SystemTime::now() }
    }
}

#[derive(Debug)]
pub enum ReloadError {
    /// The new file is not a valid config; every problem is listed.
    Invalid(ConfigErrors),
    /// The change cannot be applied to running workers.
    NeedsRestart(&'static str),
    /// A new listener could not be opened.
    Bind(BindError),
    /// Apex runs without a config file (`apex proxy`).
    NoFile,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::NeedsRestart(key) => {
                write!(f, "changing `{key}` needs a restart; the running config is unchanged")
            }
            ReloadError::Bind(e) => write!(f, "{e}; the running config is unchanged"),
            ReloadError::NoFile => write!(f, "apex was started without a config file"),
        }
    }
}

/// Command-line settings that override the file, on every load.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub runtime: Option<crate::config::RuntimeKind>,
    pub workers: Option<crate::config::Workers>,
}

impl Overrides {
    pub fn apply(&self, c: &mut Config) {
        if let Some(r) = self.runtime {
            c.runtime = r;
        }
        if let Some(w) = self.workers {
            c.workers = w;
        }
    }
}

/// Owns the config file's path and what is live; used only by the main thread.
pub struct Reloader {
    path: Option<PathBuf>,
    overrides: Overrides,
    pub config: Config,
    pub active: Active,
}

impl Reloader {
    pub fn new(config: Config, overrides: Overrides) -> Reloader {
        let text = config
            .source
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        Reloader { path: config.source.clone(), overrides, config, active: Active::new(text) }
    }

    /// Reads the file again and applies it; returns a one-line summary.
    pub fn reload(&mut self, server: &mut Server) -> Result<String, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ReloadError::Invalid(ConfigErrors(vec![crate::config::ConfigError {
                file: path.display().to_string(),
                line: None,
                key: String::new(),
                problem: crate::config::Problem::Unreadable(e.to_string()),
            }]))
        })?;
        let mut next =
            Config::from_yaml(&text, &path.display().to_string()).map_err(ReloadError::Invalid)?;
        next.source = Some(path);
        self.overrides.apply(&mut next);
        if next.workers != self.config.workers {
            return Err(ReloadError::NeedsRestart("workers"));
        }
        if next.runtime != self.config.runtime {
            return Err(ReloadError::NeedsRestart("runtime"));
        }
        if next.admin != self.config.admin {
            return Err(ReloadError::NeedsRestart("admin"));
        }
        if next.access_log != self.config.access_log {
            return Err(ReloadError::NeedsRestart("access_log"));
        }

        // Listeners, by name: bind every new one before changing anything. A listener whose
        // address changed is moved: its old sockets close and new ones open, under one name.
        // What a name is bound to now is `server.listeners` (port 0 resolved), so a port-0
        // listener rewritten with the port it got is not a move.
        let bound_at = |name: &str| server.listeners.iter().find(|(n, _)| n == name).map(|b| b.1);
        let old = &self.config.listeners;
        let moved: Vec<String> = next
            .listeners
            .iter()
            .filter(|n| {
                old.iter()
                    .find(|o| o.name == n.name)
                    .is_some_and(|o| o.address != n.address && bound_at(&n.name) != Some(n.address))
            })
            .map(|n| n.name.clone())
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|o| next.listeners.iter().all(|n| n.name != o.name))
            .map(|o| o.name.clone())
            .collect();
        let mut opened = Vec::new();
        for l in &next.listeners {
            if old.iter().any(|o| o.name == l.name) && !moved.contains(&l.name) {
                continue;
            }
            let socks = bind_reuseport(l.address, server.workers).map_err(ReloadError::Bind)?;
            opened.push((l.clone(), socks));
        }

        let summary = format!(
            "{} routes, {} clusters, {} listeners ({} added, {} removed, {} moved)",
            next.routes.len(),
            next.clusters.len(),
            next.listeners.len(),
            opened.len() - moved.len(),
            removed.len(),
            moved.len()
        );
        crate::discovery::publish(&server.shared, &server.dns, &next);
        for name in removed.iter().chain(&moved) {
            for w in 0..server.workers {
                server.order(w, Control::RemoveListener(name.clone()));
            }
            server.listeners.retain(|(n, _)| n != name);
            // Its sockets are no longer handed over on an upgrade (and close once every
            // worker has stopped accepting on them).
            server.sockets.retain(|(n, _)| n != name);
        }
        for (l, socks) in opened {
            let bound = socks[0]
                .local_addr()
                .map_err(|e| ReloadError::Bind(BindError::Other(l.address, e)))?;
            let mut resolved = l.clone();
            resolved.address = bound;
            let copies = socks.iter().map(|s| s.try_clone()).collect::<Result<Vec<_>, _>>();
            server.sockets.push((
                l.name.clone(),
                copies.map_err(|e| ReloadError::Bind(BindError::Other(bound, e)))?,
            ));
            info!(listener = %l.name, address = %bound, "listening");
            for (w, s) in socks.into_iter().enumerate() {
                server.order(w, Control::AddListener(Box::new(resolved.clone()), s));
            }
            server.listeners.push((l.name.clone(), bound));
        }
        self.config = next;
        self.active = Active::new(text);
        Ok(summary)
    }
}
