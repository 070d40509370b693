//! The sans-IO core of a TLS connection: rustls's unbuffered API driven over ciphertext the
//! caller read into its own buffers. Nothing here reads or writes a socket; [`super::TlsStream`]
//! does, around these calls, on every runtime.
//!
//! Why the unbuffered API: rustls's buffered connection keeps a 4 KiB receive buffer for its
//! whole life (its deframer never shrinks below one 4 KiB read), which made an idle TLS
//! connection cost 4 KiB more than it needs to. Here the ciphertext lives in Apex's buffers,
//! which hold nothing while the connection is idle.

use std::io;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon};
use rustls::unbuffered::{InsufficientSizeError, UnbufferedStatus};

/// The largest ciphertext kept while a message is incomplete: rustls's own cap on a joined
/// handshake message (64 KiB) plus two records at their largest (18,437 bytes on the wire each:
/// the one being completed and the next read's). A backstop: rustls refuses a larger message
/// first, so a peer it accepts never reaches it; past it the connection is cut.
pub const MAX_PENDING_CIPHERTEXT: usize = 64 * 1024 + 37 * 1024;

/// Bytes added to each record by encryption, at most (TLS 1.2 AES-GCM: 5 header + 8 explicit
/// nonce + 16 tag; TLS 1.3: 5 + 1 content type + 16), with room to spare.
const RECORD_OVERHEAD: usize = 64;
/// Plaintext per record (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 16 * 1024;

/// rustls's two unbuffered connection types (server and client), behind one call.
pub trait Side: std::ops::DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Where the connection stands after the ciphertext given so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Application data flows (the handshake is complete).
    Open,
}

/// Where decrypted application data goes: into the spare capacity of the caller's buffer first
/// (never past its capacity: the caller sized it), the rest into `overflow`, which the next
/// read hands out before it reads again.
pub struct Sink<'a> {
    pub buf: &'a mut Vec<u8>,
    pub overflow: &'a mut Vec<u8>,
}

impl Sink<'_> {
    fn put(&mut self, mut data: &[u8]) {
        if self.overflow.is_empty() {
            let room = (self.buf.capacity() - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..room]);
            data = &data[room..];
        }
        self.overflow.extend_from_slice(data);
    }
}

/// One TLS connection's state between reads: rustls's, plus whether the peer closed.
pub struct Engine<C> {
    pub conn: C,
    /// The peer sent close_notify: no more application data will come.
    pub peer_closed: bool,
}

impl<C: Side> Engine<C> {
    pub fn new(conn: C) -> Engine<C> {
        Engine { conn, peer_closed: false }
    }

    /// Runs rustls over `ciphertext` (what the peer sent and nothing processed yet): handshake
    /// messages are answered into `out` (TLS records to send, appended), application data goes
    /// to `sink`. Returns how many bytes of `ciphertext` were used (the rest is an incomplete
    /// record, to keep and extend) and where the connection stands. On a TLS error, the alert
    /// rustls has for the peer is in `out`.
    pub fn advance(
        &mut self,
        ciphertext: &mut [u8],
        out: &mut Vec<u8>,
        sink: &mut Sink<'_>,
    ) -> (usize, Result<Step, rustls::Error>) {
        let mut used = 0;
        loop {
            let status = self.conn.process(&mut ciphertext[used..]);
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    used += discard;
                    self.queue_alert(&mut ciphertext[used..], out);
                    return (used, Err(e));
                }
            };
            let step = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        match record {
                            Ok(record) => sink.put(record.payload),
                            Err(e) => return (used + discard, Err(e)),
                        }
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    if let Err(err) = encode(&mut e, out) {
                        return (used + discard, Err(err));
                    }
                    None
                }
                // What `out` holds is sent by the caller before it next waits for the peer.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::BlockedHandshake => Some(Step::Handshaking),
                ConnectionState::WriteTraffic(_) | ConnectionState::Closed => Some(Step::Open),
                // Early data is never enabled (max_early_data_size stays 0).
                _ => {
                    return (
                        used + discard,
                        Err(rustls::Error::General("unexpected TLS state".into())),
                    )
                }
            };
            used += discard;
            if let Some(step) = step {
                return (used, Ok(step));
            }
        }
    }

    /// After an error: encodes the alert rustls queued for the peer (one at most: every
    /// earlier record was encoded as it came). `pending` is the ciphertext not yet discarded
    /// (see [`Engine::encrypt`] on why it must be passed).
    ///
    /// It stops at the alert: one more call would run rustls's deframer over the same bad
    /// record again, which queues a second fatal alert (a debug assertion inside rustls).
    fn queue_alert(&mut self, pending: &mut [u8], out: &mut Vec<u8>) {
        // Bounded: application data decrypted before the error may come first, once.
        for _ in 0..2 {
            let status = self.conn.process(pending);
            match status.state {
                Ok(ConnectionState::ReadTraffic(mut r)) => while r.next_record().is_some() {},
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let _ = encode(&mut e, out);
                    return;
                }
                _ => return,
            }
        }
    }

    /// Encrypts `data` into records appended to `out` (after any handshake message rustls
    /// still had to send, such as session tickets).
    ///
    /// `pending` is the ciphertext kept from the last [`Engine::advance`] (an incomplete
    /// record or handshake message). It must be passed as it is: rustls remembers where a
    /// handshake message split across records starts in it, and a call over any other buffer
    /// panics inside rustls. Only complete records are processed, so none of it is used here.
    pub fn encrypt(
        &mut self,
        data: &[u8],
        pending: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        self.with_write_traffic(
            pending,
            out,
            |w, spare| match w {
                Some(w) => w.encrypt(data, spare).map_err(Fault::from),
                None => Err(Fault::Tls(rustls::Error::HandshakeNotComplete)),
            },
            encrypted_size(data.len()),
        )
    }

    /// Appends a close_notify alert to `out`; `pending` as for [`Engine::encrypt`].
    pub fn close_notify(
        &mut self,
        pending: &mut [u8],
        out: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        self.with_write_traffic(
            pending,
            out,
            |w, spare| match w {
                Some(w) => w.queue_close_notify(spare).map_err(Fault::from),
                None => Ok(0),
            },
            RECORD_OVERHEAD,
        )
    }

    /// Brings the connection to the state where application data may be written, encoding
    /// what rustls queued first, then lets `f` write into `out`'s spare room (grown to what
    /// `f` says it needs, once).
    fn with_write_traffic(
        &mut self,
        pending: &mut [u8],
        out: &mut Vec<u8>,
        mut f: impl FnMut(
            Option<&mut rustls::unbuffered::WriteTraffic<'_, C::Data>>,
            &mut [u8],
        ) -> Result<usize, Fault>,
        mut room: usize,
    ) -> Result<(), rustls::Error> {
        // Bounded: each pass encodes one queued handshake message or writes.
        for _ in 0..64 {
            let status = self.conn.process(pending);
            debug_assert_eq!(status.discard, 0, "only complete records are discarded");
            let state = status.state?;
            match state {
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out)?,
                ConnectionState::TransmitTlsData(mut t) => {
                    let write = |spare: &mut [u8]| f(t.may_encrypt_app_data().as_mut(), spare);
                    if write_into(out, &mut room, write)? {
                        t.done();
                        return Ok(());
                    }
                }
                ConnectionState::WriteTraffic(mut w) => {
                    if write_into(out, &mut room, |spare| f(Some(&mut w), spare))? {
                        return Ok(());
                    }
                }
                // Application data that arrived with a handshake message: nothing reads it
                // here, and rustls holds it until the next read, which takes it.
                ConnectionState::ReadTraffic(_) => {
                    return Err(rustls::Error::General("unread TLS application data".into()))
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                _ => return Err(rustls::Error::HandshakeNotComplete),
            }
        }
        Err(rustls::Error::General("TLS connection made no progress".into()))
    }
}

