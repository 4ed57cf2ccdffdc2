"""The note on a forwarded MCP request whose answer the proxy reads (``ResponseTracker``
notes): what the answer teaches its ``McpFront`` (a learned set-up answer, a session the
server opened, credentials it refused)."""

from __future__ import annotations

from typing import Protocol

import orjson

from ..config import Address, ServiceConfig
from ..core.states import State
from .heads import Head
from .mcp import Answer, Kind, Message, credentials, response_in


class Backend(Protocol):
    """The backend a session is opened on (a service, or one replica)."""

    @property
    def name(self) -> str: ...

    @property
    def incarnation(self) -> int: ...

    @property
    def backend(self) -> Address | None: ...

    @property
    def cfg(self) -> ServiceConfig: ...

    @property
    def state(self) -> State: ...

    @property
    def upstream_keepalive(self) -> bool: ...

    async def wake(self, reason: str = ...) -> None: ...


class AnswerHead(Protocol):
    """An answer's head as a note reads it (``tracker.ResponseHead``)."""

    status: int

    def get(self, name: bytes) -> bytes: ...


class Front(Protocol):
    """What a note's answer tells its listener's ``McpFront``."""

    def learn(self, kind: Kind, key: str, endpoint: str, cred: bytes, answer: Answer) -> None: ...

    def refused(self, endpoint: str, cred: bytes) -> None: ...

    def opened(self, sid: bytes, expected: Expected) -> None: ...


def endpoint_of(head: Head) -> str:
    """The MCP endpoint a request went to: its path."""
    return head.path.decode("latin-1")


class Expected:
    """A forwarded request whose answer the proxy reads (ResponseTracker notes): set-up
    to learn from, an initialize whose session to keep, a request whose 202 may mean a
    result still due (HTTP+SSE). What its head says is read only if its answer asks."""

    __slots__ = ("backend", "front", "head", "message", "opener", "peer", "request")

    def __init__(
        self, front: Front, message: Message, head: Head, request: bytes, peer: str, opener: int
    ) -> None:
        self.front, self.message, self.head = front, message, head
        self.request = request  # an initialize, kept for a replay of its session
        self.peer, self.opener = peer, opener
        self.backend: Backend | None = None

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.head)

    @property
    def key(self) -> str:
        """The protocol version it was asked in."""
        if self.message.kind is Kind.DISCOVER:
            return self.head.get(b"mcp-protocol-version").decode("latin-1")
        return self.message.version

    @property
    def credentials(self) -> bytes:
        return credentials(self.head.get, self.head.query)

    @property
    def expects_result(self) -> bool:
        return self.message.expects_result

    @property
    def reads_body(self) -> bool:
        kind = self.message.kind
        return kind is Kind.INITIALIZE or kind is Kind.DISCOVER

    def answered(
        self,
        head: AnswerHead,
        body: bytes,
        *,
        content_type: bytes | None = None,
        final: bool = True,
    ) -> bool:
        """The answer arrived (its body up to MAX_MESSAGE; with ``final`` False, an
        event stream's as far as it came): True once it was taken in (False: the
        stream's JSON-RPC response is not there yet). Its headers are read only when
        what it answered asks (most answers are read for their status alone)."""
        front, kind, status = self.front, self.message.kind, head.status
        reads = self.reads_body
        message = None
        if reads:
            if content_type is None:
                content_type = head.get(b"content-type")
            message = response_in(content_type, body, self.message.id)
            if message is None and not final:
                return False
        if status in (401, 403):
            front.refused(self.endpoint, self.credentials)
            return True
        if kind is not Kind.INITIALIZE and message is None:
            return True
        session = head.get(b"mcp-session-id")
        if kind is Kind.INITIALIZE and 200 <= status < 300 and session and self.backend:
            front.opened(session, self)
        # Learned: an initialize's result; discover's answer, a legacy server's error
        # too. Never a server's fault.
        if (
            message is None
            or status >= 500
            or (kind is Kind.INITIALIZE and "result" not in message)
        ):
            return True
        answer = Answer(
            200 if kind is Kind.INITIALIZE else status,
            "application/json",
            message,
            echo_id=orjson.dumps(message.get("id")) == self.message.id,
            stateful=bool(session),
        )
        front.learn(kind, self.key, self.endpoint, self.credentials, answer)
        return True
