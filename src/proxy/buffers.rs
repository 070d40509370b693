//! The worker's spare buffers: a connection borrows its large buffers for one request and gives
//! them back when it goes idle, so an idle keep-alive connection holds only a small read buffer.

use std::cell::RefCell;

/// Read buffer an idle connection waits with: big enough for most request heads in one read.
pub const IDLE_READ: usize = 512;
/// Spare buffers kept per worker; beyond this they are freed.
const MAX_SPARE: usize = 1024;
/// Buffers that grew past this are freed rather than kept.
const MAX_KEPT_CAPACITY: usize = 64 * 1024;

#[derive(Default)]
pub struct BufferPool {
    spare: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// An empty buffer, reusing a spare one when there is one.
    pub fn take(&self) -> Vec<u8> {
        self.spare.borrow_mut().pop().unwrap_or_default()
    }

    /// Keeps `buf`'s memory for the next request (emptied), unless it is unusually large or
    /// enough are kept already.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX_KEPT_CAPACITY {
            return;
        }
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE {
            buf.clear();
            spare.push(buf);
        }
    }
}
