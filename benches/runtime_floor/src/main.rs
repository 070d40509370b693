//! The minimal-relay floor of each runtime Apex could run its data path on (issue 13: "choose
//! by a measured prototype"). One thread; per client connection one dedicated upstream
//! connection; read until the end of the request head, write it upstream unchanged, read a
//! Content-Length response, write it back; `TCP_NODELAY` on both sockets; no other parsing.
//! Apex's own work (routing, header rewriting, pool, timers) comes on top of these floors; what
//! they compare is what each runtime's I/O path costs per request.
//!
//!     runtime-floor MODE LISTEN UPSTREAM
//!
//! MODE:
//! - `monoio`: monoio 0.2.4 on io_uring (SINGLE_ISSUER + DEFER_TASKRUN, as Apex builds it),
//!   plain read/write futures into the relay's own buffers;
//! - `compio`: compio on io_uring with the same ring flags, plain read/write futures;
//! - `compio-ring`: compio, every receive takes its buffer from a provided-buffer ring (the
//!   kernel picks a buffer when bytes arrive, so a waiting read holds none), written on from
//!   that buffer when it holds the whole message;
//! - `compio-multi`: as `compio-ring`, with the client side read by one multishot receive for
//!   the connection's whole life;
//! - `compio-zc`: as `compio`, with each response sent by `IORING_OP_SEND_ZC` (the kernel sends
//!   from the relay's buffer and says when it may be reused) instead of a copying send;
//! - `tokio`: Tokio's current-thread runtime (epoll).

use std::io;
use std::net::SocketAddr;

/// End of a request or response head (`\r\n\r\n`), as the index just past it.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// A whole response's length, once its head is in: head plus Content-Length.
fn response_len(buf: &[u8]) -> Option<usize> {
    let end = head_end(buf)?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let len = head
        .split("\r\n")
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    Some(end + len)
}

/// The listening socket, from std (which sets SO_REUSEADDR, so that one mode can follow
/// another on the same port), non-blocking for the runtimes that need it.
fn listener(at: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(at)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// What a relay needs to know of the bytes read so far: a whole message (`Some(len)`) or not.
type Whole = fn(&[u8]) -> Option<usize>;

/// `Some(len)` once `buf` holds a whole message; else makes room for the next read (every
/// runtime's plain relay reads into the spare room of one growing buffer).
fn whole_or_room(buf: &mut Vec<u8>, whole: Whole) -> Option<usize> {
    if let Some(n) = whole(buf) {
        if buf.len() >= n {
            return Some(n);
        }
    }
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16384);
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, upstream] = &args[..] else {
        eprintln!(
            "usage: runtime-floor monoio|compio|compio-ring|compio-multi|compio-zc|tokio LISTEN UPSTREAM"
        );
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN: an address");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM: an address");
    let result = match mode.as_str() {
        "monoio" => monoio_floor::run(listen, upstream),
        "compio" => compio_floor::run(listen, upstream, compio_floor::Reads::Plain),
        "compio-ring" => compio_floor::run(listen, upstream, compio_floor::Reads::Ring),
        "compio-multi" => compio_floor::run(listen, upstream, compio_floor::Reads::Multishot),
        "compio-zc" => compio_floor::run(listen, upstream, compio_floor::Reads::PlainSendZc),
        "tokio" => tokio_floor::run(listen, upstream),
        other => Err(io::Error::other(format!("unknown mode {other}"))),
    };
    if let Err(e) = result {
        eprintln!("runtime-floor: {e}");
        std::process::exit(1);
    }
}

