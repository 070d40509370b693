//! The PROXY protocol (HAProxy's `proxy-protocol.txt`), versions 1 (text) and 2 (binary),
//! without I/O: the caller feeds the bytes it read and gets "need more", a header and its
//! length, "no header here", or an error. Sans-IO so every runtime shares it and it can be
//! fuzzed; strict because the header decides which address Apex trusts as the client's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accept {
    pub v1: bool,
    pub v2: bool,
}

/// What a PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection is proxied for this client, to this destination.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// v1 `UNKNOWN`, v2 `LOCAL` (the proxy's own health checks), or a v2 family Apex does not
    /// use (UNSPEC, AF_UNIX): the socket's own peer stands.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to decide.
    Partial,
    /// A complete header of `len` bytes at the start of the buffer.
    Complete { header: Header, len: usize },
    /// The bytes do not start with a PROXY signature (plain HTTP, say).
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A version signature this listener does not accept.
    NotAccepted,
    /// v1: no CRLF within 107 bytes.
    V1TooLong,
    /// v1: not `PROXY TCP4|TCP6|UNKNOWN ...` with single spaces.
    V1Malformed,
    BadAddress,
    BadPort,
    /// v2: version nibble other than 2, or a command other than LOCAL/PROXY.
    V2BadVersion,
    /// v2: UDP, or an unknown family/protocol byte.
    V2BadFamily,
    /// v2: the length is shorter than the family's addresses.
    V2TooShort,
    /// v2: the length is over [`V2_MAX_LEN`].
    V2TooLong,
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::NotAccepted => "PROXY protocol version not accepted here",
            Error::V1TooLong => "PROXY v1 line too long",
            Error::V1Malformed => "malformed PROXY v1 line",
            Error::BadAddress => "bad address in PROXY header",
            Error::BadPort => "bad port in PROXY header",
            Error::V2BadVersion => "bad PROXY v2 version or command",
            Error::V2BadFamily => "PROXY v2 family or protocol not supported",
            Error::V2TooShort => "PROXY v2 length too short for its addresses",
            Error::V2TooLong => "PROXY v2 header too long",
        }
    }
}

const V1_PREFIX: &[u8] = b"PROXY ";
/// The v1 line's longest form, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;
const V2_SIGNATURE: [u8; 12] =
    [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Largest v2 address-and-TLV block Apex reads: 216 bytes of AF_UNIX addresses plus room for
/// the usual TLVs (ALPN, authority, SSL info, unique id). The 16-bit length field would
/// allow 64 KiB, which no sender needs and every reader would have to buffer.
pub const V2_MAX_LEN: usize = 520;

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8], accept: Accept) -> Result<Parsed, Error> {
    if prefix_of(buf, &V2_SIGNATURE) {
        if buf.len() < V2_SIGNATURE.len() {
            return Ok(Parsed::Partial);
        }
        if !accept.v2 {
            return Err(Error::NotAccepted);
        }
        return parse_v2(buf);
    }
    if prefix_of(buf, V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return Ok(Parsed::Partial);
        }
        if !accept.v1 {
            return Err(Error::NotAccepted);
        }
        return parse_v1(buf);
    }
    Ok(Parsed::Absent)
}

/// Whether `buf` and `sig` agree on their common length (`buf` may be shorter or longer).
fn prefix_of(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    !buf.is_empty() && buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Err(Error::V1TooLong) } else { Ok(Parsed::Partial) };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..cr]).map_err(|_| Error::V1Malformed)?;
    let len = cr + 2;
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Ok(Parsed::Complete { header: Header::Local, len }),
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let addr = |s: &str| -> Result<IpAddr, Error> {
                if v4 {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| Error::BadAddress)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| Error::BadAddress)
                }
            };
            let source = SocketAddr::new(addr(src)?, port(sport)?);
            let destination = SocketAddr::new(addr(dst)?, port(dport)?);
            Ok(Parsed::Complete { header: Header::Proxied { source, destination }, len })
        }
        _ => Err(Error::V1Malformed),
    }
}

/// A decimal port: digits only (no sign, no spaces), 0–65535.
fn port(s: &str) -> Result<u16, Error> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::BadPort);
    }
    s.parse().map_err(|_| Error::BadPort)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    if buf.len() < 16 {
        return Ok(Parsed::Partial);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0F);
    if version != 2 || command > 1 {
        return Err(Error::V2BadVersion);
    }
    let family = buf[13];
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body > V2_MAX_LEN {
        return Err(Error::V2TooLong);
    }
    let needed = match family {
        0x11 => 12,
        0x21 => 36,
        0x00 | 0x31 | 0x32 => 0,
        _ => return Err(Error::V2BadFamily),
    };
    if body < needed {
        return Err(Error::V2TooShort);
    }
    let len = 16 + body;
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let a = &buf[16..len];
    let header = match (command, family) {
        (0, _) | (_, 0x00 | 0x31 | 0x32) => Header::Local,
        (_, 0x11) => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let p = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), p(8)),
                destination: SocketAddr::new(ip(4), p(10)),
            }
        }
        _ => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let p = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0), p(32)),
                destination: SocketAddr::new(ip(16), p(34)),
            }
        }
    };
    Ok(Parsed::Complete { header, len })
}

