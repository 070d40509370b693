//! Test support: the real `apex` binary as a child process, fake upstreams on 127.0.0.1, and a
//! raw HTTP/1.1 client. Everything synchronises on events (log lines, bytes, barriers), never on
//! sleeps.
#![allow(dead_code)]

pub mod dns;
pub mod tls;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Generates one `#[test]` per runtime (io_uring, epoll, the Tokio build) for a test function
/// taking the runtime's name.
#[macro_export]
macro_rules! under_each_driver {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn io_uring() {
                    super::$name("io_uring")
                }
                #[test]
                fn epoll() {
                    super::$name("epoll")
                }
                #[test]
                fn tokio() {
                    super::$name("tokio")
                }
            }
        )*
    };
}

// ---------------------------------------------------------------- the apex process

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("apex-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn apex_bin() -> &'static str {
    env!("CARGO_BIN_EXE_apex")
}

/// Runs `apex check` on `yaml`; returns the exit code, stderr and the file's path.
pub fn apex_check(yaml: &str) -> (Option<i32>, String, String) {
    let dir = TempDir::new();
    let path = dir.write("check.yaml", yaml);
    let out = Command::new(apex_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .expect("run apex check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, path.display().to_string())
}

/// A running `apex` child process; killed on drop.
pub struct Apex {
    child: Child,
    /// The first listener's bound address.
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    logs: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// The config file `Apex::start` wrote (reload tests rewrite it).
    pub config_path: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl Apex {
    /// Runs `apex --config <yaml> --runtime <runtime>`; panics with the logs if it does not
    /// come up.
    pub fn start(yaml: &str, runtime: &str) -> Apex {
        let dir = TempDir::new();
        let path = dir.write("apex.yaml", yaml);
        let mut a = Apex::spawn(&["--config", path.to_str().unwrap(), "--runtime", runtime])
            .unwrap_or_else(|logs| panic!("apex did not start:\n{logs}"));
        a.config_path = Some(path);
        a._dir = Some(dir);
        a
    }

    /// Runs the binary with `args` and waits for its "apex started" line and listener
    /// addresses; `Err(logs)` if it exits first.
    pub fn spawn(args: &[&str]) -> Result<Apex, String> {
        Apex::spawn_with(args, |_| {})
    }

    /// Like [`Apex::spawn`], letting the test adjust the command first.
    pub fn spawn_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Result<Apex, String> {
        let mut cmd = Command::new(apex_bin());
        cmd.args(args)
            .env("RUST_LOG", "info,apex=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn apex");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let mut addrs = Vec::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if line.contains("listening") {
                        if let Some(a) = field(&line, "address") {
                            addrs.push(a.parse().expect("listening address"));
                        }
                    }
                    let started = line.contains("apex started");
                    seen.push(line);
                    if started {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    for l in rx.try_iter() {
                        seen.push(l);
                    }
                    return Err(seen.join("\n"));
                }
            }
        }
        Ok(Apex { child, addr: addrs[0], addrs, logs: rx, seen, config_path: None, _dir: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a log line containing every one of `needles` appears; returns it.
    pub fn wait_for_log(&mut self, needles: &[&str]) -> Option<String> {
        let hit = |l: &String| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.seen.iter().find(|l| hit(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + PATIENCE;
        while let Ok(line) =
            self.logs.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if hit(&line) {
                return Some(line);
            }
        }
        None
    }

    /// Like [`Apex::wait_for_log`], counting only lines that arrive from now on.
    pub fn wait_for_new_log(&mut self, needles: &[&str]) -> Option<String> {
        for l in self.logs.try_iter() {
            self.seen.push(l);
        }
        let deadline = Instant::now() + PATIENCE;
        while let Ok(line) =
            self.logs.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if needles.iter().all(|n| line.contains(n)) {
                return Some(line);
            }
        }
        None
    }

    /// Rewrites the config file and sends SIGHUP; returns the log line that reports the outcome.
    pub fn reload_with(&mut self, yaml: &str) -> String {
        std::fs::write(self.config_path.as_ref().expect("started from a config file"), yaml)
            .unwrap();
        // Skip outcomes of earlier reloads: only lines after this point count.
        let seen = self.seen.len();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(l) = self.seen[seen..]
                .iter()
                .find(|l| l.contains("config reloaded") || l.contains("reload refused"))
            {
                return l.clone();
            }
            match self.logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no reload outcome logged:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every log line so far.
    pub fn logs(&mut self) -> String {
        for l in self.logs.try_iter() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with the pid of our own child and a valid signal number.
        let rc = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit (its stderr closing is the event) and returns its exit
    /// code; `None` if it is still running after `PATIENCE`.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
            }
        }
        let status = self.child.wait().expect("wait for apex");
        Some(status.code().unwrap_or(-1))
    }

    /// Waits for the process to exit, for at most `PATIENCE`, without waiting for its log
    /// pipe to close (a process it started, like an upgrade's new one, may hold the pipe).
    pub fn wait_process_exit(&mut self) -> Option<i32> {
        if !wait_pid_exit(self.child.id(), PATIENCE) {
            return None;
        }
        let status = self.child.wait().expect("wait for apex");
        for line in self.logs.try_iter() {
            self.seen.push(line);
        }
        Some(status.code().unwrap_or(-1))
    }

    /// Resident set size of the process, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// Peak resident set size (VmHWM) of the process so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Apex {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` exits within `limit` (a pidfd polled: no sleep loop). `true` also when
/// it no longer exists.
pub fn wait_pid_exit(pid: u32, limit: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        return true;
    }
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; `fd` is closed right after.
    let ready = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) } > 0;
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    ready
}

/// A process the test did not start itself (an upgrade's new Apex): killed when dropped, so a
/// failing test leaves nothing running.
pub struct Stray(pub u32);

impl Drop for Stray {
    fn drop(&mut self) {
        // SAFETY: kill with a valid signal; the pid was reported by the process itself.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        wait_pid_exit(self.0, PATIENCE);
    }
}

/// The value of `name=value` in a tracing log line (quotes stripped).
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// A config with one listener on 127.0.0.1:0, one worker, and the given routes and clusters.
pub fn config(routes: &str, clusters: &str) -> String {
    format!(
        "workers: 1\nlisteners:\n  - name: test\n    address: 127.0.0.1:0\nroutes:\n{routes}\nclusters:\n{clusters}\n"
    )
}

/// The usual setup: every request goes to one cluster with these endpoints.
pub fn proxy_config(endpoints: &[SocketAddr], cluster_extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    config(
        "  - match: { path_prefix: \"/\" }\n    cluster: backend",
        &format!("  - name: backend\n    endpoints: [{}]\n{cluster_extra}", eps.join(", ")),
    )
}

// ---------------------------------------------------------------- reading HTTP

/// A TCP connection with a read buffer, for either side of a test.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_nodelay(true).unwrap();
        Wire { stream, buf: Vec::new() }
    }

    pub fn connect(addr: SocketAddr) -> Wire {
        Wire::new(TcpStream::connect(addr).expect("connect"))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads a head up to and including CRLFCRLF. `Ok(None)` on EOF before any byte.
    pub fn read_head(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
            }
            if self.fill()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof inside head"));
            }
        }
    }

    pub fn read_exact_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof inside body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof inside line"));
            }
        }
    }

    /// Reads one chunk; `None` after the last chunk and its trailers.
    pub fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let line = self.read_line()?;
        let size =
            usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
        if size == 0 {
            while !self.read_line()?.is_empty() {}
            return Ok(None);
        }
        let data = self.read_exact_bytes(size)?;
        let crlf = self.read_exact_bytes(2)?;
        assert_eq!(crlf, b"\r\n", "chunk data must end with CRLF");
        Ok(Some(data))
    }

    pub fn read_chunked_body(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        while let Some(c) = self.read_chunk()? {
            body.extend_from_slice(&c);
        }
        Ok(body)
    }

    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Reads a whole response. `head_request`: the request was HEAD (no body follows).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        let head = self.read_head()?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response")
        })?;
        let mut r = Response::parse(&head);
        let no_body = head_request || r.status < 200 || r.status == 204 || r.status == 304;
        r.body = if no_body {
            Vec::new()
        } else if r.header("transfer-encoding").is_some() {
            self.read_chunked_body()?
        } else if let Some(n) = r.header("content-length") {
            self.read_exact_bytes(n.parse().unwrap())?
        } else {
            self.read_to_end()?
        };
        Ok(r)
    }

    /// Whether the peer closes the connection (EOF, or a reset) within `PATIENCE`, with no
    /// further bytes. A connection still open when the wait runs out is *not* closed: a read
    /// timeout is the proof that the peer kept it open.
    pub fn is_closed(&mut self) -> bool {
        self.closes_within(PATIENCE)
    }

    /// Whether the peer closes the connection within `wait` (EOF or reset) without sending
    /// another byte; `false` if bytes arrive or `wait` runs out with the connection open.
    pub fn closes_within(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
        let verdict = match self.fill() {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => false,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => true,
                other => panic!("reading to see whether the peer closed: {other:?} ({e})"),
            },
        };
        self.stream.set_read_timeout(Some(PATIENCE)).unwrap();
        verdict
    }

    /// Waits for the peer to close (as [`Wire::is_closed`]) and returns how long that took
    /// from `since`; `None` if it stayed open for `PATIENCE`.
    pub fn closed_after(&mut self, since: Instant) -> Option<Duration> {
        self.is_closed().then(|| since.elapsed())
    }

    /// Sends a request and reads its response.
    pub fn request(&mut self, raw: &str) -> Response {
        self.send(raw.as_bytes());
        self.read_response(raw.starts_with("HEAD ")).expect("response")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn parse(head: &str) -> Response {
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Response { status, head: head.to_string(), headers, body: Vec::new() }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub head: String,
    pub body: Vec<u8>,
    /// Which accepted connection (0-based) and which request on it (0-based).
    pub conn: usize,
    pub index: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        Response::parse(&format!("X 0 x\r\n{}", self.head.split_once("\r\n").unwrap().1))
            .header(&name.to_ascii_lowercase())
            .map(str::to_string)
    }
    pub fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap()
    }
}

