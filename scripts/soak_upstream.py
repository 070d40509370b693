#!/usr/bin/env python3
"""A misbehaving HTTP/1.1 upstream for scripts/soak.sh.

    soak_upstream.py PORT MODE      MODE: idle-close | close-after-read | delay

idle-close:       keeps connections alive, but closes each one after a random idle time
                  (0.05-1.5 s), the way a server's keep-alive timeout does.
close-after-read: on a connection that already answered a request, closes one request in
                  five right after reading it, without answering (the keep-alive race).
delay:            answers every request after a random 0-30 ms.
"""
import asyncio
import random
import sys

BODY = b"soak ok\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s" % (len(BODY), BODY)


async def read_head(reader, timeout):
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def serve(reader, writer, mode):
    served = 0
    try:
        while True:
            idle = random.uniform(0.05, 1.5) if mode == "idle-close" else 3600
            try:
                await read_head(reader, idle)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            if mode == "close-after-read" and served > 0 and random.random() < 0.2:
                return
            if mode == "delay":
                await asyncio.sleep(random.uniform(0, 0.03))
            writer.write(RESPONSE)
            await writer.drain()
            served += 1
    finally:
        writer.close()


async def main():
    port, mode = int(sys.argv[1]), sys.argv[2]
    server = await asyncio.start_server(lambda r, w: serve(r, w, mode), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
