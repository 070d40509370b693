//! Response compression: gzip and brotli responses that decompress to the upstream's body,
//! and every case where Apex must leave a response alone.

mod support;

use std::io::Read;

use support::*;

fn text_body() -> String {
    (0..3000).map(|i| format!("<p>paragraph {i} of a page worth compressing</p>\n")).collect()
}

/// An upstream answering every request with `extra` fields and `body`.
fn serving(extra: &'static str, body: String) -> Upstream {
    Upstream::start(move |_, w| {
        w.send(
            format!("HTTP/1.1 200 OK\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len())
                .as_bytes(),
        );
        After::KeepOpen
    })
}

fn compressed_config(up: std::net::SocketAddr) -> String {
    config(
        "  - match: { path_prefix: \"/\" }\n    cluster: backend\n    compression: { encodings: [br, gzip], gzip_level: 6, min_size: 1KiB }",
        &format!("  - name: backend\n    endpoints: [\"{up}\"]"),
    )
}

fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap(),
        "br" => brotli::Decompressor::new(bytes, 4096).read_to_end(&mut out).unwrap(),
        other => panic!("{other}"),
    };
    out
}

fn gzip_and_brotli_decompress_to_the_original(rt: &str) {
    let body = text_body();
    let up = serving(
        "Content-Type: text/html; charset=utf-8\r\nETag: \"v1\"\r\nVary: Cookie\r\n",
        body.clone(),
    );
    let apex = Apex::start(&compressed_config(up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    for (accept, want) in [("gzip", "gzip"), ("br;q=1, gzip;q=0.5", "br"), ("gzip, br", "br")] {
        let r =
            c.request(&format!("GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: {accept}\r\n\r\n"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-encoding"), Some(want), "{accept}");
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("vary"), Some("Cookie, Accept-Encoding"));
        assert_eq!(r.header("etag"), Some("W/\"v1\""), "a strong ETag is weakened");
        assert!(r.body.len() < body.len() / 4, "{want}: {} bytes", r.body.len());
        assert!(decode(want, &r.body) == body.as_bytes(), "{want} round trip");
    }
}

fn responses_that_must_not_be_compressed_are_left_alone(rt: &str) {
    let body = text_body();
    let cases: [(&'static str, &str); 5] = [
        ("Content-Type: text/html\r\nContent-Encoding: br\r\n", "already encoded"),
        ("Content-Type: text/html\r\nCache-Control: public, no-transform\r\n", "no-transform"),
        ("Content-Type: image/png\r\n", "a type the route does not compress"),
        ("Content-Type: text/html\r\nContent-Range: bytes 0-9/100\r\n", "a range"),
        ("Content-Type: text/html\r\n", "a client that accepts no encoding"),
    ];
    for (i, (fields, why)) in cases.into_iter().enumerate() {
        let up = serving(fields, body.clone());
        let apex = Apex::start(&compressed_config(up.addr), rt);
        let accept = if i == 4 { "identity" } else { "gzip, br" };
        let r = Wire::connect(apex.addr)
            .request(&format!("GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: {accept}\r\n\r\n"));
        assert_eq!(r.header("content-encoding"), if i == 0 { Some("br") } else { None }, "{why}");
        assert_eq!(r.header("content-length"), Some(body.len().to_string().as_str()), "{why}");
        assert!(r.body == body.as_bytes(), "{why}: body unchanged");
    }
    // Small bodies and HEAD requests are not worth it either.
    let up = serving("Content-Type: text/html\r\n", "tiny".to_string());
    let apex = Apex::start(&compressed_config(up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request("GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!((r.header("content-encoding"), r.text().as_str()), (None, "tiny"));
    let r = c.request("HEAD / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("content-length"), Some("4"));
}

/// A chunked body arriving in pieces is compressed as it streams: the first piece reaches the
/// client before the upstream sends the second.
fn a_streamed_body_is_compressed_as_it_arrives(rt: &str) {
    let first_seen = std::sync::Arc::new(std::sync::Barrier::new(2));
    let wait_first = first_seen.clone();
    let up = Upstream::start(move |_, w| {
        let piece = "x".repeat(2000);
        w.send(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
        wait_first.wait();
        w.send(format!("{:x}\r\n{piece}\r\n0\r\n\r\n", piece.len()).as_bytes());
        After::KeepOpen
    });
    let apex = Apex::start(&compressed_config(up.addr), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n");
    let head = c.read_head().unwrap().unwrap();
    assert!(head.to_ascii_lowercase().contains("content-encoding: gzip"), "{head}");
    let first = c.read_chunk().unwrap().expect("a first compressed chunk before the rest");
    // The first chunk alone decompresses to the whole first piece: it was flushed, not held
    // back waiting for more input.
    let mut decoder = flate2::read::GzDecoder::new(&first[..]);
    let mut prefix = vec![0u8; 4096];
    let mut got = 0;
    while let Ok(n) = decoder.read(&mut prefix[got..]) {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, 2000, "the first piece reached the client whole");
    first_seen.wait();
    let mut all = first;
    all.extend(c.read_chunked_body().unwrap());
    assert_eq!(decode("gzip", &all), "x".repeat(4000).into_bytes());
}

under_each_driver!(
    gzip_and_brotli_decompress_to_the_original,
    responses_that_must_not_be_compressed_are_left_alone,
    a_streamed_body_is_compressed_as_it_arrives,
);
