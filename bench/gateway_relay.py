"""The relay of the gateway bench (bench/gateway.py): bytes between the gateway and
wakeproxy's ports, unchanged, with a count per service of what the gateway sent and the
statuses it got back. Loopback only."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from datetime import UTC, datetime
from typing import IO

from bench.peers import free_port

REQUEST_LINE = re.compile(rb"(GET|POST|DELETE|PUT) /\S* HTTP/1\.1\r\n")
RPC_METHOD = re.compile(rb'"method":"([^"]+)"')
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


class Relay:
    """Bytes between the gateway and wakeproxy's ports, unchanged; counts per service what
    the gateway sent (HTTP GET/DELETE, JSON-RPC methods) and the statuses it got back, and
    writes every chunk to ``trace`` when given."""

    def __init__(self, trace: IO[str] | None) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.trace = trace
        self._servers: list[asyncio.Server] = []
        self._ids = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, service: str, target: int) -> int:
        port = free_port()
        self.counts[service] = Counter()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._ids += 1
            cid = f"{service}#{self._ids}"
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError as exc:
                self._log(cid, "!", repr(exc).encode())
                writer.close()
                return
            await asyncio.gather(
                self._pipe(service, cid, ">", reader, up_writer),
                self._pipe(service, cid, "<", up_reader, writer),
            )

        server = await asyncio.start_server(handle, "127.0.0.1", port)
        self._servers.append(server)
        return port

    async def _pipe(
        self,
        service: str,
        cid: str,
        way: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        counts = self.counts[service]
        tail = b""
        try:
            for _ in range(1_000_000):  # a bound; a relayed connection is far shorter
                data = await reader.read(65536)
                if not data:
                    break
                self._log(cid, way, data)
                text = tail + data
                patterns = [(STATUS_LINE, "status ")]
                if way == ">":
                    patterns = [(REQUEST_LINE, ""), (RPC_METHOD, "")]
                for pattern, prefix in patterns:
                    for match in pattern.finditer(text):
                        if match.end() > len(tail) and match[1] != b"POST":
                            counts[prefix + match[1].decode()] += 1
                tail = text[-64:]
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _log(self, cid: str, way: str, data: bytes) -> None:
        if self.trace is not None:
            stamp = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
            self.trace.write(f"{stamp} {cid} {way} {data[:2000]!r}\n")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
