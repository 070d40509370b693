//! The HTTP/1.1 codec: parsing heads, framing bodies and encoding heads, with no I/O at all.
//!
//! Everything here works on byte slices and returns "need more bytes" instead of reading, so both
//! runtime adapters share it and fuzzers can drive it directly.

pub mod chunked;
pub mod encoding;
pub mod fields;
pub mod h2_bridge;
pub mod h2_guard;
pub mod request;
pub mod response;
pub mod rewrite;
pub mod scan;

/// Result of parsing something that may not have fully arrived yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Status<T> {
    Complete(T),
    /// Not enough bytes: read more and call again with the whole buffer.
    Partial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a message body is delimited on the wire (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// Limits a peer's head must respect.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Request line, in bytes without CRLF; longer is 414.
    pub max_request_line: usize,
    /// Whole head including request line, in bytes; larger is 431.
    pub max_head: usize,
    /// Number of header fields; more is 431. At most [`MAX_FIELDS_CAP`].
    pub max_fields: usize,
}

/// The parser's field array lives on the stack; this bounds its size.
pub const MAX_FIELDS_CAP: usize = 256;

/// Storage for a head's fields, left uninitialised: httparse writes only what it parses, so a
/// parse does not first clear 8 KiB.
pub type Fields<'b> = [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_FIELDS_CAP];

pub fn fields<'b>() -> Fields<'b> {
    [const { std::mem::MaybeUninit::uninit() }; MAX_FIELDS_CAP]
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits { max_request_line: 8 * 1024, max_head: 64 * 1024, max_fields: 100 }
    }
}

/// Why a request head was refused; each maps to one status code and always closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 400 with a short reason for the log.
    BadRequest(&'static str),
    /// 414: request line over the limit.
    UriTooLong,
    /// 431: header section or field count over the limit.
    FieldsTooLarge,
    /// 501: a transfer coding we do not implement.
    NotImplemented(&'static str),
    /// 417: an `Expect` other than `100-continue`.
    ExpectationFailed,
    /// 408: the client started a head and did not finish it within the header timeout.
    TimedOut,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::BadRequest(_) => 400,
            HeadError::UriTooLong => 414,
            HeadError::FieldsTooLarge => 431,
            HeadError::NotImplemented(_) => 501,
            HeadError::ExpectationFailed => 417,
            HeadError::TimedOut => 408,
        }
    }
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::BadRequest(r) | HeadError::NotImplemented(r) => r,
            HeadError::UriTooLong => "request line too long",
            HeadError::FieldsTooLarge => "header section too large",
            HeadError::ExpectationFailed => "unsupported expectation",
            HeadError::TimedOut => "request head not finished in time",
        }
    }
}

/// Standard reason phrase for the statuses Apex itself produces.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        429 => "Too Many Requests",
        _ => "",
    }
}

/// Appends a complete small response that Apex produces itself (errors, direct responses).
pub fn encode_simple_response(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
    keep_alive_header: bool,
) {
    use std::io::Write;
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n", body.len());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_header {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

pub mod body;

/// Body bytes of the plain-text error response for `status` (`"502 Bad Gateway\n"`).
pub fn error_body_len(status: u16) -> u64 {
    (3 + 1 + reason_phrase(status).len() + 1) as u64
}

/// Appends a short plain-text error response produced by Apex itself.
pub fn encode_error_response(out: &mut Vec<u8>, status: u16, close: bool, keep_alive_header: bool) {
    encode_error_response_with(out, status, close, keep_alive_header, b"");
}

/// [`encode_error_response`] with extra field lines (each ending in CRLF), e.g. `Retry-After`.
pub fn encode_error_response_with(
    out: &mut Vec<u8>,
    status: u16,
    close: bool,
    keep_alive_header: bool,
    extra: &[u8],
) {
    use std::io::Write;
    let reason = reason_phrase(status);
    let body_len = error_body_len(status);
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {body_len}\r\n"
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_header {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(extra);
    let _ = write!(out, "\r\n{status} {reason}\n");
}
