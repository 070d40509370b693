//! TLS for client connections (certificates chosen by SNI) and for upstream connections, on a
//! TLS stream layered over the runtime seam, so the proxy loop and every runtime share one
//! implementation.
//!
//! rustls is driven through its unbuffered API (the sans-IO core in [`engine`]): ciphertext
//! is read by the seam into Apex's own buffers and handed to rustls, and the records rustls
//! produces are written by the seam. Nothing here blocks or owns a thread. Each worker builds
//! its own `ServerConfig` (its own session cache), so no handshake writes memory another worker
//! uses.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::rc::Rc;

use crate::proxy::io::{ReadHalf, Stream, WriteHalf};

mod engine;

use engine::{tls_error, Engine, Sink, Step, MAX_PENDING_CIPHERTEXT};

/// A TLS connection's parameters, for the access log and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSummary {
    pub version: &'static str,
    pub cipher: &'static str,
    pub sni: Option<String>,
}

/// The last validity time (notAfter) of a DER certificate, in seconds since the Unix epoch:
/// read from the TBSCertificate's validity, without a full X.509 parser (webpki does not
/// expose it). `None` if the DER is not shaped as expected.
pub fn not_after(der: &[u8]) -> Option<i64> {
    /// One DER element at the start of `b`: (tag, contents, rest).
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, b) = b.split_first()?;
        let (len, b) = if first < 0x80 {
            (usize::from(first), b)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let len = b[..n].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
            (len, &b[n..])
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (_, cert, _) = element(der)?;
    let (_, tbs, _) = element(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == 0xa0 {
        rest = after; // version
    }
    for _ in 0..3 {
        rest = element(rest)?.2; // serial, signature algorithm, issuer
    }
    let (_, validity, _) = element(rest)?;
    let not_before_rest = element(validity)?.2;
    let (tag, time, _) = element(not_before_rest)?;
    let t = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = t.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (t.get(..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
    let (month, day, h, m, sec) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    Some(crate::timefmt::days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Ciphertext read at once: one TLS record and its overhead.
const TLS_READ: usize = 16 * 1024 + 512;
/// The smallest ciphertext read: what a read for a small plaintext buffer (an idle connection
/// waiting for its next request offers 512 bytes) uses, so that an idle TLS connection does not
/// hold a 16 KiB record buffer while it waits. A larger record arrives over several reads;
/// rustls keeps the partial record.
const TLS_SMALL_READ: usize = 1024;

/// The ciphertext buffer for a read that may return up to `want` bytes of plaintext.
fn ciphertext_capacity(want: usize) -> usize {
    (want + 512).clamp(TLS_SMALL_READ, TLS_READ)
}
/// Sessions each worker remembers for TLS 1.2 resumption by session id.
const SESSION_CACHE: usize = 4096;

/// A certificate chain with its key, and the DNS names it is for.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case SAN names; wildcards as `*.example.net`.
    pub names: Vec<String>,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: Option<i64>,
}

/// Why a certificate or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertError {
    Unreadable(String),
    NoCertificate,
    BadKey(String),
    KeyMismatch,
    NoSubjectAltName,
    /// The OCSP response file: unreadable, not DER, or not a successful response.
    BadOcsp(String),
}

impl std::fmt::Display for CertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertError::Unreadable(e) => write!(f, "cannot read: {e}"),
            CertError::NoCertificate => write!(f, "holds no PEM certificate"),
            CertError::BadKey(e) => write!(f, "no usable private key: {e}"),
            CertError::KeyMismatch => write!(f, "the key does not match the certificate"),
            CertError::NoSubjectAltName => {
                write!(f, "the certificate names no DNS subject alternative name")
            }
            CertError::BadOcsp(e) => write!(f, "OCSP response: {e}"),
        }
    }
}

/// The `responseStatus` of a DER OCSPResponse (RFC 6960 §4.2.1: a SEQUENCE whose first
/// element is an ENUMERATED, 0 for `successful`); `None` when the bytes are not one.
pub fn ocsp_status(der: &[u8]) -> Option<u8> {
    if der.first() != Some(&0x30) {
        return None;
    }
    // The SEQUENCE's length, short or long form, must cover the rest exactly.
    let (len, at) = match *der.get(1)? {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let k = (n & 0x7f) as usize;
            if k == 0 || k > 4 {
                return None;
            }
            let mut len = 0usize;
            for b in der.get(2..2 + k)? {
                len = len << 8 | *b as usize;
            }
            (len, 2 + k)
        }
    };
    if at + len != der.len() {
        return None;
    }
    match der.get(at..at + 3)? {
        [0x0a, 0x01, status] => Some(*status),
        _ => None,
    }
}

