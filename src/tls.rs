//! TLS for client connections (certificates chosen by SNI) and for upstream connections, on a
//! TLS stream layered over the runtime seam, so the proxy loop and every runtime share one
//! implementation.
//!
//! rustls is driven through its buffered API from Apex's own buffers: ciphertext is read by
//! the seam into an owned buffer and fed to `read_tls`; what rustls has to send is drained with
//! `write_tls` into an owned buffer and written by the seam. Nothing here blocks or owns a
//! thread. Each worker builds its own `ServerConfig` (its own session cache), so no handshake
//! writes memory another worker uses.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{Connection, ServerConfig, ServerConnection};

use crate::proxy::io::{ReadHalf, Stream, WriteHalf};

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

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A client connection over TLS, on any seam stream. Reads and writes plaintext like the
/// stream it wraps.
pub struct TlsStream<S> {
    conn: Connection,
    inner: S,
    /// Ciphertext read from `inner` not yet taken by rustls.
    incoming: Vec<u8>,
    /// Ciphertext rustls produced, being written to `inner`.
    outgoing: Vec<u8>,
}

impl<S: Stream> TlsStream<S> {
    /// Completes the handshake on `inner` (the caller bounds it with its handshake timeout).
    pub async fn accept(config: Arc<ServerConfig>, inner: S) -> io::Result<TlsStream<S>> {
        let conn = ServerConnection::new(config).map_err(tls_error)?;
        Self::handshake(Connection::Server(conn), inner).await
    }

    /// Completes a client handshake with an upstream on `inner`.
    pub async fn connect(
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        inner: S,
    ) -> io::Result<TlsStream<S>> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        Self::handshake(Connection::Client(conn), inner).await
    }

    async fn handshake(conn: Connection, inner: S) -> io::Result<TlsStream<S>> {
        let mut s = TlsStream { conn, inner, incoming: Vec::new(), outgoing: Vec::new() };
        while s.conn.is_handshaking() {
            s.send_pending().await?;
            if !s.conn.is_handshaking() {
                break;
            }
            if s.receive(TLS_READ).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        s.send_pending().await?;
        // Idle connections keep no ciphertext buffer.
        s.incoming = Vec::new();
        Ok(s)
    }

    /// The server name the client asked for (SNI), the negotiated protocol and version.
    pub fn server_name(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(c) => c.server_name(),
            Connection::Client(_) => None,
        }
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// What the access log records of this connection's TLS: version, cipher suite, SNI.
    pub fn summary(&self) -> TlsSummary {
        let version = match self.conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "-",
        };
        let cipher =
            self.conn.negotiated_cipher_suite().and_then(|c| c.suite().as_str()).unwrap_or("-");
        TlsSummary { version, cipher, sni: self.server_name().map(str::to_string) }
    }

    /// Writes whatever rustls has to send.
    async fn send_pending(&mut self) -> io::Result<()> {
        queue_records(&mut self.conn, &mut self.outgoing)?;
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let (res, mut b) = self.inner.write_all(std::mem::take(&mut self.outgoing)).await;
        b.clear();
        self.outgoing = b;
        release_if_empty(&mut self.outgoing);
        res
    }

    /// Reads ciphertext (up to `capacity` bytes) and hands it to rustls; `Ok(0)` at the peer's
    /// end of stream. A TLS error sends rustls's alert before it is returned.
    async fn receive(&mut self, capacity: usize) -> io::Result<usize> {
        if self.incoming.capacity() < capacity {
            self.incoming.reserve(capacity - self.incoming.len());
        }
        let (res, b) = self.inner.read(std::mem::take(&mut self.incoming)).await;
        self.incoming = b;
        let n = res?;
        if n == 0 {
            return Ok(0);
        }
        feed(&mut self.conn, &mut self.incoming)?;
        release_if_empty(&mut self.incoming);
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.send_pending().await;
            return Err(tls_error(e));
        }
        Ok(n)
    }
}

/// Frees a ciphertext buffer that holds nothing, so an idle TLS connection keeps no record
/// buffer (16 KiB and more each); the next read or write allocates again.
fn release_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

