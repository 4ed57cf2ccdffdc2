"""The Python a mode-http request costs, without sockets: the client connection's reading
(``HttpClientSide``) fed one request at a time, and for the MCP mix the backend side's
(``HttpUpstreamSide``) fed one answer each, with stand-ins for the service and the
transports. What is left of a row's CPU a request is the runtime's I/O (compare with the
row's figures in bench/RESULTS.md). Best of 3 passes; under py-spy it shows where the
Python goes::

    .venv/bin/python -m bench.httpcost [same|varied|mcp] [--requests N]
    py-spy record -r 2000 -o cost.svg -- .venv/bin/python -m bench.httpcost mcp

No traffic leaves the process.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from wakeproxy.config import HttpSettings
from wakeproxy.config.model import McpConfig
from wakeproxy.core.states import State
from wakeproxy.httpmode.client import HttpClientSide
from wakeproxy.httpmode.mcpfront import McpFront
from wakeproxy.httpmode.mcpstore import McpStore
from wakeproxy.net.forward import UpstreamSide

# nginx's answer to the MCP mix (bench/nginx.conf): an event stream framed by length.
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 14:00:00 GMT\r\n"
    b"Content-Type: text/event-stream\r\nContent-Length: 112\r\nConnection: keep-alive\r\n\r\n"
) + b"x" * 112


class Service:
    """The least a connection asks of its service: awake, no probes, nothing counted."""

    idle_connection_timeout = 0.0
    wake_on_connect = False
    state = State.RUNNING
    http = HttpSettings()
    probe_rules = ()
    idle_delay = 60.0
    replicated = False
    name = "bench"
    incarnation = 1
    upstream_keepalive = False

    def __init__(self, mcp: McpFront | None) -> None:
        self.mcp = mcp

    def connection_made(self, conn: object) -> bool:
        return True

    def head_started(self) -> bool:
        return True

    def stream_started(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        # Everything else a connection reports (needs_backend, request_seen, record...).
        return lambda *args, **kwargs: None


class Transport:
    """Counts what is written to it; answers the peer's address."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def requests(kind: str, count: int) -> list[bytes]:
    if kind == "same":
        return [b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"] * count
    if kind == "varied":
        return [b"GET /?q=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n" % i for i in range(count)]
    out = []
    for i in range(count):  # bench/mcp_mix.lua's requests, 1 KiB bodies
        body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":' % i
        body += b'{"name":"echo","arguments":{"text":"' + b"x" * 900 + b'"}}}'
        head = (
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            b"Mcp-Session-Id: bench-session-%02d\r\nMcp-Protocol-Version: 2025-06-18\r\n"
            b"Content-Length: %d\r\n\r\n" % (i % 16, len(body))
        )
        out.append(head + body)
    return out


async def cost(kind: str, count: int) -> float:
    """Microseconds of Python a request (and its answer, for ``mcp``), best of 3."""
    front = None
    if kind == "mcp":
        store = McpStore(McpConfig(state_file=None))
        front = McpFront("bench", HttpSettings(), store, McpConfig())
    service = Service(front)
    conn = HttpClientSide(service)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    up, down = Transport(), Transport()
    conn.upstream, conn.backend = up, service  # type: ignore[assignment]
    batch = requests(kind, count)
    conn.data_received(batch[0])  # the first request places the connection
    upstream: UpstreamSide = conn.upstream_protocol()
    upstream.client_transport = down
    if kind == "mcp":
        upstream.data_received(ANSWER)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for request in batch:
            conn.data_received(request)
            if kind == "mcp":
                upstream.data_received(ANSWER)
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    # A path that refused or held the requests would cost less and mean nothing.
    if up.written != len(batch[0]) + 3 * sum(map(len, batch)) or conn.answered:
        raise RuntimeError(f"{kind}: not every request was forwarded ({up.written} bytes)")
    if kind == "mcp" and (down.written != (1 + 3 * count) * len(ANSWER) or conn.tracker.inflight):
        raise RuntimeError(f"{kind}: not every answer was followed ({down.written} bytes)")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", nargs="*", default=["same", "varied", "mcp"])
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    for kind in args.kind:
        us = asyncio.run(cost(kind, args.requests))
        print(f"{kind}: {us:.2f} us of Python a request")


if __name__ == "__main__":
    main()
