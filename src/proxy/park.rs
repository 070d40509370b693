//! Parked connections: keep-alive client connections idle past `listeners[].park_after`, held
//! as a few words in a per-worker table with their socket in a per-worker epoll set, instead of
//! a task each.
//!
//! Why: an idle connection's task (its future, the session it serves, the runtime's descriptor
//! and readiness operation) measured 0.73 KiB on io_uring, against nginx's 0.28. A parked
//! connection keeps only its descriptor, its client's address, its listener, its deadline and
//! its place in the connection counts (one [`Parked`] entry); one readiness wait on the epoll
//! set watches all of them, and the first byte (or the close) from a client gives it a task
//! again.
//!
//! This file is the table and the epoll set only: what a parked connection carries, and how it
//! is served again, is `downstream`'s; the wait for the set is a worker task (`worker_tasks`).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// Most parked connections taken from the epoll set by one `epoll_wait`.
pub const BATCH: usize = 64;

/// A parked connection: its socket (a descriptor of its own, registered in the epoll set),
/// when the keep-alive timeout closes it, and what serving it again needs (`C`).
struct Entry<C> {
    fd: OwnedFd,
    until: Instant,
    conn: C,
}

/// One worker's parked connections. Entries sit in a vector reused through a free list, so the
/// table stays one compact allocation (no hole per connection for the allocator to keep).
pub struct Parked<C> {
    /// `None` when the worker could not create its epoll set: connections then never park.
    epoll: Option<OwnedFd>,
    slots: RefCell<Vec<Option<Entry<C>>>>,
    free: RefCell<Vec<u32>>,
    count: Cell<usize>,
    /// Set when nothing waits for the set any more: connections then stop parking.
    off: Cell<bool>,
    /// Connections parked since the allocator last returned freed memory.
    parked_since_trim: Cell<usize>,
}

impl<C> Parked<C> {
    /// A table with its epoll set (without one, on failure: parking is an optimisation).
    pub fn new() -> Self {
        // SAFETY: epoll_create1 takes no pointer; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epoll = (fd >= 0).then(|| {
            // SAFETY: `fd` was just created and is owned by nothing else.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        if epoll.is_none() {
            tracing::warn!(error = %io::Error::last_os_error(), "no epoll set: idle connections will not park");
        }
        Parked {
            epoll,
            slots: RefCell::default(),
            free: RefCell::default(),
            count: Cell::new(0),
            off: Cell::new(false),
            parked_since_trim: Cell::new(0),
        }
    }

    /// Whether connections can park on this worker.
    pub fn enabled(&self) -> bool {
        self.epoll.is_some() && !self.off.get()
    }

    /// No more connections park (nothing would serve them again).
    pub fn disable(&self) {
        self.off.set(true);
    }

    /// A descriptor of the epoll set, for the worker task that waits for it to be readable.
    pub fn epoll_fd(&self) -> Option<io::Result<OwnedFd>> {
        self.epoll.as_ref().map(OwnedFd::try_clone)
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.count.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks a connection: `fd` (its socket, a descriptor the caller gives up) joins the epoll
    /// set, watched for bytes or a close. `Err` gives `conn` back when the kernel refuses or
    /// parking is off (the caller's task then keeps the connection; `fd` is closed).
    pub fn park(&self, fd: OwnedFd, until: Instant, conn: C) -> Result<(), C> {
        let Some(epoll) = self.epoll.as_ref().filter(|_| !self.off.get()) else {
            return Err(conn);
        };
        let mut slots = self.slots.borrow_mut();
        let key = match self.free.borrow_mut().pop() {
            Some(k) => k as usize,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key as u64,
        };
        // SAFETY: both descriptors are open (owned by `self` and by the caller), and `event`
        // is a valid epoll_event for the duration of the call.
        let added = unsafe {
            libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event)
        };
        if added < 0 {
            self.free.borrow_mut().push(key as u32);
            return Err(conn);
        }
        slots[key] = Some(Entry { fd, until, conn });
        self.count.set(self.count.get() + 1);
        self.parked_since_trim.set(self.parked_since_trim.get() + 1);
        Ok(())
    }

    /// Takes the parked connections whose client sent bytes or closed, at most [`BATCH`]: each
    /// leaves the epoll set with its socket, for a task to serve it. Never waits.
    pub fn take_ready(&self) -> Vec<(OwnedFd, C)> {
        let Some(epoll) = &self.epoll else { return Vec::new() };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: `events` has room for BATCH entries; a zero timeout never blocks.
        let n =
            unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
        let mut ready = Vec::with_capacity(n.max(0) as usize);
        for e in &events[..n.max(0) as usize] {
            if let Some(entry) = self.remove(e.u64 as usize) {
                ready.push((entry.fd, entry.conn));
            }
        }
        ready
    }

    /// Closes the parked connections whose deadline (`due` of their own) has passed: their
    /// sockets are closed, and their `C` dropped.
    pub fn sweep(&self, now: Instant, due: impl Fn(Instant) -> Instant) {
        let expired: Vec<usize> = self
            .slots
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.as_ref().is_some_and(|e| due(e.until) <= now))
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            // Dropped outside the table's borrow: `C` may wake tasks as it goes.
            drop(self.remove(k));
        }
    }

    /// Called once a second: when at least [`TRIM_AFTER`] connections parked since the last
    /// time, has the allocator give freed memory back to the kernel (see [`return_freed`]).
    pub fn trim(&self) {
        if self.parked_since_trim.get() >= TRIM_AFTER {
            self.parked_since_trim.set(0);
            return_freed();
        }
    }

    /// Empties the slot `key`, taking its socket out of the epoll set.
    fn remove(&self, key: usize) -> Option<Entry<C>> {
        let entry = self.slots.borrow_mut().get_mut(key)?.take()?;
        if let Some(epoll) = &self.epoll {
            deregister(epoll.as_raw_fd(), entry.fd.as_raw_fd());
        }
        self.free.borrow_mut().push(key as u32);
        self.count.set(self.count.get() - 1);
        Some(entry)
    }
}

