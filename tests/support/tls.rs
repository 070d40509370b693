//! TLS helpers for tests with real rustls clients: throwaway certificates and a client that
//! accepts any server certificate (the tests check which one was presented).
// The staple recorder is written by the client's verifier and read by the test (test code).
#![allow(clippy::disallowed_types)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::TempDir;

/// A self-signed certificate for `names`, written as PEM files; returns (cert, key, DER).
pub fn cert_files(dir: &TempDir, tag: &str, names: &[&str]) -> (String, String, Vec<u8>) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = dir.write(&format!("{tag}.crt"), &c.cert.pem());
    let key = dir.write(&format!("{tag}.key"), &c.key_pair.serialize_pem());
    (cert.display().to_string(), key.display().to_string(), c.cert.der().to_vec())
}

/// Accepts any server certificate: the tests check which one was presented.
#[derive(Debug)]
pub struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    Arc::new(client_config_with_alpn(versions, &[]))
}

/// A client config offering `alpn` protocols, for any server certificate.
pub fn client_config_with_alpn(
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&str],
) -> ClientConfig {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}

/// Accepts any server certificate, like [`AnyCert`], and keeps the OCSP response the server
/// stapled (empty when none).
#[derive(Debug, Default)]
pub struct StapleRecorder(pub std::sync::Mutex<Vec<u8>>);

impl ServerCertVerifier for StapleRecorder {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = ocsp.to_vec();
        AnyCert.verify_server_cert(end, chain, name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        AnyCert.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        AnyCert.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        AnyCert.supported_verify_schemes()
    }
}

/// A client for `versions` that records the stapled OCSP response in `recorder`.
pub fn stapling_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    recorder: Arc<StapleRecorder>,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder)
        .with_no_client_auth();
    Arc::new(config)
}
