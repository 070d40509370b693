//! Zero-copy relay of large plaintext response bodies: the bytes go from the upstream socket
//! into a pipe and from the pipe to the client socket inside the kernel (`splice(2)`), never
//! copied through Apex's buffers. Only for a body that passes through unchanged (the same
//! `Content-Length` on both sides) between two plaintext TCP connections.
//!
//! Each worker keeps its own pipes; a pipe is lent to one response at a time and comes back
//! empty, so bytes of two responses never meet in one pipe.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::io::Stream;
use super::wait::{before, SendBound};

/// Bodies at least this long (bytes still to come after the first read) are spliced. Below
/// it the two extra system calls per chunk cost more than the copies they save.
pub const SPLICE_MIN: u64 = 16 * 1024;
/// Pipes one worker holds at most (lent and spare): each holds up to [`PIPE_BYTES`] of
/// in-flight body and two descriptors. Beyond it, large bodies are copied as before.
const MAX_PIPES: usize = 256;
/// Bytes moved per splice: the default capacity of a Linux pipe (16 pages), so a splice into an
/// empty pipe never finds it full.
const PIPE_BYTES: usize = 64 * 1024;

/// A pipe's two ends. Empty whenever it is not lent.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// The worker's pipes.
#[derive(Default)]
pub struct Pipes {
    spare: RefCell<Vec<Pipe>>,
    /// Pipes lent out now.
    lent: Cell<usize>,
}

impl Pipes {
    /// An empty pipe, or `None` when the worker holds [`MAX_PIPES`] already or the system
    /// refuses one (descriptor limits): the caller copies instead.
    pub fn take(&self) -> Option<Pipe> {
        let pipe = match self.spare.borrow_mut().pop() {
            Some(p) => p,
            None if self.lent.get() < MAX_PIPES => Pipe::new().ok()?,
            None => return None,
        };
        self.lent.set(self.lent.get() + 1);
        Some(pipe)
    }

    /// Takes a pipe back. One that may still hold bytes (`empty` false: a relay cut midway) is
    /// closed, never lent again.
    pub fn give(&self, pipe: Pipe, empty: bool) {
        self.lent.set(self.lent.get() - 1);
        if empty {
            self.spare.borrow_mut().push(pipe);
        }
    }
}

/// How a spliced body ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Spliced {
    /// All of it reached the client's socket.
    Whole,
    /// The upstream closed (or failed) before the end of the body.
    UpstreamClosed,
    /// No byte came from the upstream for the read timeout.
    ReadTimeout,
    /// The client's socket failed, or took no byte for the send timeout.
    ClientGone,
}

/// Moves `len` body bytes from `up` to `client` through `pipe`, calling `moved` with each
/// chunk's size as it is taken from the upstream. Each wait for the upstream is bounded by
/// `read_timeout`, each wait for the client by `bound` (as a copied body's reads and writes
/// are; both on `bound`'s timers). On any end but [`Spliced::Whole`] the pipe may hold bytes.
#[allow(clippy::too_many_arguments)]
pub async fn splice_body<U: Stream, C: Stream>(
    up: &mut U,
    client: &mut C,
    pipe: &Pipe,
    mut len: u64,
    bound: SendBound<'_>,
    read_timeout: Duration,
    mut moved: impl FnMut(usize),
) -> Spliced {
    let (Some(from), Some(to)) = (up.splice_fd(), client.splice_fd()) else {
        return Spliced::ClientGone;
    };
    let (pipe_in, pipe_out) = (pipe.write.as_raw_fd(), pipe.read.as_raw_fd());
    while len > 0 {
        let want = (len as usize).min(PIPE_BYTES);
        let until = crate::clock::now() + read_timeout;
        let read = up.nonblocking(false, || splice(from, pipe_in, want, false));
        let mut held = match before(bound.timers, until, read).await {
            None => return Spliced::ReadTimeout,
            Some(Ok(0)) | Some(Err(_)) => return Spliced::UpstreamClosed,
            Some(Ok(n)) => n,
        };
        len -= held as u64;
        moved(held);
        // SPLICE_F_MORE while more body follows: the kernel may hold a partial segment back
        // for the next chunk, as MSG_MORE does.
        let more = len > 0;
        while held > 0 {
            let write = client.nonblocking(true, || splice(pipe_out, to, held, more));
            match bound.bound(write).await {
                Some(Ok(n)) if n > 0 => held -= n,
                // Failed, or not writable for the send timeout (counted by `bound`).
                _ => return Spliced::ClientGone,
            }
        }
    }
    Spliced::Whole
}

/// One non-blocking `splice(2)` of up to `len` bytes from `from` to `to` (one of them a pipe).
fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    // SAFETY: both descriptors are open for the length of the call (the caller holds the
    // sockets and the pipe); null offsets, as sockets and pipes have no file position.
    let n =
        unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
