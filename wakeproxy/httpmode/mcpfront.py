"""MCP sessions in front of a service (mode http): what the proxy answers itself while
the server sleeps, and the replay that opens a session on the server when real work
comes for it.

One ``McpFront`` per listener (a service, or a replicated service's pool) holds its
sessions (``core.sessions``) and what its server answered to set-up
(``httpmode.mcp.Learned``); ``McpStore`` keeps every service's learned answers across
restarts in one small state file. The connection (``httpmode.client``) asks
``answer`` whether the proxy answers a request itself, and for a request that goes to
the server, ``materialize`` makes sure the server knows its session first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import h11
import orjson

from ..config import Address, ServiceConfig
from ..core.sessions import MINTED, Session, Sessions, mint
from ..statefile import read_bounded, write_atomically
from .heads import Head, with_header
from .mcp import (
    MAX_MESSAGE,
    Answer,
    Kind,
    Learned,
    Message,
    answer_bytes,
    error_body,
    pong,
    response_in,
)

if TYPE_CHECKING:
    from ..config.model import HttpSettings, McpConfig

log = logging.getLogger("wakeproxy.mcp")

STATE_VERSION = 1
# A near-full state (4,096 services, a few versions each) is well under this.
MAX_STATE = 16 * 1024 * 1024
MAX_SERVICES = 4096
# A session's initialize and initialized (head and body) are kept for a replay up to
# this size each; a larger one is answered and forwarded, not resumable.
MAX_KEPT = 16 * 1024
# Changes are saved this long after the first one (a burst of handshakes: one write).
SAVE_DELAY = 2.0
# Sessions one connection may open (a client pipelining initialize requests to flush
# the table is refused past this, its other connections past sessions_per_client).
PER_CONNECTION = 100


class ReplayFailed(Exception):
    """The server refused a session's replayed initialize: the client gets its answer."""

    def __init__(self, status: int, answer: bytes, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.answer = answer


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

    async def wake(self, reason: str = ...) -> None: ...


class McpStore:
    """Every service's learned set-up answers, read once at start, saved after changes
    (in a thread: the loop never waits for the disk)."""

    def __init__(self, cfg: McpConfig) -> None:
        self.cfg = cfg
        self.learned: dict[str, Learned] = {}
        self._save: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._error: str | None = None

    async def load(self) -> None:
        path = self.cfg.state_file
        if path is None:
            return
        try:
            data = await asyncio.to_thread(read_bounded, path, MAX_STATE)
            self.learned = _from_state(orjson.loads(data))
        except FileNotFoundError:
            log.info("mcp: no state at %s yet; learning from the servers' answers", path)
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            log.warning("mcp: state %s not used (%s); learning anew", path, exc)
        else:
            log.info("mcp: state %s read (%d service(s))", path, len(self.learned))

    def of(self, name: str) -> Learned:
        learned = self.learned.get(name)
        if learned is None:
            learned = self.learned[name] = Learned()
        return learned

    def changed(self) -> None:
        if self.cfg.state_file is None or self._save is not None:
            return
        loop = asyncio.get_running_loop()
        self._save = loop.call_later(SAVE_DELAY, self._start_save)

    def _start_save(self) -> None:
        self._save = None
        if self._writing is not None:  # one write at a time; this change comes next
            self.changed()
            return
        self._writing = asyncio.get_running_loop().create_task(self._write())
        self._writing.add_done_callback(lambda _: setattr(self, "_writing", None))

    async def _write(self) -> None:
        path = self.cfg.state_file
        assert path is not None
        data = orjson.dumps(_to_state(self.learned))
        try:
            await asyncio.to_thread(write_atomically, path, data)
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._error:
                log.warning("mcp: cannot write %s (%s); kept in memory", path, why)
            self._error = why
        else:
            self._error = None

    async def close(self) -> None:
        """At shutdown: a pending change is written now."""
        pending = self._save is not None
        if self._save is not None:
            self._save.cancel()
            self._save = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        if pending:
            await self._write()


def _to_state(learned: dict[str, Learned]) -> dict[str, Any]:
    known = {name: entry for name, entry in learned.items() if entry.known}
    names = sorted(known)[:MAX_SERVICES]
    return {"version": STATE_VERSION, "services": {n: known[n].to_state() for n in names}}


def _from_state(data: object) -> dict[str, Learned]:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} state")
    services = data.get("services")
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise ValueError(f"services: expected a mapping of at most {MAX_SERVICES}")
    return {
        str(name): Learned.from_state(entry, f"services.{name}") for name, entry in services.items()
    }


