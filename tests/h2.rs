//! HTTP/2 to clients with a real h2 client (the `h2` crate, over tokio-rustls or plain TCP):
//! requests reach an HTTP/1.1 upstream and come back, many streams share a connection, large
//! bodies stream both ways with bounded memory, a reset stream cancels its upstream request,
//! and h2c works by prior knowledge only where it is turned on.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use support::tls::*;
use support::*;

/// Runs `f` to its end on a current-thread Tokio runtime (the h2 client's).
fn block_on<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f)
}

/// An h2 connection over TLS, h2 chosen by ALPN.
async fn connect_tls(addr: SocketAddr) -> SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let config = client_config_with_alpn(&[&rustls::version::TLS13], &["h2", "http/1.1"]);
    let name = ServerName::try_from("a.example.com".to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN picks h2");
    handshake(tls).await.expect("h2 handshake over TLS")
}

/// An h2c connection by prior knowledge.
async fn connect_h2c(addr: SocketAddr) -> Result<SendRequest<Bytes>, h2::Error> {
    handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await
}

/// Sends one request (with `body`, if any, in DATA frames of 16 KiB) and reads the whole
/// response.
async fn request(
    send: &mut SendRequest<Bytes>,
    req: http::Request<()>,
    body: Option<Vec<u8>>,
) -> (http::response::Parts, Vec<u8>) {
    let mut ready = send.clone().ready().await.expect("connection ready");
    let (resp, mut stream) = ready.send_request(req, body.is_none()).expect("send request");
    if let Some(body) = body {
        let mut rest = Bytes::from(body);
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(16384));
            stream.reserve_capacity(piece.len());
            let mut piece = piece;
            while !piece.is_empty() {
                let n = std::future::poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("capacity");
                let part = piece.split_to(n.min(piece.len()));
                stream.send_data(part, false).expect("send data");
            }
        }
        stream.send_data(Bytes::new(), true).expect("end stream");
    }
    let (parts, mut recv) = resp.await.expect("response").into_parts();
    let mut got = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("response body");
        recv.flow_control().release_capacity(chunk.len()).unwrap();
        got.extend_from_slice(&chunk);
    }
    (parts, got)
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://a.example.com{path}")).body(()).unwrap()
}

/// A TLS listener offering h2 and http/1.1, in front of `up`.
fn h2_tls_apex(up: SocketAddr, rt: &str, dir: &TempDir) -> Apex {
    let (c, k, _) = cert_files(dir, "a", &["a.example.com"]);
    let yaml = proxy_config(&[up], "").replace(
        "address: 127.0.0.1:0",
        &format!(
            "address: 127.0.0.1:0\n    tls: {{ certificates: [ {{ cert: \"{c}\", key: \"{k}\" }} ], alpn: [h2, http/1.1] }}"
        ),
    );
    Apex::start(&yaml, rt)
}

/// The protocol shows in the metrics (requests by protocol, GOAWAYs by reason) and in the
/// access log (`HTTP/2.0`, as nginx writes it).
fn metrics_and_the_access_log_tell_h2_from_http1(rt: &str) {
    let up = Upstream::ok("ok");
    let dir = TempDir::new();
    let (c, k, _) = cert_files(&dir, "a", &["a.example.com"]);
    let log = dir.0.join("access.log");
    let yaml = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        &format!(
            "address: 127.0.0.1:0\n    tls: {{ certificates: [ {{ cert: \"{c}\", key: \"{k}\" }} ], alpn: [h2, http/1.1] }}"
        ),
    );
    let yaml = with_admin(&format!("access_log: {{ path: \"{}\" }}\n{yaml}", log.display()));
    let mut apex = Apex::start(&yaml, rt);
    let admin_at = admin_addr(&mut apex);
    block_on(async {
        let mut send = connect_tls(apex.addr).await;
        for _ in 0..2 {
            assert_eq!(request(&mut send, get("/m"), None).await.0.status, 200);
        }
    });
    let text = metrics(admin_at);
    assert_eq!(
        metric(&text, "apex_requests_by_protocol_total{protocol=\"h2\"}"),
        Some(2),
        "{text}"
    );
    assert_eq!(metric(&text, "apex_requests_by_protocol_total{protocol=\"http1\"}"), Some(0));
    apex.signal(libc::SIGTERM);
    assert_eq!(apex.wait_exit(), Some(0));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches("\"GET /m HTTP/2.0\" 200").count(), 2, "{logged}");
}

