//! HTTP/2 at the edge of the journey, with no I/O: an h2 request's head becomes the HTTP/1.1
//! head that Apex's own parser reads (so routing, limits and every check apply unchanged, and
//! Apex's strict parser sees every byte a client sent), and the HTTP/1.1 response Apex writes
//! becomes an h2 response head plus the body framing to decode.
//!
//! The `h2` crate has already refused connection-specific fields (`connection`, `upgrade`,
//! `transfer-encoding`, `keep-alive`, `proxy-connection`, a `te` other than `trailers`) and
//! field values with CR, LF or NUL (RFC 9113 §8.2.1); the checks here are the second line.

use super::response;
use super::{fields, Framing, HeadLimits, Status, MAX_FIELDS_CAP};

/// How the request body reaches Apex's parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// The HEADERS frame ended the stream.
    None,
    /// `content-length` was given: the DATA bytes as they are.
    Length,
    /// No length: the DATA frames as HTTP/1.1 chunks (trailers after the last one).
    Chunked,
}

/// Why an h2 request cannot become an HTTP/1.1 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeError {
    /// CONNECT (RFC 9113 §8.5, and extended CONNECT) is not proxied.
    Connect,
    /// No `:path`, or bytes an HTTP/1.1 request line cannot carry.
    BadTarget,
    BadField,
    /// The response Apex wrote is not a response (a bug, not a peer's fault).
    BadResponse,
}

impl BridgeError {
    /// The status the client gets.
    pub fn status(self) -> u16 {
        match self {
            BridgeError::Connect => 501,
            BridgeError::BadResponse => 502,
            BridgeError::BadTarget | BridgeError::BadField => 400,
        }
    }
}

/// Bytes no HTTP/1.1 field value or request target may hold.
fn unsafe_byte(b: u8) -> bool {
    b == b'\r' || b == b'\n' || b == 0
}

