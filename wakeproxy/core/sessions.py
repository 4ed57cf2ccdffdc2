"""MCP sessions a service's clients hold, as the proxy keeps them (mode http).

Pure: the glue feeds what it saw (a session a response started, one the proxy answered
itself, a request naming one) with the time; this table answers where a request goes,
what the backend calls its session, and whether one more session may open.

A session is known by the id its client uses. Either the server minted it (its answer to
a forwarded ``initialize`` carried ``Mcp-Session-Id``; an SSE stream's ``endpoint``
event named it) or the proxy did: a *virtual* session, answered from what the server
said before while it slept (``wp-`` and 32 hex digits). A session is *materialized* on a
backend incarnation once that backend knows it, under its own id (``backend``): the
proxy then writes that id into the session's requests. A backend restarted since (a stop,
a crash; a replica gone) has lost it: a session whose ``initialize`` the proxy holds is
replayed there (resumed), any other is gone (its request is answered ``404``, the spec's
word for "start a new session").

Bounded against a client that opens sessions to flush others' (each holds its replica
pin): at most ``limit`` sessions, ``per_peer`` per client address. When full, the least
recently used session idle for ``EVICT_IDLE`` seconds goes (counted in ``evicted``); one
with an open stream, or in use, never goes: a new session is refused instead.
"""

from __future__ import annotations

import collections
import re
import secrets
from dataclasses import dataclass

MAX_SESSIONS = 10_000
MAX_PER_PEER = 1_000
# A session unused this long may make room for a new one when the table is full.
EVICT_IDLE = 60.0
# How many of the least recently used sessions a full table looks at for one to evict.
_EVICT_SCAN = 64
MINTED = re.compile(rb"wp-[0-9a-f]{32}")
_SSE_SESSION = re.compile(rb"session_id=([A-Za-z0-9_\-]{1,128})(?=[\s&\"'#]|$)")
# How much of an event stream's start is searched for its endpoint event (comment
# lines, such as keepalives, not counted).
SSE_SCAN_LIMIT = 16 * 1024


def mint() -> bytes:
    """An id for a virtual session: random, and recognisably the proxy's."""
    return b"wp-" + secrets.token_hex(16).encode()


def session_in_query(query: bytes) -> bytes | None:
    """The SSE session a POST's query names (``session_id=...``)."""
    found = _SSE_SESSION.search(query)
    return found.group(1) if found else None


class EndpointScan:
    """Finds the ``endpoint`` event in an event stream's start, fed as it arrives:
    line by line, so an id split across reads is never taken by its first part, and
    comment lines (``: ping`` keepalives) before it are skipped, not counted."""

    __slots__ = ("_cr", "_event", "_line", "scanned")

    def __init__(self) -> None:
        self._line = bytearray()
        self._event = b""
        self._cr = False  # the last line ended with CR: an LF right after is its end too
        self.scanned = 0  # bytes of non-comment lines seen

    @property
    def exhausted(self) -> bool:
        return self.scanned >= SSE_SCAN_LIMIT

    def feed(self, data: bytes) -> bytes | None:
        """The session the endpoint event names, once its data line is complete."""
        for piece in data.splitlines(keepends=True):
            self._line += piece
            if not self._line.endswith((b"\n", b"\r")):
                if len(self._line) > SSE_SCAN_LIMIT:
                    self.scanned = SSE_SCAN_LIMIT
                    return None
                continue
            raw = bytes(self._line)
            self._line.clear()
            if raw == b"\n" and self._cr:
                self._cr = False
                continue  # the LF of a CRLF split across two reads
            self._cr = raw.endswith(b"\r")
            line = raw.rstrip(b"\r\n")
            if line.startswith(b":"):
                continue  # a comment: keepalives may precede the event
            self.scanned += len(line) + 1
            if not line:
                self._event = b""
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            elif line.startswith(b"data:") and self._event == b"endpoint":
                found = _SSE_SESSION.search(line + b"\n")
                if found is not None:
                    return found.group(1)
            if self.exhausted:
                return None
        return None


class Gone:
    """A session whose backend is gone or was restarted and cannot be resumed."""

    __slots__ = ()


GONE = Gone()


@dataclass(slots=True)
class Session:
    # The client's address (its share of the table), and the connection that opened it
    # (a number unique in the process; 0: none counted).
    peer: str
    used: float
    # Replicas: the replica holding it (None: not placed yet, a virtual session).
    replica: str | None = None
    # The backend incarnation that knows it (0: none) and its id for it there.
    incarnation: int = 0
    backend: bytes = b""
    # The client's own initialize and notifications/initialized (head and body), kept
    # to open it again on a backend that does not know it: materialized, or resumed.
    init: bytes = b""
    initialized: bytes = b""
    # An SSE session: its stream is open; it ends with it, and is never evicted.
    streaming: bool = False
    opener: int = 0
    # Where its initialize was sent, and with which credentials (see httpmode.mcp).
    endpoint: str = ""
    credentials: bytes = b""

    def known_to(self, incarnation: int) -> bool:
        return self.incarnation != 0 and self.incarnation == incarnation


