//! Binding listening sockets: one `SO_REUSEPORT` socket per worker and configured listener.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel accept queue length per worker socket.
const BACKLOG: i32 = 4096;

#[derive(Debug)]
pub enum BindError {
    /// Another process holds the address; the kernel would otherwise let us share it silently
    /// when that process also set `SO_REUSEPORT`.
    InUse(SocketAddr),
    Other(SocketAddr, io::Error),
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindError::InUse(a) => write!(f, "address {a} is already in use by another process"),
            BindError::Other(a, e) => write!(f, "cannot listen on {a}: {e}"),
        }
    }
}

impl std::error::Error for BindError {}

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted Apex bind while old connections sit in TIME_WAIT.
    s.set_reuse_address(true)?;
    Ok(s)
}

fn map_err(addr: SocketAddr, e: io::Error) -> BindError {
    if e.kind() == io::ErrorKind::AddrInUse {
        BindError::InUse(addr)
    } else {
        BindError::Other(addr, e)
    }
}

/// Whether a socket bound at `at` serves a listener configured at `want`: the same address,
/// or any port of the same IP when the config says port 0 (how sockets an upgrade hands over
/// are matched to the new config's listeners).
pub fn serves_address(at: SocketAddr, want: SocketAddr) -> bool {
    at == want || (want.port() == 0 && at.ip() == want.ip())
}

/// Binds `count` listening sockets sharing `addr` through `SO_REUSEPORT`, one per worker.
/// With port 0 the kernel picks a port for the first and the rest share it.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>, BindError> {
    if addr.port() != 0 {
        // Probe without SO_REUSEPORT: it fails if anyone listens on the address, even a process
        // that would share it with us.
        let probe = socket_for(addr).map_err(|e| map_err(addr, e))?;
        probe.bind(&addr.into()).map_err(|e| map_err(addr, e))?;
        probe.listen(1).map_err(|e| map_err(addr, e))?;
        drop(probe);
    }
    bind_group(addr, count)
}

/// Adds `count` sockets to the `SO_REUSEPORT` group already listening on `addr` (sockets an
/// upgrade handed over, when this process has more workers than the old one had).
pub fn bind_more(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>, BindError> {
    bind_group(addr, count)
}

fn bind_group(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>, BindError> {
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let s = socket_for(bound).map_err(|e| map_err(bound, e))?;
        s.set_reuse_port(true).map_err(|e| map_err(bound, e))?;
        s.set_nonblocking(true).map_err(|e| map_err(bound, e))?;
        s.bind(&bound.into()).map_err(|e| map_err(bound, e))?;
        s.listen(BACKLOG).map_err(|e| map_err(bound, e))?;
        let l: TcpListener = s.into();
        if bound.port() == 0 {
            bound = l.local_addr().map_err(|e| map_err(addr, e))?;
        }
        out.push(l);
    }
    Ok(out)
}
