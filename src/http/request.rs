//! Parsing a downstream request head strictly, and encoding the head sent upstream.

use std::io::Write;
use std::net::IpAddr;

use httparse::Header;

use std::mem::MaybeUninit;

use super::fields::{self, ConnectionTokens, TransferCoding};
use super::scan::{find_head_end, HeadEnd};
use super::{Framing, HeadError, HeadLimits, Status, Version};

/// A parsed request head borrowing from the read buffer (`'b`) and the field array (`'h`).
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    /// Field names the `Connection` fields list (to drop when forwarding).
    pub conn: ConnectionTokens<'b>,
    pub method: &'b str,
    pub target: &'b str,
    pub version: Version,
    pub headers: &'h [Header<'b>],
    /// Bytes of the buffer the head occupies, including skipped empty lines before it.
    pub len: usize,
    pub framing: Framing,
    /// Host from an absolute-form target, else the `Host` field; without port, not lower-cased.
    pub host: &'b str,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl<'b> RequestHead<'b, '_> {
    /// The path of the target, without query, for routing.
    pub fn path(&self) -> &str {
        let t = self.target;
        let t = match absolute_form_rest(t) {
            Some((_, rest)) => rest,
            None => t,
        };
        let end = t.find(['?', '#']).unwrap_or(t.len());
        if end == 0 {
            "/"
        } else {
            &t[..end]
        }
    }

    /// Methods RFC 9110 §9.2.2 calls idempotent, which a proxy may replay on a fresh connection.
    pub fn is_idempotent(&self) -> bool {
        matches!(self.method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with exactly
    /// one `Upgrade` field, and no body, since the body would precede the switch), or `None`.
    pub fn upgrade(&self) -> Option<&'b [u8]> {
        if self.version != Version::Http11
            || self.framing != Framing::None
            || !self.conn.lists(self.headers, "upgrade")
        {
            return None;
        }
        let mut fields = self.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("upgrade"));
        let value = fields::trim_ows(fields.next()?.value);
        (fields.next().is_none() && !value.is_empty()).then_some(value)
    }
}

/// Adds the fields of a forwarded upgrade to a head [`encode_upstream_head`] just wrote (before
/// its final empty line): `Connection: upgrade` and the `Upgrade` the route allowed.
pub fn add_upgrade(out: &mut Vec<u8>, protocol: &[u8]) {
    debug_assert!(out.ends_with(b"\r\n\r\n"));
    out.truncate(out.len() - 2);
    out.extend_from_slice(b"Connection: upgrade\r\nUpgrade: ");
    out.extend_from_slice(protocol);
    out.extend_from_slice(b"\r\n\r\n");
}

/// `http://host:port/path` → (`host:port`, `/path`). Compares bytes: the target may hold
/// non-ASCII bytes, and slicing a `str` inside a character would panic.
fn absolute_form_rest(target: &str) -> Option<(&str, &str)> {
    let b = target.as_bytes();
    let scheme_len = if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if b.len() > 8 && b[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return None;
    };
    // The scheme is ASCII, so `scheme_len` is a character boundary.
    let rest = &target[scheme_len..];
    let slash = rest.find(['/', '?']).unwrap_or(rest.len());
    Some((&rest[..slash], &rest[slash..]))
}

/// Strips `:port` from an authority (`[v6]:port` keeps its brackets).
fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

fn valid_authority(v: &[u8]) -> bool {
    v.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

/// Parses a request head at the start of `buf`. `fields` is the caller's storage for the field
/// array (see [`super::fields`]); at most `limits.max_fields` of it is used.
pub fn parse_request_head<'b, 'h>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<Header<'b>>],
    limits: &HeadLimits,
) -> Result<Status<RequestHead<'b, 'h>>, HeadError> {
    let Some(end) = find_head_end(buf, limits.max_request_line, limits.max_head)? else {
        return Ok(Status::Partial);
    };
    parse_request_head_at(buf, end, fields, limits).map(Status::Complete)
}

