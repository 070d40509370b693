//! WebSocket and other upgrades through Apex, with a real WebSocket client and server
//! (tungstenite): the 101 is relayed, then bytes flow both ways until either side closes.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::*;
use tungstenite::{accept, client, Message};

/// A WebSocket echo server on 127.0.0.1:0: every message comes back; a text message "close"
/// makes the server close the connection itself. Its thread's panics fail the test through
/// the returned channel.
fn echo_server() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (fail, failures) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(stream) = stream else { continue };
            let fail = fail.clone();
            std::thread::spawn(move || {
                let mut ws = match accept(stream) {
                    Ok(ws) => ws,
                    Err(e) => {
                        let _ = fail.send(format!("handshake: {e}"));
                        return;
                    }
                };
                loop {
                    match ws.read() {
                        Ok(Message::Text(t)) if t.as_str() == "close" => {
                            let _ = ws.close(None);
                            let _ = ws.flush();
                        }
                        Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                            if ws.send(m).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    (addr, failures)
}

fn ws_config(upstream: SocketAddr, route_extra: &str) -> String {
    config(
        &format!("  - match: {{ path_prefix: \"/\" }}\n    cluster: ws\n{route_extra}"),
        &format!("  - name: ws\n    endpoints: [\"{upstream}\"]"),
    )
}

fn connect_ws(apex: SocketAddr) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(apex).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let (ws, resp) = client(format!("ws://{apex}/chat"), stream).expect("handshake through Apex");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

fn messages_cross_in_order_and_large_ones_whole(rt: &str) {
    let (up, failures) = echo_server();
    let mut admin_yaml = with_admin(&ws_config(up, ""));
    admin_yaml.push('\n');
    let mut apex = Apex::start(&admin_yaml, rt);
    let admin_at = admin_addr(&mut apex);
    let mut ws = connect_ws(apex.addr);
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "the 1 MiB message came back whole"),
        other => panic!("{other:?}"),
    }
    for i in 0..1000 {
        ws.send(Message::Text(format!("m{i}"))).unwrap();
    }
    for i in 0..1000 {
        match ws.read().unwrap() {
            Message::Text(t) => assert_eq!(t.as_str(), format!("m{i}"), "in order"),
            other => panic!("{other:?}"),
        }
    }
    let text = metrics(admin_at);
    assert_eq!(metric(&text, "apex_tunnels_open"), Some(1), "{text}");
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert!(failures.try_recv().is_err(), "the echo server saw no error");
}

fn a_server_initiated_close_reaches_the_client(rt: &str) {
    let (up, _failures) = echo_server();
    let apex = Apex::start(&ws_config(up, ""), rt);
    let mut ws = connect_ws(apex.addr);
    ws.send(Message::Text("close".into())).unwrap();
    match ws.read() {
        Ok(Message::Close(_)) => {}
        Ok(other) => panic!("expected the server's close, got {other:?}"),
        Err(e) => panic!("expected the server's close frame, got {e}"),
    }
}

/// A tunnel outlives the listener's keep-alive timeout; its own idle timeout closes it.
fn an_idle_tunnel_stays_open_until_its_own_timeout(rt: &str) {
    let (up, _failures) = echo_server();
    let yaml = ws_config(up, "    tunnel_idle_timeout: 1s\n")
        .replace("address: 127.0.0.1:0", "address: 127.0.0.1:0\n    keepalive_timeout: 100ms");
    let apex = Apex::start(&yaml, rt);
    let mut ws = connect_ws(apex.addr);
    // Quiet for several keep-alive timeouts: a read timeout is the proof it stayed open.
    ws.get_mut().set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the idle tunnel must stay open: {other:?}"),
    }
    ws.get_mut().set_read_timeout(Some(PATIENCE)).unwrap();
    ws.send(Message::Text("still here".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("still here".into()));
    // Now idle past tunnel_idle_timeout: Apex closes it.
    let started = std::time::Instant::now();
    assert!(ws.read().is_err(), "closed after the tunnel idle timeout");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
}

/// An upgrade the upstream declines is relayed as a normal response, and the connection
/// stays HTTP.
fn a_refused_upgrade_is_a_normal_response(rt: &str) {
    let up = Upstream::start(|r, w| {
        assert_eq!(r.header("upgrade").as_deref(), Some("websocket"), "forwarded: {}", r.head);
        w.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno");
        After::KeepOpen
    });
    let apex = Apex::start(&ws_config(up.addr, ""), rt);
    let mut c = Wire::connect(apex.addr);
    let handshake = "GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let r = c.request(handshake);
    assert_eq!((r.status, r.text().as_str()), (403, "no"));
    assert_eq!(c.request(handshake).status, 403, "the connection is still HTTP");
    let got = up.next();
    assert!(got.head.to_ascii_lowercase().contains("connection: upgrade"), "{}", got.head);
}

/// A route that forwards no upgrade strips the fields; the upstream sees a plain request.
fn a_route_without_the_upgrade_strips_it(rt: &str) {
    let up = Upstream::ok("plain");
    let apex = Apex::start(&ws_config(up.addr, "    upgrade: []\n"), rt);
    let mut c = Wire::connect(apex.addr);
    let r = c.request(
        "GET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let got = up.next();
    assert_eq!(got.header("upgrade"), None, "{}", got.head);
}

/// FIN from either side is passed on, and the other direction keeps flowing.
fn half_close_is_passed_on(rt: &str) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // ends when the client's FIN arrives through Apex
        s.write_all(b"after your fin: ").unwrap();
        s.write_all(&got).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    let apex = Apex::start(&ws_config(up, ""), rt);
    let mut c = Wire::connect(apex.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
    let head = c.read_head().unwrap().unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    c.send(b"raw bytes");
    c.stream.shutdown(Shutdown::Write).unwrap();
    let rest = c.read_to_end().unwrap();
    assert_eq!(rest, b"after your fin: raw bytes");
    server.join().expect("the raw upstream's thread");
}

under_each_driver!(
    messages_cross_in_order_and_large_ones_whole,
    a_server_initiated_close_reaches_the_client,
    an_idle_tunnel_stays_open_until_its_own_timeout,
    a_refused_upgrade_is_a_normal_response,
    a_route_without_the_upgrade_strips_it,
    half_close_is_passed_on,
);
