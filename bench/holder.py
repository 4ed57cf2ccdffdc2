"""A backend that holds memory: ``python bench/holder.py --port P --hold MIB``.

GET / answers a few bytes (a small request); GET /checksum reads every page of the
heap and answers its SHA-256 (a request touching all its memory). Stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(1)
    heap = [rng.randbytes(1 << 20) for _ in range(args.hold)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # One request per connection, then close: the bench reads to EOF.
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /checksum"):
                digest = hashlib.sha256()
                for block in heap:
                    digest.update(block)
                body = digest.hexdigest().encode()
            else:
                body = b"ok\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