// ---------------------------------------------------------------- the fake upstream

/// What the handler wants done with the connection after it wrote its reply.
pub enum After {
    KeepOpen,
    Close,
}

type Handler = dyn Fn(&Received, &mut Wire) -> After + Send + Sync;

/// A fake upstream on 127.0.0.1:0 that counts accepted connections and records requests.
///
/// A panic in one of its threads (a handler's assertion, say) fails the test that owns it:
/// the panic is caught in the thread, reported here, and raised again by [`Upstream::next`]
/// and when the upstream is dropped (linkerd's `join_servers`), instead of surfacing later as
/// a misleading "received no request".
pub struct Upstream {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    /// Requests, and (as `Err`) a thread's panic, so that a waiting `next` fails at once.
    received: mpsc::Receiver<Result<Received, String>>,
    /// Connections (by accept index) the proxy closed, in the order they were seen closing.
    closes: mpsc::Receiver<usize>,
    panics: mpsc::Receiver<String>,
    /// The accept thread; it runs until the process ends (its listener is never closed).
    _acceptor: std::thread::JoinHandle<()>,
}

/// The message of a caught panic.
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_string())
}

impl Upstream {
    /// Serves every request with `handler`, one thread per connection.
    pub fn start(
        handler: impl Fn(&Received, &mut Wire) -> After + Send + Sync + 'static,
    ) -> Upstream {
        Upstream::start_on("127.0.0.1:0".parse().unwrap(), handler)
    }

