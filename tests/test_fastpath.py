"""The kernel's fast path through the whole proxy (``fast_path: kernel``), on the real
kernel with real sockets: while the backend runs, new connections reach it without
the proxy (its accept count does not move, the backend sees the client's own port);
it still sleeps when idle, and the next connection is held and wakes it; a restarted
backend is steered to again; a killed proxy leaves nothing attached; without the
capability, or where it cannot apply, the service runs as it always did.

Needs root (CAP_BPF, CAP_NET_ADMIN, pidfd_getfd): skipped without, failed in CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import (
    FAST_PATH_DROP_IN,
    admin_call,
    backend_command,
    config_from,
    config_text,
    free_port,
    http_get,
    in_ci,
    pids_with,
    proc_state,
    proxy_log,
    running,
    service,
    start_proxy,
    unit_settings,
    wait_until,
)
from wakeproxy.config import load_config
from wakeproxy.control.metrics import render
from wakeproxy.core.states import State
from wakeproxy.errors import ServiceBusy
from wakeproxy.host import bpf
from wakeproxy.host.steering import Steering
from wakeproxy.runtimes.process import ProcessRuntime
from wakeproxy.serve.fastpath import FastPathState, Why


def _why_not() -> str | None:
    try:
        Steering().close()
    except (bpf.BpfError, OSError) as exc:
        return str(exc)
    return None


WHY_NOT = _why_not()
if WHY_NOT is not None and not in_ci():
    pytest.skip(f"the kernel's fast path cannot load here: {WHY_NOT}", allow_module_level=True)

pytestmark = pytest.mark.asyncio


def fast(port: int, backend: int, mode: str = "peer", **settings):
    """A service with the fast path in front of tests/backends/server.py."""
    settings.setdefault("sleep_policy", {"idle_timeout": 60})
    return service(
        "web",
        port,
        backend,
        command=backend_command(backend, mode),
        fast_path="kernel",
        wake_timeout=15,
        **settings,
    )


async def peer(port: int) -> tuple[str, int]:
    """Connect, read the backend's first line (whom it sees); (the line, our own port)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        mine = writer.get_extra_info("sockname")[1]
        line = await asyncio.wait_for(reader.readline(), 15)
        return line.decode(), mine
    finally:
        writer.close()


def assert_steered(counted: int, made: int) -> None:
    """The kernel's count of hand-overs against the connections made. It counts the
    listener lookups it handed to the backend: one per connection, and a segment of a
    connection whose socket is gone (a late one of a closed connection's, proxied or
    not) is looked up and handed over too. So a few more, never fewer, never double."""
    assert made <= counted <= made + 3, f"{counted} hand-overs for {made} connections"


async def steering(backend) -> None:
    await wait_until(lambda: backend.fast_path.state is FastPathState.STEERING, within=10)


async def test_new_connections_reach_the_backend_without_the_proxy():
    port, backend = free_port(), free_port()
    async with running(config_from(config_text(fast(port, backend)))) as proxy:
        web = proxy.services["web"]
        assert web.fast_path.state is FastPathState.STANDBY
        # The first one starts the backend: held and forwarded by the proxy, as ever.
        line, mine = await peer(port)
        assert line.startswith("peer 127.0.0.1:") and line != f"peer 127.0.0.1:{mine}\n"
        await steering(web)
        accepted = web.stats.accepted
        for _ in range(20):
            line, mine = await peer(port)
            assert line == f"peer 127.0.0.1:{mine}\n", "the backend sees the client itself"
        assert web.stats.accepted == accepted, "the proxy accepted none of them"
        counted = web.fast_path.steered
        assert_steered(counted, 20)
        metrics = render(proxy).decode()
        shown = re.search(r'wakeproxy_fast_path_steered_total\{service="web"\} (\S+)', metrics)
        assert shown is not None and counted <= float(shown[1]) <= web.fast_path.steered
        assert 'wakeproxy_fast_path_state{service="web",state="steering"} 1.0' in metrics
        status, _, body = await admin_call(proxy, "GET", "/services")
        (described,) = (s["fast_path"] for s in orjson.loads(body)["services"])
        assert status == 200 and described["state"] == "steering"
        assert counted <= described["steered"] <= web.fast_path.steered


