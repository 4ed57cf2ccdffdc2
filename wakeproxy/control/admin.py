"""The admin HTTP server: h11 over asyncio streams, in the proxy's own process.

Not a hot path, so streams keep it readable. Hostile clients are bounded: a request
head over 16 KiB gets 431, a malformed one 400, a request (head and body) not complete
within 10 s 408, a body over 1 MiB 413; each is answered and the connection closed, and nothing here
touches the data path. Routing and decisions live in ``api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import h11
import orjson

from ..config import AdminConfig, is_loopback
from ..errors import ConfigError
from .api import Api, Response

if TYPE_CHECKING:
    from .running import Running

log = logging.getLogger("wakeproxy.admin")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
HEAD_TIMEOUT = 10.0
TOKEN_ENV = "WAKEPROXY_ADMIN_TOKEN"


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_token(cfg: AdminConfig) -> str | None:
    """The bearer token: $WAKEPROXY_ADMIN_TOKEN wins over admin.token_file; whitespace stripped."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if cfg.token_file is not None:
        try:
            token = Path(cfg.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [f"admin.token_file: cannot read {cfg.token_file}: {exc.strerror or exc}"]
            ) from None
        if not token:
            raise ConfigError([f"admin.token_file: {cfg.token_file} is empty"])
        return token
    return None


def checked_token(cfg: AdminConfig) -> str | None:
    """The token, or ConfigError: an unreadable token file, or a public admin address
    without a token (anyone who reaches it could pause or stop services)."""
    token = load_token(cfg)
    if token is None and not is_loopback(cfg.listen.host):
        raise ConfigError(
            [
                f"admin.listen: {cfg.listen} is not a loopback address and no admin token is "
                f"set: anyone who reaches it could pause or stop services. Set {TOKEN_ENV} "
                "or admin.token_file, or listen on 127.0.0.1"
            ]
        )
    return token


class AdminServer:
    def __init__(self, proxy: Running, cfg: AdminConfig) -> None:
        self.cfg = cfg
        token = checked_token(cfg)
        self.api = Api(proxy, token=token, protect_reads=cfg.protect_reads)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        listen = self.cfg.listen
        self._server = await asyncio.start_server(
            self._serve, listen.host, listen.port, reuse_address=True, limit=MAX_HEAD
        )
        log.info("admin API on http://%s", listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                received = await self._next_request(conn, reader)
                if received is None:
                    break
                request, body = received
                response = await self._dispatch(request, body)
                self._send(conn, writer, response, head_only=request.method == b"HEAD")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except _Reject as exc:
            with contextlib.suppress(OSError):
                writer.write(_raw_error(exc.status, str(exc)))
                await writer.drain()
        except (OSError, h11.LocalProtocolError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def _next_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        """Read one request (head within HEAD_TIMEOUT, body up to MAX_BODY)."""
        request: h11.Request | None = None
        body: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEAD_TIMEOUT
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                reason = (
                    "request head over 16 KiB" if status == 431 else f"malformed request: {exc}"
                )
                raise _Reject(status, reason) from None
            if event is h11.NEED_DATA:
                try:
                    # The body is bounded too (admin bodies are small JSON): a client
                    # trickling bytes cannot hold a task for ever.
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(65536)
                except TimeoutError:
                    what = "request head" if request is None else "request body"
                    raise _Reject(408, f"no complete {what} within 10 s") from None
                if not data and conn.their_state is h11.IDLE:
                    return None
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                # h11 bounds only an incomplete head; a complete one that arrived in a
                # single read is measured here.
                if _head_size(event) > MAX_HEAD:
                    raise _Reject(431, "request head over 16 KiB")
                request = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise _Reject(413, "request body over 1 MiB")
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, b"".join(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: h11.Request, body: bytes) -> Response:
        target = urlsplit(request.target.decode("latin-1"))
        query = dict(parse_qsl(target.query))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        method = request.method.decode("latin-1")
        try:
            return await self.api.handle(method, target.path, query, headers, body)
        except Exception:
            log.exception("admin API: %s %s failed", method, target.path)
            return Response(500, orjson.dumps({"error": "internal error; see the proxy's log"}))

    @staticmethod
    def _send(
        conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, head_only: bool
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        if not head_only:
            writer.write(conn.send(h11.Data(data=response.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")


def _head_size(request: h11.Request) -> int:
    line = len(request.method) + len(request.target) + 11
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


def _raw_error(status: int, message: str) -> bytes:
    # The h11 state is unusable after a protocol error: answer by hand, then close.
    body = orjson.dumps({"error": message})
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body
