"""MCP through the proxy with the real SDK: FastMCP as the backend, the SDK's client.

The backend runs under the process runtime, and in a Docker container built from the
locally made Python base (test_mcp_server_in_a_paused_container...). All traffic is on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid

import anyio
import httpx
import pytest
from mcp.shared.exceptions import McpError

from tests.helpers import (
    MCP_SERVER,
    PYTHON,
    config_from,
    consecutive_ports,
    container_status,
    docker,
    free_port,
    http_get,
    mcp_session,
    mcp_yaml,
    paused,
    port_answers,
    running,
    shout,
    wait_until,
    whoami,
)
from wakeproxy.core.states import Outcome, State
from wakeproxy.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("transport", ["sse", "streamable-http"])
async def test_sdk_client_wakes_a_paused_mcp_server_once_and_calls_its_tool(transport):
    port, backend = free_port(), free_port()
    config = config_from(mcp_yaml(port, backend, transport, "sleep_policy: {idle_timeout: 0.5}"))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        await paused(service)
        wakes = service.stats.wakes["ok"]
        async with mcp_session(port, transport) as session:
            assert await shout(session, "hello") == "HELLO!"
            assert service.stats.wakes["ok"] == wakes + 1, "one wake for the whole session"
            if transport == "sse":
                # keep-awake (the default): the open stream keeps the backend running. The
                # proxy counts it as needing the backend (no idle deadline is due), and
                # three idle timeouts later it still runs.
                assert service.attached >= 1 and service.sleeps_in() is None
                await asyncio.sleep(1.5)
                assert service.state is State.RUNNING and service.sleeps_in() is None
                assert await shout(session, "again") == "AGAIN!"


async def test_gateway_probes_every_100ms_never_wake_a_paused_server():
    port, backend = free_port(), free_port()
    config = config_from(mcp_yaml(port, backend, "sse", "sleep_policy: {idle_timeout: 0.5}"))
    async with running(config) as proxy:
        service = proxy.services["echo"]
        await paused(service)
        wakes = service.stats.wakes["ok"]
        # Twenty probes 100 ms apart: four idle timeouts.
        probes = 0
        # As the gateway probes: a streamed GET with Accept */*, status read, connection dropped.
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=no_reuse, timeout=5) as client:
            for _ in range(20):
                async with client.stream(
                    "GET", f"http://127.0.0.1:{port}/sse", headers={"Accept": "*/*"}
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                probes += 1
                await asyncio.sleep(0.1)
        assert service.state is State.PAUSED and service.stats.wakes["ok"] == wakes
        assert service.stats.connections["probe_answered"] == probes
        scrape = await http_get(proxy.config.admin.listen.port, "/metrics")
        assert (
            f'wakeproxy_http_answers_total{{service="echo",status="200"}} {probes}.0'.encode()
            in scrape
        )
        assert b'wakeproxy_connections_total{outcome="probe_answered",service="echo"}' in scrape


async def test_allow_sleep_pauses_under_an_open_stream_and_the_next_call_wakes_it():
    port, backend = free_port(), free_port()
    config = config_from(
        mcp_yaml(
            port, backend, "sse",
            "sleep_policy: {idle_timeout: 0.5}",
            "http: {idle_connections: allow-sleep, inflight_grace: 0.5}",
            ping=0.1,  # keepalives on the stream every 100 ms: not activity
        )
    )  # fmt: skip
    async with running(config) as proxy:
        service = proxy.services["echo"]
        await paused(service)
        wakes = service.stats.wakes["ok"]
        async with mcp_session(port, "sse") as session:
            assert await shout(session, "one") == "ONE!"
            assert service.stats.wakes["ok"] == wakes + 1
            down_before = service.bytes_moved()[1]
            await wait_until(lambda: service.state is State.PAUSED, within=10)
            assert service.bytes_moved()[1] > down_before, "keepalives flowed while it idled"
            assert service.attached == 0 and service.connections, "the stream is still open"

            assert await shout(session, "two") == "TWO!"
            assert service.stats.wakes["ok"] == wakes + 2, "the next call woke it once"


MCP_IMAGE = "wakeproxy-test/mcp-echo:1"


@pytest.fixture(scope="session")
def mcp_image(python_base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = tmp_path_factory.mktemp("mcp-image")
    shutil.copy(MCP_SERVER, context / "mcp_server.py")
    (context / "Dockerfile").write_text(
        f"FROM {python_base}\n"
        'RUN pip install --no-cache-dir "mcp>=1.28,<2"\n'
        "COPY mcp_server.py /srv/mcp_server.py\n"
        'ENTRYPOINT ["python", "/srv/mcp_server.py"]\n'
    )
    docker("build", "--network", "host", "-q", "-t", MCP_IMAGE, str(context), within=600)
    return MCP_IMAGE


@pytest.mark.docker
@pytest.mark.timeout(900)
@pytest.mark.parametrize("transport", ["sse", "streamable-http"])
async def test_mcp_server_in_a_paused_container_wakes_for_a_session_never_for_probes(
    mcp_image, transport
):
    port, backend = free_port(), free_port()
    name = f"wp-test-mcp-{uuid.uuid4().hex[:10]}"
    docker(
        "run", "-d", "--network", "host", "--name", name, "--label", "wakeproxy-test=1",
        mcp_image, "--port", str(backend), "--transport", transport,
    )  # fmt: skip
    try:
        await wait_until(lambda: port_answers(backend), within=60, interval=0.1)
        docker("pause", name)
        config = "\n".join(
            [
                "services:",
                "  mcp:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f"    container: {name}",
                "    mode: http",
                "    sleep_policy: {idle_timeout: 600}",
            ]
        )
        async with running(config_from(config)) as proxy:
            service = proxy.services["mcp"]
            assert service.state is State.PAUSED
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=no_reuse, timeout=5) as client:
                for _ in range(10):
                    async with client.stream(
                        "GET", f"http://127.0.0.1:{port}/sse", headers={"Accept": "*/*"}
                    ) as response:
                        assert response.status_code == 200
                    await asyncio.sleep(0.1)
            assert container_status(name) == "paused" and service.stats.wakes["ok"] == 0

            async with mcp_session(port, transport) as session:
                assert await shout(session, "from docker") == "FROM DOCKER!"
            # The answer can come before the engine tells the proxy the unpause ended.
            await wait_until(lambda: service.stats.wakes["ok"] == 1, within=5)
            assert container_status(name) == "running"
    finally:
        docker("rm", "-f", name)


@pytest.mark.parametrize("transport", ["sse", "streamable-http"])
async def test_each_mcp_session_stays_on_the_replica_that_created_it(transport):
    port, first = free_port(), consecutive_ports(3)
    command = [PYTHON, MCP_SERVER, "--port", "{port}", "--transport", transport]
    config = config_from(
        "\n".join(
            [
                "services:",
                "  tools:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{first}",
                "    command: [" + ", ".join(f'"{a}"' for a in command) + "]",
                "    mode: http",
                "    wake_timeout: 30",
                # A session whose replica died is not opened again on another (below).
                "    http: {mcp_resume: false}",
                "    replicas: {count: 3, min: 3, target_inflight: 100}",
            ]
        )
    )
    async with running(config) as proxy:
        replicas = [proxy.services[f"tools@{i}"] for i in (1, 2, 3)]
        await wait_until(lambda: all(r.state is State.RUNNING for r in replicas), within=60)
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(mcp_session(port, transport))]
            sessions += [await stack.enter_async_context(mcp_session(port, transport))]
            sessions += [await stack.enter_async_context(mcp_session(port, transport))]
            # Every call of a session lands where it began; the three spread (each one's
            # open stream counts on its replica, so the next goes to another).
            homes = []
            for session in sessions:
                answers = {await whoami(session) for _ in range(4)}
                assert len(answers) == 1, answers
                homes.append(answers.pop())
            assert sorted(homes) == [first, first + 1, first + 2], homes
            assert len(proxy.frontends["tools"].sessions) >= 3
            # The first session's replica dies: that session gets an error, never
            # another replica's answer.
            dead = replicas[homes[0] - first]
            runtime = dead.runtime
            assert isinstance(runtime, ProcessRuntime) and runtime.pid is not None
            os.kill(runtime.pid, signal.SIGKILL)
            await wait_until(lambda: dead.state is not State.RUNNING, within=10)
            # The SDK's own error for a session that is gone, never a timeout (a call left
            # hanging would pass an "any exception" check): streamable HTTP reads the
            # proxy's 404 as "Session terminated"; over SSE the event stream ended with the
            # replica and the session's streams are closed.
            gone = McpError if transport == "streamable-http" else anyio.ClosedResourceError
            with pytest.raises(gone) as raised:
                await whoami(sessions[0], within=10)
            if transport == "streamable-http":
                assert "Session terminated" in str(raised.value)
            pool = proxy.frontends["tools"]
            if transport == "streamable-http":
                # The proxy itself said 404 (the MCP spec's "unknown session").
                assert pool.sessions.lost == 1
                assert pool.stats.connections[Outcome.SESSION_GONE] == 1
            else:
                # Its event stream ended with the replica: the pin went with it.
                assert pool.sessions.by_replica().get(dead.name, 0) == 0
            # The others are untouched, and a new session works (on a live replica).
            assert await whoami(sessions[1]) == homes[1]
            fresh = await stack.enter_async_context(mcp_session(port, transport))
            assert await whoami(fresh) in (first, first + 1, first + 2)