class Sessions:
    """Client session id -> Session, bounded in size, per client and in idle time."""

    def __init__(
        self, idle: float = 3600.0, limit: int = MAX_SESSIONS, per_peer: int = MAX_PER_PEER
    ) -> None:
        self.idle = idle
        self.limit = limit
        self.per_peer = per_peer
        self._sessions: collections.OrderedDict[bytes, Session] = collections.OrderedDict()
        self._streams: dict[bytes, Session] = {}  # streaming: never evicted, never idle
        self._aliases: dict[bytes, bytes] = {}  # a backend's id -> its client's
        self._peers: collections.Counter[str] = collections.Counter()
        self._openers: collections.Counter[int] = collections.Counter()
        self._held: collections.Counter[str] = collections.Counter()  # per replica
        self.lost = 0  # requests told their session is gone
        self.evicted = 0  # idle sessions dropped to make room
        self.refused = 0  # new sessions refused: the table or the client's share full

    def __len__(self) -> int:
        return len(self._sessions) + len(self._streams)

    # ---- opening and ending

    def admit(self, peer: str, now: float, opener: int = 0, per_opener: int = 0) -> bool:
        """Whether one more session of ``peer`` may open, over connection ``opener``
        holding at most ``per_opener`` live sessions (0: no such bound), making room if
        the table is full by evicting an idle one; counts a refusal."""
        if (
            self._peers[peer] >= self.per_peer
            or (per_opener and opener and self._openers[opener] >= per_opener)
            or (len(self) >= self.limit and not self._evict(now))
        ):
            self.refused += 1
            return False
        return True

    def _evict(self, now: float) -> bool:
        for n, (sid, session) in enumerate(self._sessions.items()):
            if n >= _EVICT_SCAN or now - session.used < EVICT_IDLE:
                return False  # least recently used first: the rest were used later
            self._drop(sid, session)
            self.evicted += 1
            return True
        return False

    def add(self, sid: bytes, session: Session) -> bool:
        """A session opened (``admit`` said yes, or the server opened it already);
        False when there is no room (a full table of sessions in use): not kept."""
        old = self._sessions.get(sid) or self._streams.get(sid)
        if old is not None:
            self._drop(sid, old)
        elif len(self) >= self.limit and not self._evict(session.used):
            self.refused += 1
            return False
        self._peers[session.peer] += 1
        if session.opener:
            self._openers[session.opener] += 1
        if session.replica:
            self._held[session.replica] += 1
        if session.streaming:
            self._streams[sid] = session
        else:
            self._sessions[sid] = session
        if session.backend and session.backend != sid:
            self._aliases[session.backend] = sid
        return True

    def end(self, sid: bytes) -> None:
        """The session ended (a DELETE, its SSE stream closed)."""
        sid = self._aliases.get(sid, sid)
        session = self._sessions.get(sid) or self._streams.get(sid)
        if session is not None:
            self._drop(sid, session)

    def _drop(self, sid: bytes, session: Session) -> None:
        self._sessions.pop(sid, None)
        self._streams.pop(sid, None)
        self._peers[session.peer] -= 1
        if self._peers[session.peer] <= 0:
            del self._peers[session.peer]
        if session.opener:
            self._openers[session.opener] -= 1
            if self._openers[session.opener] <= 0:
                del self._openers[session.opener]
        self._unhold(session.replica)
        if session.backend and self._aliases.get(session.backend) == sid:
            del self._aliases[session.backend]

    # ---- requests naming a session

    def get(self, sid: bytes, now: float) -> tuple[bytes, Session] | None:
        """The session a request names (by its id, or by the backend's id for it: a
        client may adopt the id it sees on the backend's answers), marked used; None
        when unknown, or idle past ``idle`` (forgotten)."""
        sid = self._aliases.get(sid, sid)
        session = self._streams.get(sid)
        if session is not None:
            return sid, session
        session = self._sessions.get(sid)
        if session is None:
            return None
        if now - session.used > self.idle:
            self._drop(sid, session)
            return None
        session.used = now
        self._sessions.move_to_end(sid)
        return sid, session

    def materialized(
        self, sid: bytes, backend: bytes, incarnation: int, replica: str | None
    ) -> None:
        """The backend ``incarnation`` (of ``replica``) knows the session as ``backend``."""
        session = self._sessions.get(sid) or self._streams.get(sid)
        if session is None:
            return
        if session.backend and self._aliases.get(session.backend) == sid:
            del self._aliases[session.backend]
        session.backend, session.incarnation = backend, incarnation
        self._place(session, replica)
        if backend and backend != sid:
            self._aliases[backend] = sid

    def where(
        self, sid: bytes, incarnations: dict[str, int], now: float, *, resume: bool
    ) -> str | Gone | None:
        """Replicas: the replica holding the session a request names; None when it is
        not placed (unknown, virtual, or to be resumed on whichever replica the request
        goes to); GONE when its replica is gone or was restarted and it cannot be
        resumed (the request is told so, and it is forgotten)."""
        found = self.get(sid, now)
        if found is None:
            return None
        sid, session = found
        if session.replica is None:
            return None
        if incarnations.get(session.replica) == session.incarnation:
            return session.replica
        if resume and session.init:
            # Its replica lost it: open it again wherever this request goes.
            session.incarnation = 0
            self._place(session, None)
            return None
        self._drop(sid, session)
        self.lost += 1
        return GONE

    def _place(self, session: Session, replica: str | None) -> None:
        """Move the session to ``replica`` (None: no replica), keeping the counts."""
        self._unhold(session.replica)
        session.replica = replica
        if replica:
            self._held[replica] += 1

    def _unhold(self, replica: str | None) -> None:
        if replica:
            self._held[replica] -= 1
            if self._held[replica] <= 0:
                del self._held[replica]

    def by_replica(self) -> dict[str, int]:
        """How many sessions each replica holds (placement's tie-break, the API)."""
        return dict(self._held)

    def virtual(self) -> int:
        """Sessions no backend knows now (answered by the proxy so far)."""
        return sum(not s.incarnation for s in (*self._sessions.values(), *self._streams.values()))
