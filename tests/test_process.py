"""The process runtime for real: a command started, frozen with SIGSTOP, woken, ended."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.helpers import (
    backend_command,
    config_from,
    free_port,
    http_get,
    proc_state,
    running,
    service_yaml,
    wait_until,
)
from wakeproxy.core.states import State
from wakeproxy.memory import cgroup_of
from wakeproxy.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.asyncio


def process_config(port: int, backend: int, command: str, policy: str = "{idle_timeout: 0.5}"):
    return config_from(
        service_yaml(
            port,
            backend,
            command=command,
            readiness="{http: /}",
            wake_timeout=15,
            sleep_policy=policy,
        )
    )


async def test_burst_of_200_on_a_paused_command_one_wake_then_sleeps_again():
    port, backend = free_port(), free_port()
    config = process_config(port, backend, backend_command(backend, "http"))
    async with running(config) as proxy:
        service = proxy.services["web"]
        runtime = service.runtime
        assert isinstance(runtime, ProcessRuntime)
        assert service.state is State.STOPPED and runtime.pid is None

        first = await http_get(port)
        assert first.startswith(b"HTTP/1.1 200 OK") and first.endswith(b"hello from the backend\n")
        pid = runtime.pid
        assert pid is not None
        await wait_until(lambda: service.state is State.PAUSED, within=5)
        assert proc_state(pid) == "T", "the command should be stopped by SIGSTOP"
        wakes_before = service.stats.wakes["ok"]

        replies = await asyncio.gather(*(http_get(port, f"/{i}") for i in range(200)))
        assert all(r.endswith(b"hello from the backend\n") for r in replies)
        assert service.stats.wakes["ok"] == wakes_before + 1, "one wake for the whole burst"
        assert runtime.pid == pid, "woken by SIGCONT, not restarted"

        await wait_until(lambda: service.state is State.PAUSED, within=5)
        assert proc_state(pid) == "T"
        assert service.stats.sleeps[("pause", "idle")] == 2
    # Closing the proxy ends the command.
    await wait_until(lambda: not os.path.exists(f"/proc/{pid}"), within=5)


async def test_crashed_command_is_started_again_by_the_next_connection():
    port, backend = free_port(), free_port()
    config = process_config(port, backend, backend_command(backend, "http"), "{enabled: false}")
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        runtime = service.runtime
        assert isinstance(runtime, ProcessRuntime) and runtime.pid is not None
        os.killpg(runtime.pid, signal.SIGKILL)
        await wait_until(lambda: service.state is State.STOPPED, within=5)
        assert "command exited with status -9" in service.reason
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        assert service.stats.wakes["ok"] == 2


async def test_missing_command_fails_fast_with_a_clear_reason():
    port = free_port()
    config = process_config(port, free_port(), '["/nonexistent/server"]')
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert await http_get(port) == b""
        assert service.state is State.FAILED
        assert "cannot run '/nonexistent/server': No such file or directory" in service.reason
        assert service.stats.connections["backend_error"] == 1


async def test_command_that_dies_at_boot_fails_before_wake_timeout():
    port = free_port()
    config = process_config(port, free_port(), '["/bin/sh", "-c", "exit 3"]')
    async with running(config) as proxy:
        service = proxy.services["web"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await http_get(port) == b""
        assert loop.time() - started < 5, "a dead command must not wait for wake_timeout (15 s)"
        assert "stopped while starting" in service.reason


async def test_stop_action_ends_the_command_and_start_brings_it_back():
    port, backend = free_port(), free_port()
    config = process_config(
        port, backend, backend_command(backend, "http"), "{idle_timeout: 0.3, action: stop}"
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        pid = service.runtime.pid  # type: ignore[attr-defined]
        await wait_until(lambda: service.state is State.STOPPED, within=5)
        await wait_until(lambda: not os.path.exists(f"/proc/{pid}"), within=5)
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        assert service.stats.sleeps[("stop", "idle")] == 1


async def test_auto_start_wakes_at_proxy_start():
    port, backend = free_port(), free_port()
    config = config_from(
        service_yaml(
            port,
            backend,
            command=backend_command(backend, "http"),
            auto_start="true",
            sleep_policy="{enabled: false}",
        )
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        await wait_until(lambda: service.state is State.RUNNING, within=10)
        assert service.stats.wakes["ok"] == 1 and service.stats.connections["forwarded"] == 0
        assert service.reason == "woken"


async def test_unreachable_engine_fails_docker_services_only(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    port, backend, other = free_port(), free_port(), free_port()
    config = config_from(
        f"""
        services:
          web:
            listen: 127.0.0.1:{port}
            backend: 127.0.0.1:{backend}
            command: {backend_command(backend, "http")}
          box:
            listen: 127.0.0.1:{other}
            backend: 127.0.0.1:{free_port()}
            container: anything
        """
    )
    async with running(config) as proxy:
        box = proxy.services["box"]
        assert box.state is State.FAILED
        assert "the Docker engine does not answer" in box.reason
        assert await http_get(other) == b""
        # The process service is unaffected.
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")


async def test_each_command_has_its_own_memory_cgroup_removed_when_it_ends_and_stale_ones_go():
    own = cgroup_of("self")
    if own is None or own.version != 1:
        pytest.skip("no cgroup v1 memory hierarchy here: commands run without one")
    # What a SIGKILLed proxy leaves: an empty cgroup, long unused.
    stale = own.path / "wakeproxy-leftover-of-a-killed-proxy"
    stale.mkdir(exist_ok=True)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    port, backend = free_port(), free_port()
    config = process_config(port, backend, backend_command(backend, "http"), "{enabled: false}")
    async with running(config) as proxy:
        assert (await http_get(port)).endswith(b"backend\n")
        runtime = proxy.services["web"].runtime
        assert isinstance(runtime, ProcessRuntime) and runtime.cgroup is not None
        mine = runtime.cgroup.path
        assert mine.parent == own.path and runtime.pid in runtime.cgroup.pids()
        assert not stale.exists(), "the empty leftover is removed when the proxy starts"
    assert not mine.exists(), "the command's cgroup goes with it"
