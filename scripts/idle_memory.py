#!/usr/bin/env python3
"""RSS growth of a proxy per idle keep-alive client connection.

    idle_memory.py PORT PID [CONNECTIONS] [tls|h2c|h2]      (default 5000, HTTP/1.1 plaintext)

Opens CONNECTIONS keep-alive connections to 127.0.0.1:PORT (over TLS, certificate unchecked,
with `tls`; HTTP/2 by prior knowledge with `h2c`, or over TLS with ALPN h2 with `h2`, using the
`h2` package from PyPI), sends one request on each and reads its response, then leaves them all idle and
reports the growth of the RSS of PID (summed with its children, for nginx) divided by the
number of connections, in KiB, read once they have been idle IDLE_SETTLE seconds (default 3).
Closes everything.
"""
import os
import socket
import ssl
import sys
import time


def rss_kib(pid):
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def h2_request(s):
    """One GET over a new HTTP/2 connection on socket `s`; returns the connection state, which
    must stay alive with the socket."""
    import h2.config
    import h2.connection
    import h2.events

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":path", "/64"), (":authority", "bench"),
                       (":scheme", "http")], end_stream=True)
    s.sendall(c.data_to_send())
    while True:
        data = s.recv(65536)
        if not data:
            raise SystemExit("connection closed before a response")
        ended = any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1
                    for e in c.receive_data(data))
        out = c.data_to_send()
        if out:
            s.sendall(out)
        if ended:
            return c


def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    mode = sys.argv[4] if len(sys.argv) > 4 else "plain"
    settle = float(os.environ.get("IDLE_SETTLE", "3"))
    tls = mode in ("tls", "h2")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if mode == "h2":
        context.set_alpn_protocols(["h2"])
    request = b"GET /64 HTTP/1.1\r\nHost: bench\r\n\r\n"
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = context.wrap_socket(s, server_hostname="localhost")
        s.settimeout(5)
        if mode in ("h2c", "h2"):
            conns.append((s, h2_request(s)))
            continue
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("connection closed before a response")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            body += s.recv(4096)
        conns.append(s)
    # Idle means idle: the RSS is read once the connections have waited `settle` seconds
    # (IDLE_SETTLE, default 3), past Apex's park_after (1 s) and the trim after it, as a
    # keep-alive connection between a client's page loads waits seconds to a minute.
    time.sleep(settle)
    after = rss_kib(pid)
    print(f"connections={n} rss_before_kib={before} rss_after_kib={after} "
          f"kib_per_connection={(after - before) / n:.2f}")
    for s in conns:
        (s[0] if isinstance(s, tuple) else s).close()


if __name__ == "__main__":
    main()