/// Writes the HTTP/1.1 head for an h2 request into `out` (RFC 9113 §8.3.1): `:authority`
/// becomes `Host` (a `host` field beside it is dropped), `cookie` fields are joined with "; "
/// (§8.2.3), `te` is not forwarded (Apex strips hop-by-hop fields anyway), and a body without
/// `content-length` is sent chunked.
pub fn encode_request_head(
    parts: &http::request::Parts,
    end_stream: bool,
    out: &mut Vec<u8>,
) -> Result<RequestBody, BridgeError> {
    if parts.method == http::Method::CONNECT {
        return Err(BridgeError::Connect);
    }
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(BridgeError::BadTarget);
    }
    out.reserve(head_size(parts));
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = parts.uri.authority().map(|a| a.as_str());
    if let Some(a) = authority {
        if a.bytes().any(unsafe_byte) {
            return Err(BridgeError::BadField);
        }
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut cookies = 0;
    let mut has_length = false;
    for (name, value) in &parts.headers {
        if value.as_bytes().iter().any(|&b| unsafe_byte(b)) {
            return Err(BridgeError::BadField);
        }
        match name.as_str() {
            "host" if authority.is_some() => continue,
            "te" => continue,
            "cookie" => {
                cookies += 1;
                continue;
            }
            "content-length" => has_length = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if cookies > 0 {
        out.extend_from_slice(b"cookie: ");
        for (i, v) in parts.headers.get_all(http::header::COOKIE).iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    let body = if end_stream {
        RequestBody::None
    } else if has_length {
        RequestBody::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        RequestBody::Chunked
    };
    out.extend_from_slice(b"\r\n");
    Ok(body)
}

/// One DATA frame's bytes as an HTTP/1.1 chunk.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return; // an empty chunk would end the body
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with the request's trailers, for Apex's chunked decoder to check and drop,
/// as it does an HTTP/1.1 request's (a trailer field with an unsafe byte is left out).
pub fn encode_last_chunk(trailers: Option<&http::HeaderMap>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if value.as_bytes().iter().any(|&b| unsafe_byte(b)) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head Apex wrote, as h2 sends it.
#[derive(Debug)]
pub struct ResponseStart {
    /// Bytes of the HTTP/1.1 head.
    pub head_len: usize,
    pub response: http::Response<()>,
    /// How the body that follows is framed (already decided by Apex for an HTTP/1.1 client).
    pub framing: Framing,
    /// A 1xx Apex answered itself (`100 Continue`): not sent over h2, the final one follows.
    pub informational: bool,
}

/// Fields that mean nothing in HTTP/2 and must not be sent (RFC 9113 §8.2.2).
const CONNECTION_SPECIFIC: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"];

/// Limits for reading back a head Apex wrote itself: it passed the upstream's response limits
/// before Apex's own fields were added, so only the parser's field storage bounds it.
const OWN_HEAD: HeadLimits =
    HeadLimits { max_request_line: 64 * 1024, max_head: 1024 * 1024, max_fields: MAX_FIELDS_CAP };

/// Parses the HTTP/1.1 response head at the start of `bytes` (with Apex's own response
/// parser, which also decides the body's framing); `Ok(None)`: not whole yet. `is_head`: the
/// request was HEAD, so no body follows whatever the head says.
pub fn parse_response_head(
    bytes: &[u8],
    is_head: bool,
) -> Result<Option<ResponseStart>, BridgeError> {
    let mut storage = fields();
    let head = match response::parse_response_head(bytes, &mut storage, &OWN_HEAD, is_head) {
        Ok(Status::Complete(h)) => h,
        Ok(Status::Partial) => return Ok(None),
        Err(_) => return Err(BridgeError::BadResponse),
    };
    // The h2 head outlives the buffer it was read from, so its values are copied: once, the
    // whole head, with each value a view into it (not an allocation per field). Registered
    // names are lowercased without allocating.
    let shared = bytes::Bytes::copy_from_slice(&bytes[..head.len]);
    let mut fields = http::HeaderMap::with_capacity(head.headers.len());
    for f in head.headers {
        if CONNECTION_SPECIFIC.iter().any(|c| f.name.eq_ignore_ascii_case(c)) {
            continue;
        }
        let name = http::HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| BridgeError::BadResponse)?;
        let value = match view(&shared, bytes, f.value) {
            Some(v) => http::HeaderValue::from_maybe_shared(v),
            None => http::HeaderValue::from_bytes(f.value),
        };
        fields.append(name, value.map_err(|_| BridgeError::BadResponse)?);
    }
    let mut response = http::Response::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(head.status).map_err(|_| BridgeError::BadResponse)?;
    *response.headers_mut() = fields;
    Ok(Some(ResponseStart {
        head_len: head.len,
        response,
        framing: head.framing,
        informational: head.is_interim(),
    }))
}

/// Bytes [`encode_request_head`] writes at most for `parts`, so the head takes one allocation
/// (built field by field from an empty buffer, it took five).
fn head_size(parts: &http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    let host = parts.uri.authority().map_or(0, |a| a.as_str().len() + "host: \r\n".len());
    // Each field as `name: value\r\n`; joined cookies take less (`; ` per value after the first
    // and one name for all).
    let fields: usize = parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let line = parts.method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    line + host + fields + "transfer-encoding: chunked\r\n\r\n".len()
}

/// `part` (a slice of `whole`) as the same bytes of `copy`, a copy of `whole`'s start; `None`
/// if it is not inside it.
fn view(copy: &bytes::Bytes, whole: &[u8], part: &[u8]) -> Option<bytes::Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= copy.len()).then(|| copy.slice(start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, fields: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in fields {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn head(p: &http::request::Parts, end: bool) -> (String, RequestBody) {
        let mut out = Vec::new();
        let body = encode_request_head(p, end, &mut out).unwrap();
        (String::from_utf8(out).unwrap(), body)
    }

    #[test]
    fn authority_becomes_host_and_replaces_a_host_field() {
        let p = parts("GET", "https://a.example/x?y=1", &[("host", "evil"), ("accept", "*/*")]);
        let (h, body) = head(&p, true);
        assert_eq!(h, "GET /x?y=1 HTTP/1.1\r\nhost: a.example\r\naccept: */*\r\n\r\n");
        assert_eq!(body, RequestBody::None);
    }

    #[test]
    fn cookies_are_joined_and_te_is_dropped() {
        let p =
            parts("GET", "https://a/", &[("cookie", "a=1"), ("te", "trailers"), ("cookie", "b=2")]);
        let (h, _) = head(&p, true);
        assert_eq!(h, "GET / HTTP/1.1\r\nhost: a\r\ncookie: a=1; b=2\r\n\r\n");
    }

    #[test]
    fn a_body_without_length_is_chunked_and_with_length_is_not() {
        let (h, body) = head(&parts("POST", "https://a/", &[]), false);
        assert!(h.ends_with("transfer-encoding: chunked\r\n\r\n"), "{h}");
        assert_eq!(body, RequestBody::Chunked);
        let (h, body) = head(&parts("POST", "https://a/", &[("content-length", "3")]), false);
        assert!(!h.contains("transfer-encoding"), "{h}");
        assert_eq!(body, RequestBody::Length);
        let mut out = Vec::new();
        encode_chunk(b"hello", &mut out);
        encode_chunk(b"", &mut out);
        encode_last_chunk(None, &mut out);
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
    }

    #[test]
    fn connect_is_refused() {
        let p = parts("CONNECT", "https://a:443", &[]);
        assert_eq!(encode_request_head(&p, true, &mut Vec::new()), Err(BridgeError::Connect));
    }

    #[test]
    fn response_heads_lose_connection_fields_and_keep_their_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5\r\n";
        let r = parse_response_head(raw, false).unwrap().unwrap();
        assert_eq!(r.head_len, raw.len() - 3);
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(r.response.status(), 200);
        assert!(r.response.headers().get("connection").is_none());
        assert!(r.response.headers().get("transfer-encoding").is_none());
        assert_eq!(r.response.headers()["x-a"], "1");
        let r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(r.unwrap().unwrap().framing, Framing::None, "HEAD: no body");
        let r = parse_response_head(b"HTTP/1.1 100 Continue\r\n\r\n", false).unwrap().unwrap();
        assert!(r.informational);
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n", false).unwrap().is_none());
    }

    #[test]
    fn response_fields_keep_their_values_and_order_under_lowercase_names() {
        let raw = b"HTTP/1.1 404 Not Found\r\nSet-Cookie: a=1\r\nContent-Type: text/plain\r\n\
                    X-Empty:\r\nSET-COOKIE: b=2; Path=/\r\nX-Tab: x\ty\r\nContent-Length: 0\r\n\r\n";
        let r = parse_response_head(raw, false).unwrap().unwrap();
        let h = r.response.headers();
        assert_eq!(r.response.status(), 404);
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2; Path=/"]);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["x-empty"], "");
        assert_eq!(h["x-tab"], "x\ty");
        assert_eq!(h["content-length"], "0");
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn a_view_is_the_same_bytes_of_the_copy_or_none_outside_it() {
        let whole = b"HTTP/1.1 200 OK\r\nA: xyz\r\n\r\n";
        let copy = bytes::Bytes::copy_from_slice(&whole[..20]);
        assert_eq!(view(&copy, whole, &whole[20..23]), None, "beyond the copy");
        assert_eq!(view(&copy, whole, &whole[17..20]).as_deref(), Some(&b"A: "[..]));
        assert_eq!(view(&copy, whole, b"elsewhere"), None);
    }

    #[test]
    fn the_request_head_fits_the_size_reserved_for_it() {
        let cases = [
            parts("GET", "https://a.example/x?y=1", &[("accept", "*/*")]),
            parts("POST", "https://a/upload", &[("cookie", "a=1"), ("cookie", "b=2"), ("x", "")]),
            parts("PUT", "/no-authority", &[("content-length", "3"), ("te", "trailers")]),
            parts("OPTIONS", "*", &[]),
        ];
        for p in &cases {
            for end in [true, false] {
                let mut out = Vec::new();
                if encode_request_head(p, end, &mut out).is_ok() {
                    assert!(out.len() <= head_size(p), "{} > {}", out.len(), head_size(p));
                }
            }
        }
    }
}