async def test_it_sleeps_when_idle_and_the_next_connection_is_held_and_wakes_it():
    port, backend = free_port(), free_port()
    config = config_from(config_text(fast(port, backend, sleep_policy={"idle_timeout": 0.5})))
    async with running(config) as proxy:
        web = proxy.services["web"]
        await peer(port)
        await steering(web)
        await peer(port)  # steered
        assert isinstance(web.runtime, ProcessRuntime)
        pid = web.runtime.pid
        assert pid is not None
        await wait_until(lambda: web.state is State.PAUSED, within=10)
        assert proc_state(pid) == "T"
        assert web.fast_path.state is FastPathState.STANDBY
        accepted = web.stats.accepted
        line, mine = await peer(port)  # held by the proxy, then forwarded
        assert line != f"peer 127.0.0.1:{mine}\n"
        assert web.stats.accepted == accepted + 1 and web.stats.found_asleep >= 1
        assert web.stats.wakes["ok"] == 2 and web.runtime.pid == pid, "woken by SIGCONT"
        await steering(web)
        line, mine = await peer(port)
        assert line == f"peer 127.0.0.1:{mine}\n"
        assert web.stats.sleeps[("pause", "idle")] >= 1


async def test_an_open_connection_the_proxy_never_saw_keeps_the_backend_awake():
    port, backend = free_port(), free_port()
    config = config_from(config_text(fast(port, backend, sleep_policy={"idle_timeout": 0.3})))
    async with running(config) as proxy:
        web = proxy.services["web"]
        await peer(port)
        await steering(web)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.wait_for(reader.readline(), 10)
            # Several idle timeouts: every read of the kernel lists it, the backend stays.
            await wait_until(lambda: web.fast_path.seen == 1, within=10)
            await asyncio.sleep(1.5)
            assert web.state is State.RUNNING and web.node.kernel_attached == 1
            with pytest.raises(ServiceBusy, match="1 connection"):
                await web.sleep("pause")
            # Bytes on it arrive untouched, both ways.
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        finally:
            writer.close()
        await wait_until(lambda: web.state is State.PAUSED, within=10)


async def test_transfers_through_the_fast_path_are_byte_exact_both_ways():
    port, backend = free_port(), free_port()
    async with running(config_from(config_text(fast(port, backend)))) as proxy:
        web = proxy.services["web"]
        await peer(port)
        await steering(web)
        payload = random.Random(30).randbytes(8 << 20)
        accepted, moved = web.stats.accepted, web.bytes_moved()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(reader.readline(), 10)  # the peer line

        async def send() -> None:
            for offset in range(0, len(payload), 1 << 16):
                writer.write(payload[offset : offset + (1 << 16)])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.ensure_future(send())
        echoed = await asyncio.wait_for(reader.read(-1), 60)
        await sending
        writer.close()
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert web.stats.accepted == accepted and web.bytes_moved() == moved, "not by the proxy"


async def test_a_restarted_backend_is_steered_to_again():
    port, backend = free_port(), free_port()
    policy = {"idle_timeout": 0.5, "action": "stop"}
    async with running(config_from(config_text(fast(port, backend, sleep_policy=policy)))) as proxy:
        web = proxy.services["web"]
        runtime = web.runtime
        assert isinstance(runtime, ProcessRuntime)
        await peer(port)
        await steering(web)
        first = runtime.pid
        # Stopped when idle: its process and listener are gone.
        await wait_until(lambda: web.state is State.STOPPED, within=10)
        line, mine = await peer(port)  # held; starts a new process with a new listener
        assert line != f"peer 127.0.0.1:{mine}\n"
        await steering(web)
        second = runtime.pid
        assert second is not None and second != first
        line, mine = await peer(port)
        assert line == f"peer 127.0.0.1:{mine}\n"
        # Killed behind the proxy's back: the kernel drops its socket from the map, the
        # next connection comes to the proxy and starts it again.
        os.killpg(second, signal.SIGKILL)
        await wait_until(lambda: web.state is State.STOPPED, within=10)
        line, mine = await peer(port)
        await steering(web)
        assert runtime.pid not in (first, second)
        steered = web.fast_path.steered
        line, mine = await peer(port)
        assert line == f"peer 127.0.0.1:{mine}\n"
        assert_steered(web.fast_path.steered - steered, 1)


async def test_a_reload_that_turns_it_off_hands_connections_back_to_the_proxy(tmp_path: Path):
    port, backend = free_port(), free_port()
    path, entry = tmp_path / "config.yaml", fast(port, backend)
    path.write_text(config_text(entry))
    async with running(load_config(path)) as proxy:
        await peer(port)
        await steering(proxy.services["web"])
        line, mine = await peer(port)
        assert line == f"peer 127.0.0.1:{mine}\n"
        entry["web"]["fast_path"] = "off"
        path.write_text(config_text(entry))
        assert (await proxy.reload()).replaced == ["web"]
        web = proxy.services["web"]
        assert web.fast_path.state is FastPathState.OFF
        line, mine = await peer(port)  # its route is gone: the proxy's listener takes it
        assert line.startswith("peer 127.0.0.1:") and line != f"peer 127.0.0.1:{mine}\n"
        assert web.stats.accepted == 1


