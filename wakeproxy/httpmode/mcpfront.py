"""MCP sessions in front of a service (mode http): what the proxy answers itself while
the server sleeps, and what it learns from the server's answers that pass through.

One ``McpFront`` per listener (a service, or a replicated service's pool) holds its
sessions (``core.sessions``) and what its server answered to set-up
(``httpmode.mcp.Learned``, kept by ``httpmode.mcpstore``). The connection
(``httpmode.client``) asks ``answer`` whether the proxy answers a request itself; for a
request that goes to the server, ``route_to`` says whether the server must be told the
session first (``materialize``: the client's initialize replayed, ``httpmode.replay``)
and which id to write into it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from ..core.sessions import MINTED, Session, Sessions, mint
from .heads import Head
from .mcp import (
    Answer,
    Kind,
    Message,
    answer_bytes,
    credentials,
    error_body,
    pong,
)
from .mcpnote import Backend, Expected, endpoint_of
from .mcpstore import McpStore
from .replay import ReplayFailed, replay

if TYPE_CHECKING:
    from ..config.model import HttpSettings, McpConfig

log = logging.getLogger("wakeproxy.mcp")

# A session's initialize and initialized (head and body) are kept for a replay up to
# this size each (a real initialize is well under 1 KiB); a larger initialize is
# forwarded, never answered here (it could not be replayed).
MAX_KEPT = 4 * 1024
# Live sessions one connection may hold (a client pipelining initialize requests to
# flush the table is refused past this; its address past sessions_per_client).
PER_CONNECTION = 100


class McpFront:
    """One listener's MCP sessions and learned answers (see the module's docstring)."""

    def __init__(self, name: str, settings: HttpSettings, store: McpStore, cfg: McpConfig) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.learned = store.of(name)
        self.sessions = Sessions(limit=cfg.max_sessions, per_peer=cfg.sessions_per_client)
        # Traffic was MCP (a JSON-RPC message, a session): every connection's answers
        # are then followed, so each initialize is learned from and kept for a replay.
        self.seen = False
        # What the proxy answered itself, by method; sessions opened on a server after
        # the proxy answered their start (materialized) or after their server lost them
        # (resumed); replays the server refused.
        self.answered: collections.Counter[str] = collections.Counter()
        self.materialized = 0
        self.resumed = 0
        self.replays_failed = 0
        self._opening: dict[tuple[bytes, int], asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Set by the listener's owner: whether the server holding a session (a
        # replica's name; None: the service, or for replicas any) sleeps now, so
        # set-up is answered here; and a replica's incarnation now (None: gone).
        self.asleep: Callable[[str | None], bool] = lambda _: False
        self.incarnation_of: Callable[[str], int | None] = lambda _: None

    def __repr__(self) -> str:
        return (
            f"<McpFront {self.name} learned={self.learned.versions()} "
            f"sessions={len(self.sessions)} answered={sum(self.answered.values())}>"
        )

    @property
    def on(self) -> bool:
        return self.settings.mcp != "off"

    @property
    def resume(self) -> bool:
        return self.settings.mcp_resume

    def fronts(self) -> bool:
        """Whether there is anything MCP to show (on, or sessions pinned with it off)."""
        return self.on or len(self.sessions) > 0

    # ---- what the proxy answers itself

    def answer(
        self, head: Head, message: Message | None, request: bytes, peer: str, opener: int
    ) -> bytes | None:
        """The proxy's own answer to a request (session set-up while the server sleeps,
        a session it knows nothing of, a session too many), or None: the request goes
        to the server. ``message``: a POST's; None for a GET or DELETE. ``request``: its
        head (as it would be forwarded) and body. ``opener``: the connection (a number
        unique in the process). Called only when nothing of that connection is with the
        server: an answer of the proxy's own would overtake that response."""
        self.seen = True
        now = time.monotonic()
        endpoint = endpoint_of(head)
        sid = head.session
        found = self.sessions.get(sid, now) if sid else None
        if sid and found is None:
            if MINTED.fullmatch(sid):
                # One of the proxy's own that it no longer holds (a restart, an
                # eviction): the server never knew it. The spec: start a new session.
                request_id = message.id if message is not None and message.id else b"null"
                body = error_body(-32001, "Session not found", request_id)
                return self._count("unknown session", answer_bytes(404, body))
            return None  # the server's to answer
        if found is not None:
            return self._of_session(head, message, request, found[0], found[1], endpoint)
        if message is None:
            return None
        kind = message.kind
        if kind is Kind.INITIALIZE:
            return self._initialize(head, message, request, peer, opener, now, endpoint)
        # Set-up of no session yet: answered while the server (for replicas, every
        # replica: a session is placed with its first real request) sleeps.
        if not (self.asleep(None) and self._admits(head, endpoint)):
            return None
        if kind is Kind.DISCOVER:
            learned = self.learned.discover.get(head.get(b"mcp-protocol-version").decode("latin-1"))
            if learned is None:
                return None
            body = learned.body(message.id)
            reply = answer_bytes(learned.status, body, content_type=learned.content_type)
            return self._count(kind.value, reply)
        if kind in (Kind.INITIALIZED, Kind.PING) and self.learned.known:
            return self._setup_reply(message)  # a stateless server's session
        return None

    def _of_session(
        self,
        head: Head,
        message: Message | None,
        request: bytes,
        sid: bytes,
        session: Session,
        endpoint: str,
    ) -> bytes | None:
        """A request of a session the proxy holds: answered here while no server knows
        it yet, or while its server sleeps; set-up only, on its own endpoint."""
        if endpoint != session.endpoint:
            return None
        if message is not None and message.kind is Kind.INITIALIZED and not session.initialized:
            session.initialized = request if len(request) <= MAX_KEPT else b""
        if session.incarnation and not self.asleep(session.replica):
            return None
        if head.method == b"GET":
            # The server-to-client stream: optional (the spec allows 405).
            reply = answer_bytes(405, b"", extra=(("Allow", "POST, DELETE"),))
            return self._count("GET", reply)
        if head.method == b"DELETE":
            self.sessions.end(sid)
            return self._count("DELETE", answer_bytes(200, b""))
        if message is not None and message.kind in (Kind.INITIALIZED, Kind.PING):
            return self._setup_reply(message)
        return None

    def _initialize(
        self,
        head: Head,
        message: Message,
        request: bytes,
        peer: str,
        opener: int,
        now: float,
        endpoint: str,
    ) -> bytes | None:
        if not self._admit(peer, opener, now):
            body = error_body(-32000, "too many sessions from this client", message.id)
            return answer_bytes(429, body, extra=(("Retry-After", "1"),))
        learned = self.learned.initialize.get(message.version)
        if learned is None or not self.asleep(None) or not self._admits(head, endpoint):
            return None
        session = b""
        if learned.stateful:
            if len(request) > MAX_KEPT:
                return None  # it could not be opened on the server later: forwarded
            session = mint()
            cred = credentials(head.get, head.query)
            kept = Session(
                peer, now, opener=opener, init=request, endpoint=endpoint, credentials=cred
            )
            if not self.sessions.add(session, kept):
                return None
        reply = answer_bytes(200, learned.body(message.id), session=session)
        return self._count(message.kind.value, reply)

    def _setup_reply(self, message: Message) -> bytes:
        if message.kind is Kind.INITIALIZED:
            return self._count(message.kind.value, answer_bytes(202, b""))
        return self._count(message.kind.value, answer_bytes(200, pong(message.id)))

    def _admits(self, head: Head, endpoint: str) -> bool:
        return self.learned.admits(endpoint, credentials(head.get, head.query))

    def _admit(self, peer: str, opener: int, now: float) -> bool:
        """Whether this client may open one more session (logged when not, and when an
        idle one had to make room)."""
        evicted = self.sessions.evicted
        if self.sessions.admit(peer, now, opener, PER_CONNECTION):
            if self.sessions.evicted != evicted and _worth_saying(self.sessions.evicted):
                log.warning(
                    "%s: the MCP session table is full (%d); an idle session was dropped for "
                    "a new one (%d so far)",
                    self.name,
                    self.sessions.limit,
                    self.sessions.evicted,
                    extra={"service": self.name},
                )
            return True
        if _worth_saying(self.sessions.refused):
            log.warning(
                "%s: a new MCP session of %s refused: too many open (%d refused so far)",
                self.name,
                peer,
                self.sessions.refused,
                extra={"service": self.name},
            )
        return False

    def _count(self, what: str, reply: bytes) -> bytes:
        self.answered[what] += 1
        return reply

    # ---- what the server answered (through ResponseTracker notes)

    def expect(
        self, head: Head, message: Message, request: bytes, peer: str, opener: int
    ) -> Expected:
        """The note for a forwarded POST whose answer matters."""
        self.seen = True
        kept = request if message.kind is Kind.INITIALIZE and len(request) <= MAX_KEPT else b""
        return Expected(self, message, head, kept, peer, opener)

    def learn(self, kind: Kind, key: str, endpoint: str, cred: bytes, answer: Answer) -> None:
        if key and self.learned.learn(kind, key, endpoint, cred, answer):
            log.info(
                "%s: learned the server's answer to %s (%s): %s",
                self.name,
                kind.value,
                key,
                self.learned.server_name() or "unnamed",
                extra={"service": self.name},
            )
            self.store.changed()

    def refused(self, endpoint: str, cred: bytes) -> None:
        if self.learned.refused(endpoint, cred):
            self.store.changed()

    def opened(self, sid: bytes, expected: Expected) -> None:
        """A session the server opened (its answer to a forwarded initialize)."""
        backend = expected.backend
        assert backend is not None
        session = Session(
            expected.peer,
            time.monotonic(),
            replica=self._replica(backend),
            incarnation=backend.incarnation,
            backend=sid,
            init=expected.request,
            opener=expected.opener,
            endpoint=expected.endpoint,
            credentials=expected.credentials,
        )
        self.sessions.add(sid, session)

    def seen_in_answer(self, sid: bytes, peer: str, backend: Backend, *, stream: bool) -> None:
        """Replicas: an answer of ``backend`` named a session (its header; an SSE stream's
        endpoint event): pinned there. One with an open stream lives with its stream."""
        if not stream and self.sessions.get(sid, time.monotonic()) is not None:
            return
        replica = self._replica(backend)
        session = Session(
            peer, time.monotonic(), replica, backend.incarnation, sid, streaming=stream
        )
        self.sessions.add(sid, session)

    def _replica(self, backend: Backend) -> str | None:
        return backend.name if backend.name != self.name else None

    # ---- opening a session on the server

    def route_to(self, sid: bytes, backend: Backend) -> tuple[Session | None, bytes]:
        """For a request naming ``sid`` that goes to ``backend``: the session to open
        there first (the backend does not know it and its initialize is held: a
        virtual session's first real request, or a resume unless ``mcp_resume: false``),
        else the id to write into the request instead of the client's (b"": as is)."""
        found = self.sessions.get(sid, time.monotonic())
        if found is None:
            return None, b""
        _, session = found
        if session.known_to(backend.incarnation):
            return None, session.backend if session.backend != sid else b""
        if not session.init or (session.incarnation and not self.resume):
            return None, b""  # forwarded as it is: the server answers 404
        home = session.replica
        if home not in (None, backend.name) and self.incarnation_of(home) == session.incarnation:
            # Its own replica still holds it (this connection was placed elsewhere by
            # an earlier request): never a second copy of it. The server it reaches
            # answers for it.
            return None, b""
        return session, b""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # Keep a reference: an unreferenced pending task can be collected mid-flight.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def materialize(self, sid: bytes, session: Session, backend: Backend) -> bytes:
        """Wake ``backend``, open ``session`` there with its client's initialize and
        initialized, and return the server's id for it (b"": a stateless server).
        One replay per session and incarnation, however many requests wait for it."""
        key = (sid, backend.incarnation)
        pending = self._opening.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._opening[key] = pending
            task = self.spawn(self._open(sid, session, backend, pending))
            task.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(pending)

    async def _open(
        self, sid: bytes, session: Session, backend: Backend, done: asyncio.Future[bytes]
    ) -> None:
        try:
            done.set_result(await self._replay(sid, session, backend))
        except Exception as exc:
            done.set_exception(exc)
        finally:
            if not done.done():
                done.cancel()  # the proxy is shutting down: nobody waits in vain

    async def _replay(self, sid: bytes, session: Session, backend: Backend) -> bytes:
        resumed = session.incarnation != 0
        await backend.wake(f"MCP session {sid[:16].decode('latin-1')}")
        incarnation = backend.incarnation  # a restart during the replay: not this one
        address = backend.backend
        if address is None:
            raise ReplayFailed(502, b"", "the backend has no address")
        try:
            opened = await asyncio.wait_for(replay(address, session), backend.cfg.wake_timeout)
        except ReplayFailed as exc:
            self.replays_failed += 1
            self.sessions.end(sid)
            log.warning(
                "%s: the server refused session %s's replayed initialize: %s",
                backend.name,
                sid[:16].decode("latin-1"),
                exc,
                extra={"service": backend.name},
            )
            raise
        server_id, message = opened
        self.sessions.materialized(sid, server_id or sid, incarnation, self._replica(backend))
        if resumed:
            self.resumed += 1
        else:
            self.materialized += 1
        # The server may answer differently now (an upgrade): what clients see next.
        version = _asked_version(session.init)
        if version:
            answer = Answer(200, "application/json", message, stateful=bool(server_id))
            self.learn(Kind.INITIALIZE, version, session.endpoint, session.credentials, answer)
        return server_id


def _worth_saying(count: int) -> bool:
    """Log a repeated event at its 1st, 10th, 100th, then every 1000th time."""
    return count in (1, 10, 100) or count % 1000 == 0


def _asked_version(init: bytes) -> str:
    """The protocol version a kept initialize asked for."""
    try:
        params = orjson.loads(init[init.index(b"\r\n\r\n") + 4 :])["params"]
    except (ValueError, KeyError, TypeError):
        return ""
    version = params.get("protocolVersion") if isinstance(params, dict) else None
    return version if isinstance(version, str) else ""
