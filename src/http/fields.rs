//! Reading the header fields that decide framing and connection handling, strictly.

use httparse::Header;

/// Elements of a comma-separated field value (RFC 9110 §5.6.1), trimmed of optional whitespace;
/// empty elements are skipped.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim_ows).filter(|e| !e.is_empty())
}

pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Folds every `Content-Length` field (repeated fields and comma lists) into one value.
/// `Err` for anything but digits, overflow, or values that differ.
pub fn content_length(headers: &[Header<'_>]) -> Result<Option<u64>, &'static str> {
    let mut found: Option<u64> = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")) {
        let mut any = false;
        for part in h.value.split(|&b| b == b',') {
            let part = trim_ows(part);
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let mut n: u64 = 0;
            for d in part {
                n = n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d - b'0')))
                    .ok_or("Content-Length overflows")?;
            }
            match found {
                Some(prev) if prev != n => return Err("conflicting Content-Length values"),
                _ => found = Some(n),
            }
            any = true;
        }
        if !any {
            return Err("empty Content-Length");
        }
    }
    Ok(found)
}

/// What the `Transfer-Encoding` fields say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferCoding {
    Absent,
    /// Exactly `chunked` (possibly split over fields, case-insensitive).
    Chunked,
    /// `chunked` is not the final coding: a request must be refused, a response runs until close.
    NotChunkedLast,
    /// Other codings before `chunked` (e.g. `gzip, chunked`): Apex does not implement them.
    Unsupported,
}

pub fn transfer_coding(headers: &[Header<'_>]) -> TransferCoding {
    let mut count = 0usize;
    let mut chunked_at: Option<usize> = None;
    let mut chunked_times = 0;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding")) {
        for e in list_elements(h.value) {
            if e.eq_ignore_ascii_case(b"chunked") {
                chunked_at = Some(count);
                chunked_times += 1;
            }
            count += 1;
        }
        if count == 0 {
            // A Transfer-Encoding field with an empty value: not a valid framing.
            return TransferCoding::NotChunkedLast;
        }
    }
    match (count, chunked_at) {
        (0, _) => TransferCoding::Absent,
        (n, Some(i)) if i + 1 == n && chunked_times == 1 => {
            if n == 1 {
                TransferCoding::Chunked
            } else {
                TransferCoding::Unsupported
            }
        }
        _ => TransferCoding::NotChunkedLast,
    }
}