/// Appends every TLS record rustls has to send to `out` (for the caller to write).
fn queue_records(conn: &mut Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// Gives rustls the ciphertext in `incoming` (as much as it takes; the rest stays).
fn feed(conn: &mut Connection, incoming: &mut Vec<u8>) -> io::Result<()> {
    let mut taken = 0;
    while taken < incoming.len() {
        let n = conn.read_tls(&mut &incoming[taken..])?;
        if n == 0 {
            break;
        }
        taken += n;
        if conn.process_new_packets().is_err() {
            break;
        }
    }
    incoming.drain(..taken);
    Ok(())
}

/// Runs bytes a client sent (in the given pieces) through a fresh server connection, the way
/// the listener path does, and returns what the server would send back: the sans-IO core of
/// the handshake, for the fuzz target. Never panics; stops at the first TLS error.
pub fn serve_bytes(config: Arc<ServerConfig>, pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(server) = ServerConnection::new(config) else { return out };
    let mut conn = Connection::Server(server);
    let mut incoming = Vec::new();
    let mut plain = Vec::with_capacity(4096);
    for piece in pieces {
        incoming.extend_from_slice(piece);
        if feed(&mut conn, &mut incoming).is_err() || conn.process_new_packets().is_err() {
            let _ = conn.write_tls(&mut out);
            return out;
        }
        plain.clear();
        let _ = take_plaintext(&mut conn, &mut plain);
        if queue_records(&mut conn, &mut out).is_err() {
            return out;
        }
    }
    out
}

/// Moves available plaintext into `buf`'s spare capacity. `Some(0)`: the peer's close_notify;
/// `None`: nothing yet.
fn take_plaintext(conn: &mut Connection, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let len = buf.len();
    buf.resize(buf.capacity(), 0);
    let got = conn.reader().read(&mut buf[len..]);
    match got {
        Ok(n) => {
            buf.truncate(len + n);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            buf.truncate(len);
            Ok(None)
        }
        Err(e) => {
            buf.truncate(len);
            Err(e)
        }
    }
}

impl<S: Stream> Stream for TlsStream<S> {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            match take_plaintext(&mut self.conn, &mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            let want = ciphertext_capacity(buf.capacity() - buf.len());
            match self.receive(want).await {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
            // Post-handshake messages (tickets, key updates) may need an answer.
            if let Err(e) = self.send_pending().await {
                return (Err(e), buf);
            }
        }
    }

    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if let Err(e) = self.conn.writer().write_all(&buf) {
            return (Err(e), buf);
        }
        (self.send_pending().await, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.send_pending().await?;
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
    /// The halves share the rustls state through an `Rc<RefCell>`, borrowed only between
    /// awaits, never across one: each half owns its direction of the socket and its buffer.
    /// Records rustls queues while reading (a key update's answer) leave with the next write.
    fn into_split(self) -> (TlsRead<S>, TlsWrite<S>) {
        let (r, w) = self.inner.into_split();
        let conn = std::rc::Rc::new(std::cell::RefCell::new(self.conn));
        (
            TlsRead { conn: std::rc::Rc::clone(&conn), inner: r, incoming: self.incoming },
            TlsWrite { conn, inner: w, outgoing: self.outgoing },
        )
    }
}

pub struct TlsRead<S: Stream> {
    conn: std::rc::Rc<std::cell::RefCell<Connection>>,
    inner: S::Read,
    incoming: Vec<u8>,
}

pub struct TlsWrite<S: Stream> {
    conn: std::rc::Rc<std::cell::RefCell<Connection>>,
    inner: S::Write,
    outgoing: Vec<u8>,
}

impl<S: Stream> ReadHalf for TlsRead<S> {
    async fn read(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            match take_plaintext(&mut self.conn.borrow_mut(), &mut buf) {
                Ok(Some(n)) => return (Ok(n), buf),
                Ok(None) => {}
                Err(e) => return (Err(e), buf),
            }
            let want = ciphertext_capacity(buf.capacity() - buf.len());
            if self.incoming.capacity() < want {
                self.incoming.reserve(want - self.incoming.len());
            }
            let (res, b) = self.inner.read(std::mem::take(&mut self.incoming)).await;
            self.incoming = b;
            match res {
                Ok(0) => return (Ok(0), buf),
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
            let mut conn = self.conn.borrow_mut();
            if let Err(e) = feed(&mut conn, &mut self.incoming) {
                return (Err(e), buf);
            }
            release_if_empty(&mut self.incoming);
            if let Err(e) = conn.process_new_packets() {
                return (Err(tls_error(e)), buf);
            }
        }
    }
}

impl<S: Stream> TlsWrite<S> {
    async fn send_pending(&mut self) -> io::Result<()> {
        queue_records(&mut self.conn.borrow_mut(), &mut self.outgoing)?;
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let (res, mut b) = self.inner.write_all(std::mem::take(&mut self.outgoing)).await;
        b.clear();
        self.outgoing = b;
        release_if_empty(&mut self.outgoing);
        res
    }
}

impl<S: Stream> WriteHalf for TlsWrite<S> {
    async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if let Err(e) = self.conn.borrow_mut().writer().write_all(&buf) {
            return (Err(e), buf);
        }
        (self.send_pending().await, buf)
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.send_pending().await?;
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
