//! rustls's two crypto providers, measured in memory on this machine (no sockets): full TLS 1.3
//! handshakes with an ECDSA P-256 certificate, resumed handshakes (tickets), and bulk
//! encryption+decryption of 16 KiB records. Run: `cargo run --release` in this directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

fn configs(provider: Arc<CryptoProvider>) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der_key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der_key)
        .unwrap();
    server.ticketer = if is_ring(&provider) {
        rustls::crypto::ring::Ticketer::new().unwrap()
    } else {
        rustls::crypto::aws_lc_rs::Ticketer::new().unwrap()
    };
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

fn is_ring(p: &CryptoProvider) -> bool {
    format!("{:?}", p.key_provider).contains("Ring")
}

/// Moves records between the two sides until both are done handshaking (the figures are for
/// both sides together: client and server work are not separated).
fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    let mut buf = Vec::new();
    loop {
        let mut moved = false;
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        if !moved && !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
    }
}

fn per_second(n: u32, took: Duration) -> f64 {
    f64::from(n) / took.as_secs_f64()
}

fn measure(name: &str, provider: Arc<CryptoProvider>) {
    let (server, client) = configs(provider);
    let name_ = ServerName::try_from("bench.test").unwrap();
    // Full handshakes: a fresh client config each time has no session to resume.
    let n = 2000;
    let started = Instant::now();
    for _ in 0..n {
        let fresh = Arc::new((*client).clone());
        let mut c = ClientConnection::new(fresh, name_.clone()).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        pump(&mut c, &mut s);
    }
    let full = per_second(n, started.elapsed());
    // Resumed: the shared client config keeps the tickets.
    let mut c = ClientConnection::new(client.clone(), name_.clone()).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    pump(&mut c, &mut s);
    let n = 5000;
    let started = Instant::now();
    let mut resumed = 0;
    for _ in 0..n {
        let mut c = ClientConnection::new(client.clone(), name_.clone()).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        pump(&mut c, &mut s);
        resumed += u32::from(c.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
    }
    let resumed_rate = per_second(n, started.elapsed());
    // Bulk: 16 KiB application records, server to client.
    let mut c = ClientConnection::new(client.clone(), name_.clone()).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    pump(&mut c, &mut s);
    let record = vec![7u8; 16 * 1024];
    let mut wire = Vec::with_capacity(20 * 1024);
    let mut plain = vec![0u8; 16 * 1024];
    let rounds = 20_000u32;
    let started = Instant::now();
    for _ in 0..rounds {
        use std::io::{Read, Write};
        s.writer().write_all(&record).unwrap();
        wire.clear();
        s.write_tls(&mut wire).unwrap();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        let mut got = 0;
        while got < record.len() {
            got += c.reader().read(&mut plain).unwrap();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let gbps = f64::from(rounds) * 16.0 * 1024.0 / secs / 1e9;
    println!(
        "{name}: full handshakes/s {full:.0} (both sides), resumed/s {resumed_rate:.0} ({resumed} of {n} resumed), bulk {gbps:.2} GB/s (16 KiB records, encrypt+decrypt, {})",
        s.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default()
    );
}

fn main() {
    measure("ring", Arc::new(rustls::crypto::ring::default_provider()));
    measure("aws-lc-rs", Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
}
