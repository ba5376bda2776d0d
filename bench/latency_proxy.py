#!/usr/bin/env python3
"""A TCP proxy that adds latency to every request, as a cloud region's object store does: the
first bytes a client sends after its connection was quiet (a new HTTP request on a kept-alive
connection, or a new connection) are held back DELAY_MS before they are passed on; the rest of a
request (an upload's body) and every answer flow at once. So each request waits about DELAY_MS
before its first byte, whatever its size, which is what 10 to 30 ms to first byte in a region
costs a tool that waits on one request at a time. bench/rivals.py puts it between its TLS
terminator and Garage (store "s3lat"), for every tool alike.

Usage: latency_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS
"""
import asyncio
import socket
import sys
import time

# A gap this long in what the client sends starts a new request.
QUIET = 0.002


async def pipe(reader, writer, delay):
    last = 0.0
    try:
        while True:
            data = await reader.read(1 << 18)
            if not data:
                break
            now = time.monotonic()
            if delay and now - last > QUIET:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            last = time.monotonic()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def serve(listen, target, delay):
    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        for w in (cw, sw):
            s = w.get_extra_info("socket")
            if s is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(cr, sw, delay), pipe(sr, cw, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen, target, delay_ms / 1000.0))
