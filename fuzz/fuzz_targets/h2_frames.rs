//! Arbitrary bytes after the HTTP/2 preface, fed to the h2 server side as Apex runs it: through
//! Apex's frame guard (its flood limits, at their defaults), into an `h2` server with the
//! listener's default settings, each accepted stream translated by Apex's bridge and answered.
//! Never a panic; memory stays bounded (libFuzzer's RSS limit).
#![no_main]

use std::time::{Duration, Instant};

use apex::config::defaults::HTTP2;
use apex::http::h2_bridge::{encode_request_head, parse_response_head};
use apex::http::h2_guard::FrameGuard;
use apex::proxy::http2::{h2_builder, PREFACE};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    // What reaches h2: the frames up to the first one the guard refuses.
    let mut guard = FrameGuard::new(HTTP2.floods);
    let mut passed = PREFACE.to_vec();
    for chunk in data.chunks(64) {
        if guard.feed(chunk, Instant::now()).is_err() {
            break;
        }
        passed.extend_from_slice(chunk);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let feed = tokio::spawn(async move {
            let _ = client.write_all(&passed).await;
            // End of input: the server's accept ends once it has read everything.
            let _ = client.shutdown().await;
            // Keep reading what the server writes, so it never blocks on a full pipe.
            let mut sink = vec![0u8; 16384];
            loop {
                match tokio::io::AsyncReadExt::read(&mut client, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        let serve = async move {
            let Ok(mut conn) = h2_builder(&HTTP2).handshake::<_, Bytes>(server).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let (parts, body) = req.into_parts();
                let mut head = Vec::new();
                let _ = encode_request_head(&parts, body.is_end_stream(), &mut head);
                let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                if let Ok(Some(start)) = parse_response_head(raw, false) {
                    let _ = respond.send_response(start.response, true);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), serve).await;
        feed.abort();
    });
});