/// Appends a v2 header (PROXY command, TCP, no TLVs) for a connection from `source` to
/// `destination`; when their families differ, the IPv4 one is sent IPv4-mapped, over TCP6.
pub fn encode_v2(out: &mut Vec<u8>, source: SocketAddr, destination: SocketAddr) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Accept = Accept { v1: true, v2: true };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_headers_parse_and_leave_the_request_behind_them() {
        let raw = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        let want = Header::Proxied {
            source: addr("192.0.2.1:56324"),
            destination: addr("198.51.100.2:443"),
        };
        assert_eq!(parse(raw, BOTH), Ok(Parsed::Complete { header: want, len: 45 }));
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
        assert!(matches!(parse(v6, BOTH), Ok(Parsed::Complete { len: 44, .. })));
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n", BOTH),
            Ok(Parsed::Complete { header: Header::Local, len: 24 })
        );
    }

    #[test]
    fn every_split_of_a_header_is_partial_until_complete() {
        let mut v2 = Vec::new();
        encode_v2(&mut v2, addr("10.1.2.3:4000"), addr("10.9.9.9:80"));
        let v1 = b"PROXY TCP4 10.1.2.3 10.9.9.9 4000 80\r\n".to_vec();
        for whole in [v1, v2] {
            for cut in 1..whole.len() {
                assert_eq!(parse(&whole[..cut], BOTH), Ok(Parsed::Partial), "cut at {cut}");
            }
            let Ok(Parsed::Complete { header, len }) = parse(&whole, BOTH) else { panic!() };
            assert_eq!(len, whole.len());
            assert_eq!(
                header,
                Header::Proxied { source: addr("10.1.2.3:4000"), destination: addr("10.9.9.9:80") }
            );
        }
    }

    #[test]
    fn plain_http_has_no_header() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", BOTH), Ok(Parsed::Absent));
        assert_eq!(parse(b"PRI * HTTP/2.0", BOTH), Ok(Parsed::Absent));
        assert_eq!(parse(b"PRO", BOTH), Ok(Parsed::Partial));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let bad: [(&[u8], Error); 9] = [
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 80\r\n", Error::BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 80\r\n", Error::BadPort),
            (b"PROXY TCP4 ::1 5.6.7.8 1 80\r\n", Error::BadAddress),
            (b"PROXY TCP6 1.2.3.4 ::1 1 80\r\n", Error::BadAddress),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 80\r\n", Error::V1Malformed),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 80\r\n", Error::V1Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Error::V1Malformed),
            (b"PROXY ", Error::NotAccepted),
            (
                &[
                    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21,
                    0x12, 0, 12,
                ],
                Error::V2BadFamily,
            ),
        ];
        for (i, (raw, want)) in bad.iter().enumerate() {
            let accept = if i == 7 { Accept { v1: false, v2: true } } else { BOTH };
            assert_eq!(
                parse(raw, accept),
                Err(*want),
                "case {i}: {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long, BOTH), Err(Error::V1TooLong));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x03, 0x00]);
        assert_eq!(parse(&v2, BOTH), Err(Error::V2TooLong));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x21, 0, 12]);
        assert_eq!(parse(&v2, BOTH), Err(Error::V2TooShort));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert_eq!(parse(&v2, BOTH), Err(Error::V2BadVersion));
    }

    #[test]
    fn v2_local_and_tlvs_are_consumed() {
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&v2, BOTH), Ok(Parsed::Complete { header: Header::Local, len: 16 }));
        let mut with_tlv = Vec::new();
        encode_v2(&mut with_tlv, addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2"));
        // Grow the length by a 5-byte TLV (type 0x04 NOOP, length 2, value).
        with_tlv[15] += 5;
        with_tlv.extend_from_slice(&[0x04, 0, 2, 0xAA, 0xBB, b'G']);
        let Ok(Parsed::Complete { len, .. }) = parse(&with_tlv, BOTH) else { panic!() };
        assert_eq!(len, with_tlv.len() - 1, "the TLV is consumed, the next byte is not");
    }

    #[test]
    fn mixed_families_go_as_tcp6() {
        let mut v2 = Vec::new();
        encode_v2(&mut v2, addr("192.0.2.1:5"), addr("[2001:db8::2]:6"));
        let Ok(Parsed::Complete { header: Header::Proxied { source, .. }, .. }) = parse(&v2, BOTH)
        else {
            panic!()
        };
        assert_eq!(source, addr("[::ffff:192.0.2.1]:5"));
    }
}