/// Parses a head whose end a [`super::scan::HeadScanner`] already found (and whose line endings
/// it already checked), so the bytes are not scanned twice.
pub fn parse_request_head_at<'b, 'h>(
    buf: &'b [u8],
    end: HeadEnd,
    fields: &'h mut [MaybeUninit<Header<'b>>],
    limits: &HeadLimits,
) -> Result<RequestHead<'b, 'h>, HeadError> {
    let head = &buf[end.skip..end.end];
    let max = limits.max_fields.min(fields.len());
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut fields[..max]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::BadRequest("truncated head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::FieldsTooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::BadRequest("unsupported version")),
        Err(httparse::Error::Token) => return Err(HeadError::BadRequest("invalid method")),
        Err(httparse::Error::HeaderName) => {
            return Err(HeadError::BadRequest("invalid header field name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HeadError::BadRequest("invalid header field value"))
        }
        Err(_) => return Err(HeadError::BadRequest("malformed request line")),
    }
    let httparse::Request { method, path, version, headers } = req;
    let headers: &'h [Header<'b>] = headers;
    let (Some(method), Some(target), Some(version)) = (method, path, version) else {
        return Err(HeadError::BadRequest("malformed request line"));
    };
    let version = match version {
        0 => Version::Http10,
        1 => Version::Http11,
        _ => return Err(HeadError::BadRequest("unsupported version")),
    };
    if method == "CONNECT" {
        return Err(HeadError::NotImplemented("CONNECT is not supported"));
    }
    let absolute = absolute_form_rest(target);
    let origin_ok = target.starts_with('/') || (target == "*" && method == "OPTIONS");
    if absolute.is_none() && !origin_ok {
        return Err(HeadError::BadRequest("invalid request target"));
    }

    let mut host_field: Option<&'b [u8]> = None;
    let mut hosts = 0;
    let mut expect: Option<&'b [u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host_field = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("expect") {
            if expect.is_some() {
                return Err(HeadError::ExpectationFailed);
            }
            expect = Some(h.value);
        }
    }
    if hosts > 1 {
        return Err(HeadError::BadRequest("more than one Host field"));
    }
    if hosts == 0 && version == Version::Http11 {
        return Err(HeadError::BadRequest("HTTP/1.1 request without Host"));
    }
    let host_value = match host_field {
        Some(v) => {
            if !valid_authority(v) {
                return Err(HeadError::BadRequest("invalid Host field"));
            }
            // valid_authority admits only ASCII, so this cannot fail.
            std::str::from_utf8(v).map_err(|_| HeadError::BadRequest("invalid Host field"))?
        }
        None => "",
    };
    if let Some((authority, _)) = absolute {
        // The authority replaces Host upstream (RFC 9112 §3.2.2), so it must be one: nothing
        // a Host field could not hold, which excludes userinfo (`@`, RFC 9110 §4.2.4).
        if authority.is_empty() || !valid_authority(authority.as_bytes()) {
            return Err(HeadError::BadRequest("invalid authority in the request target"));
        }
    }
    let host = match absolute {
        Some((authority, _)) => host_without_port(authority),
        None => host_without_port(host_value),
    };

    let length = fields::content_length(headers).map_err(HeadError::BadRequest)?;
    let framing = match (fields::transfer_coding(headers), length) {
        (TransferCoding::Absent, None) => Framing::None,
        (TransferCoding::Absent, Some(n)) => Framing::Length(n),
        (_, Some(_)) => {
            return Err(HeadError::BadRequest("both Content-Length and Transfer-Encoding"))
        }
        (_, None) if version == Version::Http10 => {
            return Err(HeadError::BadRequest("Transfer-Encoding in an HTTP/1.0 request"))
        }
        (TransferCoding::Chunked, None) => Framing::Chunked,
        (TransferCoding::Unsupported, None) => {
            return Err(HeadError::NotImplemented("transfer coding other than chunked"))
        }
        (TransferCoding::NotChunkedLast, None) => {
            return Err(HeadError::BadRequest("Transfer-Encoding does not end in chunked"))
        }
    };
    let expect_continue = match expect {
        None => false,
        Some(v) if fields::trim_ows(v).eq_ignore_ascii_case(b"100-continue") => {
            version == Version::Http11
        }
        Some(_) => return Err(HeadError::ExpectationFailed),
    };
    let conn = ConnectionTokens::of(headers);
    let close = conn.has("close");
    let keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => !close && conn.has("keep-alive"),
    };
    Ok(RequestHead {
        conn,
        method,
        target,
        version,
        headers,
        len: end.end,
        framing,
        host,
        keep_alive,
        expect_continue,
    })
}