/// An echo upstream: answers with the request's head and body, so a test can see what
/// arrived.
/// Answers with the request's head as the upstream saw it, `--`, and its body.
fn echo_reply(r: &Received, w: &mut Wire) -> After {
    let mut body = r.head.clone().into_bytes();
    body.extend_from_slice(b"\r\n--\r\n");
    body.extend_from_slice(&r.body);
    w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    w.send(&body);
    After::KeepOpen
}

fn echo() -> Upstream {
    Upstream::start(echo_reply)
}

fn get_and_post_over_h2_reach_an_http1_upstream(rt: &str) {
    let up = echo();
    let dir = TempDir::new();
    let apex = h2_tls_apex(up.addr, rt, &dir);
    block_on(async {
        let mut send = connect_tls(apex.addr).await;
        let req = http::Request::get("https://a.example.com/x?y=1")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-custom", "v")
            .body(())
            .unwrap();
        let (parts, body) = request(&mut send, req, None).await;
        assert_eq!(parts.status, 200);
        assert!(parts.headers.get("connection").is_none(), "no connection field over h2");
        let seen = String::from_utf8(body).unwrap();
        let head = seen.split("\r\n--\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /x?y=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nhost: a.example.com\r\n"), ":authority becomes Host: {head}");
        assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "cookies joined: {head}");
        assert!(head.contains("\r\nx-forwarded-proto: https\r\n"), "{head}");
        // A body with a length, and one without (sent on as chunks).
        let upload = b"hello h2".to_vec();
        let req = http::Request::post("https://a.example.com/p")
            .header("content-length", upload.len())
            .body(())
            .unwrap();
        let (_, body) = request(&mut send, req, Some(upload.clone())).await;
        assert!(body.ends_with(b"\r\n--\r\nhello h2"), "{}", String::from_utf8_lossy(&body));
        let req = http::Request::post("https://a.example.com/p").body(()).unwrap();
        let (_, body) = request(&mut send, req, Some(upload)).await;
        let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        assert!(text.ends_with("\r\n--\r\nhello h2"), "{text}");
    });
    // The fake upstream reports a request after answering it: wait for each report.
    for _ in 0..3 {
        up.next();
    }
    assert!(up.drain().is_empty(), "three requests reached the upstream");
}

fn a_hundred_concurrent_streams_on_one_connection_all_complete(rt: &str) {
    // The upstream answers none until all 100 requests are in: streams served one after
    // another would never finish.
    let all_in = Arc::new(std::sync::Barrier::new(100));
    let up = Upstream::start(move |r, w| {
        all_in.wait();
        let line = r.request_line().to_string();
        w.send(
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}", line.len()).as_bytes(),
        );
        After::KeepOpen
    });
    let dir = TempDir::new();
    let apex = h2_tls_apex(up.addr, rt, &dir);
    block_on(async {
        let send = connect_tls(apex.addr).await;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let (parts, body) = request(&mut send, get(&format!("/s{i}")), None).await;
                (parts.status, body)
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200);
            let text = String::from_utf8_lossy(&body).to_string();
            assert!(text.starts_with(&format!("GET /s{i} HTTP/1.1")), "stream {i}: {text}");
        }
    });
}