@dataclass(slots=True)
class Expected:
    """A forwarded request whose answer the proxy reads (ResponseTracker notes): set-up
    to learn from, an initialize whose session to keep, a request whose 202 may mean a
    result still due (HTTP+SSE)."""

    front: McpFront | None
    message: Message
    path: str = ""
    key: str = ""  # the protocol version it was asked in
    authorization: bytes = b""
    request: bytes = b""  # an initialize, kept for a replay of its session
    peer: str = ""
    backend: Backend | None = None

    @property
    def expects_result(self) -> bool:
        return self.message.expects_result

    @property
    def reads_body(self) -> bool:
        return self.front is not None and self.message.kind in (Kind.INITIALIZE, Kind.DISCOVER)

    def answered(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_type: bytes,
        body: bytes,
        *,
        final: bool = True,
    ) -> bool:
        """The answer arrived (its body up to MAX_MESSAGE; with ``final`` False, an
        event stream's as far as it came): True once it was taken in (False: the
        stream's JSON-RPC response is not there yet)."""
        front = self.front
        if front is None:
            return True
        message = None
        if self.reads_body:
            message = response_in(content_type, body, self.message.id)
            if message is None and not final:
                return False
        session = b"".join(v for k, v in headers if k == b"mcp-session-id")
        kind = self.message.kind
        if kind is Kind.INITIALIZE and 200 <= status < 300 and session and self.backend:
            front.opened(session, self)
        # Learned: an initialize's result; discover's answer, a legacy server's error
        # too. Never a refusal for credentials, nor a server's fault.
        learnable = message is not None and status < 500 and status not in (401, 403)
        if message is not None and learnable and (kind is Kind.DISCOVER or "result" in message):
            answer = Answer(
                200 if kind is Kind.INITIALIZE else status,
                "application/json",
                message,
                echo_id=orjson.dumps(message.get("id")) == self.message.id,
                stateful=bool(session),
            )
            front.learn(kind, self.key, self.path, self.authorization, answer)
        return True


