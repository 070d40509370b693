//! Fuzz target: the request-head parser, and the encoders fed by what it accepts.
#![no_main]

use apex::http::request::{
    encode_request_head, encode_upstream_head, parse_request_head, Forwarding,
};
use apex::http::{HeadLimits, Status, MAX_FIELDS_CAP};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let mut fields = apex::http::fields();
    let Ok(Status::Complete(head)) = parse_request_head(data, &mut fields, &limits) else {
        return;
    };
    assert!(head.len <= data.len());
    // A head we accept re-encodes to one that parses to the same thing.
    let mut again = Vec::new();
    encode_request_head(&mut again, &head);
    let mut fields2 = apex::http::fields();
    let Ok(Status::Complete(head2)) = parse_request_head(&again, &mut fields2, &limits) else {
        panic!("re-encoded head does not parse: {:?}", String::from_utf8_lossy(&again));
    };
    assert_eq!(head.method, head2.method);
    assert_eq!(head.target, head2.target);
    assert_eq!(head.version, head2.version);
    assert_eq!(head.framing, head2.framing);
    assert_eq!(head.headers.len(), head2.headers.len());
    // What we send upstream is always a valid, CRLF-only HTTP/1.1 head.
    let mut up = Vec::new();
    encode_upstream_head(
        &mut up,
        &head,
        &Forwarding::plain("192.0.2.1".parse().unwrap(), &"backend:80"),
    );
    assert!(!up.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    // It may exceed the client-side limits by the fields Apex adds (X-Forwarded-*).
    let relaxed =
        HeadLimits { max_head: limits.max_head + 4096, max_fields: MAX_FIELDS_CAP, ..limits };
    let mut fields3 = apex::http::fields();
    match parse_request_head(&up, &mut fields3, &relaxed) {
        Ok(Status::Complete(sent)) => assert_eq!(sent.framing, head.framing),
        other => panic!("upstream head does not parse: {other:?}"),
    }
});
