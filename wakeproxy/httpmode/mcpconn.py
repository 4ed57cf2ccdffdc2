"""The MCP part of reading a mode-http client connection (streamable HTTP, see
``mcpfront``): a JSON POST read whole before anything is decided, a session's requests
routed to the server's id for it, a request held while its session opens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.states import Outcome
from .conn import READ_HEAD, READ_MESSAGE, HttpConnection, HttpOwner
from .heads import Head, with_header
from .mcp import MAX_MESSAGE, Message, classify
from .mcpnote import Backend
from .replay import ReplayFailed

if TYPE_CHECKING:
    from ..core.sessions import Session
    from .mcpfront import McpFront
    from .mcpnote import Expected


class McpConnection(HttpConnection):
    __slots__ = ()

    def __init__(self, owner: HttpOwner) -> None:
        super().__init__(owner)
        if owner.replicated:
            self.tracker.on_session = self._session_seen

    def _forward(
        self,
        head: Head,
        raw: bytes,
        activity: bool,
        *,
        counted: bool = True,
        body: bytes = b"",
        note: Expected | None = None,
        outgoing: bool = False,
    ) -> None:
        """The request goes to the backend (``counted``: whether it is activity is known
        now; else at the end of its body; ``outgoing``: ``raw`` has the proxy's
        forwarded headers already)."""
        self._request_activity = activity
        self._need_backend(activity and counted)
        if self.answered:
            return  # refused on the way (a limit, no replica)
        if not outgoing:
            raw = self._outgoing(raw, head)
        if self._follow:
            if note is not None:
                note.backend = self._placed()
            self.tracker.expect(head.method, note)
            if head.upgrade:
                self.tracker.upgrading()
        session = head.session
        if session and self.mcp is not None and not head.upgrade:
            opening, write_as = self.mcp.route_to(session, self._placed())
            if opening is not None:
                self._open_session(session, opening, raw, body)
                return
            if write_as:
                raw = with_header(raw, b"Mcp-Session-Id", write_as)
            if head.method == b"DELETE":
                self.mcp.sessions.end(session)
        self._send_up(raw + body if body else raw)
        if counted and activity:
            self._count_request()
        if head.upgrade:
            # Another protocol only once the server agrees (101; a 2xx to CONNECT): the
            # client sends nothing but the request's body before that answer, so what
            # comes after it waits for the answer.
            if head.has_body:
                self._upgrade_after_body = True
            else:
                self._suspended = True

    def _mcp_head(self, head: Head, raw: bytes) -> bool:
        """An MCP request: a JSON POST is read whole before anything is decided; a GET
        or DELETE naming a session is decided now. False: not MCP's (a body to frame,
        an upgrade, a client waiting for 100 Continue)."""
        if head.upgrade or head.get(b"expect"):
            return False
        method = head.method
        if method == b"POST":
            if (
                head.chunked
                or not 0 < head.length <= MAX_MESSAGE
                or b"json" not in head.get(b"content-type")
            ):
                return False
            self._message = (head, raw)
            self._body = bytearray()
            self._phase, self._remaining = READ_MESSAGE, head.length
            return True
        if method in (b"GET", b"DELETE") and head.session and not head.has_body:
            self._mcp_request(head, raw, b"", None)
            return True
        return False

    def _message_body(self, data: bytes, pos: int) -> int:
        body = self._body
        assert body is not None and self._message is not None
        stop = min(len(data), pos + self._remaining)
        if not body and stop - pos == self._remaining:
            whole = data[pos:stop]  # the common case: all of it in one read, one copy
        else:
            body += data[pos:stop]
            self._remaining -= stop - pos
            if self._remaining:
                return stop
            whole = bytes(body)
        self._remaining = 0
        (head, raw), self._message, self._body = self._message, None, None
        self._phase = READ_HEAD
        self._cancel_header_timeout()
        message = classify(whole, head.get(b"mcp-method"))
        self._mcp_request(head, raw, whole, message)
        return stop

    def _mcp_request(self, head: Head, raw: bytes, body: bytes, message: Message | None) -> None:
        front = self.mcp
        assert front is not None
        raw = self._outgoing(raw, head)
        request, peer = raw + body, self._client_address()
        # Only when nothing of this connection is with the backend: an answer of the
        # proxy's own would overtake that response.
        if self._quiet:
            reply = front.answer(head, message, request, peer, self._id)
            if reply is not None:
                self._reply(reply, head)
                return
        # Set-up and streams are never activity: only real work keeps a server awake.
        activity = message is not None and message.activity
        note = None
        if message is not None:
            note = front.expect(head, message, request, peer, self._id)
        self._forward(head, raw, activity, body=body, note=note, outgoing=True)

    def _open_session(self, sid: bytes, session: Session, raw: bytes, body: bytes) -> None:
        """Hold this request (and what follows it) while its session is opened on the
        backend it goes to; then write the server's id into it and send it."""
        front = self.mcp
        assert front is not None
        self._suspended = True
        backend = self._placed()
        front.spawn(self._opening(front, sid, session, backend, raw, body))

    async def _opening(
        self,
        front: McpFront,
        sid: bytes,
        session: Session,
        backend: Backend,
        raw: bytes,
        body: bytes,
    ) -> None:
        try:
            server_id = await front.materialize(sid, session, backend)
        except ReplayFailed as exc:
            if not self.closed and not self.answered:
                self.owner.record(self, Outcome.BACKEND_ERROR, exc.status)
                if exc.answer:
                    self._write_answer(exc.answer, close=True)
                else:
                    self._error(502, f"the backend refused the session: {exc}")
            return
        except TimeoutError:
            if not self.closed and not self.answered:
                status = self._error(504, "the backend did not open the session in time")
                self.owner.record(self, Outcome.WAKE_TIMEOUT, status)
            return
        except Exception:  # the wake failed: the held connection was answered for it
            if not self.closed and not self.answered:
                self.owner.record(self, Outcome.BACKEND_ERROR, self._error(502, "the wake failed"))
            return
        if self.closed or self.answered:
            return
        if server_id and server_id != sid:
            raw = with_header(raw, b"Mcp-Session-Id", server_id)
        self._send_up(raw + body)
        self._count_request()
        self._go_on()

    def _session_seen(self, session: bytes, stream: bool) -> None:
        """Replicas: a response named an MCP session (its header; an SSE stream's
        endpoint event): it is pinned to the replica this connection is on."""
        front = self.mcp
        if front is None:
            return
        if stream:
            self.sse_session = session
        backend = self._placed()
        front.seen_in_answer(session, self._client_address(), backend, stream=stream)