    /// [`Upstream::start`] on a given address (another loopback address, say 127.0.0.2, with
    /// the port of an upstream on 127.0.0.1: what DNS names with several A records need).
    pub fn start_on(
        at: SocketAddr,
        handler: impl Fn(&Received, &mut Wire) -> After + Send + Sync + 'static,
    ) -> Upstream {
        let listener = TcpListener::bind(at).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let (close_tx, closes) = mpsc::channel();
        let (panic_tx, panics) = mpsc::channel();
        let handler: Arc<Handler> = Arc::new(handler);
        let counter = accepts.clone();
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let conn = counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let tx = tx.clone();
                let close_tx = close_tx.clone();
                let panic_tx = panic_tx.clone();
                std::thread::spawn(move || {
                    let report = tx.clone();
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_fake(Wire::new(stream), conn, &*handler, tx, close_tx)
                    }));
                    if let Err(p) = served {
                        let msg = panic_message(p);
                        // `panics` first: `next` drains it once the report arrives, so the drop
                        // check does not raise the same panic a second time.
                        let _ = panic_tx.send(msg.clone());
                        let _ = report.send(Err(msg));
                    }
                });
            }
        });
        Upstream { addr, accepts, received: rx, closes, panics, _acceptor: acceptor }
    }

    /// Raises, in the test's thread, the first panic of this upstream's threads.
    pub fn check(&self) {
        if let Ok(msg) = self.panics.try_recv() {
            panic!("a fake upstream thread panicked: {msg}");
        }
    }

    /// An upstream whose response waits for the test: `arrived` is passed when a request is in,
    /// `release` lets the response (`200 done`) go.
    pub fn held() -> (Upstream, Arc<std::sync::Barrier>, Arc<std::sync::Barrier>) {
        let arrived = Arc::new(std::sync::Barrier::new(2));
        let release = Arc::new(std::sync::Barrier::new(2));
        let (a, r) = (arrived.clone(), release.clone());
        let up = Upstream::start(move |_, w| {
            a.wait();
            r.wait();
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone");
            After::KeepOpen
        });
        (up, arrived, release)
    }

    /// Answers every request `200` with `body`, keeping connections open.
    pub fn ok(body: &'static str) -> Upstream {
        Upstream::start(move |_, w| {
            w.send(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                    .as_bytes(),
            );
            After::KeepOpen
        })
    }

    /// Answers the first request on each connection; on a later one it closes the connection
    /// without answering, after the proxy has sent the request (a race no check can see).
    pub fn closing_after_first_request() -> Upstream {
        Upstream::start(|r, w| {
            if r.index > 0 {
                return After::Close;
            }
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            After::KeepOpen
        })
    }

    /// Answers a request for a path ending in `/chunked` or `/sized` `200` with a body that
    /// never ends (chunked, or with a `Content-Length` of 1 TiB), writing until the proxy closes
    /// the connection, so that request is reported only once no byte more could be written;
    /// any other request gets `200 ok`.
    pub fn endless() -> Upstream {
        Upstream::start(|r, w| {
            let path = r.request_line().split(' ').nth(1).unwrap_or("").to_string();
            let (head, piece) = if path.ends_with("/chunked") {
                let mut piece = format!("{:x}\r\n", 64 * 1024).into_bytes();
                piece.extend_from_slice(&[b'c'; 64 * 1024]);
                piece.extend_from_slice(b"\r\n");
                ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", piece)
            } else if path.ends_with("/sized") {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n";
                (head, vec![b's'; 64 * 1024])
            } else {
                w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                return After::KeepOpen;
            };
            if w.stream.write_all(head.as_bytes()).is_ok() {
                while w.stream.write_all(&piece).is_ok() {}
            }
            After::Close
        })
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The next request received, waiting for it.
    pub fn next(&self) -> Received {
        match self.received.recv_timeout(PATIENCE) {
            Ok(Ok(r)) => r,
            Ok(Err(msg)) => {
                // Raised here; the drop check need not raise it a second time.
                while self.panics.try_recv().is_ok() {}
                panic!("a fake upstream thread panicked: {msg}")
            }
            Err(_) => panic!("the upstream received no request"),
        }
    }

    /// Waits until the proxy closes one of its connections to this upstream (EOF between
    /// requests); returns that connection's accept index, or `None` after `PATIENCE`.
    pub fn next_close(&self) -> Option<usize> {
        let got = self.closes.recv_timeout(PATIENCE).ok();
        self.check();
        got
    }

    /// Requests received so far, without waiting.
    pub fn drain(&self) -> Vec<Received> {
        self.check();
        self.received
            .try_iter()
            .map(|r| r.unwrap_or_else(|msg| panic!("a fake upstream thread panicked: {msg}")))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.check();
        }
    }
}