class McpFront:
    """One listener's MCP sessions and learned answers (see the module's docstring)."""

    def __init__(self, name: str, settings: HttpSettings, store: McpStore, cfg: McpConfig) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.learned = store.of(name)
        self.sessions = Sessions(limit=cfg.max_sessions, per_peer=cfg.sessions_per_client)
        # What the proxy answered itself, by method; sessions opened on a server after
        # the proxy answered their start (materialized) or after their server lost them
        # (resumed); replays the server refused.
        self.answered: collections.Counter[str] = collections.Counter()
        self.materialized = 0
        self.resumed = 0
        self.replays_failed = 0
        self._opening: dict[tuple[bytes, int], asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Whether the server holding a session (a replica's name; None: the service,
        # or for replicas any) sleeps now: set-up is then answered here. Set by the
        # listener's owner.
        self.asleep: Callable[[str | None], bool] = lambda _: False

    def __repr__(self) -> str:
        return (
            f"<McpFront {self.name} learned={self.learned.versions()} "
            f"sessions={len(self.sessions)} answered={sum(self.answered.values())}>"
        )

    @property
    def on(self) -> bool:
        return self.settings.mcp != "off"

    def fronts(self) -> bool:
        """Whether there is anything MCP to show (on, or sessions pinned with it off)."""
        return self.on or len(self.sessions) > 0

    def describe(self) -> dict[str, Any]:
        """What the API shows: what was learned, what was answered here, the sessions."""
        sessions = self.sessions
        return {
            "mode": self.settings.mcp,
            "resume": self.resume,
            "endpoint": self.learned.endpoint or None,
            "server": self.learned.server_name() or None,
            "versions": self.learned.versions(),
            "discover": sorted(self.learned.discover),
            "answered": dict(sorted(self.answered.items())),
            "sessions": len(sessions),
            "sessions_virtual": sessions.virtual(),
            "materialized": self.materialized,
            "resumed": self.resumed,
            "replays_failed": self.replays_failed,
            "sessions_evicted": sessions.evicted,
            "sessions_refused": sessions.refused,
            "sessions_lost": sessions.lost,
        }

    @property
    def resume(self) -> bool:
        return self.settings.mcp_resume

    # ---- what the proxy answers itself

    def answer(
        self,
        head: Head,
        message: Message | None,
        request: bytes,
        peer: str,
        opened_here: int,
        quiet: bool,
    ) -> bytes | None:
        """The proxy's own answer to a request (session set-up while the server sleeps,
        a session it knows nothing of), or None: the request goes to the server.
        ``message``: a POST's; None for a GET or DELETE. ``opened_here``: sessions this
        connection opened so far. ``quiet``: nothing of this connection is with the
        server (an answer of ours would overtake its response)."""
        now = time.monotonic()
        sid = head.get(b"mcp-session-id")
        found = self.sessions.get(sid, now) if sid else None
        if sid and found is None and MINTED.fullmatch(sid):
            # One of the proxy's own that it no longer holds (a restart, an eviction):
            # the server never knew it. The spec's answer: start a new session.
            return self._count("unknown session", self._gone(message))
        # A session's own requests may be answered while its server sleeps, or while
        # no server knows it yet (it opens there with its first real request).
        held = found[1] if found is not None else None
        here = quiet and (self.asleep(held.replica) if held and held.incarnation else True)
        method = head.method
        if method == b"GET":
            if held is not None and here:
                # The server-to-client stream: optional (the spec allows 405).
                extra = (("Allow", "POST, DELETE"),)
                return self._count("GET", answer_bytes(405, b"", extra=extra))
            return None
        if method == b"DELETE":
            if found is not None and here:
                self.sessions.end(found[0])
                return self._count("DELETE", answer_bytes(200, b""))
            return None
        if message is None:
            return None
        kind = message.kind
        # Set-up of no session yet: answered while the server (for replicas, every
        # replica: a session is placed with its first real request) sleeps.
        fresh = quiet and self.asleep(None) and self._admits(head)
        if kind is Kind.INITIALIZE:
            refused = self._admit(peer, opened_here, now, message)
            if refused is not None:
                return refused
            learned = self.learned.initialize.get(message.version)
            if learned is None or not fresh:
                return None
            session = b""
            if learned.stateful:
                session = mint()
                kept = request if len(request) <= MAX_KEPT else b""
                self.sessions.add(session, Session(peer, now, init=kept))
            reply = answer_bytes(200, learned.body(message.id), session=session)
            return self._count(kind.value, reply)
        if kind is Kind.DISCOVER:
            key = head.get(b"mcp-protocol-version").decode("latin-1")
            learned = self.learned.discover.get(key)
            if learned is None or not fresh:
                return None
            body = learned.body(message.id)
            return self._count(
                kind.value, answer_bytes(learned.status, body, content_type=learned.content_type)
            )
        if kind is Kind.INITIALIZED or kind is Kind.PING:
            if held is not None:
                if kind is Kind.INITIALIZED and held.init and not held.initialized:
                    held.initialized = request if len(request) <= MAX_KEPT else b""
                if not here:
                    return None
            elif not (fresh and self.learned.known):
                return None  # a stateless server's, or nothing learned: forwarded
            if kind is Kind.INITIALIZED:
                return self._count(kind.value, answer_bytes(202, b""))
            return self._count(kind.value, answer_bytes(200, pong(message.id)))
        return None

    def _admits(self, head: Head) -> bool:
        target = head.path.decode("latin-1")
        return self.learned.admits(target, head.get(b"authorization"))

    def _admit(self, peer: str, opened_here: int, now: float, message: Message) -> bytes | None:
        """A refusal (429) when this client may open no more sessions."""
        evicted = self.sessions.evicted
        if opened_here >= PER_CONNECTION:
            self.sessions.refused += 1
        elif self.sessions.admit(peer, now):
            if self.sessions.evicted != evicted and _worth_saying(self.sessions.evicted):
                log.warning(
                    "%s: the MCP session table is full (%d); an idle session was dropped for "
                    "a new one (%d so far)",
                    self.name,
                    self.sessions.limit,
                    self.sessions.evicted,
                    extra={"service": self.name},
                )
            return None
        if _worth_saying(self.sessions.refused):
            log.warning(
                "%s: a new MCP session of %s refused: too many open (%d refused so far)",
                self.name,
                peer,
                self.sessions.refused,
                extra={"service": self.name},
            )
        body = error_body(-32000, "too many sessions from this client", message.id)
        return answer_bytes(429, body, extra=(("Retry-After", "1"),))

    def _gone(self, message: Message | None) -> bytes:
        request_id = message.id if message is not None and message.id else b"null"
        return answer_bytes(404, error_body(-32001, "Session not found", request_id))

    def _count(self, what: str, reply: bytes) -> bytes:
        self.answered[what] += 1
        return reply

    # ---- what the server answered (through ResponseTracker notes)

    def expect(self, head: Head, message: Message, request: bytes, peer: str) -> Expected:
        """The note for a forwarded POST whose answer matters."""
        key = message.version
        if message.kind is Kind.DISCOVER:
            key = head.get(b"mcp-protocol-version").decode("latin-1")
        return Expected(
            self,
            message,
            head.path.decode("latin-1"),
            key,
            head.get(b"authorization"),
            request if message.kind is Kind.INITIALIZE and len(request) <= MAX_KEPT else b"",
            peer,
        )

    def learn(self, kind: Kind, key: str, path: str, authorization: bytes, answer: Answer) -> None:
        if not key:
            return
        if self.learned.learn(kind, key, path, authorization, answer):
            log.info(
                "%s: learned the server's answer to %s (%s): %s",
                self.name,
                kind.value,
                key,
                self.learned.server_name() or "unnamed",
                extra={"service": self.name},
            )
            self.store.changed()

    def opened(self, sid: bytes, expected: Expected) -> None:
        """A session the server opened (its answer to a forwarded initialize)."""
        backend = expected.backend
        assert backend is not None
        replica = backend.name if backend.name != self.name else None
        session = Session(
            expected.peer,
            time.monotonic(),
            replica=replica,
            incarnation=backend.incarnation,
            backend=sid,
            init=expected.request,
        )
        self.sessions.add(sid, session)

    def streamed(self, sid: bytes, peer: str, backend: Backend) -> None:
        """An SSE stream's endpoint event named its session: it lives with the stream."""
        replica = backend.name if backend.name != self.name else None
        session = Session(peer, time.monotonic(), replica, backend.incarnation, sid, streaming=True)
        self.sessions.add(sid, session)

    def seen(self, sid: bytes, peer: str, backend: Backend) -> None:
        """Replicas: a response of ``backend`` named a session: pinned there (one its
        server opened that the proxy did not see start, or one known already)."""
        if self.sessions.get(sid, time.monotonic()) is None:
            replica = backend.name if backend.name != self.name else None
            session = Session(peer, time.monotonic(), replica, backend.incarnation, sid)
            self.sessions.add(sid, session)

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
        return session, b""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: an unreferenced pending task can be collected mid-flight.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            task = asyncio.get_running_loop().create_task(
                self._open(sid, session, backend, pending)
            )
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
        replica = backend.name if backend.name != self.name else None
        self.sessions.materialized(sid, server_id or sid, backend.incarnation, replica)
        if resumed:
            self.resumed += 1
        else:
            self.materialized += 1
        result = message.get("result")
        version = _asked_version(session.init)
        if isinstance(result, dict) and version:
            # The server may answer differently now (an upgrade): what clients see next.
            answer = Answer(200, "application/json", message, stateful=bool(server_id))
            path, authorization = _target_and_auth(session.init)
            self.learn(Kind.INITIALIZE, version, path, authorization, answer)
        return server_id


def _worth_saying(count: int) -> bool:
    """Log a repeated event at its 1st, 10th, 100th, then every 1000th time."""
    return count in (1, 10, 100) or count % 1000 == 0


def _split(request: bytes) -> tuple[bytes, bytes]:
    end = request.find(b"\r\n\r\n")
    cut = end + 4 if end >= 0 else request.find(b"\n\n") + 2
    return request[:cut], request[cut:]


def _asked_version(init: bytes) -> str:
    _, body = _split(init)
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        version = orjson.loads(body)["params"]["protocolVersion"]
        return version if isinstance(version, str) else ""
    return ""


def _target_and_auth(init: bytes) -> tuple[str, bytes]:
    head, _ = _split(init)
    lines = head.split(b"\n")
    target = lines[0].split(b" ")[1].partition(b"?")[0] if b" " in lines[0] else b"/"
    auth = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            auth = value.strip()
    return target.decode("latin-1"), auth


async def replay(address: Address, session: Session) -> tuple[bytes, dict[str, Any]]:
    """Send a session's initialize to the server, then its initialized under the id the
    server gave: the server's id (b"" for a stateless server) and its initialize answer.
    ReplayFailed with the server's own answer when it refuses."""
    status, headers, body, raw = await _exchange(address, session.init)
    content_type = headers.get(b"content-type", b"")
    message = response_in(content_type, body, b"")
    if status >= 300 or message is None or "result" not in message:
        raise ReplayFailed(status, raw, f"it answered {status}")
    server_id = headers.get(b"mcp-session-id", b"")
    if session.initialized or server_id:
        initialized = session.initialized or _initialized_for(session.init)
        if server_id:
            head, body_part = _split(initialized)
            initialized = with_header(head, b"Mcp-Session-Id", server_id) + body_part
        status, _, _, raw = await _exchange(address, initialized)
        if status >= 300:
            raise ReplayFailed(status, raw, f"its initialized notification got {status}")
    return server_id, message


def _initialized_for(init: bytes) -> bytes:
    """A notifications/initialized made from a session's initialize (a client that
    sent none before its first request)."""
    head, _ = _split(init)
    body = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    head = with_header(head, b"Content-Length", str(len(body)).encode())
    return head + body


async def _exchange(
    address: Address, request: bytes
) -> tuple[int, dict[bytes, bytes], bytes, bytes]:
    """One request on a connection of its own: status, headers (lowercased names), the
    body (up to MAX_MESSAGE), and the whole answer as raw bytes (the body likewise cut)
    to hand to a client when the server refused."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(request)
        parser = h11.Connection(h11.CLIENT)
        # The request went out raw: tell h11 it did (a POST with its Content-Length).
        _, body = _split(request)
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
                if b"text/event-stream" in headers.get(b"content-type", b"") and response_in(
                    headers.get(b"content-type", b""), bytes(received), b""
                ):
                    break  # the answer came; the stream may stay open
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        return status, headers, bytes(received), bytes(raw)
    except h11.ProtocolError as exc:
        raise ReplayFailed(502, b"", f"its answer is not HTTP ({exc})") from exc
    finally:
        writer.close()