fn large_bodies_stream_both_ways_with_bounded_memory(rt: &str) {
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let body = big.clone();
    let up = Upstream::start(move |r, w| {
        if r.request_line().starts_with("PUT") {
            let n = r.body.len().to_string();
            w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{n}", n.len()).as_bytes());
        } else {
            w.send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
            w.send(&body);
        }
        After::KeepOpen
    });
    let dir = TempDir::new();
    let apex = h2_tls_apex(up.addr, rt, &dir);
    block_on(async {
        let mut send = connect_tls(apex.addr).await;
        let peak_before = apex.peak_rss_kib();
        let (_, got) = request(&mut send, get("/big"), None).await;
        assert!(got == big, "8 MiB down over h2 ({} bytes)", got.len());
        let upload: Vec<u8> = (0..4u32 << 20).map(|i| (i % 241) as u8).collect();
        let req = http::Request::put("https://a.example.com/up").body(()).unwrap();
        let (_, got) = request(&mut send, req, Some(upload.clone())).await;
        assert_eq!(got, b"4194304", "4 MiB up over h2");
        let growth = apex.peak_rss_kib().saturating_sub(peak_before);
        assert!(growth < 2048, "peak RSS grew by {growth} KiB moving 8 MiB down and 4 MiB up");
    });
    // The fake upstream reports a request after answering it: wait for both reports.
    let seen = [up.next(), up.next()];
    let put = seen.into_iter().find(|r| r.request_line().starts_with("PUT")).unwrap();
    assert!(put.body.len() == 4 << 20, "the upload arrived whole");
}

/// A stream the client resets mid-response cancels its upstream request: the upstream
/// connection is closed, not pooled with half a response unread.
fn a_reset_stream_closes_its_upstream_connection(rt: &str) {
    let up = Upstream::start(|r, w| {
        if r.request_line().starts_with("GET /slow ") {
            // A head and part of the body; the rest never comes.
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial");
        } else {
            w.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
        After::KeepOpen
    });
    let dir = TempDir::new();
    let apex = h2_tls_apex(up.addr, rt, &dir);
    // The client's runtime outlives the async part, so its connection stays open while the
    // test waits on the upstream: what closes the upstream connection is the reset alone.
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    client.block_on(async {
        let mut send = connect_tls(apex.addr).await;
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _) = ready.send_request(get("/slow"), true).unwrap();
        let (_, mut recv) = resp.await.unwrap().into_parts();
        let first = recv.data().await.unwrap().unwrap();
        assert_eq!(&first[..], b"partial");
        drop(recv); // the last handle: the client resets the stream (CANCEL)
                    // A later request on the same connection: the reset went out before it.
        let (parts, body) = request(&mut send, get("/after"), None).await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    });
    assert_eq!(up.next().request_line(), "GET /slow HTTP/1.1");
    assert_eq!(up.next().request_line(), "GET /after HTTP/1.1");
    assert_eq!(up.next_close(), Some(0), "the reset stream's upstream connection is closed");
    drop(client);
}

/// h2c by prior knowledge where the listener says so (HTTP/1.1 still works on the same port);
/// elsewhere the preface is just a bad HTTP/1.1 request.
fn h2c_works_by_prior_knowledge_only_where_turned_on(rt: &str) {
    let up = Upstream::ok("ok");
    let on = proxy_config(&[up.addr], "")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    http2: prior_knowledge");
    let apex = Apex::start(&on, rt);
    block_on(async {
        let mut send = connect_h2c(apex.addr).await.expect("h2c handshake");
        let req = http::Request::get(format!("http://{}/", apex.addr)).body(()).unwrap();
        let (parts, body) = request(&mut send, req, None).await;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));
    });
    let mut c = Wire::connect(apex.addr);
    assert_eq!(c.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200, "HTTP/1.1 too");
    let off = Apex::start(&proxy_config(&[up.addr], ""), rt);
    let refused = block_on(async {
        let Ok(send) = connect_h2c(off.addr).await else { return true };
        let Ok(mut ready) = send.ready().await else { return true };
        let req = http::Request::get("http://a/").body(()).unwrap();
        let Ok((resp, _)) = ready.send_request(req, true) else { return true };
        resp.await.is_err()
    });
    assert!(refused, "no h2c without prior_knowledge");
}