/// Whether any `Connection` field lists `token`.
pub fn connection_has(headers: &[Header<'_>], token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| list_elements(h.value).any(|e| e.eq_ignore_ascii_case(token.as_bytes())))
}

/// Fields that describe one hop and never cross the proxy (RFC 9110 §7.6.1), plus the framing
/// fields that Apex re-creates itself. Checked by length first: most names are not candidates.
pub fn is_hop_by_hop(name: &str) -> bool {
    let candidate: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        14 => &["content-length"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        19 => &["proxy-authorization"],
        _ => return false,
    };
    candidate.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Most `Connection` tokens a head may name for removal; more are a 400 (RFC 9110 lets a
/// recipient limit this, and no client sends more than a handful).
pub const MAX_CONNECTION_TOKENS: usize = 16;

/// The field names listed in a head's `Connection` fields, gathered once per head so that
/// dropping them costs one comparison per listed name, not a rescan of the head per field.
#[derive(Debug, Default)]
pub struct ConnectionTokens<'b> {
    tokens: [&'b [u8]; MAX_CONNECTION_TOKENS],
    len: usize,
    /// More tokens than fit: fall back to scanning the head.
    overflow: bool,
}

impl<'b> ConnectionTokens<'b> {
    pub fn of(headers: &[Header<'b>]) -> Self {
        let mut t = ConnectionTokens::default();
        for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
            for e in list_elements(h.value) {
                if t.len == MAX_CONNECTION_TOKENS {
                    t.overflow = true;
                    return t;
                }
                t.tokens[t.len] = e;
                t.len += 1;
            }
        }
        t
    }

    pub fn has(&self, token: &str) -> bool {
        self.tokens[..self.len].iter().any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
    }

    /// Whether the `Connection` fields list `token`, however many tokens they hold.
    pub fn lists(&self, headers: &[Header<'_>], token: &str) -> bool {
        self.has(token) || (self.overflow && connection_has(headers, token))
    }

    /// Whether the field `name` must be dropped: hop-by-hop, or named by `Connection`.
    pub fn must_drop(&self, headers: &[Header<'_>], name: &str) -> bool {
        is_hop_by_hop(name)
            || (self.len > 0 && self.has(name))
            || (self.overflow && connection_has(headers, name))
    }
}

/// Appends one field line, `name: value` CRLF, as received.
pub fn encode_field(out: &mut Vec<u8>, h: &Header<'_>) {
    out.extend_from_slice(h.name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal, without going through `fmt`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(name: &'a str, value: &'a str) -> Header<'a> {
        Header { name, value: value.as_bytes() }
    }

    #[test]
    fn content_length_folds_equal_values_and_refuses_the_rest() {
        assert_eq!(content_length(&[h("Content-Length", "5")]), Ok(Some(5)));
        assert_eq!(
            content_length(&[h("content-length", "5, 5"), h("Content-Length", "5")]),
            Ok(Some(5))
        );
        assert_eq!(content_length(&[]), Ok(None));
        for bad in ["+1", "-1", "1 2", "", "0x10", "5, 6", "1,", "99999999999999999999"] {
            assert!(content_length(&[h("Content-Length", bad)]).is_err(), "{bad:?}");
        }
        assert!(content_length(&[h("Content-Length", "5"), h("Content-Length", "6")]).is_err());
    }

    #[test]
    fn transfer_coding_accepts_only_a_single_final_chunked() {
        assert_eq!(transfer_coding(&[]), TransferCoding::Absent);
        assert_eq!(transfer_coding(&[h("Transfer-Encoding", "Chunked")]), TransferCoding::Chunked);
        assert_eq!(
            transfer_coding(&[h("Transfer-Encoding", "gzip, chunked")]),
            TransferCoding::Unsupported
        );
        assert_eq!(
            transfer_coding(&[h("Transfer-Encoding", "chunked, gzip")]),
            TransferCoding::NotChunkedLast
        );
        assert_eq!(
            transfer_coding(&[h("Transfer-Encoding", "chunked, chunked")]),
            TransferCoding::NotChunkedLast
        );
        assert_eq!(transfer_coding(&[h("Transfer-Encoding", "")]), TransferCoding::NotChunkedLast);
        assert_eq!(
            transfer_coding(&[h("Transfer-Encoding", "xchunked")]),
            TransferCoding::NotChunkedLast
        );
    }

    #[test]
    fn decimal_and_hop_by_hop_fast_paths() {
        let mut out = Vec::new();
        for n in [0u64, 7, 10, 65536, u64::MAX] {
            out.clear();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for h in [
            "TE",
            "Trailer",
            "UPGRADE",
            "Connection",
            "keep-alive",
            "Content-Length",
            "Proxy-Connection",
            "Transfer-Encoding",
            "Proxy-Authorization",
        ] {
            assert!(is_hop_by_hop(h), "{h}");
        }
        for h in ["Host", "Tx", "Upgrades", "Content-Type", "X-Connection"] {
            assert!(!is_hop_by_hop(h), "{h}");
        }
        let hs = [h("Connection", "close, X-A"), h("X-A", "1")];
        let t = ConnectionTokens::of(&hs);
        assert!(t.has("close") && t.must_drop(&hs, "x-a") && !t.must_drop(&hs, "x-b"));
    }

    #[test]
    fn connection_tokens_name_fields_to_drop() {
        let hs = [h("Connection", "close, X-Secret"), h("X-Secret", "1"), h("X-Public", "2")];
        assert!(connection_has(&hs, "close"));
        let t = ConnectionTokens::of(&hs);
        assert!(t.must_drop(&hs, "x-secret"));
        assert!(!t.must_drop(&hs, "X-Public"));
        assert!(t.must_drop(&hs, "Keep-Alive"));
    }
}