/// Reads a DER OCSP response to staple; refuses one that is not a successful response.
fn load_ocsp(path: &Path) -> Result<Vec<u8>, CertError> {
    let der = std::fs::read(path)
        .map_err(|e| CertError::BadOcsp(format!("cannot read {}: {e}", path.display())))?;
    match ocsp_status(&der) {
        Some(0) => Ok(der),
        Some(s) => {
            Err(CertError::BadOcsp(format!("{}: status {s}, not successful", path.display())))
        }
        None => Err(CertError::BadOcsp(format!("{}: not a DER OCSP response", path.display()))),
    }
}

/// Reads a PEM chain (leaf first) and its PEM key (RSA, ECDSA or Ed25519), and the OCSP
/// response to staple with it, if any.
pub fn load_cert(cert: &Path, key: &Path, ocsp: Option<&Path>) -> Result<LoadedCert, CertError> {
    let pem = std::fs::read(cert)
        .map_err(|e| CertError::Unreadable(format!("{}: {e}", cert.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::NoCertificate)?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key_pem =
        std::fs::read(key).map_err(|e| CertError::Unreadable(format!("{}: {e}", key.display())))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| CertError::BadKey(e.to_string()))?;
    let names: Vec<String> = {
        let leaf =
            webpki::EndEntityCert::try_from(&chain[0]).map_err(|_| CertError::NoCertificate)?;
        leaf.valid_dns_names().map(|n| n.to_ascii_lowercase()).collect()
    };
    let not_after = not_after(&chain[0]);
    if names.is_empty() {
        return Err(CertError::NoSubjectAltName);
    }
    let mut key =
        CertifiedKey::from_der(chain, key_der, &default_provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch,
            other => CertError::BadKey(other.to_string()),
        })?;
    // Stapled to handshakes whose client asks for it (status_request).
    key.ocsp = ocsp.map(load_ocsp).transpose()?;
    Ok(LoadedCert { key: Arc::new(key), names, not_after })
}

/// SNI: exact names first, then one-label wildcards (`*.example.net` matches `a.example.net`,
/// not `example.net` nor `a.b.example.net`), then the default. Immutable, built per config
/// snapshot; read by every worker's handshakes, written by none.
#[derive(Debug)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// `certs` in config order (the first to claim a name keeps it); `default` indexes them.
    pub fn new(certs: &[LoadedCert], default: usize) -> CertStore {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for n in &c.names {
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(n.clone()),
                }
                .or_insert_with(|| Arc::clone(&c.key));
            }
        }
        CertStore { exact, wildcard, default: Arc::clone(&certs[default].key) }
    }

    /// The certificate for a server name (lower-case), or the default.
    pub fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let found = name.and_then(|n| {
            let n = n.to_ascii_lowercase();
            self.exact
                .get(&n)
                .or_else(|| {
                    let (_, parent) = n.split_once('.')?;
                    self.wildcard.get(parent)
                })
                .cloned()
        });
        found.unwrap_or_else(|| Arc::clone(&self.default))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // For the access log: the handshake step that called this takes it (see RESOLVED_SNI).
        RESOLVED_SNI.with(|r| *r.borrow_mut() = hello.server_name().map(str::to_string));
        Some(self.pick(hello.server_name()))
    }
}