/// SIGTERM: GOAWAY, the stream in flight finishes whole, no new stream is served, and Apex
/// exits once it is done.
fn drain_sends_goaway_and_finishes_streams_in_flight(rt: &str) {
    let (up, arrived, release) = Upstream::held();
    let dir = TempDir::new();
    let mut apex = h2_tls_apex(up.addr, rt, &dir);
    block_on(async {
        let send = connect_tls(apex.addr).await;
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _) = ready.send_request(get("/hold"), true).unwrap();
        tokio::task::spawn_blocking(move || arrived.wait()).await.unwrap();
        apex.signal(libc::SIGTERM);
        apex.wait_for_log(&["draining: stopped accepting"]).expect("the worker began draining");
        tokio::task::spawn_blocking(move || release.wait()).await.unwrap();
        let (parts, mut recv) = resp.await.expect("the stream in flight finishes").into_parts();
        assert_eq!(parts.status, 200);
        let body = recv.data().await.unwrap().unwrap();
        assert_eq!(&body[..], b"done");
        let refused = match send.ready().await {
            Err(_) => true,
            Ok(mut s) => match s.send_request(get("/late"), true) {
                Err(_) => true,
                Ok((resp, _)) => resp.await.is_err(),
            },
        };
        assert!(refused, "no new stream after GOAWAY");
    });
    assert_eq!(apex.wait_exit(), Some(0));
}

/// A connection flooding PING frames (and reading the PONGs) does not keep the (single)
/// worker to itself: another client is accepted and served during the flood.
fn a_frame_flood_does_not_starve_other_connections(rt: &str) {
    let up = Upstream::ok("ok");
    // PINGs without the per-second cap, so that the flood goes on (the cap is tested below).
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: { prior_knowledge: true, max_pings_per_second: 1000000 }",
    );
    let apex = Apex::start(&on, rt);
    // The preface and an empty SETTINGS frame, then PING frames (9-byte header, 8 bytes).
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let flood = Flood::start(apex.addr, &start, ping.repeat(3855));
    let mut other = Wire::connect(apex.addr);
    let r = other.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    flood.stop();
    assert_eq!(r.status, 200, "served during the flood");
}

/// One HTTP/2 frame: 9-byte header, then the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame: its 9-byte header and its payload.
fn read_frame(w: &mut Wire) -> std::io::Result<([u8; 9], Vec<u8>)> {
    use std::io::Read;
    let mut head = [0u8; 9];
    w.stream.read_exact(&mut head)?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    w.stream.read_exact(&mut payload)?;
    Ok((head, payload))
}

/// Reads frames until a GOAWAY; returns its error code (`None`: closed without one).
fn goaway_code(w: &mut Wire) -> Option<u32> {
    loop {
        let (head, payload) = read_frame(w).ok()?;
        if head[3] == 7 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
    }
}