impl<C> Default for Parked<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Parks since the last trim that make the next one worth it: each parked connection freed
/// about 0.7 KiB (its task, session and the runtime's descriptor), so 256 are about 180 KiB.
const TRIM_AFTER: usize = 256;

/// Gives the kernel back the whole free pages of the allocator's heaps.
///
/// Why: the tasks and sessions parked connections freed are scattered through the heap that
/// held them while they were busy, and glibc returns only the top of a heap by itself. After a
/// burst of connections goes idle (5,000 opened within a second, then parked), the RSS stayed
/// at the burst's 0.8 KiB per connection; after `malloc_trim` it is 0.22 KiB (by hand:
/// `IDLE_SETTLE=2 scripts/idle_memory.py`, then `malloc_trim(0)` called from gdb).
///
/// Cost and bound: glibc has no per-arena trim, so this visits every worker's arena, holding
/// each one's lock while it advises the kernel of its free pages (well under a millisecond
/// for a heap of some MiB). It runs from the housekeeping tick, at most once a second per
/// worker and only after [`TRIM_AFTER`] connections parked: never per request. A page given
/// back and used again costs one page fault.
fn return_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes `fd` out of the epoll set `epoll`. (Closing the socket would too, but a resumed
/// connection keeps it open.)
fn deregister(epoll: RawFd, fd: RawFd) {
    // SAFETY: both are open descriptors; EPOLL_CTL_DEL ignores the event pointer (null is
    // allowed since Linux 2.6.9).
    unsafe {
        libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> (TcpStream, OwnedFd) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, OwnedFd::from(server))
    }

    /// Blocks (5 s at most) until the epoll set has a ready socket.
    fn wait_readable(parked: &Parked<impl Sized>) {
        let fd = parked.epoll_fd().unwrap().unwrap();
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1, "no socket became ready");
    }

    #[test]
    fn a_parked_socket_is_ready_once_its_client_sends_and_not_before() {
        let parked = Parked::<&str>::new();
        let now = Instant::now();
        let (mut quiet_client, quiet) = pair();
        let (mut client, fd) = pair();
        parked.park(quiet, now, "quiet").unwrap();
        parked.park(fd, now, "talker").unwrap();
        assert!(parked.take_ready().is_empty());
        client.write_all(b"GET").unwrap();
        wait_readable(&parked);
        let ready = parked.take_ready();
        assert_eq!(ready.iter().map(|(_, c)| *c).collect::<Vec<_>>(), ["talker"]);
        assert_eq!(parked.len(), 1);
        quiet_client.write_all(b"x").unwrap();
        drop(ready);
        wait_readable(&parked);
        let again = parked.take_ready();
        assert_eq!(again[0].1, "quiet");
        assert!(parked.is_empty());
    }

    #[test]
    fn the_sweep_closes_what_is_due_and_keeps_the_rest() {
        let parked = Parked::<u32>::new();
        let now = Instant::now();
        let (mut early_client, early) = pair();
        let (_late_client, late) = pair();
        parked.park(early, now, 1).unwrap();
        parked.park(late, now + Duration::from_secs(60), 2).unwrap();
        parked.sweep(now, |until| until);
        assert_eq!(parked.len(), 1);
        // The swept socket is closed: its client reads the end of the stream.
        early_client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut early_client, &mut buf).unwrap(), 0);
        // A freed slot is reused: the table does not grow.
        let (_c, again) = pair();
        parked.park(again, now, 3).unwrap();
        assert_eq!(parked.slots.borrow().len(), 2);
    }
}