async def test_where_it_cannot_apply_the_service_runs_as_always():
    port, backend = free_port(), free_port()
    entry = fast(port, backend, mode="http", sleep_policy={"idle_timeout": 60})
    entry["web"]["mode"] = "http"
    with proxy_log() as messages:
        async with running(config_from(config_text(entry))) as proxy:
            web = proxy.services["web"]
            assert web.fast_path.state is FastPathState.UNAVAILABLE
            assert web.fast_path.why is Why.MODE_HTTP
            assert (await http_get(port)).startswith(b"HTTP/1.1 200")
            assert (await http_get(port)).startswith(b"HTTP/1.1 200")
            assert web.fast_path.steered == 0 and web.stats.accepted == 2
            metrics = render(proxy).decode()
            assert 'wakeproxy_fast_path_unavailable{reason="mode_http",service="web"} 1.0' in (
                metrics
            )
            _, _, body = await admin_call(proxy, "GET", "/services")
            (described,) = (s["fast_path"] for s in orjson.loads(body)["services"])
            assert described["state"] == "unavailable" and described["why"] == "mode_http"
    said = [m for m in messages if "fast path unavailable" in m]
    assert len(said) == 1 and "mode http" in said[0], said


async def test_a_backend_in_another_network_namespace_is_not_steered():
    port, backend = free_port(), free_port()
    # unshare -n: its own namespace (only its own loopback); the proxy reaches nothing
    # there, so no readiness probe: the start itself is the wake.
    command = ["unshare", "-n", *backend_command(backend, "peer")]
    entry = fast(port, backend, readiness={"tcp": False})
    entry["web"]["command"] = command
    async with running(config_from(config_text(entry))) as proxy:
        web = proxy.services["web"]
        await web.wake("test")
        await wait_until(lambda: web.fast_path.state is not FastPathState.STANDBY, within=10)
        assert web.fast_path.state is FastPathState.UNAVAILABLE
        assert web.fast_path.why is Why.NAMESPACE


def _loaded_link(proc: subprocess.Popen[str]) -> int:
    """The link id from the proxy's log line saying the fast path is loaded."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # the proxy says one or the other as it starts
        assert "fast path unavailable" not in line, line
        found = re.search(r"fast path is loaded \(link (\d+)\)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("the proxy never said it loaded the fast path")


async def test_a_killed_proxy_leaves_no_program_attached(tmp_path: Path):
    port, backend = free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(config_text(fast(port, backend)))
    proc = start_proxy(path, port)
    try:
        link = _loaded_link(proc)
        assert [each.id for each in bpf.links() if each.id == link] == [link]
        await peer(port)  # started, and steered to
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    # No link in the kernel's list, and nothing steers the port: nobody listens on it.
    await wait_until(lambda: all(each.id != link for each in bpf.links()), within=10)
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


async def test_without_the_capability_it_falls_back_and_says_why(tmp_path: Path):
    port, backend, admin = free_port(), free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(config_text(fast(port, backend), admin=admin))
    drop = "-bpf,-net_admin,-sys_admin,-perfmon"
    prefix = ("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--")
    proc = start_proxy(path, port, prefix=prefix)
    try:
        line, mine = await peer(port)
        assert line.startswith("peer 127.0.0.1:") and line != f"peer 127.0.0.1:{mine}\n"
        line, mine = await peer(port)
        assert line != f"peer 127.0.0.1:{mine}\n", "forwarded by the proxy, as always"
        metrics = (await http_get(admin, "/metrics")).decode()
        assert 'wakeproxy_fast_path_unavailable{reason="permission",service="web"} 1.0' in (metrics)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    said = [m for m in err.splitlines() if "fast path unavailable" in m]
    assert len(said) == 1 and "Operation not permitted" in said[0], err[-2000:]
    assert "CAP_BPF" in said[0]


def _drop_in_capabilities() -> str:
    """What config/wakeproxy-fast-path.conf grants, as setpriv takes it (+bpf,+net_admin)."""
    (granted,) = unit_settings(FAST_PATH_DROP_IN)["AmbientCapabilities"]
    return ",".join(f"+{cap.removeprefix('CAP_').lower()}" for cap in granted.split())


def _ambient(pid: int) -> int:
    """A process's ambient capability set, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapAmb:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapAmb for {pid}")


