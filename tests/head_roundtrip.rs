//! Property: a request head that parses, re-encoded and parsed again, is unchanged; and the
//! head Apex sends upstream parses back to the same request.

use apex::http::request::{
    encode_request_head, encode_upstream_head, parse_request_head, Forwarding,
};
use apex::http::{HeadLimits, Status};
use proptest::prelude::*;

/// What a parsed head says, owned, for comparison.
#[derive(Debug, PartialEq, Eq)]
struct Owned {
    method: String,
    target: String,
    version: String,
    fields: Vec<(String, Vec<u8>)>,
    framing: String,
    keep_alive: bool,
}

fn parse(bytes: &[u8]) -> Option<Owned> {
    let mut f = apex::http::fields();
    match parse_request_head(bytes, &mut f, &HeadLimits::default()) {
        Ok(Status::Complete(h)) => Some(Owned {
            method: h.method.into(),
            target: h.target.into(),
            version: format!("{:?}", h.version),
            fields: h.headers.iter().map(|x| (x.name.to_string(), x.value.to_vec())).collect(),
            framing: format!("{:?}", h.framing),
            keep_alive: h.keep_alive,
        }),
        _ => None,
    }
}

fn reencode(bytes: &[u8]) -> Vec<u8> {
    let mut f = apex::http::fields();
    let Ok(Status::Complete(h)) = parse_request_head(bytes, &mut f, &HeadLimits::default()) else {
        panic!("does not parse")
    };
    let mut out = Vec::new();
    encode_request_head(&mut out, &h);
    out
}

fn head() -> impl Strategy<Value = String> {
    // Plain strings are regexes to proptest: `Just` keeps "HTTP/1.0" literal.
    let method = prop::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "X-CUSTOM",
    ]);
    let target = "/[a-zA-Z0-9._~%/-]{0,40}(\\?[a-z0-9=&]{0,20})?";
    let version = prop::sample::select(vec!["HTTP/1.0", "HTTP/1.1"]);
    let name = "[A-Za-z][A-Za-z0-9-]{0,15}".prop_filter("no framing or host fields", |n| {
        let l = n.to_ascii_lowercase();
        !matches!(l.as_str(), "host" | "content-length" | "transfer-encoding" | "expect")
    });
    let value = "[ -~]{0,30}".prop_map(|v| v.trim().to_string());
    let fields = prop::collection::vec((name, value), 0..20);
    let framing = prop_oneof![
        Just(String::new()),
        (0u32..100000).prop_map(|n| format!("Content-Length: {n}\r\n")),
        Just("Transfer-Encoding: chunked\r\n".to_string()),
    ];
    (method, target, version, fields, framing).prop_map(|(m, t, v, fs, fr)| {
        let fr = if v == "HTTP/1.0" && fr.starts_with("Transfer") { String::new() } else { fr };
        let mut s = format!("{m} {t} {v}\r\nHost: example.com\r\n");
        for (n, val) in fs {
            s.push_str(&format!("{n}: {val}\r\n"));
        }
        s.push_str(&fr);
        s.push_str("\r\n");
        s
    })
}

proptest! {
    #[test]
    fn parse_encode_parse_is_unchanged(h in head()) {
        let first = parse(h.as_bytes()).expect("generated heads are valid");
        let again = reencode(h.as_bytes());
        prop_assert_eq!(parse(&again), Some(first));
        prop_assert_eq!(reencode(&again), again, "encoding is a fixed point");
    }

    #[test]
    fn upstream_head_parses_to_the_same_request(h in head()) {
        let mut f = apex::http::fields();
        let Ok(Status::Complete(req)) = parse_request_head(h.as_bytes(), &mut f, &HeadLimits::default()) else {
            panic!("valid")
        };
        let mut up = Vec::new();
        encode_upstream_head(&mut up, &req, &Forwarding::plain("192.0.2.1".parse().unwrap(), &"backend:80"));
        let sent = parse(&up).expect("the upstream head is valid HTTP/1.1");
        prop_assert_eq!(&sent.method, req.method);
        prop_assert_eq!(&sent.target, req.target);
        prop_assert_eq!(sent.version.as_str(), "Http11");
        prop_assert_eq!(sent.framing, format!("{:?}", req.framing));
        prop_assert!(!up.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }
}
