"""MCP over streamable HTTP with the real SDKs: session set-up (the gateway's health
check) answered by the proxy while the server sleeps, a session opened on the server
with its first real request and again after a stop, the 2026-07-28 generation's
``server/discover``, replicas, the learned answers across a restart, and bad input.

Servers run under the process runtime with ``action: stop`` unless said otherwise: a
start is what a health check must never cost. All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from mcp.shared.exceptions import McpError

from tests.helpers import (
    PYTHON,
    call_text,
    config_from,
    consecutive_ports,
    exchange,
    free_port,
    in_ci,
    mcp_client,
    mcp_yaml,
    running,
    shout,
    wait_until,
    whoami,
)
from wakeproxy.core.states import Outcome, State

pytestmark = pytest.mark.asyncio
BACKENDS = Path(__file__).parent / "backends"
MCP2_PYTHON = Path(__file__).parent.parent / ".venv-mcp2" / "bin" / "python"
STOPPING = "sleep_policy: {idle_timeout: 0.5, action: stop}"


@pytest.fixture
def mcp2() -> Path:
    """The SDK 2.x's Python (./dev test makes its venv beside the main one)."""
    if not MCP2_PYTHON.exists():
        message = f"no {MCP2_PYTHON}: ./dev test installs the MCP SDK 2.x there"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return MCP2_PYTHON


async def stopped(service) -> None:
    await wait_until(lambda: service.state is State.STOPPED, within=30)


async def health_checks(port: int, count: int) -> list[str]:
    """``count`` gateway health checks (SDK 1.x sessions opened and closed): the server
    name each one saw."""
    names = []
    for _ in range(count):
        async with mcp_client(port) as client:
            names.append(client.result.serverInfo.name)
    return names


async def test_health_checks_of_a_stopped_server_start_nothing_and_a_session_starts_it_once():
    port, backend = free_port(), free_port()
    config = config_from(mcp_yaml(port, backend, "streamable-http", STOPPING))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        front = service.mcp
        # Nothing learned yet: the first session goes to the server (and teaches it).
        async with mcp_client(port) as client:
            assert await shout(client.session, "first") == "FIRST!"
        assert front.learned.versions() and front.learned.server_name() == "echo"
        await stopped(service)
        starts = service.stats.wakes["ok"]

        assert await health_checks(port, 10) == ["echo"] * 10
        assert service.state is State.STOPPED and service.stats.wakes["ok"] == starts
        assert front.answered["initialize"] == 10
        assert front.answered["notifications/initialized"] == 10
        assert (
            service.stats.connections[Outcome.MCP_ANSWERED] >= 30
        )  # initialize, initialized, DELETE...

        # A real session: one start, every call in one session the server opened.
        async with mcp_client(port) as client:
            mine = client.session_id()
            assert mine is not None and mine.startswith("wp-")
            seen = {await call_text(client.session, "session") for _ in range(3)}
            assert await shout(client.session, "again") == "AGAIN!"
        assert len(seen) == 1 and seen != {mine} and seen != {""}, seen
        assert service.stats.wakes["ok"] == starts + 1
        assert front.materialized == 1


@pytest.mark.parametrize("resume", [True, False])
async def test_a_session_outlives_its_servers_stop_unless_resuming_is_off(resume):
    port, backend = free_port(), free_port()
    lines = [STOPPING.replace("0.5", "600")]
    if not resume:
        lines.append("http: {mcp_resume: false}")
    config = config_from(mcp_yaml(port, backend, "streamable-http", *lines))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        async with mcp_client(port) as client:
            assert await shout(client.session, "one") == "ONE!"
            before = await call_text(client.session, "session")
            starts = service.stats.wakes["ok"]
            # The server stops under the open session (an operator, a crash, the idle
            # timer): its sessions die with the process.
            await service.sleep("stop", force=True)
            assert service.state is State.STOPPED
            if resume:
                assert await shout(client.session, "two") == "TWO!"
                after = await call_text(client.session, "session")
                assert after != before, "the new process knows it by a new id"
                assert service.stats.wakes["ok"] == starts + 1
                assert service.mcp.resumed == 1
            else:
                # As without the proxy: the server never heard of the session (404).
                with pytest.raises(McpError, match="Session terminated"):
                    await shout(client.session, "two")
                assert service.mcp.resumed == 0


async def test_what_was_learned_is_kept_across_a_restart_of_the_proxy(tmp_path):
    port, backend = free_port(), free_port()
    text = mcp_yaml(port, backend, "streamable-http", STOPPING)
    text += f"\nmcp: {{state_file: {tmp_path / 'mcp.json'}}}\n"
    async with running(config_from(text)) as proxy, mcp_client(port) as client:
        assert await shout(client.session, "learn") == "LEARN!"
    saved = orjson.loads((tmp_path / "mcp.json").read_bytes())
    assert saved["services"]["echo"]["endpoint"] == "/mcp"
    # A new proxy: its first health check finds the server stopped and answers it.
    async with running(config_from(text)) as proxy:
        service = proxy.services["echo"]
        assert service.state is State.STOPPED
        assert await health_checks(port, 1) == ["echo"]
        assert service.state is State.STOPPED and service.stats.wakes["ok"] == 0