mod monoio_floor {
    use super::*;
    use monoio::buf::IoBufMut;
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    use monoio::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_single_issuer();
        urb.setup_defer_taskrun();
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(urb)
            .with_entries(1024)
            .build()?;
        rt.block_on(async move {
            let l = TcpListener::from_std(listener(listen)?)?;
            println!("ready");
            loop {
                let (c, _) = l.accept().await?;
                monoio::spawn(async move {
                    let _ = relay(c, upstream).await;
                });
            }
        })
    }

    /// Reads into `buf`'s spare room until `whole` says a message is in; its length.
    async fn read_whole(s: &mut TcpStream, buf: &mut Vec<u8>, whole: Whole) -> io::Result<usize> {
        loop {
            if let Some(n) = whole_or_room(buf, whole) {
                return Ok(n);
            }
            let (len, cap) = (buf.len(), buf.capacity());
            let (res, slice) = s.read(std::mem::take(buf).slice_mut(len..cap)).await;
            *buf = slice.into_inner();
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn relay(mut c: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let mut u = TcpStream::connect(upstream).await?;
        c.set_nodelay(true)?;
        u.set_nodelay(true)?;
        let (mut req, mut resp) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
        loop {
            req.clear();
            read_whole(&mut c, &mut req, head_end).await?;
            let (res, r) = u.write_all(req).await;
            req = r;
            res?;
            resp.clear();
            read_whole(&mut u, &mut resp, response_len).await?;
            let (res, r) = c.write_all(resp).await;
            resp = r;
            res?;
        }
    }
}

mod compio_floor {
    use super::*;
    use compio::driver::ProactorBuilder;
    use compio::io::{AsyncRead, AsyncReadManaged, AsyncReadMulti, AsyncWriteExt};
    use compio::net::{TcpListener, TcpStream};
    use futures_util::StreamExt;

    #[derive(Clone, Copy, PartialEq)]
    pub enum Reads {
        Plain,
        Ring,
        Multishot,
        /// Plain reads; responses sent with SEND_ZC.
        PlainSendZc,
    }

    pub fn run(listen: SocketAddr, upstream: SocketAddr, reads: Reads) -> io::Result<()> {
        let mut proactor = ProactorBuilder::new();
        proactor.capacity(1024).single_issuer(true).defer_taskrun(true);
        // The provided-buffer ring: 1,024 buffers of 16 KiB (a 4 KiB response and its head fit
        // in one), shared by every connection of the thread.
        proactor.buffer_pool_size(std::num::NonZero::new(1024).unwrap());
        proactor.buffer_pool_buffer_len(16384);
        let rt = compio::runtime::RuntimeBuilder::new().with_proactor(proactor).build()?;
        rt.block_on(async move {
            let l = TcpListener::from_std(listener(listen)?)?;
            println!("ready");
            loop {
                let (c, _) = l.accept().await?;
                compio::runtime::spawn(async move {
                    let _ = relay(c, upstream, reads).await;
                })
                .detach();
            }
        })
    }

    /// Reads (appending) until `whole` says a message is in; its length.
    async fn read_whole(s: &TcpStream, buf: &mut Vec<u8>, whole: Whole) -> io::Result<usize> {
        let mut s = s;
        loop {
            if let Some(n) = whole_or_room(buf, whole) {
                return Ok(n);
            }
            // A read fills the buffer from its start: read into the part after what is in,
            // so that a message in several reads (a 64 KiB response) is appended.
            let len = buf.len();
            let room = compio::buf::IoBuf::slice(std::mem::take(buf), len..);
            let compio::BufResult(res, b) = s.read(room).await;
            *buf = compio::buf::IntoInner::into_inner(b);
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn relay(c: TcpStream, upstream: SocketAddr, reads: Reads) -> io::Result<()> {
        let u = TcpStream::connect(upstream).await?;
        c.set_nodelay(true)?;
        u.set_nodelay(true)?;
        match reads {
            Reads::Plain => relay_plain(c, u, false).await,
            Reads::PlainSendZc => relay_plain(c, u, true).await,
            Reads::Ring | Reads::Multishot => relay_ring(c, u, reads == Reads::Multishot).await,
        }
    }

    /// The plain relay; `zc`: the response goes out by SEND_ZC (each send completes once the
    /// kernel has queued it, and the buffer is reused only after the kernel's second
    /// completion says it no longer reads from it).
    async fn relay_plain(c: TcpStream, u: TcpStream, zc: bool) -> io::Result<()> {
        let (mut req, mut resp) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
        loop {
            req.clear();
            read_whole(&c, &mut req, head_end).await?;
            let compio::BufResult(res, r) = (&u).write_all(req).await;
            req = r;
            res?;
            resp.clear();
            let len = read_whole(&u, &mut resp, response_len).await?;
            resp = if zc {
                send_zc(&c, resp, len).await?
            } else {
                let compio::BufResult(res, r) = (&c).write_all(resp).await;
                res?;
                r
            };
        }
    }

    /// Sends `buf[..len]` by SEND_ZC; the buffer back once the kernel is done with it.
    async fn send_zc(c: &TcpStream, mut buf: Vec<u8>, len: usize) -> io::Result<Vec<u8>> {
        use compio::buf::IntoInner;
        use compio::io::AsyncWriteZerocopy;
        let mut sent = 0;
        while sent < len {
            let slice = compio::buf::IoBuf::slice(buf, sent..len);
            let compio::BufResult(res, ready) = (&*c).write_zerocopy(slice).await;
            buf = ready.await.into_inner();
            match res? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => sent += n,
            }
        }
        Ok(buf)
    }

    /// Every receive takes a ring buffer; a buffer that holds a whole message is written on
    /// as it is (and goes back to the ring when dropped); a message in several pieces is
    /// gathered into the relay's own buffer first.
    async fn relay_ring(c: TcpStream, u: TcpStream, multishot: bool) -> io::Result<()> {
        let mut gathered = Vec::with_capacity(16384);
        let mut client_side = &c;
        let mut from_client = multishot.then(|| Box::pin(client_side.read_multi(0)));
        loop {
            // The request head.
            gathered.clear();
            loop {
                let piece = match &mut from_client {
                    Some(stream) => stream.next().await.transpose()?,
                    None => (&c).read_managed(0).await?,
                };
                let Some(piece) = piece else { return Ok(()) };
                if gathered.is_empty() && head_end(&piece) == Some(piece.len()) {
                    let compio::BufResult(res, _) = (&u).write_all(piece).await;
                    res?;
                    break;
                }
                gathered.extend_from_slice(&piece);
                if head_end(&gathered).is_some() {
                    let compio::BufResult(res, g) = (&u).write_all(gathered).await;
                    gathered = g;
                    res?;
                    break;
                }
            }
            // The response.
            gathered.clear();
            loop {
                let Some(piece) = (&u).read_managed(0).await? else {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                };
                if gathered.is_empty() && response_len(&piece) == Some(piece.len()) {
                    let compio::BufResult(res, _) = (&c).write_all(piece).await;
                    res?;
                    break;
                }
                gathered.extend_from_slice(&piece);
                if response_len(&gathered).is_some_and(|n| gathered.len() >= n) {
                    let compio::BufResult(res, g) = (&c).write_all(gathered).await;
                    gathered = g;
                    res?;
                    break;
                }
            }
        }
    }
}

mod tokio_floor {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let l = TcpListener::from_std(listener(listen)?)?;
            println!("ready");
            loop {
                let (c, _) = l.accept().await?;
                tokio::task::spawn_local(async move {
                    let _ = relay(c, upstream).await;
                });
            }
        })
    }

    async fn read_whole(s: &mut TcpStream, buf: &mut Vec<u8>, whole: Whole) -> io::Result<usize> {
        loop {
            if let Some(n) = whole_or_room(buf, whole) {
                return Ok(n);
            }
            if s.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn relay(mut c: TcpStream, upstream: SocketAddr) -> io::Result<()> {
        let mut u = TcpStream::connect(upstream).await?;
        c.set_nodelay(true)?;
        u.set_nodelay(true)?;
        let (mut req, mut resp) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
        loop {
            req.clear();
            read_whole(&mut c, &mut req, head_end).await?;
            u.write_all(&req).await?;
            resp.clear();
            read_whole(&mut u, &mut resp, response_len).await?;
            c.write_all(&resp).await?;
        }
    }
}