/// Each kind of frame `h2` lets through unbounded has a per-connection cap, and so do the
/// resets (rapid reset, CVE-2023-44487; MadeYouReset, CVE-2025-8671): over one, GOAWAY
/// ENHANCE_YOUR_CALM (0xb), counted by kind, while another client is served as usual.
fn each_flood_gets_goaway_enhance_your_calm(rt: &str) {
    let up = Upstream::ok("ok");
    // MadeYouReset's cap lowered from 500, so that the test sends a few frames.
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: { prior_knowledge: true, max_resets_sent: 10 }",
    );
    let mut apex = Apex::start(&with_admin(&on), rt);
    let admin_at = admin_addr(&mut apex);
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(4, 0, 0, b""));
    // HEADERS for stream 1 (GET / on authority "a", HPACK static entries), body to follow.
    let get = [0x82, 0x87, 0x84, 0x41, 0x01, b'a'];
    let open_stream = frame(1, 0x4, 1, &get);
    // Streams 1, 3, 5, ... each opened whole (END_STREAM) and then followed by `then`.
    let streams_then = |n: u32, then: &dyn Fn(u32) -> Vec<u8>| -> Vec<u8> {
        (0..n).flat_map(|i| [frame(1, 0x5, 2 * i + 1, &get), then(2 * i + 1)].concat()).collect()
    };
    // Rapid reset: each stream cancelled (RST_STREAM CANCEL) as soon as it is opened.
    let rapid_reset = streams_then(101, &|id| frame(3, 0, id, &[0, 0, 0, 8]));
    // MadeYouReset: a WINDOW_UPDATE that overflows each stream's window, a stream error
    // (FLOW_CONTROL_ERROR) Apex must answer with RST_STREAM.
    let made_you_reset = streams_then(11, &|id| frame(8, 0, id, &[0x7f, 0xff, 0xff, 0xff]));
    let floods: [(&str, Vec<u8>); 7] = [
        ("rst_stream", rapid_reset),
        ("reset_limits", made_you_reset),
        ("ping", frame(6, 0, 0, &[0; 8]).repeat(101)),
        ("settings", frame(4, 0, 0, b"").repeat(51)),
        ("empty_data", [open_stream, frame(0, 0, 1, b"").repeat(101)].concat()),
        ("window_update", frame(8, 0, 0, &[0, 0, 0, 1]).repeat(1001)),
        (
            "continuation",
            [frame(1, 0, 1, &get[..1]), frame(9, 0, 1, &get[1..2]).repeat(21)].concat(),
        ),
    ];
    for (kind, flood) in floods {
        let mut w = Wire::connect(apex.addr);
        w.send(&[start.clone(), flood].concat());
        assert_eq!(goaway_code(&mut w), Some(0xb), "{kind}: GOAWAY ENHANCE_YOUR_CALM");
        let mut other = Wire::connect(apex.addr);
        assert_eq!(other.request("GET / HTTP/1.1\r\nHost: a\r\n\r\n").status, 200, "{kind}");
        let text = metrics(admin_at);
        let series = format!("apex_h2_floods_total{{kind=\"{kind}\"}}");
        assert_eq!(metric(&text, &series), Some(1), "{kind}: {text}");
    }
    let text = metrics(admin_at);
    assert_eq!(metric(&text, "apex_h2_goaways_total{reason=\"flood\"}"), Some(7), "{text}");
}

/// A client that starts a header block and stalls inside it (no other frame may come between
/// its frames, so the whole connection stalls) is cut after the header timeout, long before
/// the keep-alive timeout, with a GOAWAY counted as `header_timeout`.
fn a_stalled_header_block_is_cut_after_the_header_timeout(rt: &str) {
    let up = Upstream::ok("ok");
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: prior_knowledge\n    header_timeout: 300ms\n    keepalive_timeout: 1h",
    );
    let mut apex = Apex::start(&with_admin(&on), rt);
    let admin_at = admin_addr(&mut apex);
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(4, 0, 0, b""));
    // HEADERS for stream 1 without END_HEADERS: the block goes on in a CONTINUATION that never
    // comes.
    let get = [0x82, 0x87, 0x84, 0x41, 0x01, b'a'];
    let mut w = Wire::connect(apex.addr);
    w.send(&[start, frame(1, 0x1, 1, &get[..3])].concat());
    let started = Instant::now();
    assert_eq!(goaway_code(&mut w), Some(0), "GOAWAY NO_ERROR");
    assert!(w.is_closed(), "and the connection closes");
    assert!(started.elapsed() < Duration::from_secs(5), "not at the keep-alive timeout");
    let text = metrics(admin_at);
    assert_eq!(
        metric(&text, "apex_h2_goaways_total{reason=\"header_timeout\"}"),
        Some(1),
        "{text}"
    );
    // A connection whose header blocks end is not cut, however long it then idles.
    let mut client = Wire::connect(apex.addr);
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(4, 0, 0, b""));
    client.send(&[start, frame(1, 0x5, 1, &get)].concat());
    // The response: frames up to one on stream 1 that ends it.
    loop {
        let (head, _) = read_frame(&mut client).expect("a response frame");
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        assert_ne!(head[3], 7, "GOAWAY instead of the response");
        if stream == 1 && head[4] & 0x1 != 0 {
            break;
        }
    }
    // Then nothing at all (no GOAWAY, no close) for well past the header timeout.
    use std::io::Read;
    client.stream.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let quiet = client.stream.read(&mut [0u8; 64]);
    assert!(
        quiet.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "cut although its header block ended: {quiet:?}"
    );
}

