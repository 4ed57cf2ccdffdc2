"""A small test backend with a deep listen backlog (busybox httpd's is 9).

Modes:
  http    answers every request with a small 200 response (keep-alive); reads a
          Content-Length or chunked body; GET /echo-head answers with the request head
          itself, POST /echo with the request body (either framing); GET /gzip-chunked
          streams --size bytes as "Transfer-Encoding: gzip, chunked" (framing h11 cannot
          follow), 64 KiB every --delay seconds; GET /slow sends a 10-byte body a byte
          every --delay seconds; POST /accept answers 202 (a result that comes later);
          a request with "Connection: upgrade" (101) or CONNECT (200) then echoes raw bytes
          (an upgrade to /no-upgrade is answered 200 and stays HTTP)
  echo    echoes bytes back; on EOF it finishes its writes and half-closes
  peer    first sends "peer HOST:PORT\n", the client's address as it sees it (the kernel's
          fast path hands it the client's own), then echoes as echo does
  source  sends --size pseudo-random bytes (seeded by --seed), then closes
  sink    reads everything slowly (--delay between reads), then sends the SHA-256 hex
--hold MIB  keeps MIB of pseudo-random heap (hibernation tests); GET /checksum answers
          its SHA-256, reading every page of it
--term-delay S  on SIGTERM, exits only S seconds later (a backend slow to stop)
Runs standalone (``python3 server.py --port P --mode echo``) so the process runtime
and containers can start it; stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import signal

HEAP: list[bytes] = []


def payload(seed: int, size: int, chunk: int = 1 << 20):
    """Deterministic bytes: the test computes the same stream to compare."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


async def send_gzip_chunked(writer, args) -> None:
    """A valid response an intermediary cannot frame: chunked inside another coding."""
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    for block in payload(args.seed, args.size, 64 * 1024):
        writer.write(b"%x\r\n" % len(block) + block + b"\r\n")
        await writer.drain()
        await asyncio.sleep(args.delay)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def send_slowly(writer, args) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):
        await writer.drain()
        await asyncio.sleep(args.delay)
        writer.write(b"x")


async def accept_for_later(writer, args) -> None:
    writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")


SPECIAL = {b"/gzip-chunked": send_gzip_chunked, b"/slow": send_slowly, b"/accept": accept_for_later}


async def handle(reader, writer, args) -> None:
    try:
        if args.mode == "http":
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lowered = head.lower()
                received = b""
                for line in lowered.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        received = await reader.readexactly(int(line.split(b":", 1)[1]))
                if b"transfer-encoding: chunked" in lowered:
                    while size := int((await reader.readline()).split(b";")[0], 16):
                        received += (await reader.readexactly(size + 2))[:-2]
                    await reader.readline()  # the blank line after the last chunk
                # /echo-head answers with the request head as the proxy sent it.
                parts = head.split(b" ", 2)
                target = parts[1] if len(parts) > 1 else b""
                asks = b"connection: upgrade" in lowered or head.startswith(b"CONNECT ")
                if asks and target != b"/no-upgrade":  # /no-upgrade: answered as HTTP
                    # Another protocol from here on: echo raw bytes (WebSocket, a tunnel).
                    tunnel = head.startswith(b"CONNECT ")
                    status = b"200 OK" if tunnel else b"101 Switching Protocols"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nConnection: upgrade\r\n\r\n")
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
                    break
                if target in SPECIAL:
                    await SPECIAL[target](writer, args)
                    await writer.drain()
                    if b"connection: close" in lowered:
                        break
                    continue
                if target == b"/checksum":
                    digest = hashlib.sha256()
                    for block in HEAP:
                        digest.update(block)
                    body = digest.hexdigest().encode()
                else:
                    body = {b"/echo-head": head, b"/echo": received}.get(target, args.body.encode())
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        elif args.mode in ("echo", "peer"):
            if args.mode == "peer":
                host, port = writer.get_extra_info("peername")[:2]
                writer.write(f"peer {host}:{port}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        elif args.mode == "source":
            for block in payload(args.seed, args.size):
                writer.write(block)
                await writer.drain()
        elif args.mode == "sink":
            digest = hashlib.sha256()
            while data := await reader.read(65536):
                digest.update(data)
                if args.delay:
                    await asyncio.sleep(args.delay)
            writer.write(digest.hexdigest().encode())
            await writer.drain()
    except (asyncio.IncompleteReadError, OSError):  # a client gone mid-way (reset, ENOTCONN)
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--mode", choices=["http", "echo", "peer", "source", "sink"], default="http"
    )
    parser.add_argument("--body", default="hello from the backend\n")
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument("--term-delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.term_delay:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGTERM, lambda: loop.call_later(args.term_delay, os._exit, 0)
        )
    HEAP.extend(payload(args.seed, args.hold << 20))
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args), args.host, args.port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
