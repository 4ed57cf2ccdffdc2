"""The process runtime for real: a command started, frozen with SIGSTOP, woken, ended."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    backend_command,
    config_from,
    config_text,
    first_index,
    free_port,
    http_get,
    port_answers,
    proc_state,
    proxy_log,
    running,
    service,
    service_yaml,
    wait_until,
)
from wakeproxy.control.api import service_status
from wakeproxy.control.printed import format_status
from wakeproxy.core.states import State
from wakeproxy.host.memory import Cgroup, cgroup_of
from wakeproxy.runtimes.leftovers import reap_leftovers
from wakeproxy.runtimes.process import ProcessRuntime
from wakeproxy.serve.status import backend_status

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


async def test_burst_of_200_held_through_one_wake_then_paused_and_woken_by_sigcont(tmp_path):
    # The burst must arrive while the wake is in flight, or "one wake" proves nothing (a
    # SIGCONT ends before a burst sent from this loop gets far: the old version of this
    # test passed with a second-wake bug). The command listens only once the test
    # creates a file, so the start is in flight until all 200 are held.
    port, backend = free_port(), free_port()
    flag = tmp_path / "listen"
    server = " ".join(backend_command(backend, "http"))
    gated = f"while [ ! -e {flag} ]; do sleep 0.01; done; exec {server}"
    config = config_from(
        service_yaml(
            port, backend, command=["sh", "-c", gated], readiness="{http: /}",
            wake_timeout=60, sleep_policy="{idle_timeout: 0.5}",
        )
    )  # fmt: skip
    async with running(config) as proxy:
        service = proxy.services["web"]
        runtime = service.runtime
        assert isinstance(runtime, ProcessRuntime)
        assert service.state is State.STOPPED and runtime.pid is None

        with proxy_log() as messages:
            burst = asyncio.gather(*(http_get(port, f"/{i}", within=60) for i in range(200)))
            await wait_until(lambda: service.held == 200, within=30)
            assert service.state is State.WAKING and service.stats.wakes["ok"] == 0
            flag.touch()
            replies = await burst
        assert all(r.endswith(b"hello from the backend\n") for r in replies)
        assert service.stats.wakes["ok"] == 1, "one wake for the whole burst"
        awake = [m for m in messages if "awake after" in m]
        assert len(awake) == 1 and awake[0].endswith("(200 held)"), awake
        pid = runtime.pid
        assert pid is not None

        await wait_until(lambda: service.state is State.PAUSED, within=10)
        assert proc_state(pid) == "T", "the command should be stopped by SIGSTOP"
        replies = await asyncio.gather(*(http_get(port, f"/{i}") for i in range(200)))
        assert all(r.endswith(b"hello from the backend\n") for r in replies)
        assert service.stats.wakes["ok"] == 2
        assert runtime.pid == pid, "woken by SIGCONT, not restarted"

        await wait_until(lambda: service.state is State.PAUSED, within=10)
        assert proc_state(pid) == "T"
        assert service.stats.sleeps[("pause", "idle")] == 2
    # Closing the proxy ends the command.
    await wait_until(lambda: not os.path.exists(f"/proc/{pid}"), within=10)


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
        # The retry re-reads the state (stopped: nothing runs); the status keeps why.
        await wait_until(lambda: service.state is State.STOPPED, within=10)
        status = service_status(backend_status(service))
        assert status["reason"] == "state re-read"
        assert status["last_error"]["reason"].startswith("cannot run '/nonexistent/server'")
        assert "; last error: cannot run '/nonexistent/server'" in format_status([status])


async def test_command_that_dies_at_boot_fails_before_wake_timeout():
    port = free_port()
    config = process_config(port, free_port(), '["/bin/sh", "-c", "exit 3"]')
    async with running(config) as proxy:
        service = proxy.services["web"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await http_get(port) == b""
        assert loop.time() - started < 5, "a dead command must not wait for wake_timeout (15 s)"
        assert "stopped while starting (exited with status 3)" in service.reason


async def test_after_a_wake_timeout_a_command_that_never_listens_never_reads_running():
    # Before the fix the retry saw the process alive and marked it running: requests
    # then got instant 502s for ever instead of being held for a wake.
    port = free_port()
    never = '["/bin/sh", "-c", "exec sleep 60"]'
    config = config_from(
        service_yaml(port, free_port(), command=never, readiness="{tcp: true}", wake_timeout=0.5)
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert await http_get(port) == b""  # tcp mode: the wake timed out, closed
        assert service.stats.wakes["timeout"] == 1
        seen = set()
        deadline = time.monotonic() + 3  # past two retries (0.5 s, then 1 s back-off)
        while time.monotonic() < deadline:
            seen.add(service.state)
            await asyncio.sleep(0.02)
        assert State.RUNNING not in seen, "running without readiness"
        assert service.state is State.FAILED
        assert "not ready" in service.reason, service.reason


async def test_a_slow_command_counts_as_running_only_once_it_listens():
    port, backend = free_port(), free_port()
    server = " ".join(backend_command(backend, "echo"))
    slow = f'["/bin/sh", "-c", "sleep 1.5; exec {server}"]'
    config = config_from(
        service_yaml(port, backend, command=slow, readiness="{tcp: true}", wake_timeout=0.5)
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert await http_get(port) == b""  # timed out: the command is still booting
        deadline = time.monotonic() + 20
        while service.state is not State.RUNNING:
            assert time.monotonic() < deadline, service.reason
            await asyncio.sleep(0.02)
        assert port_answers(backend), "running before it listened"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        writer.close()


async def test_requests_during_a_slow_start_past_wake_timeout_wait_for_it_not_502():
    # A command needing seconds to listen, wake_timeout 1: the first client's 504 is
    # right, but every request inside the back-off that followed got an immediate 502
    # while the process was alive and still starting. Now each is held for the start
    # (its own wake_timeout: 504 if it is still not up), until one is answered.
    port, backend = free_port(), free_port()
    server = " ".join(backend_command(backend, "http"))
    slow = f'["/bin/sh", "-c", "sleep 3; exec {server}"]'
    config = config_from(
        service_yaml(
            port, backend, command=slow, mode="http", readiness="{http: /}", wake_timeout=1
        )
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        statuses: list[int] = []
        deadline = time.monotonic() + 40
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses
            reply = await http_get(port, within=20)
            statuses.append(int(reply.split(b" ", 2)[1]))
        assert statuses[0] == 504 and set(statuses[:-1]) == {504}, statuses
        assert service.stats.connections["backend_error"] == 0
        assert service.stats.connections["wake_timeout"] == len(statuses) - 1


async def test_readiness_never_passes_against_another_process_listener():
    # Something else holds the backend's port (here: this test). The command cannot
    # bind and exits; before the fix the connect to the other listener passed readiness.
    port, backend = free_port(), free_port()
    squatter = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", backend)
    config = config_from(
        service_yaml(port, backend, command=backend_command(backend, "echo"), wake_timeout=15)
    )
    try:
        async with running(config) as proxy:
            service = proxy.services["web"]
            assert await http_get(port) == b""
            assert service.state is State.FAILED, (service.reason, dict(service.stats.wakes))
            assert f"port {backend} is held by pid {os.getpid()}" in service.reason
            assert service.stats.wakes["failed"] == 1
    finally:
        squatter.close()


async def test_held_clients_that_reset_leave_the_hold_queue_at_once():
    # A held client that sent 64 KiB or more is no longer read (the hold buffer is
    # full), so its reset went unseen until the wake ended; it kept its place in
    # max_held_connections and new clients were refused.
    tcp, http = free_port(), free_port()
    never = ["/bin/sh", "-c", "exec sleep 60"]
    text = config_text(
        service("tcp", tcp, free_port(), command=never, wake_timeout=30, max_held_connections=5),
        service(
            "http", http, free_port(), command=never, wake_timeout=30,
            max_held_connections=5, mode="http",
        ),
    )  # fmt: skip
    big = b"x" * 300_000
    async with running(config_from(text)) as proxy:
        for name, port, data in (
            ("tcp", tcp, big),
            ("http", http, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + big),
        ):
            svc = proxy.services[name]
            socks = []
            for _ in range(5):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.send(data)
                socks.append(sock)
            await wait_until(lambda s=svc: s.held == 5, within=5)
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset
            # Gone by the reset check (every 0.2 s), well before wake_timeout (30 s).
            await wait_until(lambda s=svc: s.held == 0, within=10)
            # Their places are free: a new client is held, not refused.
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(data[:100])
                await wait_until(lambda s=svc: s.held == 1, within=5)
            assert svc.stats.connections["rejected_overflow"] == 0, name


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


def v1_cgroup():
    own = cgroup_of("self")
    if own is None or own.version != 1:
        pytest.skip("no cgroup v1 memory hierarchy here: commands run without one")
    return own


async def test_a_child_that_left_the_session_pauses_and_stops_with_its_command():
    # A child that calls setsid is out of the command's process group: it was neither
    # paused nor stopped, kept the port, and every later wake failed ("port held by
    # pid ..., not by this command"). It is in the command's cgroup: now it goes too.
    v1_cgroup()
    port, backend = free_port(), free_port()
    server = " ".join(backend_command(backend, "http"))
    command = f'["/bin/sh", "-c", "setsid {server} & wait"]'
    config = config_from(
        service_yaml(port, backend, command=command, readiness="{http: /}", stop_timeout=2)
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).endswith(b"backend\n")
        runtime = service.runtime
        assert isinstance(runtime, ProcessRuntime) and runtime.cgroup is not None
        cgroup = runtime.cgroup.path
        [child] = [pid for pid in runtime.cgroup.pids() if pid != runtime.pid]
        try:
            assert os.getsid(child) == child, "the server is in a session of its own"
            await wait_until(lambda: not service.connections, within=5)
            await service.sleep("pause")
            assert proc_state(child) == "T", "paused with its command"
            await service.sleep("stop")
            assert service.state is State.STOPPED
            assert not cgroup.exists(), "every process of its cgroup ended, and it went"
            await wait_until(lambda: not os.path.exists(f"/proc/{child}"), within=5)
        finally:
            with contextlib.suppress(ProcessLookupError):  # a failed run leaves none
                os.kill(child, signal.SIGKILL)
        # The port is free: the next wake starts the command again and is answered.
        assert (await http_get(port, within=20)).endswith(b"backend\n")
        assert service.stats.wakes["failed"] == 0


class Leftovers:
    """wakeproxy-* cgroups under this process's, as proxies (killed or live) leave
    them, with their run records in ``records``; ``close`` removes what is left."""

    def __init__(self, own: Cgroup, records: Path) -> None:
        self.own, self.records = own, records
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.orphans: list[int] = []
        self.paths: list[Path] = []
        ended = subprocess.Popen(["true"])
        ended.wait()
        self.dead_owner = f"{ended.pid} 1"  # a proxy that is gone
        started = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
        self.live_owner = f"{os.getpid()} {started}"  # this process: alive

    def make(self, token: str, owner: str | None, *, orphan=False, child=False) -> Path:
        path = self.own.path / f"wakeproxy-{token}"
        path.mkdir()
        self.paths.append(path)
        if owner is not None:
            (self.records / f"run-{token}").write_text(f"{owner} server\n")
        if child:  # a live proxy's command: a child of that proxy (here: this test)
            proc = subprocess.Popen(["sleep", "60"])
            self.spawned.append(proc)
            (path / "cgroup.procs").write_text(str(proc.pid))
        if orphan:  # what a killed proxy left: frozen, its parent gone (init's now)
            out = subprocess.run(
                ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            pid = int(out.stdout)
            os.kill(pid, signal.SIGSTOP)
            self.orphans.append(pid)
            (path / "cgroup.procs").write_text(str(pid))
        return path

    def close(self) -> None:
        for proc in self.spawned:
            proc.kill()
            proc.wait()
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for path in self.paths:
            deadline = time.monotonic() + 5
            while path.exists() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):  # its process may still be leaving
                    path.rmdir()
                time.sleep(0.02)


async def test_at_start_a_killed_proxys_cgroups_are_emptied_and_removed_a_live_ones_kept(
    tmp_path, monkeypatch
):
    # A killed proxy's cgroups were emptied only through the environment (env -i, sudo:
    # missed, frozen for ever) and, empty, removed only by a start 60 s later.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # this test's run records only
    records = tmp_path / f"wakeproxy-{os.getuid()}"
    records.mkdir()
    left = Leftovers(v1_cgroup(), records)
    token = "t" + os.urandom(4).hex()
    try:
        paths = {
            # An empty one of a killed proxy, just made: removed at once.
            "dead-empty": left.make(f"{token}a", left.dead_owner),
            # A killed proxy's frozen orphan, whatever its environment: thawed, ended.
            "dead-frozen": left.make(f"{token}b", left.dead_owner, orphan=True),
            # No record (an older version's, a lost one), its process an orphan: ended.
            "unrecorded-orphan": left.make(f"{token}c", None, orphan=True),
            # A live proxy's (its record names this process): kept, its process too.
            "live": left.make(f"{token}d", left.live_owner, child=True),
            # No record, but its process is a child of a live process: kept.
            "unrecorded-live": left.make(f"{token}e", None, child=True),
            # No record, empty, just made (a command may be about to enter it): kept.
            "unrecorded-fresh": left.make(f"{token}f", None),
        }
        runs, removed = await reap_leftovers()
        assert sorted(runs) == [("(not recorded)", 1), ("server", 1)], runs
        assert removed >= 3
        for name in ("dead-empty", "dead-frozen", "unrecorded-orphan"):
            assert not paths[name].exists(), name
        for name in ("live", "unrecorded-live", "unrecorded-fresh"):
            assert paths[name].exists(), name

        def orphans_gone() -> bool:
            return not any(os.path.exists(f"/proc/{pid}") for pid in left.orphans)

        await wait_until(orphans_gone, within=5)
        assert all(proc.poll() is None for proc in left.spawned), "a live one's runs on"
        assert not (records / f"run-{token}a").exists(), "a dead run's record goes"
        assert (records / f"run-{token}d").exists()
    finally:
        left.close()


async def test_stop_of_a_paused_command_that_ignores_sigterm_ends_with_sigkill():
    # SIGCONT first (a stopped process keeps SIGTERM pending for ever), then SIGTERM,
    # then SIGKILL once stop_timeout passed.
    port, backend = free_port(), free_port()
    command = backend_command(backend, "http", "--term-delay", "60")
    config = config_from(
        service_yaml(port, backend, command=command, stop_timeout=1, wake_timeout=15)
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        pid = service.runtime.pid  # type: ignore[attr-defined]
        await wait_until(lambda: not service.connections, within=5)
        await service.sleep("pause")
        assert proc_state(pid) in ("T", "t")
        with proxy_log() as log:
            started = time.monotonic()
            await service.sleep("stop")
            took = time.monotonic() - started
        assert service.state is State.STOPPED
        await wait_until(lambda: not os.path.exists(f"/proc/{pid}"), within=5)
        assert took >= 0.9, f"ended after {took:.2f} s: before stop_timeout"
        first_index(log, "did not end within 1.0s of SIGTERM; sending SIGKILL")
