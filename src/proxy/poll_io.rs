//! A poll-style (`AsyncRead`/`AsyncWrite`) view of an Apex stream, for the `h2` crate.
//!
//! Apex's streams take owned buffers (io_uring owns a buffer while a read is in flight), while
//! `h2` polls with borrowed ones. The adapter owns one read buffer and one write buffer and
//! keeps at most one operation in flight per direction: the stream's half moves into the
//! boxed operation and comes back with its result, so an operation is never dropped
//! mid-flight and no byte the kernel delivered is lost. Shared by every runtime (a TLS stream
//! is an Apex stream too).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io::{ReadHalf, Stream, WriteHalf};
use crate::http::h2_guard::{Flood, FrameGuard};

/// Bytes asked of the stream per read.
const READ_SIZE: usize = 16 * 1024;
/// Bytes `h2` may queue before a write must go out: h2 writes frame by frame and flushes; the
/// buffer turns its small writes into one system call. Bounded: beyond it, writes wait.
const WRITE_HIGH: usize = 64 * 1024;

type ReadOp<R> = Pin<Box<dyn Future<Output = (R, io::Result<usize>, Vec<u8>)>>>;
type WriteOp<W> = Pin<Box<dyn Future<Output = (W, io::Result<()>, Vec<u8>)>>>;

enum ReadSide<R> {
    /// `buf[pos..]` is read and not yet handed out.
    Idle {
        half: R,
        buf: Vec<u8>,
        pos: usize,
    },
    Busy(ReadOp<R>),
    /// Only while switching states.
    Gone,
}

enum WriteSide<W> {
    /// `buf` holds bytes not yet written.
    Idle {
        half: W,
        buf: Vec<u8>,
    },
    Writing(WriteOp<W>),
    ShuttingDown(WriteOp<W>),
    /// FIN sent: nothing more goes out.
    Shut,
    Gone,
}

pub struct PollIo<S: Stream> {
    read: ReadSide<S::Read>,
    write: WriteSide<S::Write>,
    watch: Watch,
}

/// Watches the frames the client sends before `h2` sees them (see `http::h2_guard`).
pub struct Watch {
    frames: FrameGuard,
    /// Bytes of the connection preface still to pass before frames start.
    preface: usize,
    /// Set when a limit was crossed: from then on nothing more is handed to `h2`, and the
    /// connection's task answers GOAWAY ENHANCE_YOUR_CALM.
    tripped: Rc<Cell<Option<Flood>>>,
    /// When the header block being received began (the guard's view, after each read).
    block_since: Rc<Cell<Option<Instant>>>,
}

/// What the connection's task reads of a [`Watch`]: a flood, and an open header block.
pub struct Watched {
    pub tripped: Rc<Cell<Option<Flood>>>,
    pub block_since: Rc<Cell<Option<Instant>>>,
}

impl Watch {
    pub fn new(frames: FrameGuard, preface: usize) -> (Watch, Watched) {
        let tripped = Rc::new(Cell::new(None));
        let block_since = Rc::new(Cell::new(None));
        let w = Watch {
            frames,
            preface,
            tripped: Rc::clone(&tripped),
            block_since: Rc::clone(&block_since),
        };
        (w, Watched { tripped, block_since })
    }

    fn see(&mut self, mut bytes: &[u8]) -> Result<(), Flood> {
        let skip = self.preface.min(bytes.len());
        self.preface -= skip;
        bytes = &bytes[skip..];
        let seen = self.frames.feed(bytes, Instant::now());
        self.block_since.set(self.frames.header_block_since());
        seen
    }
}

// No field is ever pinned in place: the operations are boxed, the halves moved by value.
impl<S: Stream> Unpin for PollIo<S> {}

impl<S: Stream> PollIo<S> {
    /// Wraps `stream`; `already_read` are bytes read from it before (a preface sniffed to
    /// choose the protocol), handed out first; `watch` sees every byte before `h2` does.
    pub fn new(stream: S, already_read: Vec<u8>, watch: Watch) -> PollIo<S> {
        let (r, w) = stream.into_split();
        PollIo {
            read: ReadSide::Idle { half: r, buf: already_read, pos: 0 },
            write: WriteSide::Idle { half: w, buf: Vec::new() },
            watch,
        }
    }

