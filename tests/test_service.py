"""The service glue driven through real loopback sockets, with the in-memory runtime.

The fake runtime only stands in for pause/unpause; the backend server (an echo server in
this process) behaves as a frozen one would: its kernel accepts connections, but it
answers nothing until the fake's state is running again. These tests check decisions:
single flight, overflow, timeouts, back-off, the idle timer and races. The real runtimes
are tested in test_process.py and test_docker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import types

import pytest

from tests.fakes import FakeRuntime
from tests.helpers import (
    Lone,
    config_from,
    echo_server,
    exchange,
    free_port,
    listener_drops,
    lone_service,
    wait_until,
)
from wakeproxy.config import Address
from wakeproxy.control.api import service_status
from wakeproxy.core import pacing
from wakeproxy.core.lifecycle import BACKOFF_FIRST
from wakeproxy.core.states import SleepAction, State
from wakeproxy.net import admission, forward
from wakeproxy.net.admission import Admission
from wakeproxy.serve.stats import ServiceStats
from wakeproxy.serve.status import backend_status

pytestmark = pytest.mark.asyncio


class Harness:
    def __init__(self, runtime: FakeRuntime, extra: str = "") -> None:
        self.runtime = runtime
        self.port = free_port()
        self.backend_port = free_port()
        self.extra = extra
        self.service: Lone
        self.server: asyncio.Server

    async def __aenter__(self) -> Harness:
        # Config first: if it fails, no server is left open (uvloop's close would hang).
        cfg = config_from(
            "services:\n"
            "  web:\n"
            f"    listen: 127.0.0.1:{self.port}\n"
            f"    backend: 127.0.0.1:{self.backend_port}\n"
            "    container: fake\n" + self.extra
        ).services["web"]
        # As a paused process: it answers only while the fake runs.
        running = self.runtime
        self.server = await echo_server(
            self.backend_port, answers_while=lambda: running.state is State.RUNNING
        )
        self.service = lone_service(cfg, self.runtime)
        await self.service.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.service.close()
        self.server.close()

    async def roundtrip(self, payload: bytes = b"ping", within: float = 5.0) -> bytes:
        """Send, half-close, read to EOF: b'' means the proxy closed without forwarding."""
        return await exchange(self.port, payload, within=within, half_close=True)


def settings(**values: object) -> str:
    """Extra service keys, indented to sit under `web:` in the harness YAML."""
    return "".join(f"    {key}: {value}\n" for key, value in values.items())


async def test_single_flight_one_unpause_for_a_burst():
    runtime = FakeRuntime(State.PAUSED, delay=0.05)
    async with Harness(runtime) as h:
        replies = await asyncio.gather(*(h.roundtrip(b"n%d" % i) for i in range(100)))
        assert replies == [b"n%d" % i for i in range(100)]
        assert runtime.calls["unpause"] == 1
        assert h.service.state is State.RUNNING
        assert h.service.stats.wakes["ok"] == 1
        assert h.service.stats.connections["forwarded"] == 100


async def test_overflow_is_closed_at_once_and_counted():
    runtime = FakeRuntime(State.PAUSED, delay=0.3)
    async with Harness(runtime, settings(max_held_connections=3)) as h:
        replies = await asyncio.gather(*(h.roundtrip(b"x") for _ in range(5)))
        assert sorted(replies) == [b"", b"", b"x", b"x", b"x"]
        assert h.service.stats.connections["rejected_overflow"] == 2


async def test_wake_timeout_closes_held_connections():
    runtime = FakeRuntime(State.PAUSED, delay=2.0)
    async with Harness(runtime, settings(wake_timeout=0.2)) as h:
        replies = await asyncio.gather(*(h.roundtrip() for _ in range(3)))
        # Closed by the timeout, not by the 2 s unpause ending (that would have answered
        # them): the counts say which, whatever the clock read.
        assert replies == [b"", b"", b""]
        assert h.service.stats.wakes["ok"] == 0
        assert h.service.stats.connections["wake_timeout"] == 3
        assert h.service.stats.wakes["timeout"] == 1
        assert h.service.state is State.FAILED
        assert "wake_timeout (0.2s)" in h.service.reason


class GatedRuntime(FakeRuntime):
    """A stopped backend whose start ends when the test opens the gate (a start: no
    early connect, the held bytes stay in the proxy)."""

    def __init__(self) -> None:
        super().__init__(State.STOPPED)
        self.gate = asyncio.Event()

    async def start(self) -> None:
        self.calls["start"] += 1
        await self.gate.wait()
        self.state = State.RUNNING


async def test_a_held_connection_stops_being_read_once_64_kib_are_held():
    # README: reading pauses once 64 KiB are held, so a held connection buffers 64 KiB
    # plus the read that crossed it. The facts: the proxy's socket for it is no longer
    # read (the transport says so), what it holds stays under 64 KiB plus one read
    # (uvloop reads at most 256 KiB at once), and after the wake every byte arrives.
    runtime = GatedRuntime()
    async with Harness(runtime, settings(wake_timeout=60)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        try:
            sent = bytes(range(256)) * 4096  # 1 MiB, queued in this side's transport
            writer.write(sent)
            await wait_until(lambda: h.service.held == 1, within=10)
            (conn,) = h.service.connections
            await wait_until(lambda: conn._pending_size >= forward.HOLD_LIMIT, within=10)
            assert conn.reading_paused
            assert conn.transport is not None and not conn.transport.is_reading()
            held = conn._pending_size
            assert held < forward.HOLD_LIMIT + 256 * 1024, held
            runtime.gate.set()
            echoed = await asyncio.wait_for(reader.readexactly(len(sent)), 30)
            assert echoed == sent
            assert runtime.calls["start"] == 1
        finally:
            writer.transport.abort()


async def test_failed_wake_backs_off_then_recovers():
    runtime = FakeRuntime(State.PAUSED)
    runtime.fail.add("unpause")
    async with Harness(runtime) as h:
        assert await h.roundtrip() == b""
        assert h.service.state is State.FAILED
        assert "fake unpause failed" in h.service.reason
        # Inside the back-off: refused at once, the runtime is not called again.
        assert await h.roundtrip() == b""
        assert runtime.calls["unpause"] == 1
        runtime.fail.clear()
        # The back-off timer re-reads the state by itself.
        await wait_until(lambda: h.service.state is State.PAUSED, within=BACKOFF_FIRST + 2)
        assert await h.roundtrip(b"again") == b"again"
        assert runtime.calls["unpause"] == 2
        assert h.service.stats.connections["backend_error"] == 2


async def test_idle_timer_pauses_only_with_no_open_connection():
    runtime = FakeRuntime(State.RUNNING)
    async with Harness(runtime, settings(sleep_policy="{idle_timeout: 0.2}")) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"hold")
        assert await reader.readexactly(4) == b"hold"
        await asyncio.sleep(0.5)
        assert runtime.calls["pause"] == 0, "paused under an open connection"
        assert h.service.sleeps_in() is None
        writer.close()
        await wait_until(lambda: h.service.state is State.PAUSED, within=10)
        assert runtime.calls["pause"] == 1
        assert h.service.stats.sleeps[("pause", "idle")] == 1


class GatedPause(FakeRuntime):
    """A pause that ends when the test opens the gate: the pause stays in flight for as
    long as the test needs, however slow the machine."""

    def __init__(self) -> None:
        super().__init__(State.RUNNING)
        self.gate = asyncio.Event()

    async def pause(self) -> None:
        self.calls["pause"] += 1
        await self.gate.wait()
        self.state = State.PAUSED


async def test_connection_during_pause_waits_then_wakes():
    runtime = GatedPause()
    async with Harness(runtime, settings(sleep_policy="{idle_timeout: 0.1}")) as h:
        await wait_until(lambda: h.service.state is State.PAUSING, within=10)
        race = asyncio.ensure_future(h.roundtrip(b"race", within=30))
        await wait_until(lambda: h.service.attached == 1, within=10)
        assert h.service.state is State.PAUSING, "it waits for the pause in flight"
        runtime.gate.set()
        assert await race == b"race"
        assert runtime.calls["pause"] == 1 and runtime.calls["unpause"] == 1
        await wait_until(lambda: h.service.state is State.RUNNING, within=10)


async def test_stop_after_stops_a_paused_backend():
    runtime = FakeRuntime(State.RUNNING)
    policy = "{idle_timeout: 0.1, stop_after: 0.2}"
    async with Harness(runtime, settings(sleep_policy=policy)) as h:
        await wait_until(lambda: h.service.state is State.STOPPED, within=10)
        assert runtime.calls["pause"] == 1 and runtime.calls["stop"] == 1
        assert await h.roundtrip(b"up") == b"up"
        assert runtime.calls["start"] == 1


async def test_high_priority_never_sleeps():
    runtime = FakeRuntime(State.RUNNING)
    async with Harness(runtime, settings(sleep_policy="{idle_timeout: 0.05, priority: high}")) as h:
        assert h.service.sleeps_in() is None, "no idle deadline is due"
        await asyncio.sleep(0.4)  # 8 idle timeouts
        assert runtime.calls["pause"] == 0 and h.service.state is State.RUNNING
        assert h.service.sleeps_in() is None


async def test_external_pause_is_followed():
    runtime = FakeRuntime(State.RUNNING)
    async with Harness(runtime) as h:
        runtime.external(State.PAUSED, "paused by hand")
        assert h.service.state is State.PAUSED
        assert h.service.reason == "paused by hand"
        assert h.service.stats.sleeps[("pause", "external")] == 1
        assert await h.roundtrip(b"wake") == b"wake"
        assert runtime.calls["unpause"] == 1


async def test_wake_on_data_ignores_silent_connections():
    runtime = FakeRuntime(State.PAUSED)
    async with Harness(runtime, settings(wake_on="data")) as h:
        _, writer = await asyncio.open_connection("127.0.0.1", h.port)
        # Accepted by the proxy (a condition, not a time), and yet not attached.
        await wait_until(lambda: len(h.service.frontend.connections) == 1, within=10)
        await asyncio.sleep(0.1)  # loop turns after the accept: still nothing
        assert runtime.calls["unpause"] == 0 and h.service.attached == 0
        writer.close()
        assert await h.roundtrip(b"data") == b"data"
        assert runtime.calls["unpause"] == 1


async def test_idle_connection_timeout_closes_silent_connections():
    runtime = FakeRuntime(State.RUNNING)
    async with Harness(runtime, settings(idle_connection_timeout=0.3)) as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        async with asyncio.timeout(30):  # closed at 0.3 s: the deadline is for a slow machine
            assert await reader.read(-1) == b""
        writer.close()
        assert h.service.stats.connections["idle_timeout"] == 1
        await wait_until(lambda: h.service.attached == 0, within=10)


async def test_api_wake_and_repr():
    runtime = FakeRuntime(State.STOPPED)
    async with Harness(runtime) as h:
        assert repr(h.service).startswith(
            f"<Backend web :{h.port} state=stopped held=0 attached=0 idle_for="
        )
        await h.service.wake()
        assert runtime.calls["start"] == 1 and h.service.state is State.RUNNING
        await h.service.wake()
        assert runtime.calls["start"] == 1


async def test_a_refused_connect_is_counted_and_the_state_re_read():
    runtime = FakeRuntime(State.RUNNING)
    async with Harness(runtime, settings(sleep_policy="{idle_timeout: 600}")) as h:
        assert await h.roundtrip() == b"ping"
        h.server.close()
        await h.server.wait_closed()
        runtime.state = State.STOPPED  # gone behind the proxy's back, nothing reported
        inspected = runtime.calls["inspect"]
        assert await h.roundtrip() == b"", "refused: closed"
        assert h.service.stats.connections["backend_error"] == 1
        await wait_until(lambda: h.service.state is State.STOPPED, within=5)
        assert runtime.calls["inspect"] == inspected + 1, "one re-read"
        # The re-read state is what the next connection acts on: it starts the backend.
        h.server = await echo_server(h.backend_port)
        assert await h.roundtrip() == b"ping"
        assert runtime.calls["start"] == 1


class CountingBackend:
    """Accepts connections and answers each first read after ``delay``: how many are
    connected and not yet answered at once, and in what order their first bytes came."""

    def __init__(self, delay: float, *, speak: bool = True) -> None:
        self.delay = delay
        self.speak = speak
        self.unanswered = 0
        self.peak = 0
        self.order: list[bytes] = []
        self.accepted = 0
        self.accept_times: list[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.accept_times.append(asyncio.get_running_loop().time())
        self.unanswered += 1
        self.peak = max(self.peak, self.unanswered)
        try:
            if not self.speak:
                await reader.read()  # a server that never speaks first
                return
            first = await reader.readline()
            self.order.append(first.strip())
            await asyncio.sleep(self.delay)
            writer.write(b"ok\n")
            await writer.drain()
            self.unanswered -= 1
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _paced_service(backend: CountingBackend, concurrency: int) -> tuple[Lone, asyncio.Server]:
    port, backend_port = free_port(), free_port()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", backend_port, backlog=1024)
    cfg = config_from(
        f"services:\n  web:\n    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend_port}\n    container: fake\n"
        f"    connect_concurrency: {concurrency}\n    wake_timeout: 15\n"
    ).services["web"]
    service = lone_service(cfg, FakeRuntime(State.PAUSED, delay=0.3))
    await service.start()
    return service, server


async def test_release_keeps_connect_concurrency_until_first_bytes_and_late_ones_queue():
    backend = CountingBackend(delay=0.05)
    service, server = await _paced_service(backend, concurrency=4)
    port = service.cfg.listen.port
    clients = []
    try:
        for index in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d\n" % index)
            clients.append((reader, writer))
        await wait_until(lambda: service.held == 30, within=5)
        # One more arrives while the release drains: it joins the end of the queue.
        await wait_until(lambda: backend.accepted >= 4, within=10)
        late = await asyncio.open_connection("127.0.0.1", port)
        late[1].write(b"late\n")
        clients.append(late)
        for reader, _ in clients:
            assert await asyncio.wait_for(reader.readline(), 15) == b"ok\n"
        # Never more than connect_concurrency connected and unanswered at once: a slot
        # is given back at the backend's first byte, not when the connect completes.
        assert 2 <= backend.peak <= 4, backend.peak
        assert backend.order[-1] == b"late", backend.order
        assert sorted(backend.order[:-1], key=int) == [b"%d" % i for i in range(30)]
    finally:
        for _, writer in clients:
            writer.close()
        await service.close()
        server.close()


async def test_release_gives_a_slot_back_100_ms_after_a_connect_when_the_backend_is_silent():
    backend = CountingBackend(delay=0, speak=False)
    service, server = await _paced_service(backend, concurrency=2)
    port = service.cfg.listen.port
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(8):  # they send nothing: the backend never answers first
            clients.append(await asyncio.open_connection("127.0.0.1", port))  # noqa: PERF401
        await wait_until(lambda: service.held == 8, within=5)
        await wait_until(lambda: backend.accepted == 8, within=10)
        times = backend.accept_times
        # Two at a time, each pair ~100 ms (SETTLE_AFTER) after the one before.
        spread = times[-1] - times[0]
        assert spread >= 0.25, f"8 connects in {spread:.3f} s: slots were not held"
    finally:
        for _, writer in clients:
            writer.close()
        await service.close()
        server.close()


class QueueOnlyBackend:
    """A listener with a small backlog that accepts nothing until the fake runs again,
    as a paused process does: the kernel completes handshakes into its accept queue,
    up to the backlog, and drops SYNs past it."""

    def __init__(self, runtime: FakeRuntime, backlog: int, lag: float = 0.0) -> None:
        self.runtime = runtime
        self.lag = lag  # how long after a wake it starts accepting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """While running: accept and echo each connection's first read, then close."""
        loop = asyncio.get_running_loop()
        while True:
            if self.runtime.state is not State.RUNNING:
                await wait_until(lambda: self.runtime.state is State.RUNNING, within=60)
                await asyncio.sleep(self.lag)
            conn, _ = await loop.sock_accept(self.sock)
            self.accepted.append(conn)
            task = loop.create_task(self._echo(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _echo(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            data = await loop.sock_recv(conn, 65536)
            await loop.sock_sendall(conn, data)
        conn.close()


async def _thawing(runtime: FakeRuntime, backend: QueueOnlyBackend) -> Lone:
    cfg = config_from(
        f"services:\n  web:\n    listen: 127.0.0.1:{free_port()}\n"
        f"    backend: 127.0.0.1:{backend.port}\n    container: fake\n    wake_timeout: 15\n"
    ).services["web"]
    service = lone_service(cfg, runtime)
    await service.start()
    return service


async def _clients(port: int, count: int) -> list[tuple[float, bytes]]:
    async def one(index: int) -> tuple[float, bytes]:
        started = time.monotonic()
        reply = await exchange(port, b"c%d" % index, within=20, half_close=True)
        return time.monotonic() - started, reply

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_held_connections_connect_during_the_thaw_up_to_the_backlog_and_none_is_lost():
    runtime = FakeRuntime(State.PAUSED, delay=0.3)  # a slow unpause: all arrive during it
    backend = QueueOnlyBackend(runtime, backlog=8)
    service = await _thawing(runtime, backend)
    serving = asyncio.create_task(backend.serve())
    try:
        dropped = listener_drops(backend.port)
        results = await _clients(service.cfg.listen.port, 30)
        assert [reply for _, reply in results] == [b"c%d" % i for i in range(30)]
        # Early: as many as the accept queue took, no more (a 9th would be a dropped SYN).
        assert service.admission.early_connects == 8
        # The unpause took 0.3 s, past the 100 ms slot fallback: the early ones kept their
        # slots while the backend was frozen, so the window after it is the queue's (not 1,
        # and never past its limit).
        assert service.admission.window == 8, service.admission.window
        # The kernel's count at the backend's listener, not a client's wait under 1 s.
        assert listener_drops(backend.port) == dropped, "a SYN was dropped"
        assert service.stats.connections["forwarded"] == 30
        assert runtime.calls["unpause"] == 1
    finally:
        serving.cancel()
        await service.close()
        backend.sock.close()


async def test_a_backend_that_accepts_late_after_its_wake_gets_no_connect_past_its_queue():
    # The backend runs again but accepts nothing for 0.5 s (a loaded machine: busybox's
    # fork per connection behind two busy cores), well past the 100 ms after which a
    # silent connection gives its release slot back. The slots alone then let the next
    # window's connects into a queue still full of the early ones, and the kernel drops
    # their SYNs (each client retries a second later). Connects go only into the room the
    # kernel shows: the listener's own drop count stays 0, whatever the timing.
    runtime = FakeRuntime(State.PAUSED, delay=0.2)
    backend = QueueOnlyBackend(runtime, backlog=8, lag=0.5)
    service = await _thawing(runtime, backend)
    serving = asyncio.create_task(backend.serve())
    try:
        dropped = listener_drops(backend.port)
        results = await _clients(service.cfg.listen.port, 30)
        assert [reply for _, reply in results] == [b"c%d" % i for i in range(30)]
        assert service.admission.early_connects == 8
        assert listener_drops(backend.port) == dropped, "SYNs dropped at the backend's queue"
        assert service.stats.connections["forwarded"] == 30
        assert runtime.calls["unpause"] == 1
    finally:
        serving.cancel()
        await service.close()
        backend.sock.close()


async def test_connections_arriving_behind_a_release_are_paced_with_it_not_sent_past_it():
    # Four held clients fill the accept queue during the thaw; the backend then accepts
    # nothing for 0.5 s. Ten clients arriving meanwhile find it running and nothing
    # queued: sent straight upstream they would meet the full queue (dropped SYNs,
    # one-second retries). They wait behind the release's connects, for room.
    runtime = FakeRuntime(State.PAUSED, delay=0.2)
    backend = QueueOnlyBackend(runtime, backlog=4, lag=0.5)
    service = await _thawing(runtime, backend)
    serving = asyncio.create_task(backend.serve())
    port = service.cfg.listen.port
    try:
        dropped = listener_drops(backend.port)
        first = asyncio.ensure_future(_clients(port, 4))
        await wait_until(lambda: service.state is State.RUNNING, within=15)
        assert not backend.accepted, "the backend accepts only after its lag"
        later = await _clients(port, 10)
        assert [reply for _, reply in later] == [b"c%d" % i for i in range(10)]
        assert [reply for _, reply in await first] == [b"c%d" % i for i in range(4)]
        assert service.admission.early_connects == 4
        assert listener_drops(backend.port) == dropped, "SYNs dropped at the backend's queue"
        assert service.stats.connections["forwarded"] == 14
    finally:
        serving.cancel()
        await service.close()
        backend.sock.close()


async def test_a_wake_that_fails_after_early_connects_closes_them_all():
    runtime = FakeRuntime(State.PAUSED, delay=0.3)
    runtime.fail.add("unpause")
    backend = QueueOnlyBackend(runtime, backlog=16)
    service = await _thawing(runtime, backend)
    try:
        results = await _clients(service.cfg.listen.port, 5)
        assert [reply for _, reply in results] == [b""] * 5, "closed, nothing forwarded"
        assert service.admission.early_connects == 5
        counts = service.stats.connections
        assert (counts["backend_error"], counts["forwarded"]) == (5, 0), dict(counts)
        # The early upstream connections were closed too: each reads its end at once.
        loop = asyncio.get_running_loop()
        for _ in range(5):
            conn, _ = await asyncio.wait_for(loop.sock_accept(backend.sock), 5)
            with conn:
                data = await asyncio.wait_for(loop.sock_recv(conn, 100), 5)
                rest = await asyncio.wait_for(loop.sock_recv(conn, 100), 5) if data else b""
                assert rest == b"", "the proxy left an early connection open"
    finally:
        await service.close()
        backend.sock.close()


async def test_a_stopped_backend_gets_no_early_connect_even_with_a_listener_in_view():
    runtime = FakeRuntime(State.STOPPED, delay=0.3)  # a start: nothing may connect before it
    backend = QueueOnlyBackend(runtime, backlog=16)
    service = await _thawing(runtime, backend)
    serving = asyncio.create_task(backend.serve())
    try:
        results = await _clients(service.cfg.listen.port, 5)
        assert [reply for _, reply in results] == [b"c%d" % i for i in range(5)]
        assert service.admission.early_connects == 0
        assert runtime.calls["start"] == 1
    finally:
        serving.cancel()
        await service.close()
        backend.sock.close()


async def test_where_the_accept_queue_cannot_be_read_the_window_is_learned_from_syn_retries(
    monkeypatch: pytest.MonkeyPatch,
):
    # As for a container in another network namespace: sock_diag cannot see its listener.
    # The backend and the kernel's SYN drops past its backlog are real.
    monkeypatch.setattr(admission, "accept_queue", lambda address: None)
    runtime = FakeRuntime(State.PAUSED, delay=0.1)
    backend = QueueOnlyBackend(runtime, backlog=4, lag=0.05)
    service = await _thawing(runtime, backend)
    serving = asyncio.create_task(backend.serve())
    port = service.cfg.listen.port
    try:
        assert service.admission.learned == pacing.FALLBACK_WINDOW
        dropped = listener_drops(backend.port)
        first = await _clients(port, 30)
        assert service.stats.connections["forwarded"] == 30
        assert service.admission.early_connects == 0, "no early connect where it cannot see"
        # At the starting window all 30 went at once into a queue of 5 nothing accepted
        # from yet: the rest were dropped and retried a second later (and some completed
        # by a SYN cookie lost their bytes: the kernel's doing, which is why the window
        # matters), and what was in flight when the first was sent is the window now.
        assert listener_drops(backend.port) > dropped
        assert max(seconds for seconds, _ in first) >= pacing.SYN_RETRIED  # a retry's floor
        dropped = listener_drops(backend.port)
        assert 1 <= service.admission.learned <= 10, service.admission.learned
        learned = service.admission.learned
        assert service_status(backend_status(service))["release"] == {
            "window": learned,
            "window_from": "learned",
            "early_connects": 0,
        }
        await service.sleep(SleepAction.PAUSE)
        second = await _clients(port, 30)
        assert [reply for _, reply in second] == [b"c%d" % i for i in range(30)]
        # At the learned window the kernel dropped nothing (its count, not a client's
        # wait under a second, which a busy machine can stretch with no SYN dropped).
        assert listener_drops(backend.port) == dropped, "a SYN dropped at the learned window"
        assert runtime.calls["unpause"] == 2
        assert service.stats.connections["forwarded"] == 60
        assert service.admission.learned == learned, "no SYN retry, nothing more to learn"
        # A start forgets it: the new process may listen with another backlog.
        await service.sleep(SleepAction.STOP)
        await service.wake()
        assert service.admission.learned == pacing.FALLBACK_WINDOW
    finally:
        serving.cancel()
        await service.close()
        backend.sock.close()


class _Stalling:
    """A loop whose connects never complete (SYNs that go unanswered), timers real."""

    def __init__(self) -> None:
        self.call_later = asyncio.get_running_loop().call_later

    async def create_connection(self, *args: object) -> None:
        await asyncio.Event().wait()


async def test_repeated_connect_errors_are_logged_at_most_once_per_5_s_with_a_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # README: repeated upstream connect errors are logged at most once per 5 s per
    # service, with a count of those not logged. The clock is the test's.
    now = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: now[0])
    gate = Admission(
        "web", ServiceStats(), backend=lambda: None, spawn=asyncio.ensure_future,
        on_connect_error=lambda: None, connect_timeout=1.0, concurrency=None,
    )  # fmt: skip
    backend = Address("127.0.0.1", 9)
    refused = ConnectionRefusedError(111, "Connection refused")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]

    with caplog.at_level("WARNING", logger="wakeproxy.service"):
        gate._log_connect_error(backend, refused)
        for step in range(1, 50):  # 49 more within 4.9 s: none logged
            now[0] = 1000.0 + step * 0.1
            gate._log_connect_error(backend, refused)
        assert logged() == [
            "web: cannot connect to backend 127.0.0.1:9: [Errno 111] Connection refused"
        ]
        now[0] = 1005.0  # 5 s after the one logged: the next is, with the count
        gate._log_connect_error(backend, TimeoutError())
        assert logged()[1:] == ["web: cannot connect to backend 127.0.0.1:9: timed out (+49 more)"]
        now[0] = 1009.9
        gate._log_connect_error(backend, refused)
        assert len(logged()) == 2
        now[0] = 1010.0
        gate._log_connect_error(backend, refused)
        assert logged()[2].endswith("Connection refused (+1 more)")


async def test_a_connect_past_connect_timeout_raises_timeout_and_an_outside_cancel_stays_one():
    stats = ServiceStats()
    gate = Admission(
        "web",
        stats,
        backend=lambda: Address("127.0.0.1", 9),
        spawn=asyncio.ensure_future,
        on_connect_error=lambda: None,
        connect_timeout=0.05,
        concurrency=None,
    )
    conn = types.SimpleNamespace(upstream_protocol=lambda: None)
    backend = Address("127.0.0.1", 9)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await gate._connect(_Stalling(), conn, backend)
    assert 0.04 <= time.monotonic() - started < 5
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0, "our own cancel was taken back"
    task = asyncio.create_task(gate._connect(_Stalling(), conn, backend))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
