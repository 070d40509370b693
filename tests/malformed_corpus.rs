//! Every malformed-input case of the hardening issue, on a raw socket: the status, the close,
//! and what reached the upstream (nothing, or only the valid request sent before the bad one).

mod support;

use support::*;

const VALID: &str = "GET /valid HTTP/1.1\r\nHost: a\r\n\r\n";

/// `(name, bytes, status)`: each is sent alone and after a valid pipelined request.
fn corpus() -> Vec<(&'static str, Vec<u8>, u16)> {
    let post = |fields: &str, body: &str| -> Vec<u8> {
        format!("POST /bad HTTP/1.1\r\nHost: a\r\n{fields}\r\n{body}").into_bytes()
    };
    let mut c: Vec<(&'static str, Vec<u8>, u16)> = vec![
        (
            "content-length with transfer-encoding",
            post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            400,
        ),
        (
            "transfer-encoding with chunked not last",
            post("Transfer-Encoding: chunked, gzip\r\n", "0\r\n\r\n"),
            400,
        ),
        ("transfer-encoding identity", post("Transfer-Encoding: identity\r\n", ""), 400),
        (
            "transfer-encoding gzip then chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
            501,
        ),
        (
            "chunked twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"),
            400,
        ),
        (
            "differing content-length fields",
            post("Content-Length: 3\r\nContent-Length: 4\r\n", "abcd"),
            400,
        ),
        ("differing content-length list", post("Content-Length: 3, 4\r\n", "abcd"), 400),
        ("content-length plus sign", post("Content-Length: +3\r\n", "abc"), 400),
        ("content-length minus sign", post("Content-Length: -1\r\n", ""), 400),
        ("content-length space inside", post("Content-Length: 1 2\r\n", "abc"), 400),
        ("content-length hex", post("Content-Length: 0x3\r\n", "abc"), 400),
        ("content-length overflow", post("Content-Length: 99999999999999999999999\r\n", ""), 400),
        (
            "chunk size not hex",
            post("Transfer-Encoding: chunked\r\n", "zz\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size overflows 64 bits",
            post("Transfer-Encoding: chunked\r\n", "1ffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size with garbage",
            post("Transfer-Encoding: chunked\r\n", "3x\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk size with trailing space",
            post("Transfer-Encoding: chunked\r\n", "3 \r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "chunk data longer than announced",
            post("Transfer-Encoding: chunked\r\n", "3\r\nabcdef\r\n0\r\n\r\n"),
            400,
        ),
        (
            "bare LF in chunk line",
            post("Transfer-Encoding: chunked\r\n", "3\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "bare LF after chunk data",
            post("Transfer-Encoding: chunked\r\n", "3\r\nabc\n0\r\n\r\n"),
            400,
        ),
        ("whitespace before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Y : z\r\n\r\n".to_vec(), 400),
        ("obs-fold with space", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n".to_vec(), 400),
        ("obs-fold with tab", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n".to_vec(), 400),
        ("bare LF in request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(), 400),
        ("bare LF ending the head", b"GET / HTTP/1.1\r\nHost: a\n\n".to_vec(), 400),
        ("bare CR in a field", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n".to_vec(), 400),
        ("NUL in request line", b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 400),
        (
            "control character in request line",
            b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            400,
        ),
        ("NUL in field value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n".to_vec(), 400),
        (
            "control character in field value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n".to_vec(),
            400,
        ),
        ("DEL in field value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n".to_vec(), 400),
        ("invalid method token", b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 400),
        ("version HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec(), 400),
        ("version HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n".to_vec(), 400),
        ("no version", b"GET /\r\nHost: a\r\n\r\n".to_vec(), 400),
        ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX: a\r\n\r\n".to_vec(), 400),
        ("two Host fields", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
        (
            "request line over 8 KiB",
            format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8200)).into_bytes(),
            414,
        ),
        (
            "header section over 64 KiB",
            format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(66 * 1024))
                .into_bytes(),
            431,
        ),
    ];
    let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
    c.push((
        "over 100 fields",
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").into_bytes(),
        431,
    ));
    // Read as Content-Length the body hides a second request; read as chunked it ends at 0.
    c.push((
        "request hidden in a body",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 35\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        400,
    ));
    c
}

fn every_malformed_request_is_refused_and_closed(rt: &str) {
    let up = Upstream::ok("fine");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    for (name, bad, status) in corpus() {
        for after_valid in [false, true] {
            let mut c = Wire::connect(apex.addr);
            let mut bytes = Vec::new();
            if after_valid {
                bytes.extend_from_slice(VALID.as_bytes());
            }
            bytes.extend_from_slice(&bad);
            c.send(&bytes);
            if after_valid {
                let ok = c.read_response(false).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(ok.status, 200, "{name}: the valid request before it is served");
            }
            let r = c.read_response(false).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.status, status, "{name}");
            assert_eq!(r.header("connection"), Some("close"), "{name}");
            assert!(c.is_closed(), "{name}: the connection is closed");
            let reached: Vec<Received> = if after_valid { vec![up.next()] } else { vec![] };
            let more = up.drain();
            assert!(more.is_empty(), "{name}: reached the upstream: {:?}", more[0].head);
            for r in reached {
                assert_eq!(r.request_line(), "GET /valid HTTP/1.1", "{name}");
                assert!(
                    !r.head.replace("\r\n", "").contains(['\r', '\n']),
                    "{name}: the upstream got a head that is not clean CRLF"
                );
            }
        }
    }
}

/// Requests two parties could read two ways, and how Apex makes the upstream read them its way.
fn absolute_form_targets_reach_the_upstream_as_apex_routed_them(rt: &str) {
    let up = Upstream::ok("fine");
    let apex = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let mut c = Wire::connect(apex.addr);
    // RFC 9112 §3.2.2: the target's authority wins over Host, and the upstream is told so.
    let r = c.request("GET http://a.example:8080/x?y=1 HTTP/1.1\r\nHost: b.example\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = up.next();
    assert_eq!(got.request_line(), "GET /x?y=1 HTTP/1.1");
    assert_eq!(got.header("host").as_deref(), Some("a.example:8080"));
    assert_eq!(got.head.matches("b.example").count(), 0, "{}", got.head);
    // Userinfo in the authority is refused, never forwarded.
    let r = c.request("GET http://user@a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(c.is_closed());
    assert!(up.drain().is_empty());
}

under_each_driver!(
    every_malformed_request_is_refused_and_closed,
    absolute_form_targets_reach_the_upstream_as_apex_routed_them
);