@pytest.mark.parametrize("connections", ["keep-awake", "allow-sleep"])
async def test_replicas_health_checks_wake_none_and_all_sleep_after_the_last_call(connections):
    port, first = free_port(), consecutive_ports(3)
    command = [PYTHON, str(BACKENDS / "mcp_server.py"), "--port", "{port}"]
    config = config_from(
        "\n".join(
            [
                "services:",
                "  tools:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{first}",
                "    command: [" + ", ".join(f'"{a}"' for a in [*command, "--transport"]) + ","
                ' "streamable-http"]',
                "    mode: http",
                "    wake_timeout: 30",
                # The grace a 202 to a notification used to grant (60 s) would keep a
                # replica up long past the idle timeout below.
                f"    http: {{idle_connections: {connections}, inflight_grace: 60}}",
                "    sleep_policy: {idle_timeout: 1, action: pause}",
                "    replicas: {count: 3, min: 0, target_inflight: 1}",
            ]
        )
    )
    async with running(config) as proxy:
        pool = proxy.frontends["tools"]
        replicas = pool.backends
        async with mcp_client(port) as client:  # nothing learned yet: a real session
            assert await shout(client.session, "learn") == "LEARN!"
        await wait_until(lambda: all(r.state is not State.RUNNING for r in replicas), within=30)
        wakes = [r.stats.wakes["ok"] for r in replicas]
        scale_ups = pool.scale_ups

        assert await health_checks(port, 5) == ["echo"] * 5
        assert [r.stats.wakes["ok"] for r in replicas] == wakes, "a health check woke one"
        assert pool.scale_ups == scale_ups
        assert all(r.state is not State.RUNNING for r in replicas)

        # Six real sessions: each stays on one replica for all its calls.
        async with asyncio.TaskGroup() as group:
            homes = [group.create_task(_calls_from_one_home(port)) for _ in range(6)]
        assert all(len(h.result()) == 1 for h in homes), [h.result() for h in homes]
        # And every replica sleeps its idle timeout after the last call: no grace.
        await wait_until(
            lambda: all(r.state in (State.PAUSED, State.STOPPED) for r in replicas), within=20
        )


async def _calls_from_one_home(port: int) -> set[int]:
    async with mcp_client(port) as client:
        return {await whoami(client.session) for _ in range(3)}


def run_mcp2_client(python: Path, port: int, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [str(python), str(BACKENDS / "mcp2_client.py"), f"http://127.0.0.1:{port}/mcp", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return orjson.loads(result.stdout)


async def test_a_2026_server_is_not_started_by_discover_health_checks(mcp2):
    port, backend = free_port(), free_port()
    config = config_from(
        "\n".join(
            [
                "services:",
                "  echo2:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f'    command: ["{mcp2}", "{BACKENDS / "mcp2_server.py"}", "--port", "{backend}"]',
                "    mode: http",
                "    wake_timeout: 30",
                f"    {STOPPING}",
            ]
        )
    )
    async with running(config) as proxy:
        service = proxy.services["echo2"]
        call = ("--call", "shout", '{"text": "hi"}')
        first = await asyncio.to_thread(run_mcp2_client, mcp2, port, *call)
        assert first["call"] == "HI!"
        assert "2026-07-28" in service.mcp.learned.discover
        await stopped(service)
        starts = service.stats.wakes["ok"]

        checks = await asyncio.to_thread(run_mcp2_client, mcp2, port, "--checks", "10")
        assert checks["checks"] == ["echo2"] * 10
        assert checks["versions"] == ["2026-07-28"] * 10
        assert service.state is State.STOPPED and service.stats.wakes["ok"] == starts
        assert service.mcp.answered["server/discover"] == 10

        again = await asyncio.to_thread(run_mcp2_client, mcp2, port, *call)
        assert again["call"] == "HI!" and service.stats.wakes["ok"] == starts + 1


async def test_a_2026_client_falls_back_to_a_handshake_era_server_without_starting_it(mcp2):
    # mcp-context-forge 1.1.0 (auto mode) asks server/discover first; a server of the
    # handshake era refuses it (400), and the client falls back to initialize. Both
    # answers are learned, so the fallback wakes nothing either.
    port, backend = free_port(), free_port()
    config = config_from(mcp_yaml(port, backend, "streamable-http", STOPPING))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        call = ("--call", "shout", '{"text": "hi"}')
        assert (await asyncio.to_thread(run_mcp2_client, mcp2, port, *call))["call"] == "HI!"
        assert service.mcp.learned.discover and service.mcp.learned.initialize
        await stopped(service)
        starts = service.stats.wakes["ok"]
        checks = await asyncio.to_thread(run_mcp2_client, mcp2, port, "--checks", "3")
        assert checks["checks"] == ["echo"] * 3
        assert checks["versions"] == ["2025-11-25"] * 3
        assert service.state is State.STOPPED and service.stats.wakes["ok"] == starts


def scripted_yaml(port: int, backend: int, state: Path, then: str) -> str:
    command = [PYTHON, str(BACKENDS / "mcp_scripted.py"), "--port", str(backend)]
    command += ["--state", str(state), "--then", then]
    return "\n".join(
        [
            "services:",
            "  s:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            "    command: [" + ", ".join(f'"{a}"' for a in command) + "]",
            "    mode: http",
            "    wake_timeout: 3",
            f"    {STOPPING}",
        ]
    )


def post(port: int, message: dict[str, object], session: str = "", close: bool = True) -> bytes:
    body = orjson.dumps(message)
    head = [
        "POST /mcp HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(body)}",
    ]
    if session:
        head.append(f"Mcp-Session-Id: {session}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


INIT = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}},
}
CALL = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "x"}}


