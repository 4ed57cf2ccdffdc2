"""A server that answers 200 to every request its HTTP parser accepts whole (head and
body), and 400 to what it refuses: the differential corpus's backends
(tests/test_http_corpus.py).

``strict.py --port P --parser h11|stdlib``: ``h11`` is h11's own server parser (the
reference the proxy was built on); ``stdlib`` is Python's http.server
(BaseHTTPRequestHandler, reading a Content-Length body; it knows no chunked bodies).
"""

from __future__ import annotations

import argparse
import asyncio
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def h11_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    reply = BAD
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), 5)
                conn.receive_data(data)
                if not data:
                    break
                continue
            if isinstance(event, h11.EndOfMessage):
                reply = OK
                break
            if isinstance(event, h11.ConnectionClosed):
                break
    except (h11.RemoteProtocolError, TimeoutError):
        pass
    writer.write(reply)
    await writer.drain()
    writer.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _any(self) -> None:
        length = self.headers.get("Content-Length")
        try:
            if length:
                self.rfile.read(int(length))
        except (ValueError, OverflowError):  # what http.server itself would do with it
            self.wfile.write(BAD)
        else:
            self.wfile.write(OK)
        self.close_connection = True

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = do_OPTIONS = _any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parser", choices=["h11", "stdlib"], required=True)
    args = parser.parse_args()
    if args.parser == "stdlib":
        ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
        return

    async def serve() -> None:
        server = await asyncio.start_server(h11_client, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
