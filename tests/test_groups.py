"""depends_on and group, with real commands on the process runtime."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import (
    backend_command,
    build,
    config_from,
    first_index,
    free_port,
    http_get,
    proxy_log,
    running,
    service,
    wait_until,
)
from wakeproxy.core.states import State
from wakeproxy.errors import ConfigError, ServiceBusy

pytestmark = pytest.mark.asyncio


def two_services(relation_a: str, relation_b: str = "", idle: float = 0.4):
    ports = {name: (free_port(), free_port()) for name in ("app", "db")}
    lines = ["services:"]
    for name, extra in (("app", relation_a), ("db", relation_b)):
        port, backend = ports[name]
        lines += [
            f"  {name}:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            f"    command: {backend_command(backend, 'http')}",
            "    readiness: {http: /}",
            f"    sleep_policy: {{idle_timeout: {idle}}}",
        ]
        if extra:
            lines.append(f"    {extra}")
    return ports, config_from("\n".join(lines) + "\n")


async def test_dependency_wakes_first_and_sleeps_only_after_its_dependent():
    ports, config = two_services("depends_on: [db]")
    async with running(config) as proxy:
        app, db = proxy.services["app"], proxy.services["db"]
        # One request to app: db is started first (app's wake waits for it).
        with proxy_log() as log:
            reader, writer = await asyncio.open_connection("127.0.0.1", ports["app"][0])
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            await reader.readuntil(b"backend\n")
        assert db.state is State.RUNNING and db.stats.wakes["ok"] == 1
        db_ready = first_index(log, "db: waking -> running")
        app_started = first_index(log, f"as pid {app.runtime.pid}")  # type: ignore[attr-defined]
        assert db_ready < app_started, "app's command started before db was ready"
        # db gets no traffic of its own, yet stays awake while app is awake.
        await asyncio.sleep(1.0)
        assert app.state is State.RUNNING and db.state is State.RUNNING
        assert db.stats.sleeps[("pause", "idle")] == 0
        writer.close()
        # app sleeps after its idle timeout, and then db follows.
        await wait_until(lambda: app.state is State.PAUSED, within=5)
        await wait_until(lambda: db.state is State.PAUSED, within=5)
        # Waking app again wakes db first.
        with proxy_log() as log:
            assert (await http_get(ports["app"][0])).endswith(b"backend\n")
        assert db.state is State.RUNNING and db.stats.wakes["ok"] == 2
        assert first_index(log, "db: awake after") < first_index(log, "app: awake after")


async def test_api_sleep_of_a_needed_dependency_is_refused_unless_forced():
    _, config = two_services("depends_on: [db]", idle=60)
    async with running(config) as proxy:
        db = proxy.services["db"]
        await proxy.services["app"].wake("test")
        assert db.state is State.RUNNING
        with pytest.raises(ServiceBusy, match="needed by app"):
            await db.sleep("pause", "api")
        await db.sleep("pause", "api", force=True)
        assert db.state is State.PAUSED


async def test_a_group_wakes_together_and_sleeps_together():
    ports, config = two_services("group: pair", "group: pair")
    async with running(config) as proxy:
        app, db = proxy.services["app"], proxy.services["db"]
        assert (await http_get(ports["app"][0])).endswith(b"backend\n")
        await wait_until(lambda: db.state is State.RUNNING, within=10)
        assert db.reason == "woken"
        # Keep db busy: app is idle but the group waits for db.
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["db"][0])
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readuntil(b"backend\n")
        await asyncio.sleep(1.0)
        assert app.state is State.RUNNING, "a group member slept while another was busy"
        writer.close()
        await wait_until(lambda: app.state is State.PAUSED and db.state is State.PAUSED, within=5)


async def test_unknown_dependency_and_cycles_are_config_errors():
    with pytest.raises(ConfigError) as info:
        two_services("depends_on: [db]", "depends_on: app")
    assert any("a dependency cycle: app -> db -> app" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        two_services("depends_on: [cache]")
    assert "no service named 'cache'; services: app, db" in info.value.problems[0]


async def test_a_group_sleep_never_pauses_a_member_an_awake_service_still_needs():
    """a and b sleep as a group; c depends on b and stays busy: b must stay running
    (the group's sleep once looked at the dependents of the member whose timer fired)."""
    ports = {name: (free_port(), free_port()) for name in "abc"}
    links = {"a": {"group": "pair"}, "b": {"group": "pair"}, "c": {"depends_on": ["b"]}}
    config = build(
        *(
            service(
                name, port, backend,
                command=backend_command(backend, "http"),
                readiness={"http": "/"},
                sleep_policy={"idle_timeout": 60 if name == "c" else 0.3},
                **links[name],
            )
            for name, (port, backend) in ports.items()
        )
    )  # fmt: skip
    async with running(config) as proxy:
        a, b, c = (proxy.services[n] for n in "abc")
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["c"][0])
        writer.write(b"GET / HTTP/1.1\r\nHost: c\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"backend\n"), 15)
        assert a.state is b.state is c.state is State.RUNNING
        # Well past a's and b's idle timeout, with c's connection still open.
        await asyncio.sleep(1.2)
        assert b.state is State.RUNNING and b.stats.sleeps[("pause", "idle")] == 0
        assert a.state is State.RUNNING, "the group sleeps only once every member may"
        writer.close()