    fn start_write(&mut self) {
        let WriteSide::Idle { mut half, buf } = std::mem::replace(&mut self.write, WriteSide::Gone)
        else {
            unreachable!("a write starts from idle")
        };
        self.write = WriteSide::Writing(Box::pin(async move {
            let (res, buf) = half.write_all(buf).await;
            (half, res, buf)
        }));
    }

    /// Drives the write in flight, if any, to its end.
    fn poll_write_op(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let op = match &mut self.write {
            WriteSide::Writing(op) | WriteSide::ShuttingDown(op) => op,
            _ => return Poll::Ready(Ok(())),
        };
        let (half, res, mut buf) = std::task::ready!(op.as_mut().poll(cx));
        self.write = match self.write {
            WriteSide::ShuttingDown(_) => WriteSide::Shut,
            _ => {
                buf.clear();
                WriteSide::Idle { half, buf }
            }
        };
        Poll::Ready(res)
    }
}

impl<S: Stream> AsyncRead for PollIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.watch.tripped.get().is_some() {
            // The connection is being closed for a flood: nothing more from the client.
            return Poll::Pending;
        }
        loop {
            let this = &mut *self;
            match &mut this.read {
                ReadSide::Idle { buf, pos, .. } if *pos < buf.len() => {
                    let n = out.remaining().min(buf.len() - *pos);
                    let bytes = &buf[*pos..*pos + n];
                    if let Err(flood) = this.watch.see(bytes) {
                        // The connection's task sees this at once and sends GOAWAY.
                        this.watch.tripped.set(Some(flood));
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    out.put_slice(bytes);
                    *pos += n;
                    return Poll::Ready(Ok(()));
                }
                ReadSide::Idle { .. } => {
                    let ReadSide::Idle { mut half, mut buf, .. } =
                        std::mem::replace(&mut self.read, ReadSide::Gone)
                    else {
                        unreachable!()
                    };
                    buf.clear();
                    buf.reserve(READ_SIZE);
                    self.read = ReadSide::Busy(Box::pin(async move {
                        let (res, buf) = half.read(buf).await;
                        (half, res, buf)
                    }));
                }
                ReadSide::Busy(op) => {
                    let (half, res, buf) = std::task::ready!(op.as_mut().poll(cx));
                    self.read = ReadSide::Idle { half, buf, pos: 0 };
                    match res {
                        // End of stream: nothing put into `out`.
                        Ok(0) => return Poll::Ready(Ok(())),
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                ReadSide::Gone => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }
}

impl<S: Stream> AsyncWrite for PollIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match &mut self.write {
                WriteSide::Idle { buf, .. } if buf.len() < WRITE_HIGH => {
                    let n = data.len().min(WRITE_HIGH - buf.len());
                    buf.extend_from_slice(&data[..n]);
                    return Poll::Ready(Ok(n));
                }
                WriteSide::Idle { .. } => self.start_write(),
                WriteSide::Writing(_) => std::task::ready!(self.poll_write_op(cx))?,
                WriteSide::ShuttingDown(_) | WriteSide::Shut | WriteSide::Gone => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.write {
                WriteSide::Idle { buf, .. } if buf.is_empty() => return Poll::Ready(Ok(())),
                WriteSide::Idle { .. } => self.start_write(),
                WriteSide::Writing(_) | WriteSide::ShuttingDown(_) => {
                    std::task::ready!(self.poll_write_op(cx))?
                }
                WriteSide::Shut => return Poll::Ready(Ok(())),
                WriteSide::Gone => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.write {
                WriteSide::Idle { buf, .. } if buf.is_empty() => {
                    let WriteSide::Idle { mut half, buf } =
                        std::mem::replace(&mut self.write, WriteSide::Gone)
                    else {
                        unreachable!()
                    };
                    self.write = WriteSide::ShuttingDown(Box::pin(async move {
                        let res = half.shutdown_write().await;
                        (half, res, buf)
                    }));
                }
                WriteSide::Idle { .. } => self.start_write(),
                WriteSide::Writing(_) | WriteSide::ShuttingDown(_) => {
                    std::task::ready!(self.poll_write_op(cx))?
                }
                WriteSide::Shut => return Poll::Ready(Ok(())),
                WriteSide::Gone => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }
}
