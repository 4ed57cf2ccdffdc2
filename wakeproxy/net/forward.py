"""The byte path: one asyncio Protocol per side of a forwarded connection.

``ClientSide`` is the accepted connection; ``UpstreamSide`` the connection to the
backend. ``data_received`` writes straight into the peer's transport: a bare Protocol
pair measured 0.85-1.07x HAProxy's requests/s here (tcp mode, one thread), streams far
slower. Flow control follows uvicorn's: when one side's write buffer passes the
high-water mark, reading on the other side pauses, so memory per connection stays
bounded by the two write buffers plus the hold buffer. Half-close passes through: EOF
from one side becomes ``write_eof`` on the other, and both close once both have seen EOF.

Before the backend is connected (held during a wake, or waiting for the first byte
with ``wake_on: data``) client bytes are buffered up to ``HOLD_LIMIT``, then reading
pauses. The pause happens in ``data_received``, never ``connection_made``: uvloop
ignores ``pause_reading()`` there.

A connection talks to its service only through ``Owner`` (aiohttp's
``_manager.connection_made`` style) and keeps its own flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..config import ServiceConfig
from ..core.states import Outcome

# Per-direction write buffer: big enough for bulk throughput, small enough that a
# thousand stalled connections stay within a few hundred MiB.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
HOLD_LIMIT = 64 * 1024
# A released connection holds its connect slot until the backend sends its first
# byte, or for this long after the connect completed.
SETTLE_AFTER = 0.1

# Why reading a client is paused (bits of ClientSide._paused_by): it resumes once no
# reason is left, so one reason ending never undoes another's pause.
BACKEND_FULL = 1  # the backend's write buffer is past its high-water mark
HOLDING = 2  # HOLD_LIMIT bytes held for a backend not connected yet
WAITING = 4  # mode http: a request waits (its session opening, an upgrade's answer)
NEXT_TURN = 8  # mode http: the rest of a read waits for the loop's next turn

# TCP keepalive: a peer that vanished without a FIN/RST is found in about 2 minutes
# (60 s idle, then 6 probes 10 s apart), so it cannot keep a backend awake for ever.
_KEEPALIVE = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6),
)


def set_keepalive(sock: Any) -> None:
    """Turn on TCP keepalive; on a listening socket, every accepted one inherits it (Linux)."""
    for level, option, value in _KEEPALIVE:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


_TCP_CLOSE = 7  # tcpi_state after a reset (linux/tcp_states.h)


def peer_reset(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer reset this connection. For a transport whose reading is paused:
    the event loop stops watching its socket then, so a reset goes unseen until reading
    resumes. TCP_INFO's state reads it without touching the socket's queue or error."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return True  # the socket is gone already
    return bool(info) and info[0] == _TCP_CLOSE


_LINGER_NOW = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a reset (RST), as the peer on the other side did: ``abort()`` alone
    closes the socket with a FIN, and a reset would reach the other side as a clean end.
    SO_LINGER 0 makes the close a reset; only on this rare path is the socket object
    asked for (it costs a Python object per call on uvloop)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)
    cast(asyncio.WriteTransport, transport).abort()


def _limit_buffers(transport: asyncio.BaseTransport) -> None:
    cast(asyncio.WriteTransport, transport).set_write_buffer_limits(HIGH_WATER, LOW_WATER)


class Owner(Protocol):
    """What a connection may ask of its listener (``serve.frontend.Frontend``)."""

    @property
    def idle_connection_timeout(self) -> float: ...

    @property
    def wake_on_connect(self) -> bool: ...

    def connection_made(self, conn: ClientSide) -> bool:
        """A new connection; False when it was refused (it is being closed)."""

    def needs_backend(self, conn: ClientSide, *, activity: bool, attached: bool) -> None:
        """The connection needs a backend now: placed on one (the first time), which
        forwards, holds or refuses it."""

    def no_longer_needs(self, conn: ClientSide) -> None:
        """An attached connection no longer keeps its backend up (mode http: quiet under
        allow-sleep, or its probes were all answered)."""

    def connection_lost(self, conn: ClientSide) -> None: ...

    def record(self, conn: ClientSide, outcome: Outcome, status: int | None = None) -> None:
        """Count what became of the connection (once per outcome): where it was placed,
        or at the listener before that."""


class Placed(Protocol):
    """What a connection reads of the backend it was placed on."""

    @property
    def upstream_keepalive(self) -> bool: ...


class ClientSide(asyncio.Protocol):
    """The accepted connection; reports to its ``Owner``."""

    __slots__ = (
        "_backend_eof",
        "_client_eof",
        "_idle_handle",
        "_idle_mark",
        "_paused_by",
        "_pending",
        "_pending_size",
        "_settle",
        "_settle_handle",
        "active",
        "answered_bytes",
        "attached",
        "backend",
        "backend_closed",
        "bytes_down",
        "bytes_up",
        "closed",
        "early",
        "moves",
        "on_answer",
        "owner",
        "transport",
        "upstream",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._paused_by = 0
        self._client_eof = False
        self._backend_eof = False
        # Attached: its backend counts it as needing it (held or forwarding).
        self.attached = False
        # The backend its listener placed it on (at its first need of one).
        self.backend: Placed | None = None
        # Carried activity (mode http: a real request, not a probe): its end is activity too.
        self.active = True
        # Bytes the proxy answered itself on a connection kept open (mode http probes):
        # they count as movement for idle_connection_timeout.
        self.answered_bytes = 0
        self.closed = False
        # Connected during an unpause (Admission): held until the wake ends, its release
        # slot's fallback clock not started while the backend is frozen.
        self.early = False
        # Times it was moved to another replica after a connect failed (nothing had gone
        # upstream yet, so no client sees it).
        self.moves = 0
        self.bytes_up = 0
        self.bytes_down = 0
        # The backend ended it (a FIN, or a reset), not the client nor the proxy: a
        # replica's passive health reads it with the byte counts.
        self.backend_closed = False
        # Called once at the backend's first byte (a replica's trial connection: its
        # answer closes the circuit, however long the connection then lasts).
        self.on_answer: Callable[[], None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_mark = -1
        # Release slot (see Admission): given back once the backend has answered.
        self._settle: Callable[[], None] | None = None
        self._settle_handle: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        phase = "closed" if self.closed else "forwarding" if self.upstream else "waiting"
        return f"<{type(self).__name__} {peer} {phase} up={self.bytes_up} down={self.bytes_down}>"

    # ---- asyncio callbacks, client socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        # Keepalive comes from the listening socket (Service.start): asking uvloop for
        # this socket would build a Python socket object per connection, a cost that
        # shows in every connection under churn (bench row 2).
        _limit_buffers(transport)
        owner = self.owner
        if not owner.connection_made(self):
            return
        self.arm_idle_timeout(owner.idle_connection_timeout)
        if owner.wake_on_connect:
            self.attach()

    def attach(self, *, activity: bool = True) -> None:
        """This connection needs the backend from now on."""
        attached, self.attached = self.attached, True
        self.owner.needs_backend(self, activity=activity, attached=attached)

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            self.bytes_up += len(data)
            upstream.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if not self.attached:
            # wake_on: data -- the first byte is what makes this connection count.
            self.attach()
        if self._pending_size >= HOLD_LIMIT:
            self.pause_for(HOLDING)

    def eof_received(self) -> bool:
        self._client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if upstream.can_write_eof():
                upstream.write_eof()
            self._close_if_done()
        elif not self.attached:
            # wake_on: data and the client left without a byte: nothing to forward.
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timers()
        upstream = self.upstream
        if upstream is not None:
            # A reset passes through as a reset; a clean close lets buffered bytes drain.
            if exc is not None:
                reset(upstream)
            else:
                upstream.close()
        self.settle()
        self.owner.connection_lost(self)

    def pause_writing(self) -> None:
        # The client reads slower than the backend writes: stop reading the backend.
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    # ---- called by UpstreamSide and the owner

    def connected(self, upstream: asyncio.Transport) -> None:
        """The backend connection is up: flush what was held and start forwarding."""
        self.upstream = upstream
        self._flush(upstream)
        if not self.early:
            self.start_settle_clock()

    def start_settle_clock(self) -> None:
        """The slot's fallback clock starts once the connect completed (a connect stuck
        in SYN retries keeps its slot), and for an early connect only once the backend
        runs: while it is frozen nothing can answer."""
        if self._settle is not None and self._settle_handle is None:
            loop = asyncio.get_running_loop()
            self._settle_handle = loop.call_later(SETTLE_AFTER, self.settle)

    def resume(self) -> None:
        """The backend is up again under this connection (mode http): send what waited."""
        if self.upstream is not None and not self.closed:
            self._flush(self.upstream)

    def _flush(self, upstream: asyncio.Transport) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            self.bytes_up += len(data)
            upstream.write(data)
        if self._client_eof and upstream.can_write_eof():
            upstream.write_eof()
        self.resume_for(HOLDING)

    def pause_for(self, reason: int) -> None:
        """Stop reading the client for ``reason`` (see BACKEND_FULL...)."""
        if not self._paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused_by |= reason

    def resume_for(self, reason: int) -> None:
        """``reason`` is over: read again once no other reason holds."""
        if self._paused_by & reason:
            self._paused_by &= ~reason
            transport = self.transport
            if not self._paused_by and transport is not None and not transport.is_closing():
                transport.resume_reading()

    def backend_eof(self) -> None:
        self._backend_eof = True
        self.backend_closed = True
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
        self._close_if_done()

    def backend_lost(self, exc: Exception | None) -> None:
        self.settle()
        transport = self.transport
        if transport is None or self.closed:
            return
        if exc is not None:
            # A reset from the backend (the proxy's own abort reports no exception).
            self.backend_closed = True
        if exc is not None:
            reset(transport)
        else:
            transport.close()

    def upstream_protocol(self) -> UpstreamSide:
        """The Protocol for this connection's backend side."""
        return UpstreamSide(self)

    @property
    def reading_paused(self) -> bool:
        """Its held bytes reached HOLD_LIMIT: reading waits for the backend."""
        return bool(self._paused_by & HOLDING)

    def refuse(self, outcome: Outcome) -> int | None:
        """Close a connection the backend will not serve (overflow, failed wake). Returns
        the status the client read (mode http), or None: in tcp mode it reads a close."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        return None

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        if self.upstream is not None:
            self.upstream.abort()

    def _close_if_done(self) -> None:
        if self._client_eof and self._backend_eof:
            if self.transport is not None:
                self.transport.close()
            if self.upstream is not None:
                self.upstream.close()

    # ---- timers

    def arm_settle(self, callback: Callable[[], None]) -> None:
        """Hold a release slot until the backend answers (see ``connected``)."""
        self._settle = callback

    def settle(self) -> None:
        """Give back the release slot (once): the backend answered, or it is time."""
        callback = self._settle
        if callback is not None:
            self._settle = None
            if self._settle_handle is not None:
                self._settle_handle.cancel()
                self._settle_handle = None
            callback()

    def arm_idle_timeout(self, timeout: float) -> None:
        """Close the connection after ``timeout`` seconds with no byte either way."""
        if timeout > 0:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(timeout, self._idle_check, timeout)

    def _idle_check(self, timeout: float) -> None:
        # Byte counters, not a per-chunk timestamp: the hot path only adds integers.
        moved = self.bytes_up + self.bytes_down + self._pending_size + self.answered_bytes
        if moved == self._idle_mark:
            self._idle_handle = None
            self.owner.record(self, Outcome.IDLE_TIMEOUT)
            self.abort()
            return
        self._idle_mark = moved
        loop = asyncio.get_running_loop()
        self._idle_handle = loop.call_later(timeout, self._idle_check, timeout)

    def _cancel_timers(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None


class UpstreamSide(asyncio.Protocol):
    """The connection to the backend, wired to its ClientSide in ``connection_made``."""

    __slots__ = ("client", "client_transport", "transport")

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.client_transport: asyncio.Transport | Any = client.transport
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.client.closed:
            # The client left while we connected: nobody to forward to.
            transport.close()
            return
        backend = self.client.backend
        if backend is not None and backend.upstream_keepalive:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_keepalive(sock)
        _limit_buffers(transport)
        # Wire up here, not after create_connection returns: the backend may speak
        # first and its bytes can arrive before the awaiting task resumes.
        self.client.connected(transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client._settle is not None:
            client.settle()
        if client.on_answer is not None:
            answered, client.on_answer = client.on_answer, None
            answered()
        client.bytes_down += len(data)
        self.client_transport.write(data)

    def eof_received(self) -> bool:
        self.client.backend_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost(exc)

    def pause_writing(self) -> None:
        # The backend reads slower than the client writes: stop reading the client.
        self.client.pause_for(BACKEND_FULL)

    def resume_writing(self) -> None:
        self.client.resume_for(BACKEND_FULL)


async def open_listener(
    cfg: ServiceConfig, protocol: Callable[[], asyncio.BaseProtocol]
) -> asyncio.Server:
    """A service's listening socket."""
    server = await asyncio.get_running_loop().create_server(
        protocol, cfg.listen.host, cfg.listen.port, backlog=cfg.backlog, reuse_address=True
    )
    for sock in server.sockets:
        set_keepalive(sock)
    return server
