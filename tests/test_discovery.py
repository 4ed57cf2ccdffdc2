"""Label discovery against the real engine: containers on host networking, 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from tests.helpers import (
    backend_command,
    config_from,
    container_status,
    docker,
    engine_order,
    free_port,
    http_get,
    port_answers,
    running,
    wait_until,
)
from wakeproxy.core.states import State
from wakeproxy.runtimes.engine import DockerEngine

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
BODY = b"hello from busybox\n"


def discovery_yaml(admin: int, *services: str) -> str:
    return "\n".join(
        [
            "admin:",
            f"  listen: 127.0.0.1:{admin}",
            "discovery:",
            "  docker_labels: true",
            '  allowed_listen: ["127.0.0.0/8:1024-65535"]',
            "  interval: 600  # longer than any test: the event stream must do the work",
            *(["services:", *services] if services else []),
        ]
    )


def labels_for(name: str, listen: int, backend: int, **more: str) -> dict[str, str]:
    return {
        "wakeproxy.enable": "true",
        "wakeproxy.name": name,
        "wakeproxy.listen": f"127.0.0.1:{listen}",
        "wakeproxy.port": str(backend),  # host networking: the container's address is 127.0.0.1
        "wakeproxy.connect_concurrency": "8",  # busybox httpd's backlog is 9
        **{f"wakeproxy.{k}": v for k, v in more.items()},
    }


async def admin_json(port: int, path: str) -> object:
    raw = await http_get(port, path)
    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])


async def test_labelled_container_appears_is_woken_follows_recreation_and_goes_away(
    make_container,
):
    admin, steady_port, steady_backend = free_port(), free_port(), free_port()
    steady = [
        "  steady:",
        f"    listen: 127.0.0.1:{steady_port}",
        f"    backend: 127.0.0.1:{steady_backend}",
        f"    command: {backend_command(steady_backend, 'echo')}",
    ]
    name = f"lab-{uuid.uuid4().hex[:8]}"
    first, second, backend = free_port(), free_port(), free_port()
    async with running(config_from(discovery_yaml(admin, *steady))) as proxy:
        # A connection to another service stays open through everything below.
        reader, writer = await asyncio.open_connection("127.0.0.1", steady_port)
        writer.write(b"before\n")
        assert await asyncio.wait_for(reader.readexactly(7), 15) == b"before\n"
        assert name not in proxy.services

        container = make_container(
            backend, paused=True, labels=labels_for(name, first, backend, idle_timeout="1")
        )
        await wait_until(lambda: name in proxy.services, within=30)
        service = proxy.services[name]
        await wait_until(lambda: service.state is State.PAUSED, within=30)
        assert service.cfg.source == "labels" and service.cfg.sleep_policy.idle_timeout == 1

        reply = await http_get(first, within=15)
        assert reply.endswith(BODY), reply
        # The answer can come before the engine tells the proxy the unpause ended.
        await wait_until(lambda: service.stats.wakes["ok"] == 1, within=30)
        await wait_until(lambda: service.state is State.PAUSED, within=30)
        assert container_status(container) == "paused"

        # Labels cannot change in place: compose recreates the container.
        docker("rm", "-f", container)
        make_container(
            backend, name=container, labels=labels_for(name, second, backend, idle_timeout="600")
        )
        await wait_until(
            lambda: name in proxy.services and proxy.services[name].cfg.listen.port == second,
            within=30,
        )
        assert not port_answers(first), "the old listener closed"
        assert (await http_get(second, within=15)).endswith(BODY)
        assert proxy.services[name].cfg.sleep_policy.idle_timeout == 600
        listed = await admin_json(admin, "/services")
        assert isinstance(listed, dict)
        entry = next(s for s in listed["services"] if s["name"] == name)
        assert entry["source"] == "labels" and entry["listen"] == f"127.0.0.1:{second}"

        docker("rm", "-f", container)
        await wait_until(lambda: name not in proxy.services, within=30)
        assert not port_answers(second), "the removed container's port closed"

        writer.write(b"after\n")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"after\n"
        writer.close()


async def test_bad_labels_fail_that_service_only_and_compose_depends_on_wakes_first(
    make_container,
):
    admin = free_port()
    tag = uuid.uuid4().hex[:8]
    db_name, app_name, bad_name, wide_name = (f"{s}-{tag}" for s in ("db", "app", "bad", "wide"))
    db_port, db_backend, app_port, app_backend = (free_port() for _ in range(4))
    # Found at start-up (the same listing as the state), not through events.
    db = make_container(db_backend, paused=True, labels=labels_for(db_name, db_port, db_backend))
    app_labels = labels_for(app_name, app_port, app_backend)
    del app_labels["wakeproxy.name"]  # named by compose's own service label instead
    app = make_container(
        app_backend,
        paused=True,
        labels={
            **app_labels,
            "com.docker.compose.service": app_name,
            # Compose v2 writes this; "cache" is not managed by wakeproxy and is ignored.
            "com.docker.compose.depends_on": f"{db_name}:service_started:false,cache:x:false",
        },
    )
    bad = free_port()
    make_container(
        bad, labels=labels_for(bad_name, free_port(), bad, idle_timeout="soon", actoin="stop")
    )
    make_container(
        free_port(),
        labels={"wakeproxy.enable": "true", "wakeproxy.name": wide_name, "wakeproxy.port": "80"},
    )

    # The config file names this one too: the file wins.
    twin, twin_backend = f"twin-{tag}", free_port()
    make_container(twin_backend, labels=labels_for(twin, free_port(), twin_backend))
    in_file = [
        f"  {twin}:",
        f"    listen: 127.0.0.1:{free_port()}",
        f"    backend: 127.0.0.1:{twin_backend}",
        f"    command: {backend_command(twin_backend)}",
    ]

    async with running(config_from(discovery_yaml(admin, *in_file))) as proxy:
        assert proxy.services[twin].cfg.source == "config"
        assert proxy.services[app_name].cfg.depends_on == (db_name,)
        assert proxy.services[db_name].state is State.PAUSED
        assert bad_name not in proxy.services and wide_name not in proxy.services
        why = proxy.rejected[bad_name]
        assert "label wakeproxy.idle_timeout: expected a duration" in why, why
        assert "unknown label 'wakeproxy.actoin' (did you mean 'wakeproxy.action'?)" in why, why
        assert "outside discovery.allowed_listen" in proxy.rejected[wide_name]

        since = time.time()
        reply = await http_get(app_port, within=15)
        assert reply.endswith(BODY), reply
        # The answer can come before the engine tells the proxy the unpause ended.
        await wait_until(lambda: proxy.services[db_name].stats.wakes["ok"] == 1, within=30)
        # The engine's own record: db was unpaused before app.
        order = engine_order([db, app], "unpause", since - 1, time.time() + 1)
        assert order == [db, app], order
        assert container_status(db) == "running" and container_status(app) == "running"

        listed = await admin_json(admin, "/services")
        assert isinstance(listed, dict)
        refused = {s["name"]: s for s in listed["services"] if s["state"] == "failed"}
        assert set(refused) == {bad_name, wide_name}, "the file's twin is no failure"
        assert "wakeproxy.idle_timeout" in refused[bad_name]["reason"]
        metrics = await http_get(admin, "/metrics")
        assert f'wakeproxy_discovery_rejected{{service="{bad_name}"}} 1.0'.encode() in metrics


@pytest.mark.engine_restart
@pytest.mark.timeout(240)
async def test_missed_events_are_caught_by_the_periodic_re_read_and_after_the_engine_returns(
    own_engine, monkeypatch
):
    monkeypatch.setenv("DOCKER_HOST", own_engine.host)
    original = DockerEngine._dispatch

    def deaf(self: DockerEngine, event: dict) -> None:
        """The engine's events still move states, but never cue discovery: missed."""
        cue, self.on_labelled_change = self.on_labelled_change, None
        try:
            original(self, event)
        finally:
            self.on_labelled_change = cue

    monkeypatch.setattr(DockerEngine, "_dispatch", deaf)
    admin, port, backend = free_port(), free_port(), free_port()
    periodic = discovery_yaml(admin).replace("interval: 600", "interval: 1")
    async with running(config_from(periodic)) as proxy:
        assert "late" not in proxy.services
        name = own_engine.httpd(backend, labels=labels_for("late", port, backend))
        # No event cued a re-read: the periodic one (every second) finds it.
        await wait_until(lambda: "late" in proxy.services, within=30)
        await wait_until(lambda: port_answers(port), within=30)  # listening a moment later
        assert (await http_get(port)).endswith(BODY)

    async with running(config_from(discovery_yaml(admin))) as proxy:
        assert "late" in proxy.services, "found by the start-up listing"
        late = proxy.services["late"]
        docker("rm", "-f", name, host=own_engine.host)
        # The engine's event reached the proxy (the service's state follows it), and yet
        # discovery was not cued: still listed, stale (the periodic re-read is 600 s away).
        await wait_until(lambda: late.state is State.FAILED, within=30)
        assert "late" in proxy.services, "stale: no event and no periodic re-read (600 s)"
        engine = proxy.engine
        assert engine is not None
        await asyncio.to_thread(own_engine.stop)
        await wait_until(lambda: not engine.up, within=30)
        await asyncio.to_thread(own_engine.start)
        # The re-read after the engine came back sees it is gone.
        await wait_until(lambda: "late" not in proxy.services, within=30, interval=0.1)
        # Dropped from the table before its listener closes: wait for that too.
        await wait_until(lambda: not port_answers(port), within=30)
