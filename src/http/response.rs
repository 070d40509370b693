//! Parsing an upstream response head, and encoding the head sent downstream.

use std::io::Write;

use httparse::Header;

use std::mem::MaybeUninit;

use super::fields::{self, ConnectionTokens, TransferCoding};
use super::scan::find_head_end;
use super::{Framing, HeadLimits, Status, Version};

#[derive(Debug)]
pub struct ResponseHead<'b, 'h> {
    /// Field names the `Connection` fields list (to drop when relaying).
    pub conn: ConnectionTokens<'b>,
    pub status: u16,
    pub reason: &'b str,
    pub version: Version,
    pub headers: &'h [Header<'b>],
    pub len: usize,
    pub framing: Framing,
    /// The upstream's Content-Length, kept for bodiless responses (HEAD, 304) where it
    /// describes the representation rather than framing this message.
    pub content_length: Option<u64>,
    /// Whether the upstream lets this connection carry another request.
    pub reusable: bool,
}

impl ResponseHead<'_, '_> {
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// Why an upstream response is unusable; every one is a 502 to the client.
pub type ResponseError = &'static str;

/// Parses a response head at the start of `buf`; `head_request` says the request was HEAD.
pub fn parse_response_head<'b, 'h>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<Header<'b>>],
    limits: &HeadLimits,
    head_request: bool,
) -> Result<Status<ResponseHead<'b, 'h>>, ResponseError> {
    let end = match find_head_end(buf, limits.max_head, limits.max_head) {
        Ok(Some(end)) => end,
        Ok(None) => return Ok(Status::Partial),
        Err(e) => return Err(e.reason()),
    };
    let max = limits.max_fields.min(fields.len());
    let mut resp = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    match parser.parse_response_with_uninit_headers(
        &mut resp,
        &buf[end.skip..end.end],
        &mut fields[..max],
    ) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("truncated response head"),
        Err(_) => return Err("malformed response head"),
    }
    let httparse::Response { version, code, reason, headers } = resp;
    let headers: &'h [Header<'b>] = headers;
    let (Some(version), Some(status)) = (version, code) else {
        return Err("malformed status line");
    };
    let version = if version == 0 { Version::Http10 } else { Version::Http11 };
    let content_length = fields::content_length(headers)?;
    let coding = fields::transfer_coding(headers);
    let bodiless = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if bodiless {
        Framing::None
    } else {
        match (coding, content_length) {
            (TransferCoding::Absent, Some(n)) => Framing::Length(n),
            (TransferCoding::Absent, None) => Framing::UntilClose,
            (_, Some(_)) => return Err("both Content-Length and Transfer-Encoding"),
            (TransferCoding::Chunked, None) => Framing::Chunked,
            (_, None) => return Err("unsupported Transfer-Encoding"),
        }
    };
    let conn = ConnectionTokens::of(headers);
    let close = conn.has("close");
    let reusable = framing != Framing::UntilClose
        && match version {
            Version::Http11 => !close,
            Version::Http10 => !close && conn.has("keep-alive"),
        };
    Ok(Status::Complete(ResponseHead {
        conn,
        status,
        reason: reason.unwrap_or(""),
        version,
        headers,
        len: end.end,
        framing,
        content_length,
        reusable,
    }))
}

/// Appends the head sent downstream: the upstream's status and end-to-end fields, with framing
/// re-created as `framing`. `close` adds `Connection: close`; otherwise `keep_alive_header` adds
/// `Connection: keep-alive` (for HTTP/1.0 clients, whose default is to close).
pub fn encode_downstream_head(
    out: &mut Vec<u8>,
    resp: &ResponseHead<'_, '_>,
    framing: Framing,
    close: bool,
    keep_alive_header: bool,
    edits: Option<&super::rewrite::FieldEdits>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    fields::push_decimal(out, u64::from(resp.status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers {
        if resp.conn.must_drop(resp.headers, h.name) || edits.is_some_and(|e| e.drops(h.name)) {
            continue;
        }
        fields::encode_field(out, h);
    }
    if let Some(e) = edits {
        e.encode(out);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            fields::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None => {
            // HEAD and 304 carry the representation's length; 1xx and 204 never have one.
            if let (Some(n), false) = (resp.content_length, resp.status < 200 || resp.status == 204)
            {
                let _ = write!(out, "Content-Length: {n}\r\n");
            }
        }
        Framing::UntilClose => {}
    }
    if resp.is_interim() {
        // Interim responses carry no connection management of their own.
    } else if close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if keep_alive_header {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The `Upgrade` protocol a `101 Switching Protocols` response switches to, if it names one.
pub fn switched_to<'b>(resp: &ResponseHead<'b, '_>) -> Option<&'b [u8]> {
    let mut fields = resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let value = fields::trim_ows(fields.next()?.value);
    (fields.next().is_none() && !value.is_empty()).then_some(value)
}

/// Appends the `101 Switching Protocols` head sent to the client: the upstream's end-to-end
/// fields, then `Connection: upgrade` and the `Upgrade` it switched to. After it, the
/// connection is a tunnel.
pub fn encode_switching_head(out: &mut Vec<u8>, resp: &ResponseHead<'_, '_>, protocol: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 101 ");
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers {
        if !resp.conn.must_drop(resp.headers, h.name) {
            fields::encode_field(out, h);
        }
    }
    out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
    out.extend_from_slice(protocol);
    out.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(b: &str, head: bool) -> Result<(Framing, bool), ResponseError> {
        let mut f = crate::http::fields();
        match parse_response_head(b.as_bytes(), &mut f, &HeadLimits::default(), head)? {
            Status::Complete(r) => Ok((r.framing, r.reusable)),
            Status::Partial => panic!("partial"),
        }
    }

    #[test]
    fn response_framing_follows_rfc9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false),
            Ok((Framing::Length(3), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true),
            Ok((Framing::None, true))
        );
        assert_eq!(framing("HTTP/1.1 204 No\r\n\r\n", false), Ok((Framing::None, true)));
        assert_eq!(
            framing("HTTP/1.1 304 NM\r\nContent-Length: 9\r\n\r\n", false),
            Ok((Framing::None, true))
        );
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n", false), Ok((Framing::None, true)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n", false), Ok((Framing::UntilClose, false)));
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            Ok((Framing::Length(1), false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", false),
            Ok((Framing::Length(1), false))
        );
        assert!(framing(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
        assert!(framing("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", false).is_err());
    }

    #[test]
    fn downstream_head_is_reframed() {
        let raw = "HTTP/1.1 200 OK\r\nServer: x\r\nConnection: X-Hop\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut f = crate::http::fields();
        let Status::Complete(r) =
            parse_response_head(raw.as_bytes(), &mut f, &HeadLimits::default(), false).unwrap()
        else {
            panic!()
        };
        let mut out = Vec::new();
        encode_downstream_head(&mut out, &r, Framing::UntilClose, true, false, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: x\r\nConnection: close\r\n\r\n"
        );
    }
}
