"""Opening an MCP session on a server that does not know it: its client's own
``initialize`` sent again, then its ``notifications/initialized`` under the id the
server gave. Each on a connection of its own, parsed with h11; off the byte path."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h11

from .heads import with_header, without_header
from .mcp import MAX_MESSAGE, response_in

if TYPE_CHECKING:
    from ..config import Address
    from ..core.sessions import Session


class ReplayFailed(Exception):
    """The server refused a session's replayed initialize: the client gets its answer
    (``answer``: the server's whole response; b"" when it gave none)."""

    def __init__(self, status: int, answer: bytes, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.answer = answer


def split(request: bytes) -> tuple[bytes, bytes]:
    """A request's head (through its blank line) and body."""
    cut = request.index(b"\r\n\r\n") + 4
    return request[:cut], request[cut:]


async def replay(address: Address, session: Session) -> tuple[bytes, dict[str, Any]]:
    """Send a session's initialize to the server, then its initialized under the id the
    server gave: the server's id (b"" for a stateless server) and its initialize answer.
    ReplayFailed with the server's own answer when it refuses."""
    status, headers, body, raw = await _exchange(address, session.init)
    content_type = headers.get(b"content-type", b"")
    message = response_in(content_type, body, b"")
    if not 200 <= status < 300 or message is None or "result" not in message:
        raise ReplayFailed(status, raw, f"it answered {status or 'nothing'}")
    server_id = headers.get(b"mcp-session-id", b"")
    if session.initialized or server_id:
        initialized = session.initialized or initialized_for(session.init)
        if server_id:
            head, rest = split(initialized)
            initialized = with_header(head, b"Mcp-Session-Id", server_id) + rest
        status, _, _, raw = await _exchange(address, initialized)
        if not 200 <= status < 300:
            raise ReplayFailed(status, raw, f"its initialized got {status or 'nothing'}")
    return server_id, message


def initialized_for(init: bytes) -> bytes:
    """A notifications/initialized made from a session's initialize (for a client that
    sent none before its first request)."""
    head, _ = split(init)
    body = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    head = without_header(head, b"Mcp-Method")
    head = with_header(head, b"Content-Length", str(len(body)).encode())
    return head + body


async def _exchange(
    address: Address, request: bytes
) -> tuple[int, dict[bytes, bytes], bytes, bytes]:
    """One request on a connection of its own: status (0: none came), headers (names
    lowercased), the body (up to MAX_MESSAGE), and the whole answer as raw bytes
    (likewise cut) to hand to a client when the server refused."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(request)
        parser = h11.Connection(h11.CLIENT)
        # The request went out raw: tell h11 it did (a POST with its Content-Length).
        _, body = split(request)
        length = ("Content-Length", str(len(body)))
        parser.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), length]))
        parser.send(h11.Data(data=body))
        parser.send(h11.EndOfMessage())
        status, headers, received, raw = 0, {}, bytearray(), bytearray()
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                raw += data[: MAX_MESSAGE * 2 - len(raw)]
                parser.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.lower(): v for k, v in event.headers}
            elif isinstance(event, h11.Data):
                received += event.data[: MAX_MESSAGE - len(received)]
                content_type = headers.get(b"content-type", b"")
                if b"text/event-stream" in content_type and response_in(
                    content_type, bytes(received), b""
                ):
                    break  # the answer came; the stream may stay open
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return status, headers, bytes(received), bytes(raw)
    except h11.ProtocolError as exc:
        raise ReplayFailed(502, b"", f"its answer is not HTTP ({exc})") from exc
    finally:
        writer.close()