def session_of(reply: bytes) -> str:
    head = reply.split(b"\r\n\r\n", 1)[0].decode()
    return next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if
                line.lower().startswith("mcp-session-id:"))  # fmt: skip


@pytest.mark.parametrize("then", ["refuse", "silent"])
async def test_a_replay_the_server_refuses_or_never_answers_reaches_the_client(tmp_path, then):
    port, backend = free_port(), free_port()
    state = tmp_path / "started"
    config = config_from(scripted_yaml(port, backend, state, then))
    async with running(config) as proxy:
        service = proxy.services["s"]
        reply = await exchange(port, post(port, INIT))  # learned from the server
        assert reply.startswith(b"HTTP/1.1 200") and session_of(reply) == "s-1"
        await stopped(service)
        reply = await exchange(port, post(port, INIT))  # answered by the proxy
        assert reply.startswith(b"HTTP/1.1 200")
        virtual = session_of(reply)
        assert virtual.startswith("wp-") and service.state is State.STOPPED
        # Its first real request starts the server, whose answer to the replayed
        # initialize is the client's answer; the session is closed.
        reply = await exchange(port, post(port, CALL, virtual), within=30)
        held = service.mcp.sessions.get(virtual.encode(), time.monotonic())
        if then == "refuse":
            assert reply.startswith(b"HTTP/1.1 403"), reply
            assert b"no new sessions here" in reply
            assert held is None, "a refused session is closed"
            assert service.mcp.replays_failed == 1
        else:
            # Past wake_timeout: 504; the session stays (not opened anywhere), so its
            # next request tries again.
            assert reply.startswith(b"HTTP/1.1 504"), reply
            assert held is not None and held[1].incarnation == 0
        assert state.read_text().count("started") == 2


async def test_bad_input_never_wakes_for_nothing_and_never_breaks_the_proxy(tmp_path):
    port, backend = free_port(), free_port()
    config = config_from(scripted_yaml(port, backend, tmp_path / "started", "refuse"))
    async with running(config) as proxy:
        service = proxy.services["s"]
        assert (await exchange(port, post(port, INIT))).startswith(b"HTTP/1.1 200")
        await stopped(service)
        # A session id of the proxy's own making that it does not hold (a restart, an
        # eviction): 404 at once, as the spec says; nothing is started.
        reply = await exchange(port, post(port, CALL, "wp-" + "0" * 32))
        assert reply.startswith(b"HTTP/1.1 404") and service.state is State.STOPPED
        # A malformed JSON body is not set-up: it goes to the server (a start).
        garbage = post(port, INIT).replace(b'"jsonrpc"', b"{{{{{{{{{")
        reply = await exchange(port, garbage, within=30)
        assert reply.startswith(b"HTTP/1.1 400") and b"Parse error" in reply, reply
        assert service.stats.wakes["ok"] == 2
        await stopped(service)
        # A body over 64 KiB is never read whole: forwarded as it streams, real work.
        big = dict(CALL, params={"name": "x", "pad": "x" * 70_000})
        reply = await exchange(port, post(port, big), within=30)
        assert b"tools/call" in reply and service.stats.wakes["ok"] == 3
        # What the proxy answered is counted, and every connection ends.
        assert service.mcp.answered["unknown session"] == 1
        await wait_until(lambda: not service.connections, within=10)


async def test_with_mcp_off_set_up_is_forwarded_and_nothing_is_learned():
    # As before MCP handling: every health check reaches the server (here: starts it).
    port, backend = free_port(), free_port()
    config = config_from(mcp_yaml(port, backend, "streamable-http", STOPPING, "http: {mcp: off}"))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        assert service.mcp is not None and not service.mcp.on
        async with mcp_client(port) as client:
            assert await shout(client.session, "x") == "X!"
        await stopped(service)
        assert await health_checks(port, 1) == ["echo"]
        assert service.stats.wakes["ok"] == 2, "mcp: off forwards set-up too"
        assert not service.mcp.learned.known