/// Header bytes decoded over a connection's life are capped (an HPACK bomb sends one byte per
/// field it makes Apex decode): past the cap, GOAWAY ENHANCE_YOUR_CALM, counted.
fn decoded_header_bytes_are_capped_per_connection(rt: &str) {
    let up = Upstream::ok("ok");
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: { prior_knowledge: true, max_decoded_header_bytes: 4KiB }",
    );
    let mut apex = Apex::start(&with_admin(&on), rt);
    let admin_at = admin_addr(&mut apex);
    let served = block_on(async {
        let send = connect_h2c(apex.addr).await.expect("h2c handshake");
        let big = "v".repeat(1000);
        let mut served = 0;
        for _ in 0..10 {
            let Ok(mut ready) = send.clone().ready().await else { break };
            let req = http::Request::get(format!("http://{}/", apex.addr))
                .header("x-big", big.as_str())
                .body(())
                .unwrap();
            let Ok((resp, _)) = ready.send_request(req, true) else { break };
            match resp.await {
                Ok(r) if r.status() == 200 => served += 1,
                _ => break,
            }
        }
        served
    });
    // About 1,100 bytes per request: three fit under 4 KiB, the fourth goes over.
    assert_eq!(served, 3, "requests served before the cap");
    let text = metrics(admin_at);
    let series = "apex_h2_floods_total{kind=\"decoded_headers\"}";
    assert_eq!(metric(&text, series), Some(1), "{text}");
}

/// A reload that removes the listener sends its h2 connections GOAWAY: the stream in flight
/// finishes, no new one is served.
fn removing_the_listener_sends_goaway_and_finishes_streams(rt: &str) {
    let (up, arrived, release) = Upstream::held();
    let yaml = proxy_config(&[up.addr], "")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    http2: prior_knowledge");
    let mut apex = Apex::start(&yaml, rt);
    let without = yaml.replace("name: test", "name: other");
    block_on(async {
        let send = connect_h2c(apex.addr).await.expect("h2c handshake");
        let mut ready = send.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/hold", apex.addr)).body(()).unwrap();
        let (resp, _) = ready.send_request(req, true).unwrap();
        tokio::task::spawn_blocking(move || arrived.wait()).await.unwrap();
        assert!(apex.reload_with(&without).contains("config reloaded"));
        apex.wait_for_log(&["listener closed", "listener=test"]).expect("listener removed");
        tokio::task::spawn_blocking(move || release.wait()).await.unwrap();
        let (parts, mut recv) = resp.await.expect("the stream in flight finishes").into_parts();
        assert_eq!(parts.status, 200);
        assert_eq!(&recv.data().await.unwrap().unwrap()[..], b"done");
        let refused = match send.ready().await {
            Err(_) => true,
            Ok(mut s) => {
                let req = http::Request::get("http://a/late").body(()).unwrap();
                match s.send_request(req, true) {
                    Err(_) => true,
                    Ok((resp, _)) => resp.await.is_err(),
                }
            }
        };
        assert!(refused, "no new stream after GOAWAY");
    });
}

