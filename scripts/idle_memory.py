#!/usr/bin/env python3
"""RSS growth of a proxy per idle keep-alive client connection.

    idle_memory.py PORT PID [CONNECTIONS] [tls]      (default 5000, plaintext)

Opens CONNECTIONS keep-alive connections to 127.0.0.1:PORT (over TLS, certificate unchecked,
with `tls`), sends one request on each and reads its response, then leaves them all idle and
reports the growth of the RSS of PID (summed with its children, for nginx) divided by the
number of connections, in KiB. Closes everything.
"""
import socket
import ssl
import sys


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


def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    tls = len(sys.argv) > 4 and sys.argv[4] == "tls"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = b"GET /64 HTTP/1.1\r\nHost: bench\r\n\r\n"
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = context.wrap_socket(s, server_hostname="localhost")
        s.settimeout(5)
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
    after = rss_kib(pid)
    print(f"connections={n} rss_before_kib={before} rss_after_kib={after} "
          f"kib_per_connection={(after - before) / n:.2f}")
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