async def test_the_systemd_drop_ins_capabilities_are_enough_and_not_passed_on(
    tmp_path: Path,
):
    port, backend, admin = free_port(), free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(config_text(fast(port, backend), admin=admin))
    # Exactly what the drop-in grants, and nothing else: the bounding set is the unit's
    # CapabilityBoundingSet=, the ambient set its AmbientCapabilities=.
    caps = _drop_in_capabilities()
    prefix = (
        "setpriv",
        f"--inh-caps=-all,{caps}",
        f"--ambient-caps=-all,{caps}",
        f"--bounding-set=-all,{caps}",
        "--",
    )
    proc = start_proxy(path, port, prefix=prefix)
    try:
        _loaded_link(proc)
        assert _ambient(proc.pid) != 0, "the proxy runs with the drop-in's capabilities"
        await peer(port)  # starts the backend, through the proxy
        steers = 'wakeproxy_fast_path_state{service="web",state="steering"} 1.0'
        async with asyncio.timeout(10):
            while steers not in (await http_get(admin, "/metrics")).decode():  # noqa: ASYNC110 - the proxy runs in another process
                await asyncio.sleep(0.05)
        line, mine = await peer(port)
        assert line == f"peer 127.0.0.1:{mine}\n", "steered: the backend sees the client"
        # The command did not inherit them. It runs as root here (the test's), which gets
        # its capabilities from the bounding set whatever; a command that is not root
        # keeps only its ambient set across exec, and that is empty.
        (command,) = pids_with(f"--port {backend} ")
        assert _ambient(command) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "fast path unavailable" not in err, err[-2000:]


@pytest.mark.docker
async def test_a_host_network_container_is_steered_to_and_still_sleeps(make_container):
    port, backend = free_port(), free_port()
    name = make_container(backend)
    entry = service("web", port, backend, container=name, fast_path="kernel")
    entry["web"]["sleep_policy"] = {"idle_timeout": 0.5}
    async with running(config_from(config_text(entry))) as proxy:
        web = proxy.services["web"]
        # Running when the proxy started: steered to from the start.
        await steering(web)
        accepted = web.stats.accepted
        assert (await http_get(port)).endswith(b"hello from busybox\n")
        assert web.stats.accepted == accepted
        assert_steered(web.fast_path.steered, 1)
        await wait_until(lambda: web.state is State.PAUSED, within=15)
        assert (await http_get(port)).endswith(b"hello from busybox\n")  # held, woken
        assert web.stats.accepted == accepted + 1
        # (Answered during the unpause, before the engine's reply: the wake ends after.)
        await wait_until(lambda: web.stats.wakes["ok"] == 1, within=10)
        await steering(web)
        assert (await http_get(port)).endswith(b"hello from busybox\n")
        assert web.stats.accepted == accepted + 1
        assert_steered(web.fast_path.steered, 2)


async def test_a_reload_that_gives_it_replicas_leaves_no_route_to_the_one_before(tmp_path: Path):
    # Replicas are a key a running service takes in place: the service's one backend
    # gives way to its replicas, which the fast path does not serve. The route the
    # kernel had to the old backend must go with it, or new connections would still
    # reach that process (now no replica) past the proxy.
    port, backend = free_port(), free_port()
    path, entry = tmp_path / "config.yaml", fast(port, backend)
    path.write_text(config_text(entry))
    async with running(load_config(path)) as proxy:
        await peer(port)
        single = proxy.services["web"]
        await steering(single)
        python, server = backend_command(backend)[:2]
        entry["web"]["command"] = [python, server, "--port", "{port}", "--mode", "peer"]
        entry["web"]["replicas"] = {"count": 2}
        path.write_text(config_text(entry))
        await proxy.reload()
        assert "web" not in proxy.services, "the single backend gave way to its replicas"
        replicas = [proxy.services["web@1"], proxy.services["web@2"]]
        assert all(r.fast_path.state is FastPathState.UNAVAILABLE for r in replicas)
        assert all(r.fast_path.why is Why.REPLICAS for r in replicas)
        assert single.fast_path.state is not FastPathState.STEERING
        line, mine = await peer(port)  # the proxy's listener takes it, and places it
        assert line.startswith("peer 127.0.0.1:") and line != f"peer 127.0.0.1:{mine}\n"
        assert sum(r.stats.accepted for r in replicas) == 1
