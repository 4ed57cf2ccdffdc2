"""MCP sessions pinned to the replica that created them (mode http, replicas).

A session lives in one server process: every request of it must reach the replica
that answered its start, never another one silently. Pure: the glue feeds what it saw
(a session id in a response or an event stream, a request naming one, a replica's
restart) with the time; this table answers where a request goes.

* Streamable HTTP: the response to ``initialize`` carries ``Mcp-Session-Id``; requests
  of that session carry the same header.
* SSE: the ``endpoint`` event at the start of a ``GET`` event stream names the session
  (``/messages/?session_id=...``); the session's POSTs carry it in their query.

A pin ends with its session (DELETE answered, the SSE stream closed), when its replica
is gone or restarted (its sessions died with the process: the request is told so, 404),
after ``idle`` seconds unused, or when the table is full (the least recently used).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

MAX_PINS = 10_000
_SSE_SESSION = re.compile(rb"session_id=([A-Za-z0-9_\-]{1,128})")
# How much of an event stream's start is searched for the endpoint event.
SSE_SCAN_LIMIT = 4096


def session_in_query(query: bytes) -> bytes | None:
    """The SSE session a POST's query names (``session_id=...``)."""
    found = _SSE_SESSION.search(query)
    return found.group(1) if found else None


def session_in_stream(start: bytes) -> bytes | None:
    """The session the ``endpoint`` event at an event stream's start names."""
    at = start.find(b"endpoint")
    if at < 0:
        return None
    found = _SSE_SESSION.search(start, at)
    return found.group(1) if found else None


class Gone:
    """A session whose replica is gone or was restarted (see ``SessionPins.where``)."""

    __slots__ = ()


GONE = Gone()


@dataclass(slots=True)
class Pin:
    replica: str
    # The replica's incarnation when the session began: a restart ends its sessions.
    incarnation: int
    used: float
    # An SSE session's stream is open: its POSTs (answered 202 on a kept-alive
    # connection) may never look it up again, yet it lives; it ends with its stream.
    streaming: bool = False


class SessionPins:
    """Session id -> the replica holding it, bounded in size and idle time."""

    def __init__(self, idle: float = 3600.0, limit: int = MAX_PINS) -> None:
        self.idle = idle
        self.limit = limit
        self._pins: collections.OrderedDict[bytes, Pin] = collections.OrderedDict()
        self.lost = 0  # requests told their session is gone

    def __len__(self) -> int:
        return len(self._pins)

    def pin(
        self, session: bytes, replica: str, incarnation: int, now: float, *, streaming: bool
    ) -> None:
        self._pins[session] = Pin(replica, incarnation, now, streaming)
        self._pins.move_to_end(session)
        while len(self._pins) > self.limit:
            self._pins.popitem(last=False)

    def unpin(self, session: bytes) -> None:
        self._pins.pop(session, None)

    def where(self, session: bytes, incarnations: dict[str, int], now: float) -> str | Gone | None:
        """The replica holding ``session``: its name; None when the session is not
        known here (a new one, or one that ended: the replica it reaches answers for
        it); GONE when its replica is gone or was restarted since (the session died
        with it: the request is told so, and the pin dropped)."""
        pin = self._pins.get(session)
        if pin is None:
            return None
        if now - pin.used > self.idle and not pin.streaming:
            del self._pins[session]
            return None
        if incarnations.get(pin.replica) != pin.incarnation:
            del self._pins[session]
            self.lost += 1
            return GONE
        pin.used = now
        self._pins.move_to_end(session)
        return pin.replica

    def by_replica(self) -> dict[str, int]:
        """How many sessions each replica holds (for the API)."""
        return dict(collections.Counter(pin.replica for pin in self._pins.values()))
