//! Zero-downtime binary upgrade (HAProxy's `-x`, Pingora's upgrade socket): on SIGUSR2 the
//! running process starts the binary again, with a Unix socket inherited as descriptor
//! `APEX_UPGRADE_FD`, and sends every listening socket over it (`SCM_RIGHTS`). The new process
//! validates its config and serves on those very sockets, then says `ready`; only then does
//! the old one stop accepting and drain. No listening socket is closed in between (the old
//! process never shuts a handed-over socket down), so no connection the kernel queued is reset.
//! If the new process fails to start, it exits; the old one sees its channel close and keeps
//! serving.
//!
//! The channel is a `SOCK_SEQPACKET` socket pair: each message is one line (`L name` with a
//! listener's socket, `A` with the admin API's socket, `E` for the end; back: `R pid`) and at
//! most one descriptor.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The environment variable naming the inherited channel's descriptor.
pub const FD_ENV: &str = "APEX_UPGRADE_FD";

/// Largest message on the channel, in bytes (a listener's name is far shorter).
const MAX_MESSAGE: usize = 1024;

/// Set once this process has handed its listening sockets to a new one: from then on closing
/// a listener must not shut the (shared) socket down. Written once by the main thread; read when
/// a listener closes, never per request.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::SeqCst)
}

/// Sends `text` and, if given, one descriptor.
fn send(channel: &OwnedFd, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: text.as_ptr() as *mut libc::c_void, iov_len: text.len() };
    // Room for one descriptor's control message, aligned as cmsghdr requires.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        assert!(space <= std::mem::size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` writable, aligned bytes, so the first header
        // and its data (one RawFd) fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(channel.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message: its text and the descriptor it carried, if any. `Ok(None)` when the
/// other end has closed.
fn recv(channel: &OwnedFd) -> io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 8];
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at live, writable buffers; MSG_CMSG_CLOEXEC marks any received
    // descriptor close-on-exec, so a later upgrade's child inherits only what it is sent.
    let n = unsafe { libc::recvmsg(channel.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    let mut fd = None;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control`; the CMSG macros walk
    // only within them, and an SCM_RIGHTS payload holds descriptors now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("upgrade message truncated"));
    }
    let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
    Ok(Some((text, fd)))
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The sockets a process started by an upgrade got from the old one.
pub struct Inherited {
    channel: OwnedFd,
    /// Listening sockets by listener name, in the old process's worker order.
    pub listeners: HashMap<String, Vec<TcpListener>>,
    pub admin: Option<TcpListener>,
}

impl Inherited {
    /// The old process's sockets, when this process was started by an upgrade (`FD_ENV` set);
    /// reads them all before anything else starts.
    pub fn from_env() -> io::Result<Option<Inherited>> {
        // Left in the environment (removing it is not thread-safe, and threads run already):
        // a later upgrade sets its own value for its child.
        let Some(v) = std::env::var_os(FD_ENV) else { return Ok(None) };
        let raw: RawFd = v
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("{FD_ENV} is not a descriptor number")))?;
        // SAFETY: the old process passed this descriptor open for exactly this use, and
        // nothing else in this process knows it.
        let channel = unsafe { OwnedFd::from_raw_fd(raw) };
        // Marks it close-on-exec, as every other descriptor of ours.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(channel.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let mut inherited = Inherited { channel, listeners: HashMap::new(), admin: None };
        loop {
            let Some((text, fd)) = recv(&inherited.channel)? else {
                return Err(io::Error::other("the old process closed the upgrade channel"));
            };
            match (text.split_once(' '), fd) {
                (Some(("L", name)), Some(fd)) => {
                    let l = TcpListener::from(fd);
                    inherited.listeners.entry(name.to_string()).or_default().push(l);
                }
                (None, Some(fd)) if text == "A" => inherited.admin = Some(TcpListener::from(fd)),
                (None, None) if text == "E" => return Ok(Some(inherited)),
                _ => return Err(io::Error::other(format!("unexpected upgrade message {text:?}"))),
            }
        }
    }

    /// Tells the old process that this one is serving: it stops accepting and drains.
    pub fn ready(self) -> io::Result<()> {
        send(&self.channel, &format!("R {}", std::process::id()), None)
    }
}

/// An upgrade in progress, on the old process's side.
pub struct Handover {
    child: Child,
    channel: OwnedFd,
}

/// Starts `exe args` as the new process and sends it every listening socket and the admin
/// API's socket.
pub fn begin(
    exe: &Path,
    args: &[OsString],
    listeners: &[(String, Vec<TcpListener>)],
    admin: Option<BorrowedFd<'_>>,
) -> io::Result<Handover> {
    let (ours, theirs) = seqpacket_pair()?;
    // The child's end must survive exec: a copy without close-on-exec, closed here once the
    // child has started.
    // SAFETY: dup of a descriptor we own; the copy is owned by `inherit` below.
    let raw = unsafe { libc::dup(theirs.as_raw_fd()) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: dup succeeded; `raw` is a new descriptor nobody else owns.
    let inherit = unsafe { OwnedFd::from_raw_fd(raw) };
    drop(theirs);
    let child =
        Command::new(exe).args(args).env(FD_ENV, inherit.as_raw_fd().to_string()).spawn()?;
    drop(inherit);
    let mut h = Handover { child, channel: ours };
    let sent = (|| {
        for (name, socks) in listeners {
            for s in socks {
                send(&h.channel, &format!("L {name}"), Some(s.as_fd()))?;
            }
        }
        if let Some(a) = admin {
            send(&h.channel, "A", Some(a))?;
        }
        send(&h.channel, "E", None)
    })();
    if let Err(e) = sent {
        let _ = h.child.kill();
        let _ = h.child.wait();
        return Err(e);
    }
    Ok(h)
}

impl Handover {
    /// The new process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the new process says it serves (its PID), or fails: it exited, closed the
    /// channel, or said nothing within `limit` (then it is killed). The old process keeps
    /// serving in every failure case.
    pub fn wait_ready(mut self, limit: Duration) -> Result<u32, String> {
        let deadline = Instant::now() + limit;
        let fd = self.channel.as_raw_fd();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!("the new process did not start serving within {limit:?}"));
            }
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.to_string());
            }
            if rc == 0 {
                continue;
            }
            return match recv(&self.channel) {
                Ok(Some((text, _))) => match text.strip_prefix("R ").and_then(|p| p.parse().ok()) {
                    Some(pid) => Ok(pid),
                    None => Err(format!("unexpected answer {text:?} from the new process")),
                },
                Ok(None) | Err(_) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    Err(format!("the new process exited before serving ({status})"))
                }
            };
        }
    }
}

/// Marks this process as having handed its sockets over (see [`handed_over`]).
pub fn mark_handed_over() {
    HANDED_OVER.store(true, Ordering::SeqCst);
}

/// Tells systemd about this process (`sd_notify`), when it runs under a unit with
/// `NotifyAccess=all`; does nothing otherwise.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket address.
        Some(name) => SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a)),
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