/// A client that stops reading a response (it neither reads the socket nor opens the stream's
/// window) has that stream cut once a write to it has waited the listener's `send_timeout`:
/// its upstream connection is closed (the upstream can write no more), the stream ends in a
/// reset, not as a whole body, and the connection serves the next request.
fn a_stream_the_client_stops_reading_is_cut_after_the_send_timeout(rt: &str) {
    let up = Upstream::endless();
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: prior_knowledge\n    send_timeout: 1s",
    );
    let mut apex = Apex::start(&with_admin(&on), rt);
    let admin_at = admin_addr(&mut apex);
    // The client's runtime runs only inside `block_on`: while the test waits on the upstream,
    // nothing reads the client's socket.
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut send, mut recv) = client.block_on(async {
        let send = connect_h2c(apex.addr).await.expect("h2c");
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _) = ready.send_request(get("/chunked"), true).unwrap();
        let (parts, recv) = resp.await.unwrap().into_parts();
        assert_eq!(parts.status, 200);
        (send, recv)
    });
    assert_eq!(up.next().request_line(), "GET /chunked HTTP/1.1", "the upstream was cut");
    client.block_on(async {
        let ended = loop {
            match recv.data().await {
                Some(Ok(chunk)) => recv.flow_control().release_capacity(chunk.len()).unwrap(),
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        let reason = ended.expect("the stream ends in a reset, not as a whole body").reason();
        assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR));
        let (parts, body) = request(&mut send, get("/next"), None).await;
        assert_eq!(
            (parts.status.as_u16(), &body[..]),
            (200, &b"ok"[..]),
            "the connection serves on"
        );
    });
    assert_eq!(up.next().request_line(), "GET /next HTTP/1.1");
    assert_eq!(metric(&metrics(admin_at), "apex_client_send_timeouts_total"), Some(1));
    drop(client);
}

/// A connection Apex is closing (GOAWAY after the keep-alive timeout) whose client does not
/// let it finish (it never answers the PING that follows GOAWAY) is dropped once it has had no
/// stream for the send timeout, and counted.
fn a_closing_connection_the_client_does_not_finish_is_dropped(rt: &str) {
    let up = Upstream::ok("ok");
    let on = proxy_config(&[up.addr], "").replace(
        "address: 127.0.0.1:0",
        "address: 127.0.0.1:0\n    http2: prior_knowledge\n    keepalive_timeout: 1s\n    send_timeout: 1s",
    );
    let mut apex = Apex::start(&with_admin(&on), rt);
    let admin_at = admin_addr(&mut apex);
    let mut w = Wire::connect(apex.addr);
    w.send(&[&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &frame(4, 0, 0, b"")].concat());
    let mut kinds = Vec::new();
    let end = loop {
        match read_frame(&mut w) {
            Ok((head, _)) => kinds.push(head[3]),
            Err(e) => break e,
        }
    };
    assert!(kinds.contains(&7) && kinds.contains(&6), "GOAWAY and its PING: {kinds:?}");
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    assert!(matches!(end.kind(), UnexpectedEof | ConnectionReset), "closed, not kept: {end}");
    assert_eq!(metric(&metrics(admin_at), "apex_client_send_timeouts_total"), Some(1));
}

