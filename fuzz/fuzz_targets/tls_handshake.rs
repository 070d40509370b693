//! Arbitrary bytes, split arbitrarily, fed to the TLS listener path as a client's handshake:
//! never a panic, and the server's output stays bounded.
#![no_main]

use std::sync::{Arc, OnceLock};

use apex::tls::{load_cert, serve_bytes, server_config, CertStore, TicketKeys};
use libfuzzer_sys::fuzz_target;

fn config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let c = rcgen::generate_simple_self_signed(vec!["fuzz.test".to_string()]).unwrap();
            let dir = std::env::temp_dir().join(format!("apex-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("c.pem"), c.cert.pem()).unwrap();
            std::fs::write(dir.join("k.pem"), c.key_pair.serialize_pem()).unwrap();
            let cert = load_cert(&dir.join("c.pem"), &dir.join("k.pem"), None).unwrap();
            let store = Arc::new(CertStore::new(&[cert], 0));
            let tickets = Arc::new(arc_swap::ArcSwap::from_pointee(TicketKeys::generate()));
            server_config(store, false, &["http/1.1".to_string()], &tickets, None).unwrap()
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where the input is split in two.
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (usize::from(*s) % (r.len() + 1), r),
        None => (0, data),
    };
    let (a, b) = rest.split_at(split);
    let out = serve_bytes(config(), &[a, b]);
    assert!(out.len() < 64 * 1024, "{} bytes answered to {} bytes", out.len(), data.len());
});