fn serve_fake(
    mut w: Wire,
    conn: usize,
    handler: &Handler,
    tx: mpsc::Sender<Result<Received, String>>,
    closes: mpsc::Sender<usize>,
) {
    for index in 0.. {
        let head = match w.read_head() {
            Ok(Some(head)) => head,
            // The proxy closed the connection between requests.
            Ok(None) => {
                let _ = closes.send(conn);
                return;
            }
            Err(_) => return,
        };
        let r = Response::parse(&format!("X 0 x\r\n{}", head.split_once("\r\n").unwrap().1));
        let body = if r.header("transfer-encoding").is_some() {
            match w.read_chunked_body() {
                Ok(b) => b,
                Err(_) => return,
            }
        } else if let Some(n) = r.header("content-length") {
            match w.read_exact_bytes(n.parse().unwrap()) {
                Ok(b) => b,
                Err(_) => return,
            }
        } else {
            Vec::new()
        };
        let received = Received { head, body, conn, index };
        let after = handler(&received, &mut w);
        // Close before reporting, so a test that saw the request also knows the close was sent.
        let close = matches!(after, After::Close);
        if close {
            let _ = w.stream.shutdown(Shutdown::Both);
        }
        let _ = tx.send(Ok(received));
        if close {
            return;
        }
    }
}