/// `te: trailers` is the one `te` an h2 request may carry (RFC 9113 §8.2.2) and is not sent on
/// (it is hop-by-hop in HTTP/1.1); any other `te` makes the request malformed: the stream is
/// reset (PROTOCOL_ERROR) and nothing reaches the upstream. Trailers are dropped both ways
/// (RFC 9110 §6.5.1 lets a proxy discard them): a request's body still arrives whole, chunked,
/// and a response's body ends with its last DATA frame.
fn trailers_and_te_are_handled_as_rfc_9113_says(rt: &str) {
    let up = Upstream::start(|r, w| {
        if r.request_line().starts_with("GET /trailers ") {
            w.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n");
            return After::KeepOpen;
        }
        echo_reply(r, w)
    });
    let on = proxy_config(&[up.addr], "")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    http2: prior_knowledge");
    let apex = Apex::start(&on, rt);
    block_on(async {
        let send = connect_h2c(apex.addr).await.expect("h2c");
        // A POST with `te: trailers`, a body of no stated length, then trailers.
        let req = http::Request::post("http://a/echo").header("te", "trailers").body(()).unwrap();
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, mut body) = ready.send_request(req, false).unwrap();
        body.send_data(Bytes::from_static(b"hello"), false).unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-check", "1".parse().unwrap());
        body.send_trailers(trailers).unwrap();
        let (parts, mut recv) = resp.await.unwrap().into_parts();
        assert_eq!(parts.status, 200);
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            recv.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        let seen = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let (head, sent) = seen.split_once("\r\n--\r\n").unwrap();
        assert!(!head.contains("\r\nte:"), "te is not sent on: {head}");
        assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
        assert_eq!(sent, "hello", "the body whole, its trailers dropped");
        // A response with trailers: the body whole, no trailers after it.
        let mut ready = send.clone().ready().await.unwrap();
        let (resp, _) = ready.send_request(get("/trailers"), true).unwrap();
        let (_, mut recv) = resp.await.unwrap().into_parts();
        let mut got = Vec::new();
        while let Some(chunk) = recv.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"hello");
        assert!(recv.trailers().await.unwrap().is_none(), "the upstream's trailers are dropped");
    });
    assert_eq!(up.next().body, b"hello", "the upstream read the chunked body whole");
    assert_eq!(up.next().request_line(), "GET /trailers HTTP/1.1");
    // `te: gzip` (an HPACK literal), raw: the h2 client refuses to send it.
    let mut w = Wire::connect(apex.addr);
    let te_gzip =
        [0x82, 0x87, 0x84, 0x41, 0x01, b'a', 0x00, 0x02, b't', b'e', 0x04, b'g', b'z', b'i', b'p'];
    w.send(
        &[
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            &frame(4, 0, 0, b""),
            &frame(1, 0x5, 1, &te_gzip),
        ]
        .concat(),
    );
    let reset = loop {
        let (head, payload) = read_frame(&mut w).expect("a reset before the connection ends");
        if head[3] == 3 {
            break u32::from_be_bytes(payload[..4].try_into().unwrap());
        }
        assert_ne!(head[3], 1, "no response HEADERS for a malformed request");
    };
    assert_eq!(reset, 1, "RST_STREAM PROTOCOL_ERROR");
    let mut other = Wire::connect(apex.addr);
    assert_eq!(other.request("GET /after HTTP/1.1\r\nHost: a\r\n\r\n").status, 200);
    assert_eq!(up.next().request_line(), "GET /after HTTP/1.1", "the malformed one never came");
}

under_each_driver!(
    trailers_and_te_are_handled_as_rfc_9113_says,
    a_stream_the_client_stops_reading_is_cut_after_the_send_timeout,
    a_closing_connection_the_client_does_not_finish_is_dropped,
    a_stalled_header_block_is_cut_after_the_header_timeout,
    removing_the_listener_sends_goaway_and_finishes_streams,
    decoded_header_bytes_are_capped_per_connection,
    each_flood_gets_goaway_enhance_your_calm,
    a_frame_flood_does_not_starve_other_connections,
    metrics_and_the_access_log_tell_h2_from_http1,
    drain_sends_goaway_and_finishes_streams_in_flight,
    get_and_post_over_h2_reach_an_http1_upstream,
    a_hundred_concurrent_streams_on_one_connection_all_complete,
    large_bodies_stream_both_ways_with_bounded_memory,
    a_reset_stream_closes_its_upstream_connection,
    h2c_works_by_prior_knowledge_only_where_turned_on,
);
