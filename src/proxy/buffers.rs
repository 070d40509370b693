//! The worker's spare buffers: a connection borrows its large buffers for one request and gives
//! them back when it goes idle, so an idle keep-alive connection holds only a small read buffer.

use std::cell::RefCell;

use crate::http::encoding::{Compressor, Encoding};

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

/// Compressors kept per worker: as many as are usually compressing at once on one worker. Each
/// holds a gzip deflate state of about 300 KiB, so at most about 5 MiB per worker.
const MAX_SPARE_COMPRESSORS: usize = 16;

/// The worker's spare gzip compressors, reset after their last response (HAProxy likewise
/// keeps its zlib states in a pool). A state allocated and freed per response cost 40 -> 124 µs
/// per 16 KiB gzip response on io_uring when glibc gave the freed pages back each time.
#[derive(Default)]
pub struct CompressorPool {
    spare: RefCell<Vec<Compressor>>,
}

impl CompressorPool {
    /// A compressor for `encoding` at `level`, reusing a spare one when there is one.
    pub fn take(&self, encoding: Encoding, level: u32) -> Compressor {
        let mut spare = self.spare.borrow_mut();
        match spare.iter().rposition(|c| c.is(encoding, level)) {
            Some(i) => spare.swap_remove(i),
            None => Compressor::new(encoding, level),
        }
    }

    /// Keeps a compressor that [`Compressor::finish`] reset, unless enough are kept already.
    pub fn give(&self, c: Compressor) {
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE_COMPRESSORS {
            spare.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_gzip_compressor_is_reused_only_at_its_level() {
        let pool = CompressorPool::default();
        let spares = || pool.spare.borrow().len();
        let mut out = Vec::new();
        let reset = pool.take(Encoding::Gzip, 1).finish(&mut out).expect("gzip is reusable");
        pool.give(reset);
        assert_eq!(spares(), 1);
        let other = pool.take(Encoding::Gzip, 6);
        assert_eq!(spares(), 1, "level 6 is a new compressor");
        assert!(other.is(Encoding::Gzip, 6));
        let same = pool.take(Encoding::Gzip, 1);
        assert_eq!(spares(), 0, "level 1 is the spare");
        assert!(same.is(Encoding::Gzip, 1));
        assert!(pool.take(Encoding::Brotli, 1).finish(&mut out).is_none(), "brotli is not kept");
        for _ in 0..MAX_SPARE_COMPRESSORS + 3 {
            pool.give(Compressor::new(Encoding::Gzip, 1));
        }
        assert_eq!(spares(), MAX_SPARE_COMPRESSORS, "bounded");
    }
}