/// A port free right now, for Apex to bind later (bound, then released: it may be taken again
/// meanwhile, which a test binding it would see as an error, not as a wrong answer).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An address nothing listens on, and nothing will: a socket is bound to it and never
/// listens, so a connect is refused, and it stays bound for the rest of the test process. A
/// port bound and released at once can be handed out again to the next bind to port 0, for
/// instance to Apex's own listener, whose "dead" upstream is then itself (one access-log test
/// once logged an extra 502 with the dead address as its upstream).
pub fn closed_port() -> SocketAddr {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    // Kept open for the process's life: one descriptor per call, a few dozen per test binary.
    std::mem::forget(s);
    addr
}

/// A listener whose accept queue is full and never drained: further SYNs are dropped, so a
/// connect to it hangs until the client gives up. Keep the returned values alive.
pub fn black_hole() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            fillers.push(c);
        }
    }
    (s, fillers, addr)
}

// ---------------------------------------------------------------- the admin API

/// Prepends an admin API on 127.0.0.1:0 to a config.
pub fn with_admin(yaml: &str) -> String {
    format!("admin: 127.0.0.1:0\n{yaml}")
}

/// The admin API's address, from its startup log line.
pub fn admin_addr(apex: &mut Apex) -> SocketAddr {
    let line = apex.wait_for_log(&["admin API listening"]).expect("admin API started");
    field(&line, "address").unwrap().parse().unwrap()
}

/// One admin request.
pub fn admin(addr: SocketAddr, method: &str, path: &str) -> Response {
    Wire::connect(addr).request(&format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n"))
}

/// The value of a series (`name{labels}`) in a Prometheus text page.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// `GET /metrics` as text.
pub fn metrics(admin_at: SocketAddr) -> String {
    admin(admin_at, "GET", "/metrics").text()
}

// ---------------------------------------------------------------- a flooding client

/// A client that sends `start`, then `batch` over and over, while another thread reads and
/// drops everything that comes back: the proxy's socket for it stays readable and writable, so
/// on a driver where such operations finish at once nothing makes its task wait. `start`
/// returns once the proxy has answered the flood.
pub struct Flood {
    stop: Arc<AtomicBool>,
    writer: std::thread::JoinHandle<()>,
    reader: std::thread::JoinHandle<()>,
}

impl Flood {
    pub fn start(addr: SocketAddr, start: &[u8], batch: Vec<u8>) -> Flood {
        let mut out = TcpStream::connect(addr).unwrap();
        out.write_all(start).unwrap();
        let mut back = out.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, s2) = (stop.clone(), stop.clone());
        let (answered, first_answer) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut sink = vec![0u8; 65536];
            while !s1.load(Ordering::Relaxed) && back.read(&mut sink).unwrap_or(0) > 0 {
                let _ = answered.send(());
            }
        });
        let writer = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) && out.write_all(&batch).is_ok() {}
            let _ = out.shutdown(Shutdown::Both);
        });
        // Running: the proxy has answered it.
        first_answer.recv_timeout(PATIENCE).expect("the flood gets answers");
        Flood { stop, writer, reader }
    }

    /// Stops the flood.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.join().expect("flood writer");
        self.reader.join().expect("flood reader");
    }
}
