//! A fake authoritative DNS server on 127.0.0.1 (UDP) whose records a test changes while Apex
//! runs: A and SRV answers with a TTL, NXDOMAIN for names it does not have. Written for the
//! tests (RFC 1035 §4 message format), so it answers exactly what the test set.
// The zone is written by the test and read by the server thread; nothing of Apex's data path
// is here, so the ban on `Mutex` (clippy.toml) does not apply.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One record of a name.
#[derive(Debug, Clone)]
pub enum Record {
    A(Ipv4Addr),
    Srv { priority: u16, weight: u16, port: u16, target: String },
}

struct Zone {
    records: HashMap<String, Vec<Record>>,
    /// Queries seen per lower-case name, answered or not.
    queries: HashMap<String, usize>,
}

/// The server; it stops answering when dropped. A panic in its thread fails the test through
/// [`FakeDns::check`] (called on drop).
pub struct FakeDns {
    pub addr: SocketAddr,
    pub ttl: u32,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TYPE_A: u16 = 1;
const TYPE_SRV: u16 = 33;

impl FakeDns {
    /// Answers with `ttl` seconds on every record.
    pub fn start(ttl: u32) -> FakeDns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Lets the thread see `stop` without a message: a read wakes at least this often.
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100))).unwrap();
        let addr = sock.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone { records: HashMap::new(), queries: HashMap::new() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (z, s) = (zone.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                if let Some(reply) = answer(&buf[..n], &z, ttl) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        FakeDns { addr, ttl, zone, stop, thread: Some(thread) }
    }

    /// Replaces every record of `name`.
    pub fn set(&self, name: &str, records: Vec<Record>) {
        self.zone.lock().unwrap().records.insert(name.to_ascii_lowercase(), records);
    }

    /// Removes `name`: it answers NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().records.remove(&name.to_ascii_lowercase());
    }

    /// Queries received for `name` so far.
    pub fn queries(&self, name: &str) -> usize {
        self.zone.lock().unwrap().queries.get(&name.to_ascii_lowercase()).copied().unwrap_or(0)
    }

    pub fn check(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            if let Err(p) = t.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.check();
    }
}

/// The question's name (lower case), type, and where the question section ends.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn answer(msg: &[u8], zone: &Mutex<Zone>, ttl: u32) -> Option<Vec<u8>> {
    if msg.len() < 12 {
        return None;
    }
    let (name, qtype, end) = question(msg)?;
    let mut zone = zone.lock().unwrap();
    *zone.queries.entry(name.clone()).or_default() += 1;
    let records = zone.records.get(&name);
    let matching: Vec<&Record> = records
        .map(|rs| {
            rs.iter()
                .filter(|r| match r {
                    Record::A(_) => qtype == TYPE_A,
                    Record::Srv { .. } => qtype == TYPE_SRV,
                })
                .collect()
        })
        .unwrap_or_default();
    // QR, AA, RD copied from the query, RA; NXDOMAIN (3) for an unknown name.
    let rcode = if records.is_none() { 3 } else { 0 };
    let flags = 0x8000 | 0x0400 | (u16::from_be_bytes([msg[2], msg[3]]) & 0x0100) | 0x0080 | rcode;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&msg[0..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(matching.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..end]);
    for r in matching {
        // The question's name, by a pointer to offset 12.
        out.extend_from_slice(&[0xC0, 12]);
        let mut rdata = Vec::new();
        let rtype = match r {
            Record::A(ip) => {
                rdata.extend_from_slice(&ip.octets());
                TYPE_A
            }
            Record::Srv { priority, weight, port, target } => {
                rdata.extend_from_slice(&priority.to_be_bytes());
                rdata.extend_from_slice(&weight.to_be_bytes());
                rdata.extend_from_slice(&port.to_be_bytes());
                encode_name(&mut rdata, target);
                TYPE_SRV
            }
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
