"""Faults on the real engine: containers killed, removed or recreated by someone else,
and the engine itself restarting (with --live-restore, containers survive it).

The engine restarted is a second dockerd the test starts itself (``own_engine``): the
machine's engine is never signalled. It runs after every other test (marker
``engine_restart``). All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest

from tests.helpers import (
    config_from,
    container_status,
    docker,
    free_port,
    http_get,
    in_ci,
    port_answers,
    running,
    start_proxy,
    wait_until,
)
from wakeproxy.core.states import State

pytestmark = pytest.mark.docker
BODY = b"hello from busybox\n"


def services_yaml(*entries: tuple[str, int, int, str, str]) -> str:
    lines = ["services:"]
    for name, port, backend, container, extra in entries:
        lines += [
            f"  {name}:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            f"    container: {container}",
            "    connect_concurrency: 8",
            f"    {extra}" if extra else "    wake_timeout: 15",
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.asyncio
async def test_container_killed_removed_and_recreated_under_the_proxy(make_container):
    port, backend = free_port(), free_port()
    name = make_container(backend)
    config = config_from(
        services_yaml(("web", port, backend, name, "sleep_policy: {idle_timeout: 600}"))
    )
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).endswith(BODY)

        # A forwarding connection (request not sent yet) when the container is killed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wait_until(lambda: service.attached == 1 and not service.held, within=30)
        docker("kill", name)
        assert await asyncio.wait_for(reader.read(), 5) == b"", "closed promptly"
        writer.close()
        await wait_until(lambda: service.state is State.STOPPED, within=30)
        assert (await http_get(port, within=20)).endswith(BODY), "the next connection starts it"
        assert container_status(name) == "running"

        docker("rm", "-f", name)
        await wait_until(lambda: service.state is State.FAILED, within=30)
        assert "removed" in service.reason or "No such container" in service.reason
        assert await http_get(port) == b"", "refused at once, not held"

        # Recreated (a new id, the same name): the service follows by name.
        make_container(backend, name=name)
        await wait_until(lambda: service.state is State.RUNNING, within=15)
        assert (await http_get(port)).endswith(BODY)


@pytest.mark.asyncio
async def test_a_slow_container_is_running_only_once_ready_and_probes_never_restart_it(
    make_container,
):
    # httpd ignores SIGTERM (the ignore survives exec) and listens 2 s after its start:
    # a start outlasts wake_timeout, and a stop takes stop_timeout.
    port, backend = free_port(), free_port()
    name = make_container(backend, shell="trap '' TERM; sleep 2; exec {httpd}")
    docker("stop", "-t", "0", name)
    probe = b"GET /sse HTTP/1.1\r\nHost: web\r\nAccept: */*\r\n\r\n"
    extra = (
        "mode: http\n    wake_timeout: 1\n    stop_timeout: 2\n"
        "    sleep_policy: {idle_timeout: 0.3, action: stop}"
    )
    async with running(config_from(services_yaml(("web", port, backend, name, extra)))) as proxy:
        service = proxy.services["web"]
        reply = await http_get(port, within=15)
        assert reply.startswith(b"HTTP/1.1 504"), reply[:40]
        # Before the fix the retry saw the container running and marked it so: 502s.
        deadline = time.monotonic() + 15
        while not port_answers(backend):
            assert service.state is not State.RUNNING, "running before it listened"
            assert time.monotonic() < deadline, "the container never listened"
            await asyncio.sleep(0.02)
        await wait_until(lambda: service.state is State.RUNNING, within=15)
        assert (await http_get(port)).endswith(BODY)
        woken = service.stats.wakes["ok"]

        # The stop takes 2 s; gateway probes every 100 ms meet it in flight and are
        # answered by the proxy (before the fix each one restarted the container).
        answered_while_stopping = 0
        deadline = time.monotonic() + 15
        while not (answered_while_stopping and service.state is State.STOPPED):
            assert time.monotonic() < deadline, service.state
            stopping = service.state is State.STOPPING
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(probe)
                head = await reader.readuntil(b"\r\n\r\n")
                writer.transport.abort()
            # httpd answers /sse with a 404 while awake; the proxy's answer is an event stream.
            by_proxy = head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            answered_while_stopping += stopping and by_proxy
            await asyncio.sleep(0.1)
        assert service.stats.wakes["ok"] == woken, "a probe restarted the container"
        assert container_status(name) == "exited"


@pytest.mark.parametrize("backends", ["wake", "as-is"])
def test_sigterm_wakes_every_container_or_leaves_each_as_it_is(make_container, tmp_path, backends):
    """Through `wakeproxy run` and SIGTERM (the real shutdown path): with `backends: wake`
    paused containers serve without the proxy afterwards; the default leaves them paused."""
    port, backend, admin = free_port(), free_port(), free_port()
    name = make_container(backend, paused=True)
    path = tmp_path / "config.yaml"
    top = f"admin: {{listen: 127.0.0.1:{admin}}}\n"
    if backends == "wake":
        top += "shutdown: {backends: wake}\n"
    path.write_text(top + services_yaml(("web", port, backend, name, "")))
    proxy = start_proxy(path, admin)  # not the service's port: a connect would wake it
    try:
        assert container_status(name) == "paused"
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=30)
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.communicate()
    assert proxy.returncode == 0, err
    if backends == "wake":
        assert container_status(name) == "running"
        with urllib.request.urlopen(f"http://127.0.0.1:{backend}/", timeout=10) as reply:
            assert reply.read().endswith(BODY), "it serves directly"
    else:
        assert container_status(name) == "paused", "as-is: left as it was"


def test_sigkill_and_restart_with_paused_stopped_and_running_containers(make_container, tmp_path):
    names, ports = {}, {}
    for state in ("paused", "stopped", "running"):
        ports[state] = (free_port(), free_port())
        names[state] = make_container(ports[state][1], paused=state == "paused")
    docker("stop", "-t", "0", names["stopped"])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        + services_yaml(*((s, *ports[s], names[s], "") for s in names)).replace(
            "services:\n", "services:\n", 1
        )
    )
    first = start_proxy(config, ports["running"][0])
    first.kill()  # no shutdown of any kind
    first.communicate(timeout=10)
    expected = {"paused": "paused", "stopped": "exited", "running": "running"}
    assert {s: container_status(n) for s, n in names.items()} == expected, "nothing touched"
    second = start_proxy(config, ports["running"][0])
    try:
        for state in names:
            url = f"http://127.0.0.1:{ports[state][0]}/"
            with urllib.request.urlopen(url, timeout=20) as response:
                reply = response.read()
            assert reply.endswith(BODY), (state, reply)
        assert all(container_status(n) == "running" for n in names.values())
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=30)


@pytest.mark.engine_restart
@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_engine_restart_keeps_forwarding_fails_wakes_cleanly_and_recovers(
    own_engine, monkeypatch
):
    # The engine restarted is one this test started (own_engine records its pid); the
    # machine's engine, which other work may use, is never signalled.
    monkeypatch.setenv("DOCKER_HOST", own_engine.host)
    live, live_backend, cold, cold_backend = (free_port() for _ in range(4))
    running_one = own_engine.httpd(live_backend)
    paused_one = own_engine.httpd(cold_backend, paused=True)
    config = config_from(
        services_yaml(
            ("live", live, live_backend, running_one, "sleep_policy: {idle_timeout: 600}"),
            # A wake_timeout of 30 s: a connection held until it passed would be counted
            # wake_timeout (the check below), not backend_error.
            ("cold", cold, cold_backend, paused_one, "wake_timeout: 30"),
        )
    )
    async with running(config) as proxy:
        engine = proxy.engine
        assert engine is not None and engine.up
        cold_service = proxy.services["cold"]
        tasks_before = len(asyncio.all_tasks())
        await asyncio.to_thread(own_engine.stop)
        try:
            await wait_until(lambda: not engine.up, within=30)
            # Forwarding to a running backend needs no engine.
            assert (await http_get(live)).endswith(BODY)
            # A wake cannot happen: the connection is closed, not held until wake_timeout
            # (30 s): the proxy's counts say why it was closed, whatever the clock read.
            assert await http_get(cold, within=40) == b""
            assert cold_service.state is State.FAILED
            counts = cold_service.stats.connections
            assert counts["backend_error"] == 1 and counts["wake_timeout"] == 0, dict(counts)
            assert cold_service.stats.wakes["timeout"] == 0
        finally:
            await asyncio.to_thread(own_engine.start)
        status = docker("inspect", "-f", "{{.State.Status}}", running_one, host=own_engine.host)
        assert status == "running", "live-restore kept it running"
        await wait_until(lambda: engine.up, within=30, interval=0.1)
        # The back-off retry re-reads the state: paused again, and the next connection wakes it.
        await wait_until(lambda: cold_service.state is State.PAUSED, within=30, interval=0.1)
        assert (await http_get(cold, within=15)).endswith(BODY)
        assert (await http_get(live)).endswith(BODY)
        assert len(asyncio.all_tasks()) <= tasks_before + 2, "no task leaked"


@pytest.mark.engine_restart
def test_the_machine_engine_was_never_stopped_or_restarted(docker_engine):
    """Runs last: the engine the suite found (pid and start time from its pid file) is the
    one still running, so no test stopped, killed or restarted it."""
    from tests import conftest

    if conftest.MACHINE_ENGINE is None:
        message = "no /var/run/docker.pid: cannot tell the machine's engine"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    assert conftest.engine_identity() == conftest.MACHINE_ENGINE