/// The CAs in a PEM file, as a root store.
pub fn root_store(ca: &Path) -> Result<rustls::RootCertStore, CertError> {
    let pem =
        std::fs::read(ca).map_err(|e| CertError::Unreadable(format!("{}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|_| CertError::NoCertificate)?;
        roots.add(c).map_err(|e| CertError::BadKey(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(roots)
}

/// A worker's own client config for a cluster's TLS: its own resumption cache.
pub fn client_config(
    tls: &crate::config::UpstreamTls,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.roots {
        Some(roots) => builder.with_root_certificates(Arc::clone(roots)),
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(
            default_provider().signature_verification_algorithms,
        ))),
    };
    let config = match &tls.client_cert {
        Some(c) => builder.with_client_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from(Arc::clone(&c.key)),
        )),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `verify: false`: any upstream certificate is accepted (an operator's explicit choice for
/// a private network); signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct NoVerification(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Client certificates a listener asks for (mTLS): verified against the CAs in one PEM file.
/// Immutable and shared read-only by every worker's config.
pub fn client_verifier(
    ca: &Path,
    required: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, CertError> {
    let roots = root_store(ca)?;
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(default_provider()),
    );
    let builder = if required { builder } else { builder.allow_unauthenticated() };
    builder.build().map_err(|e| CertError::BadKey(e.to_string()))
}

/// A worker's own server config for a TLS listener: its own session cache, the snapshot's
/// certificates.
pub fn server_config(
    certs: Arc<CertStore>,
    tls13_only: bool,
    alpn: &[String],
    tickets: &SharedTicketKeys,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(versions)?;
    let builder = match client_auth {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    // Stateless tickets under keys every worker shares: a client resumes on any core.
    config.ticketer = Ticketer::new(Arc::clone(tickets));
    Ok(Arc::new(config))
}

/// A connection over TLS, on any seam stream (a client's, or Apex's own to an upstream). Reads
/// and writes plaintext like the stream it wraps.
///
/// Buffers: ciphertext for a small read (an idle connection waiting for its next request offers
/// 512 bytes) is read into the reader's own buffer, so an idle TLS connection holds no buffer
/// beyond the one a plaintext connection holds. `incoming` holds an incomplete record between
/// reads (and larger reads' ciphertext); `Core::plain` holds plaintext that did not fit the
/// reader's buffer. Each is freed once empty.
pub struct TlsStream<S> {
    core: Rc<RefCell<Core>>,
    inner: S,
    /// What the handshake settled, read once it completed.
    info: TlsInfo,
}

/// The connection's negotiated parameters.
#[derive(Debug, Clone, Default)]
struct TlsInfo {
    summary: TlsSummary,
    alpn: Option<&'static [u8]>,
    version: Option<rustls::ProtocolVersion>,
}

/// The rustls connection of either side.
enum Conn {
    Server(Engine<UnbufferedServerConnection>),
    Client(Engine<UnbufferedClientConnection>),
}

/// The state both directions of a TLS connection share.
struct Core {
    conn: Conn,
    /// Ciphertext read and not yet used: an incomplete record or handshake message. Every call
    /// into rustls gets exactly these bytes (see [`Engine::encrypt`]), so a split stream's
    /// reading half never takes them away while a read is in flight.
    incoming: Vec<u8>,
    /// Decrypted application data not yet read.
    plain: Vec<u8>,
    /// TLS records encoded and not yet written (a handshake answer, session tickets, a key
    /// update, an alert). The reading direction of a split stream leaves here what it cannot
    /// write; the writing direction sends it ahead of its own records.
    out: Vec<u8>,
}

/// Reads offering at most this much plaintext room take their ciphertext into the reader's own
/// buffer (then copied to the stack to be decrypted), so they need no buffer of their own.
const DIRECT_READ: usize = 4096;
/// Below this room a direct read would take a record in tiny pieces: such reads go through
/// `incoming` with a read of at least [`TLS_SMALL_READ`].
const MIN_DIRECT_READ: usize = 256;

thread_local! {
    /// The server name of the ClientHello this worker's certificate resolver saw last: rustls's
    /// unbuffered server connection does not expose SNI, and the resolver runs inside the
    /// handshake step of exactly one connection at a time on this thread, which takes it at once.
    static RESOLVED_SNI: RefCell<Option<String>> = const { RefCell::new(None) };
}

impl Core {
    fn new(conn: Conn) -> Core {
        Core { conn, incoming: Vec::new(), plain: Vec::new(), out: Vec::new() }
    }

    /// Runs rustls over `ciphertext`; see [`Engine::advance`]. Records to send go to `out`.
    fn advance(
        conn: &mut Conn,
        ciphertext: &mut [u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> (usize, Result<Step, rustls::Error>) {
        match conn {
            Conn::Server(e) => e.advance(ciphertext, out, sink),
            Conn::Client(e) => e.advance(ciphertext, out, sink),
        }
    }

    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.conn {
            Conn::Server(e) => e.encrypt(data, &mut self.incoming, &mut self.out),
            Conn::Client(e) => e.encrypt(data, &mut self.incoming, &mut self.out),
        }
        .map_err(tls_error)
    }

    fn close_notify(&mut self) -> io::Result<()> {
        match &mut self.conn {
            Conn::Server(e) => e.close_notify(&mut self.incoming, &mut self.out),
            Conn::Client(e) => e.close_notify(&mut self.incoming, &mut self.out),
        }
        .map_err(tls_error)
    }

    fn peer_closed(&self) -> bool {
        match &self.conn {
            Conn::Server(e) => e.peer_closed,
            Conn::Client(e) => e.peer_closed,
        }
    }

    fn common(&self) -> &rustls::CommonState {
        match &self.conn {
            Conn::Server(e) => &e.conn,
            Conn::Client(e) => &e.conn,
        }
    }

    /// Moves decrypted data the last read could not take into `buf`'s spare capacity.
    fn take_plain(&mut self, buf: &mut Vec<u8>) -> usize {
        let n = (buf.capacity() - buf.len()).min(self.plain.len());
        buf.extend_from_slice(&self.plain[..n]);
        self.plain.drain(..n);
        release_if_empty(&mut self.plain);
        n
    }

    /// Processes ciphertext a read put into `buf` after `len` (a direct read, made only while
    /// `incoming` is empty): it is moved to the stack, `buf` is cut back to `len` and receives
    /// the plaintext; what is left (an incomplete record) goes to `incoming`.
    fn digest_direct(&mut self, buf: &mut Vec<u8>, len: usize) -> Result<Step, rustls::Error> {
        debug_assert!(self.incoming.is_empty());
        let n = buf.len() - len;
        let mut ciphertext = [0u8; DIRECT_READ];
        ciphertext[..n].copy_from_slice(&buf[len..]);
        buf.truncate(len);
        let mut sink = Sink { buf, overflow: &mut self.plain };
        let (used, step) =
            Self::advance(&mut self.conn, &mut ciphertext[..n], &mut self.out, &mut sink);
        self.incoming.extend_from_slice(&ciphertext[used..n]);
        step
    }

    /// Processes the ciphertext in `incoming`, plaintext to `buf`; keeps what is left of it (an
    /// incomplete record), within [`MAX_PENDING_CIPHERTEXT`].
    fn digest(&mut self, buf: &mut Vec<u8>) -> Result<Step, rustls::Error> {
        let mut sink = Sink { buf, overflow: &mut self.plain };
        let (used, step) =
            Self::advance(&mut self.conn, &mut self.incoming[..], &mut self.out, &mut sink);
        self.incoming.drain(..used);
        release_if_empty(&mut self.incoming);
        if step.is_ok() && self.incoming.len() > MAX_PENDING_CIPHERTEXT {
            return Err(rustls::Error::General("incomplete TLS message too large".into()));
        }
        step
    }

    /// How the next read takes its ciphertext, for a reader with `room` bytes of plaintext
    /// room. `exclusive`: no other party uses this core while the read is in flight (an
    /// unsplit stream), so `incoming` itself may be read into.
    fn plan_read(&mut self, room: usize, exclusive: bool) -> ReadInto {
        if self.incoming.is_empty() && (MIN_DIRECT_READ..=DIRECT_READ).contains(&room) {
            return ReadInto::Caller;
        }
        let want = ciphertext_capacity(room);
        if exclusive || self.incoming.is_empty() {
            let mut b = std::mem::take(&mut self.incoming);
            b.reserve(want);
            ReadInto::Incoming(b)
        } else {
            ReadInto::Scratch(Vec::with_capacity(want))
        }
    }

    /// Takes back the buffer a read filled per [`Core::plan_read`] and processes it.
    fn after_read(
        &mut self,
        into: ReadInto,
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<Step, rustls::Error> {
        match into {
            ReadInto::Caller => self.digest_direct(buf, start),
            ReadInto::Incoming(b) => {
                self.incoming = b;
                self.digest(buf)
            }
            ReadInto::Scratch(b) => {
                self.incoming.extend_from_slice(&b);
                self.digest(buf)
            }
        }
    }
}

/// Where a read puts ciphertext: the reader's own buffer, `Core::incoming` (taken out while
/// the read is in flight), or a scratch buffer appended to `incoming` afterwards.
enum ReadInto {
    Caller,
    Incoming(Vec<u8>),
    Scratch(Vec<u8>),
}

/// Where ciphertext comes from: a whole stream or its reading half.
#[allow(async_fn_in_trait)]
trait CiphertextSource {
    async fn read_ciphertext(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
}

struct Whole<'a, S>(&'a mut S);
impl<S: Stream> CiphertextSource for Whole<'_, S> {
    async fn read_ciphertext(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.read(buf).await
    }
}

struct Half<'a, R>(&'a mut R);
impl<R: ReadHalf> CiphertextSource for Half<'_, R> {
    async fn read_ciphertext(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        self.0.read(buf).await
    }
}

/// Reads plaintext into `buf` from a TLS connection whose ciphertext `src` reads: the one read
/// loop of [`TlsStream`] and of its reading half. Records rustls has to send are left in
/// `core.out`. `Ok(0)`: the peer closed (close_notify or end of stream).
async fn read_plain(
    core: &RefCell<Core>,
    exclusive: bool,
    mut buf: Vec<u8>,
    src: &mut impl CiphertextSource,
) -> (io::Result<usize>, Vec<u8>) {
    let start = buf.len();
    loop {
        {
            let mut c = core.borrow_mut();
            if c.take_plain(&mut buf) > 0 {
                return (Ok(buf.len() - start), buf);
            }
            if c.peer_closed() {
                return (Ok(0), buf);
            }
        }
        let room = buf.capacity() - buf.len();
        let plan = core.borrow_mut().plan_read(room, exclusive);
        let (res, into) = match plan {
            ReadInto::Caller => {
                let (res, b) = src.read_ciphertext(buf).await;
                buf = b;
                (res, ReadInto::Caller)
            }
            ReadInto::Incoming(b) => {
                let (res, b) = src.read_ciphertext(b).await;
                (res, ReadInto::Incoming(b))
            }
            ReadInto::Scratch(b) => {
                let (res, b) = src.read_ciphertext(b).await;
                (res, ReadInto::Scratch(b))
            }
        };
        if !matches!(res, Ok(n) if n > 0) {
            // End of stream or an error: what `incoming` held is kept (and unused).
            if let ReadInto::Incoming(b) = into {
                core.borrow_mut().incoming = b;
            }
            return (res.map(|_| 0), buf);
        }
        let step = core.borrow_mut().after_read(into, &mut buf, start);
        if let Err(e) = step {
            return (Err(tls_error(e)), buf);
        }
        if buf.len() > start {
            return (Ok(buf.len() - start), buf);
        }
    }
}

impl<S: Stream> TlsStream<S> {
    /// Completes the handshake on `inner` (the caller bounds it with its handshake timeout).
    pub async fn accept(config: Arc<ServerConfig>, inner: S) -> io::Result<TlsStream<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        Self::handshake(Conn::Server(Engine::new(conn)), inner).await
    }

    /// Completes a client handshake with an upstream on `inner`.
    pub async fn connect(
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        inner: S,
    ) -> io::Result<TlsStream<S>> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        Self::handshake(Conn::Client(Engine::new(conn)), inner).await
    }

    async fn handshake(conn: Conn, inner: S) -> io::Result<TlsStream<S>> {
        let server = matches!(conn, Conn::Server(_));
        let mut s = TlsStream {
            core: Rc::new(RefCell::new(Core::new(conn))),
            inner,
            info: TlsInfo::default(),
        };
        let mut sni = None;
        loop {
            // Plaintext that comes with the handshake's last flight waits in `Core::plain`.
            RESOLVED_SNI.with(|r| r.borrow_mut().take());
            let step = s.core.borrow_mut().digest(&mut Vec::new());
            if let Some(name) = RESOLVED_SNI.with(|r| r.borrow_mut().take()) {
                sni = Some(name);
            }
            s.send_out().await?;
            match step.map_err(tls_error)? {
                Step::Open => break,
                Step::Handshaking => {
                    let mut b = std::mem::take(&mut s.core.borrow_mut().incoming);
                    b.reserve(TLS_READ);
                    let (res, b) = s.inner.read(b).await;
                    s.core.borrow_mut().incoming = b;
                    if res? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
        s.info = {
            let core = s.core.borrow();
            let common = core.common();
            let version = common.protocol_version();
            let alpn = match common.alpn_protocol() {
                Some(b"h2") => Some(&b"h2"[..]),
                Some(b"http/1.1") => Some(&b"http/1.1"[..]),
                Some(_) => Some(&b"other"[..]),
                None => None,
            };
            let summary = TlsSummary {
                version: match version {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                    _ => "-",
                },
                cipher: common
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str())
                    .unwrap_or("-"),
                sni: if server { sni } else { None },
            };
            TlsInfo { summary, alpn, version }
        };
        Ok(s)
    }

    /// The server name the client asked for (SNI).
    pub fn server_name(&self) -> Option<&str> {
        self.info.summary.sni.as_deref()
    }

    /// The negotiated application protocol (`h2`, `http/1.1`).
    pub fn alpn(&self) -> Option<&'static [u8]> {
        self.info.alpn
    }

    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.info.version
    }

    /// What the access log records of this connection's TLS: version, cipher suite, SNI.
    pub fn summary(&self) -> TlsSummary {
        self.info.summary.clone()
    }

    /// Writes the TLS records waiting in the core.
    async fn send_out(&mut self) -> io::Result<()> {
        send_out(&self.core, |b| self.inner.write_all(b)).await
    }
}

/// Writes the records waiting in `core.out` with `write`; the buffer goes back for reuse only if
/// nothing was queued meanwhile (by the other direction of a split stream), else it is dropped.
async fn send_out<F, Fut>(core: &RefCell<Core>, write: F) -> io::Result<()>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = (io::Result<()>, Vec<u8>)>,
{
    let out = std::mem::take(&mut core.borrow_mut().out);
    if out.is_empty() {
        return Ok(());
    }
    let (res, mut b) = write(out).await;
    b.clear();
    release_if_empty(&mut b);
    let mut core = core.borrow_mut();
    if core.out.is_empty() {
        core.out = b;
    }
    res
}

/// Frees a buffer that holds nothing, so an idle TLS connection keeps no record buffer (16 KiB
/// and more each); the next read or write allocates again.
fn release_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

/// Runs bytes a client sent (in the given pieces) through a fresh server connection, the way
/// the listener path does, and returns what the server would send back: the sans-IO core of
/// the handshake, for the fuzz target. Never panics; stops at the first TLS error.
pub fn serve_bytes(config: Arc<ServerConfig>, pieces: &[&[u8]]) -> Vec<u8> {
    let Ok(conn) = UnbufferedServerConnection::new(config) else { return Vec::new() };
    let mut core = Core::new(Conn::Server(Engine::new(conn)));
    let mut sent = Vec::new();
    for piece in pieces {
        core.incoming.extend_from_slice(piece);
        let step = core.digest(&mut Vec::with_capacity(4096));
        sent.append(&mut core.out);
        core.plain.clear();
        if step.is_err() {
            break;
        }
    }
    sent
}

impl<S: Stream> Stream for TlsStream<S> {
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let (res, buf) = read_plain(&self.core, true, buf, &mut Whole(&mut self.inner)).await;
        // Post-handshake answers (a key update) and alerts go out at once.
        let sent = self.send_out().await;
        match (res, sent) {
            (Ok(n), Err(e)) if n > 0 => (Err(e), buf),
            (res, _) => (res, buf),
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if let Err(e) = self.core.borrow_mut().encrypt(&buf) {
            return (Err(e), buf);
        }
        (self.send_out().await, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.core.borrow_mut().close_notify()?;
        self.send_out().await?;
        self.inner.shutdown_write().await
    }

    fn is_stale(&self) -> bool {
        self.inner.is_stale()
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    type Read = TlsRead<S>;
    type Write = TlsWrite<S>;
    /// The halves share the TLS state through an `Rc<RefCell>`, borrowed only between awaits,
    /// never across one: each half owns its direction of the socket. Records the reading half
    /// has rustls answer with (a key update's) leave with the next write.
    fn into_split(self) -> (TlsRead<S>, TlsWrite<S>) {
        let (r, w) = self.inner.into_split();
        (TlsRead { core: Rc::clone(&self.core), inner: r }, TlsWrite { core: self.core, inner: w })
    }
}

pub struct TlsRead<S: Stream> {
    core: Rc<RefCell<Core>>,
    inner: S::Read,
}

pub struct TlsWrite<S: Stream> {
    core: Rc<RefCell<Core>>,
    inner: S::Write,
}

impl<S: Stream> ReadHalf for TlsRead<S> {
    /// Records rustls answers with stay in the core for the writing half's next write.
    async fn read(&mut self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        read_plain(&self.core, false, buf, &mut Half(&mut self.inner)).await
    }
}

impl<S: Stream> WriteHalf for TlsWrite<S> {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if let Err(e) = self.core.borrow_mut().encrypt(&buf) {
            return (Err(e), buf);
        }
        (send_out(&self.core, |b| self.inner.write_all(b)).await, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.core.borrow_mut().close_notify()?;
        send_out(&self.core, |b| self.inner.write_all(b)).await?;
        self.inner.shutdown_write().await
    }
}

/// Session-ticket keys: one to encrypt with, the one before it still accepted, so a ticket
/// stays usable for up to two rotation periods. Immutable: a rotation publishes a new set
/// through `arc-swap`, the way config snapshots reach workers.
pub struct TicketKeys {
    current: Arc<TicketKey>,
    previous: Option<Arc<TicketKey>>,
}

/// A key's name (sent in the ticket, to find the key again) and the key.
type TicketKey = (TicketKeyName, ring::aead::LessSafeKey);

type TicketKeyName = [u8; 16];

/// Where the control plane publishes ticket keys and every worker's ticketer reads them.
pub type SharedTicketKeys = Arc<arc_swap::ArcSwap<TicketKeys>>;

/// How often ticket keys rotate; tickets are announced as valid for twice this (the
/// previous key is kept for one period), which bounds how long a stolen key decrypts sessions.
pub const TICKET_ROTATION: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl TicketKeys {
    fn new_key() -> Arc<TicketKey> {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        let mut name = [0u8; 16];
        let mut secret = [0u8; 32];
        // The system's random source does not fail on Linux once booted.
        rng.fill(&mut name).expect("random ticket key name");
        rng.fill(&mut secret).expect("random ticket key");
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &secret)
            .expect("a 32-byte AES-256-GCM key");
        Arc::new((name, ring::aead::LessSafeKey::new(key)))
    }

    /// A first set of keys.
    pub fn generate() -> TicketKeys {
        TicketKeys { current: Self::new_key(), previous: None }
    }

    /// The next set: a new current key, this one's current as the previous.
    pub fn rotated(&self) -> TicketKeys {
        TicketKeys { current: Self::new_key(), previous: Some(Arc::clone(&self.current)) }
    }
}

/// A ticketer for one worker's `ServerConfig`: stateless tickets sealed with AES-256-GCM under
/// the shared current key, opened under the current or previous key. It only reads the
/// published keys: no lock, and nothing written that another worker reads.
#[derive(Debug)]
pub struct Ticketer {
    keys: SharedTicketKeys,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKeys")
    }
}

impl Ticketer {
    pub fn new(keys: SharedTicketKeys) -> Arc<Ticketer> {
        Arc::new(Ticketer { keys })
    }
}

const NONCE: usize = 12;

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        (2 * TICKET_ROTATION.as_secs()) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom;
        let keys = self.keys.load();
        let (name, key) = &*keys.current;
        let mut nonce = [0u8; NONCE];
        ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(16 + NONCE + plain.len() + 16);
        out.extend_from_slice(name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(name),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < 16 + NONCE + 16 {
            return None;
        }
        let (name, rest) = cipher.split_at(16);
        let (nonce, sealed) = rest.split_at(NONCE);
        let keys = self.keys.load();
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.0[..] == *name)
            .map(|k| &k.1)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.open_in_place(nonce, ring::aead::Aad::from(name), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    /// A server and a client config for `a.test`, the client trusting the server's certificate.
    fn pair() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().clone();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let certified = CertifiedKey::from_der(vec![der.clone()], key_der, &default_provider());
        let loaded = LoadedCert {
            key: Arc::new(certified.unwrap()),
            names: vec!["a.test".into()],
            not_after: None,
        };
        let store = Arc::new(CertStore::new(&[loaded], 0));
        let keys: SharedTicketKeys =
            Arc::new(arc_swap::ArcSwap::from_pointee(TicketKeys::generate()));
        let server = server_config(store, false, &["http/1.1".into()], &keys, None).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    /// Moves what `from` has to send into `to`'s ciphertext and processes it; returns the step
    /// and the plaintext `to` decrypted.
    fn deliver(from: &mut Core, to: &mut Core) -> (Step, Vec<u8>) {
        to.incoming.append(&mut from.out);
        let mut plain = Vec::with_capacity(1 << 16);
        let step = to.digest(&mut plain).expect("no TLS error");
        (step, plain)
    }

    /// A ClientHello split over two records leaves rustls holding half a handshake message
    /// that points into Apex's buffer; an error then (a record interleaved with the message)
    /// is an error for this connection, not a panic inside rustls, which must be given the same
    /// buffer when it is asked for its alert.
    #[test]
    fn an_error_while_half_a_handshake_message_is_held_is_not_a_panic() {
        let (server_config, client_config) = pair();
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let client = UnbufferedClientConnection::new(client_config, name).unwrap();
        let mut client = Core::new(Conn::Client(Engine::new(client)));
        client.digest(&mut Vec::new()).unwrap();
        let hello = std::mem::take(&mut client.out);
        assert_eq!(hello[0], 0x16, "a handshake record");
        let body = &hello[5..];
        let record = |typ: u8, payload: &[u8]| {
            let mut r = vec![typ, 0x03, 0x03];
            r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            r.extend_from_slice(payload);
            r
        };
        let server = UnbufferedServerConnection::new(server_config).unwrap();
        let mut server = Core::new(Conn::Server(Engine::new(server)));
        server.incoming = record(0x16, &body[..body.len() / 2]);
        assert_eq!(server.digest(&mut Vec::new()), Ok(Step::Handshaking));
        assert!(!server.incoming.is_empty(), "the first half is kept for the join");
        server.incoming.extend_from_slice(&record(0x17, b"not in a handshake"));
        let e = server.digest(&mut Vec::new());
        assert!(matches!(e, Err(rustls::Error::PeerMisbehaved(_))), "{e:?}");
    }

    /// Plaintext HTTP sent to a TLS port is answered with one fatal alert record, and only one
    /// (asking rustls again would run its deframer over the same bytes and alert twice).
    #[test]
    fn bytes_that_are_not_tls_get_one_alert() {
        let (server_config, _) = pair();
        for junk in [&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..], b"-"] {
            let out = serve_bytes(Arc::clone(&server_config), &[junk]);
            assert_eq!(out.len(), 7, "one alert record: {out:?}");
            assert_eq!((out[0], out[5]), (0x15, 2), "a fatal alert: {out:?}");
        }
    }

    #[test]
    fn a_handshake_and_data_both_ways_through_the_sans_io_core() {
        let (server_config, client_config) = pair();
        let server = UnbufferedServerConnection::new(server_config).unwrap();
        let mut server = Core::new(Conn::Server(Engine::new(server)));
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let client = UnbufferedClientConnection::new(client_config, name).unwrap();
        let mut client = Core::new(Conn::Client(Engine::new(client)));
        // ClientHello.
        let mut steps = vec![client.digest(&mut Vec::new()).unwrap()];
        for _ in 0..4 {
            steps.push(deliver(&mut client, &mut server).0);
            steps.push(deliver(&mut server, &mut client).0);
        }
        assert_eq!(steps.last(), Some(&Step::Open), "{steps:?}");
        client.encrypt(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (_, got) = deliver(&mut client, &mut server);
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        server.encrypt(&big).unwrap();
        let (_, got) = deliver(&mut server, &mut client);
        assert_eq!(got, big);
        // A reader with less room than a record gets what fits; the rest waits, in order.
        server.encrypt(&big).unwrap();
        client.incoming.append(&mut server.out);
        let mut small = Vec::with_capacity(512);
        client.digest(&mut small).unwrap();
        assert_eq!(small.len(), 512, "the reader's buffer is filled, never grown");
        let mut got = small;
        while !client.plain.is_empty() {
            let mut more = Vec::with_capacity(4096);
            client.take_plain(&mut more);
            got.extend_from_slice(&more);
        }
        assert_eq!(got, big);
        server.close_notify().unwrap();
        deliver(&mut server, &mut client);
        assert!(client.peer_closed());
        assert!(client.incoming.is_empty() && server.incoming.is_empty(), "every byte used");
    }

    #[test]
    fn not_after_is_read_from_the_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 9);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-07-09T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_941_321_600));
        assert_eq!(not_after(b"\x30\x03\x02\x01"), None);
    }

    #[test]
    fn tickets_open_under_the_current_and_previous_key_only() {
        let keys: SharedTicketKeys =
            Arc::new(arc_swap::ArcSwap::from_pointee(TicketKeys::generate()));
        let worker_a = Ticketer::new(Arc::clone(&keys));
        let worker_b = Ticketer::new(Arc::clone(&keys));
        let t1 = worker_a.encrypt(b"session state").unwrap();
        assert_eq!(worker_b.decrypt(&t1).as_deref(), Some(&b"session state"[..]), "any worker");
        keys.store(Arc::new(keys.load().rotated()));
        assert!(worker_b.decrypt(&t1).is_some(), "the previous key still opens it");
        let t2 = worker_a.encrypt(b"later").unwrap();
        keys.store(Arc::new(keys.load().rotated()));
        assert!(worker_b.decrypt(&t1).is_none(), "two rotations later it is refused");
        assert!(worker_b.decrypt(&t2).is_some());
        let mut forged = t2.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert!(worker_a.decrypt(&forged).is_none(), "tampering is refused");
        assert!(worker_a.decrypt(&t2[..20]).is_none(), "short input is refused");
    }

    #[test]
    fn an_ocsp_response_is_a_der_sequence_starting_with_its_status() {
        assert_eq!(ocsp_status(&[0x30, 0x03, 0x0a, 0x01, 0x00]), Some(0));
        assert_eq!(ocsp_status(&[0x30, 0x03, 0x0a, 0x01, 0x06]), Some(6), "unauthorized");
        // Long-form length: 0x81 0x05, then the status and two more bytes.
        assert_eq!(ocsp_status(&[0x30, 0x81, 0x05, 0x0a, 0x01, 0x00, 0xa0, 0x00]), Some(0));
        assert_eq!(ocsp_status(&[0x30, 0x04, 0x0a, 0x01, 0x00]), None, "length past the end");
        assert_eq!(ocsp_status(&[0x30, 0x03, 0x02, 0x01, 0x00]), None, "not ENUMERATED");
        assert_eq!(ocsp_status(b"-----BEGIN"), None, "PEM, not DER");
        assert_eq!(ocsp_status(&[]), None);
    }
}