/// Appends `req` exactly as parsed: its start line and every field, with CRLF line endings.
/// Parsing the result gives back the same head (the property the fuzzers and tests check).
pub fn encode_request_head(out: &mut Vec<u8>, req: &RequestHead<'_, '_>) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(match req.version {
        Version::Http10 => b" HTTP/1.0\r\n",
        Version::Http11 => b" HTTP/1.1\r\n",
    });
    for h in req.headers {
        fields::encode_field(out, h);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends `ip` as text, as `Display` writes it. IPv4 (nearly every client) by hand: through
/// the formatter it cost about 900 instructions per forwarded request (callgrind, 64 B
/// requests), 5% of the total.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, &octet) in a.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// Which forwarding fields tell the upstream who the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedStyle {
    /// `X-Forwarded-For` and `X-Forwarded-Proto`.
    #[default]
    XForwarded,
    /// RFC 7239 `Forwarded: for=…;proto=…`.
    Forwarded,
}

/// How a request is forwarded: what Apex tells the upstream about the client, and the route's
/// edits.
pub struct Forwarding<'a> {
    /// The client's address (the PROXY protocol's, when the listener takes it).
    pub client: IpAddr,
    /// Fills `Host` for an HTTP/1.0 request without one.
    pub default_host: &'a dyn std::fmt::Display,
    /// The client is a trusted proxy: its forwarding fields are kept and extended. Anyone
    /// else's are replaced, so a client cannot forge the start of the chain.
    pub trusted: bool,
    pub style: ForwardedStyle,
    /// `http` or `https`: the scheme the client used.
    pub proto: &'static str,
    /// The route's field edits, rendered for this request.
    pub edits: Option<&'a super::rewrite::FieldEdits>,
    pub path: Option<&'a super::rewrite::PathEdit>,
    /// Replaces `Host`.
    pub host: Option<&'a str>,
    /// `X-Request-Id` to send (the client's, kept, or one Apex made).
    pub request_id: Option<&'a str>,
}

impl<'a> Forwarding<'a> {
    /// Forwarding with no edits: `X-Forwarded-*` over plain HTTP, the client untrusted.
    pub fn plain(client: IpAddr, default_host: &'a dyn std::fmt::Display) -> Self {
        Forwarding {
            client,
            default_host,
            trusted: false,
            style: ForwardedStyle::XForwarded,
            proto: "http",
            edits: None,
            path: None,
            host: None,
            request_id: None,
        }
    }
}

