"""The connections waiting for a backend: held during a wake, then released upstream at
the pace the backend accepts them, and refused with a counted outcome when it will not
serve them.

Release pacing: at most a window of upstream connects in flight, and a released
connection keeps its slot until the backend sends its first byte (or
``forward.SETTLE_AFTER`` after its connect completed). A just-woken backend with a
shallow listen backlog is fed at the pace it accepts instead of being flooded into
one-second SYN retries. Connections that arrive while the queue drains join its end.
The window, the accept queue's room and what the connects teach are decided in
core/pacing.py (its rules, and why); this reads the kernel for it (``backlog``: 9 for
busybox httpd, 4096 for a server listening with that backlog), times the connects and
re-reads a full queue every ``QUEUE_RECHECK``. Why the room and not only the slots: a
slot given back after ``SETTLE_AFTER`` says nothing about whether the backend accepted
(a backend slow to accept, on a loaded machine or just after its wake, still has the
earlier connections in its queue; measured: busybox httpd behind two busy cores, 40 SYNs
dropped of a 200-client release). With SYN cookies on (Linux's default) connections
completed by a cookie while the queue is full can lose their first bytes: 30
simultaneous connects, each sending 2 bytes then its FIN, to a listener with backlog 4
that accepts nothing for 50 ms: the server read 5 to 10 of them empty on kernel 6.18
(plain asyncio client, ``nstat`` counting TcpExtSyncookiesRecv).

Early connects: while an unpause is in flight the backend's listener exists and its
kernel completes handshakes into the accept queue, frozen or not. So held connections
are connected then, up to the room that queue has (read once, as the thaw starts), with
their buffered bytes; after the unpause the backend finds them waiting, instead of the
connects, accepts and answers all starting behind the wake. The rest follow as before.
A stopped backend (a start: nothing listens yet) and one whose listener cannot be seen
get no early connect. If the wake fails they are closed with the other held ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Address
from ..core.pacing import QUEUE_RECHECK, Pacing
from ..core.states import Outcome
from ..errors import OperationFailed, RuntimeFailure
from ..serve.stats import ServiceStats
from .backlog import AcceptQueue, accept_queue
from .forward import ClientSide, peer_reset

log = logging.getLogger("wakeproxy.service")

# Repeated connect errors are logged at most this often per service.
_BACKEND_ERROR_LOG_EVERY = 5.0
# How often held connections whose reading is paused are checked for a reset client.
RESET_CHECK_EVERY = 0.2


class Admission:
    """One service's held connections, release queue and upstream connects."""

    def __init__(
        self,
        name: str,
        stats: ServiceStats,
        *,
        backend: Callable[[], Address | None],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        on_connect_error: Callable[[], None],
        connect_timeout: float,
        concurrency: int | None,
    ) -> None:
        self.name = name
        self.stats = stats
        self._backend = backend
        self._spawn = spawn
        self._on_connect_error = on_connect_error
        # A replica's (set by its frontend): hand a connection whose connect failed to
        # another replica (True: taken), and report each connect that completed (its
        # circuit breaker).
        self.retry: Callable[[ClientSide], bool] | None = None
        self.on_connected: Callable[[], None] | None = None
        self.connect_timeout = connect_timeout
        self.pacing = Pacing(concurrency)
        self._held: dict[ClientSide, None] = {}
        self._queue: collections.deque[ClientSide] = collections.deque()
        self._connecting = 0
        # Upstream connects sent and not yet completed (not yet in the backend's queue
        # as the kernel counts it), and the timer reading a full queue again.
        self._opening = 0
        self._recheck: asyncio.TimerHandle | None = None
        self._last_error_log = 0.0
        self._errors_unlogged = 0
        self._reset_check: asyncio.TimerHandle | None = None
        # During an unpause: how many more early connects its accept queue takes, and the
        # held connections connected early (counted forwarded only once released).
        self._thaw_room = 0
        # Connected early -> whether its connect completed (None: refused meanwhile, as
        # the wake failed); counted forwarded exactly once: at the release if it had
        # completed, else when it does; never if refused.
        self._early: dict[ClientSide, bool | None] = {}
        self.early_connects = 0  # in total, for the API and the tests

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def window(self) -> int:
        """The last release's window (core/pacing.py)."""
        return self.pacing.window

    @property
    def learned(self) -> int:
        return self.pacing.learned

    def hold(self, conn: ClientSide) -> None:
        self._held[conn] = None
        if self._thaw_room:
            self._connect_early(conn)
        if self._reset_check is None:
            loop = asyncio.get_running_loop()
            self._reset_check = loop.call_later(RESET_CHECK_EVERY, self._check_resets)

    def _check_resets(self) -> None:
        """A held client that sent HOLD_LIMIT bytes is no longer read, so its reset is
        not seen by the loop: look for it, so it leaves the hold queue (and stops counting
        against max_held_connections) within RESET_CHECK_EVERY, not at the wake's end."""
        self._reset_check = None
        if not self._held:
            return
        for conn in list(self._held):
            transport = conn.transport
            if conn.reading_paused and transport is not None and peer_reset(transport):
                conn.abort()  # connection_lost follows: it leaves as a held connection
        loop = asyncio.get_running_loop()
        self._reset_check = loop.call_later(RESET_CHECK_EVERY, self._check_resets)

    def forget(self, conn: ClientSide) -> bool:
        """A connection went away; whether it was held."""
        if conn in self._early:
            # Its client left before the release: forwarded if it was connected (it may
            # even have been answered: a container can run before the engine says so).
            if self._early[conn]:
                self.stats.record(Outcome.FORWARDED)
            self._drop_early(conn)
        if conn not in self._held:
            return False
        del self._held[conn]
        return True

    def refuse(self, conn: ClientSide, outcome: Outcome) -> None:
        """Close one connection the backend will not serve, counting why."""
        self.stats.record(outcome, conn.refuse(outcome))

    def thaw(self) -> None:
        """An unpause is starting: connect the held connections now, up to the room in
        the backend's accept queue (none where it cannot be read)."""
        queue = self._accept_queue()
        if queue is None:
            return
        self._thaw_room = self.pacing.early_room(queue)
        for conn in list(self._held):
            self._connect_early(conn)

    def _drop_early(self, conn: ClientSide) -> None:
        if self._early[conn]:
            del self._early[conn]  # connected already: nothing more will report
        else:
            self._early[conn] = None  # still connecting: its completion counts nothing

    def _connect_early(self, conn: ClientSide) -> None:
        """Connect a held connection now, during the unpause (its bytes go with it)."""
        if self._thaw_room <= 0 or conn in self._early or conn.upstream is not None:
            return
        self._thaw_room -= 1
        self._early[conn] = False
        conn.early = True
        self.early_connects += 1
        self._connecting += 1
        conn.arm_settle(self._settled)
        self._opening += 1
        self._spawn(self._open_upstream(conn))

    def refuse_held(self, outcome: Outcome, reason: str) -> None:
        """Close every held connection (the wake failed), saying why once."""
        self._thaw_room = 0
        for conn in list(self._early):
            self._drop_early(conn)  # refused with the others: never counted forwarded
        held = list(self._held)
        self._held.clear()
        for conn in held:
            self.refuse(conn, outcome)
        if held:
            log.warning(
                "%s: closed %d held connection(s): %s",
                self.name,
                len(held),
                reason,
                extra={"service": self.name, "outcome": outcome.value},
            )

    def forward(self, conn: ClientSide) -> None:
        """The backend runs: forward this connection (behind a release still draining)."""
        if conn.upstream is not None:
            conn.resume()  # mode http: the backend woke under this open connection
        elif self._queue or self._connecting:
            # A release's connects still hold their slots: this one is paced with them
            # (sent straight away, it could meet the accept queue they fill).
            self._queue.append(conn)
            self._pump()
        else:
            self._opening += 1
            self._spawn(self._open_upstream(conn))

    def release(self) -> None:
        """The backend is ready: forward every held connection, paced."""
        self._thaw_room = 0
        self.pacing.release(self._accept_queue(), self._connecting, self._opening)
        held = list(self._held)
        self._held.clear()
        for conn in held:
            if conn in self._early:
                # Connected during the thaw (or its connect still in flight: counted
                # when it completes). The backend runs: its slot's clock starts now.
                conn.early = False
                if self._early.pop(conn) is True:
                    self.stats.record(Outcome.FORWARDED)
                    conn.start_settle_clock()
                    conn.resume()
            elif conn.upstream is not None:
                conn.resume()
            else:
                self._queue.append(conn)
        self._pump()

    def _accept_queue(self) -> AcceptQueue | None:
        backend = self._backend()
        return accept_queue(backend) if backend is not None else None

    def _pump(self) -> None:
        queue = self._queue
        while queue and self._connecting < self.window:
            if queue[0].closed:
                queue.popleft()
                continue
            if not self._queue_has_room():
                return
            conn = queue.popleft()
            in_flight = self._connecting
            self._connecting += 1
            self.pacing.sent()
            conn.arm_settle(self._settled)
            self._opening += 1
            learning = self.pacing.learning
            self._spawn(self._open_upstream(conn, in_flight if learning else None))

    def _queue_has_room(self) -> bool:
        """Whether the backend's accept queue takes one more connect now (where it is
        read: the release's window came from it); if not, it is read again soon."""
        if self.pacing.has_room():
            return True
        loop = asyncio.get_running_loop()
        queue = self._accept_queue()
        if self.pacing.reread(queue, self._opening, loop.time(), self.connect_timeout):
            return True
        if self._recheck is None:
            self._recheck = loop.call_later(QUEUE_RECHECK, self._rechecked)
        return False

    def _rechecked(self) -> None:
        self._recheck = None
        self._pump()

    def _settled(self) -> None:
        self._connecting -= 1
        self._pump()

    def describe(self) -> dict[str, object]:
        """The API's view: the last release's window and where it came from."""
        pacing = self.pacing
        return {
            "window": pacing.window,
            "window_from": pacing.source,
            "early_connects": self.early_connects,
        }

    def starting(self) -> None:
        """The backend is being started: what was learned of its backlog is forgotten."""
        self.pacing.starting()

    async def _open_upstream(self, conn: ClientSide, in_flight: int | None = None) -> None:
        """Connect ``conn`` upstream; ``in_flight``: the paced connects already in flight
        when it was sent, where the window is learned."""
        backend = self._backend()
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            try:
                if backend is None:
                    raise OperationFailed("the backend address is not known yet")
                await self._connect(loop, conn, backend)
            finally:
                self._opening -= 1
        except (OSError, TimeoutError, RuntimeFailure) as exc:
            conn.settle()
            early = conn in self._early
            dropped = early and self._early.pop(conn) is None
            if early and not dropped and conn in self._held:
                # An early connect that failed while the wake goes on (a connect past
                # a full queue timed out): it stays held, and the release tries again.
                conn.early = False
                return
            if conn.closed or dropped:
                return
            self._on_connect_error()
            if self.retry is not None and not early and self.retry(conn):
                return  # nothing had gone upstream: another replica serves it
            self.refuse(conn, Outcome.BACKEND_ERROR)
            self._log_connect_error(backend, exc)
            return
        if self.on_connected is not None:
            self.on_connected()
        if in_flight is not None:
            self.pacing.connected(loop.time() - sent, in_flight)
        if conn not in self._early:
            self.stats.record(Outcome.FORWARDED)
        elif self._early[conn] is None:
            del self._early[conn]  # refused while it connected
        else:
            self._early[conn] = True  # counted at the release

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, conn: ClientSide, backend: Address
    ) -> None:
        """create_connection within connect_timeout (TimeoutError past it). A timer that
        cancels the task rather than ``asyncio.timeout``: under connection churn that
        context manager's own Python code was about 7% of the proxy's CPU (py-spy)."""
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        handle = loop.call_later(self.connect_timeout, expire)
        try:
            await loop.create_connection(conn.upstream_protocol, backend.host, backend.port)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            raise TimeoutError from None
        finally:
            handle.cancel()

    def _log_connect_error(self, backend: Address | None, exc: BaseException) -> None:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        now = time.monotonic()
        if now - self._last_error_log < _BACKEND_ERROR_LOG_EVERY:
            self._errors_unlogged += 1
            return
        more = f" (+{self._errors_unlogged} more)" if self._errors_unlogged else ""
        log.warning(
            "%s: cannot connect to backend %s: %s%s",
            self.name,
            backend,
            reason,
            more,
            extra={"service": self.name, "outcome": Outcome.BACKEND_ERROR.value},
        )
        self._last_error_log = now
        self._errors_unlogged = 0