/// Why a write into `out` did not happen.
enum Fault {
    TooSmall(usize),
    Tls(rustls::Error),
}

impl From<EncryptError> for Fault {
    fn from(e: EncryptError) -> Fault {
        match e {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Fault::TooSmall(required_size)
            }
            other => Fault::Tls(rustls::Error::General(other.to_string())),
        }
    }
}

impl From<EncodeError> for Fault {
    fn from(e: EncodeError) -> Fault {
        match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Fault::TooSmall(required_size)
            }
            other => Fault::Tls(rustls::Error::General(other.to_string())),
        }
    }
}

/// The ciphertext size of `n` plaintext bytes, at most.
fn encrypted_size(n: usize) -> usize {
    n + (n / MAX_FRAGMENT + 1) * RECORD_OVERHEAD
}

/// Encodes one handshake record into `out`, growing it as needed.
fn encode<D>(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let mut room = 2048;
    while !write_into(out, &mut room, |spare| e.encode(spare).map_err(Fault::from))? {}
    Ok(())
}

/// Lets `write` fill up to `room` bytes appended to `out`, and keeps what it wrote: `Ok(true)`.
/// `Ok(false)`: it needs more room, now in `room`, and `out` is as it was. On an error `out` is
/// as it was too.
fn write_into(
    out: &mut Vec<u8>,
    room: &mut usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, Fault>,
) -> Result<bool, rustls::Error> {
    let start = out.len();
    out.resize(start + *room, 0);
    let res = write(&mut out[start..]);
    match res {
        Ok(n) => {
            out.truncate(start + n);
            Ok(true)
        }
        Err(Fault::TooSmall(need)) => {
            out.truncate(start);
            *room = need;
            Ok(false)
        }
        Err(Fault::Tls(e)) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// An I/O error for a TLS failure.
pub fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_into_grows_to_the_size_asked_and_keeps_only_what_was_written() {
        let mut out = b"head".to_vec();
        let mut room = 16;
        let needs_100 = |spare: &mut [u8]| {
            if spare.len() < 100 {
                return Err(Fault::TooSmall(100));
            }
            spare[..3].copy_from_slice(b"abc");
            Ok(3)
        };
        assert_eq!(write_into(&mut out, &mut room, needs_100), Ok(false));
        assert_eq!((out.as_slice(), room), (&b"head"[..], 100), "untouched, room as asked");
        assert_eq!(write_into(&mut out, &mut room, needs_100), Ok(true));
        assert_eq!(out, b"headabc");
        let failing = |_: &mut [u8]| Err(Fault::Tls(rustls::Error::HandshakeNotComplete));
        assert!(write_into(&mut out, &mut room, failing).is_err());
        assert_eq!(out, b"headabc", "an error leaves what was there");
    }
}