/// Appends the head Apex sends upstream: same method and target (an edited path, if the route
/// says so), HTTP/1.1, hop-by-hop fields removed, the forwarding fields written as `fwd` says,
/// the route's field edits applied, and framing re-created from `req.framing`.
///
/// An absolute-form target (`GET http://a.example/x`) is sent in origin form (`/x`) with
/// `Host: a.example`, replacing the client's `Host` (RFC 9112 §3.2.2): Apex routed on that
/// authority, so the upstream must see the same host.
pub fn encode_upstream_head(out: &mut Vec<u8>, req: &RequestHead<'_, '_>, fwd: &Forwarding<'_>) {
    let absolute = absolute_form_rest(req.target);
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    let target = match absolute {
        Some((_, "")) => "/",
        Some((_, rest)) => rest,
        None => req.target,
    };
    if target.starts_with('?') {
        out.push(b'/');
    }
    match fwd.path {
        Some(edit) if target.starts_with('/') => edit.apply(target, out),
        _ => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let host = fwd.host.or(absolute.map(|(authority, _)| authority));
    if let Some(host) = host {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut has_host = host.is_some();
    let chain_field = match fwd.style {
        ForwardedStyle::XForwarded => "x-forwarded-for",
        ForwardedStyle::Forwarded => "forwarded",
    };
    let mut chain_seen = false;
    for h in req.headers {
        let name = h.name;
        if req.conn.must_drop(req.headers, name)
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || (fwd.request_id.is_some() && name.eq_ignore_ascii_case("x-request-id"))
            || fwd.edits.is_some_and(|e| e.drops(name))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") || name.eq_ignore_ascii_case("forwarded") {
            chain_seen |= name.eq_ignore_ascii_case(chain_field);
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                continue;
            }
            has_host = true;
        }
        fields::encode_field(out, h);
    }
    if !has_host {
        let _ = write!(out, "Host: {}\r\n", fwd.default_host);
    }
    if let Some(edits) = fwd.edits {
        edits.encode(out);
    }
    if let Some(id) = fwd.request_id {
        out.extend_from_slice(b"X-Request-Id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // The chain so far, only from a trusted client; then this hop.
    let earlier = req
        .headers
        .iter()
        .filter(|h| fwd.trusted && chain_seen && h.name.eq_ignore_ascii_case(chain_field))
        .map(|h| fields::trim_ows(h.value))
        .filter(|v| !v.is_empty());
    match fwd.style {
        ForwardedStyle::XForwarded => {
            out.extend_from_slice(b"X-Forwarded-For: ");
            for v in earlier {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
            push_ip(out, fwd.client);
            out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
            out.extend_from_slice(fwd.proto.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        ForwardedStyle::Forwarded => {
            out.extend_from_slice(b"Forwarded: ");
            for v in earlier {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
            // RFC 7239 §6: an IPv6 node is quoted and bracketed.
            match fwd.client {
                IpAddr::V4(_) => {
                    out.extend_from_slice(b"for=");
                    push_ip(out, fwd.client);
                    let _ = write!(out, ";proto={}\r\n", fwd.proto);
                }
                IpAddr::V6(a) => {
                    let _ = write!(out, "for=\"[{a}]\";proto={}\r\n", fwd.proto);
                }
            }
        }
    }
    match req.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            fields::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::None | Framing::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.3.40",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = b"x".to_vec();
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}").into_bytes(), "{ip}");
        }
    }

    fn parse(b: &[u8]) -> Result<Status<(Framing, bool, String)>, HeadError> {
        let mut f = crate::http::fields();
        Ok(match parse_request_head(b, &mut f, &HeadLimits::default())? {
            Status::Complete(h) => Status::Complete((h.framing, h.keep_alive, h.host.to_string())),
            Status::Partial => Status::Partial,
        })
    }

    fn refused(b: &str) -> HeadError {
        parse(b.as_bytes()).expect_err(b)
    }

    #[test]
    fn simple_get_parses() {
        let r = parse(b"GET /a?b HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n").unwrap();
        assert_eq!(r, Status::Complete((Framing::None, true, "Example.com".into())));
    }

    #[test]
    fn http10_keep_alive_only_when_asked() {
        let r = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r, Status::Complete((Framing::None, false, "".into())));
        let r = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert_eq!(r, Status::Complete((Framing::None, true, "".into())));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        ] {
            assert_eq!(refused(bad).status(), 400, "{bad:?}");
        }
        assert_eq!(
            refused("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .status(),
            501
        );
        assert_eq!(refused("GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n").status(), 417);
    }

    #[test]
    fn too_many_fields_is_431() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..100 {
            s.push_str(&format!("X-{i}: v\r\n"));
        }
        s.push_str("\r\n");
        assert_eq!(refused(&s), HeadError::FieldsTooLarge);
    }

    #[test]
    fn upstream_head_drops_hop_by_hop_and_extends_forwarded_for() {
        let raw = b"POST /p HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: ws\r\nProxy-Authorization: s\r\nX-Forwarded-For: 1.1.1.1\r\n\
X-Forwarded-Proto: https\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\nAccept: */*\r\n\r\n";
        let mut f = crate::http::fields();
        let Status::Complete(h) = parse_request_head(raw, &mut f, &HeadLimits::default()).unwrap()
        else {
            panic!("partial")
        };
        assert!(h.expect_continue);
        let mut out = Vec::new();
        let untrusted = Forwarding::plain("10.0.0.9".parse().unwrap(), &"up");
        encode_upstream_head(&mut out, &h, &untrusted);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\n\
X-Forwarded-Proto: http\r\nTransfer-Encoding: chunked\r\n\r\n",
            "an untrusted client's chain is replaced"
        );
        let mut out = Vec::new();
        let trusted = Forwarding { trusted: true, ..untrusted };
        encode_upstream_head(&mut out, &h, &trusted);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("X-Forwarded-For: 1.1.1.1, 10.0.0.9\r\n"), "{text}");
    }

    #[test]
    fn forwarded_style_writes_rfc_7239_and_edits_apply() {
        let raw = b"GET /api/x?q=1 HTTP/1.1\r\nHost: h\r\nForwarded: for=1.1.1.1\r\nX-Drop: 1\r\nX-Keep: 2\r\nX-Set: old\r\n\r\n";
        let mut f = crate::http::fields();
        let Status::Complete(h) = parse_request_head(raw, &mut f, &HeadLimits::default()).unwrap()
        else {
            panic!("partial")
        };
        let edits = super::super::rewrite::FieldEdits {
            remove: vec!["x-drop".into()],
            set: vec![("x-set".into(), "new".into())],
            add: vec![("x-added".into(), "yes".into())],
        };
        let path = super::super::rewrite::PathEdit::Strip("/api".into());
        let fwd = Forwarding {
            trusted: true,
            style: ForwardedStyle::Forwarded,
            edits: Some(&edits),
            path: Some(&path),
            host: Some("backend.internal"),
            request_id: Some("abc"),
            ..Forwarding::plain("2001:db8::1".parse().unwrap(), &"up")
        };
        let mut out = Vec::new();
        encode_upstream_head(&mut out, &h, &fwd);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x?q=1 HTTP/1.1\r\nHost: backend.internal\r\nX-Keep: 2\r\nx-set: new\r\nx-added: yes\r\n\
X-Request-Id: abc\r\nForwarded: for=1.1.1.1, for=\"[2001:db8::1]\";proto=http\r\n\r\n"
        );
    }

    #[test]
    fn non_ascii_in_an_absolute_target_does_not_panic() {
        // Found by the request_head fuzzer: a multi-byte character across the scheme's end.
        let raw = "GET http:/\u{456}ther:81/x HTTP/1.1\r\nHost: h\r\n\r\n";
        let mut f = crate::http::fields();
        let _ = parse_request_head(raw.as_bytes(), &mut f, &HeadLimits::default());
        assert_eq!(absolute_form_rest("http:/\u{456}x"), None);
        assert_eq!(absolute_form_rest("http://\u{456}/p"), Some(("\u{456}", "/p")));
    }

    #[test]
    fn absolute_form_routes_on_its_authority() {
        let raw = b"GET http://Other:81/x/y?q HTTP/1.1\r\nHost: h\r\n\r\n";
        let mut f = crate::http::fields();
        let Status::Complete(h) = parse_request_head(raw, &mut f, &HeadLimits::default()).unwrap()
        else {
            panic!("partial")
        };
        assert_eq!(h.host, "Other");
        assert_eq!(h.path(), "/x/y");
    }

    /// RFC 9112 §3.2.2: the target's authority replaces Host, and the upstream gets origin form.
    #[test]
    fn absolute_form_is_forwarded_in_origin_form_with_its_authority_as_host() {
        for (target, line, host) in [
            ("http://a.example:81/x/y?q", "GET /x/y?q HTTP/1.1", "a.example:81"),
            ("http://a.example", "GET / HTTP/1.1", "a.example"),
            ("HTTP://a.example?q=1", "GET /?q=1 HTTP/1.1", "a.example"),
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: b.example\r\n\r\n");
            let mut f = crate::http::fields();
            let Status::Complete(h) =
                parse_request_head(raw.as_bytes(), &mut f, &HeadLimits::default()).unwrap()
            else {
                panic!("partial")
            };
            let mut out = Vec::new();
            encode_upstream_head(
                &mut out,
                &h,
                &Forwarding::plain("10.0.0.1".parse().unwrap(), &"unused"),
            );
            let text = String::from_utf8(out).unwrap();
            assert!(text.starts_with(&format!("{line}\r\n")), "{text}");
            assert_eq!(text.matches("Host:").count() + text.matches("host:").count(), 1, "{text}");
            assert!(text.contains(&format!("Host: {host}\r\n")), "{text}");
            assert!(!text.contains("b.example"), "{text}");
        }
    }

    #[test]
    fn absolute_form_with_userinfo_or_no_authority_is_refused() {
        for target in ["http://user@a.example/x", "http:///x", "http://a b/x"] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: b\r\n\r\n");
            let mut f = crate::http::fields();
            assert!(
                parse_request_head(raw.as_bytes(), &mut f, &HeadLimits::default()).is_err(),
                "{target}"
            );
        }
    }
}
