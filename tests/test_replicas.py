"""Replicas for real: several commands behind one listener, woken as the load grows, slept
newest first as it falls, balanced by attached connections; the API and metrics."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from tests.helpers import (
    BACKEND,
    PYTHON,
    config_from,
    config_text,
    consecutive_ports,
    docker,
    engine_order,
    exchange,
    free_port,
    http_get,
    proxy_log,
    running,
    service,
    wait_until,
)
from wakeproxy.config import load_config
from wakeproxy.control import metrics
from wakeproxy.core.states import State
from wakeproxy.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.asyncio

SERIAL = str(Path(__file__).parent / "backends" / "serial.py")
ROOT = Path(__file__).parent.parent


def replicated(port: int, first: int, count: int, **replicas: object) -> str:
    return config_text(
        service(
            "web",
            port,
            first,
            command=[PYTHON, SERIAL, "--port", "{port}"],
            replicas={"count": count, **replicas},
            wake_timeout=15,
            sleep_policy={"idle_timeout": 1},
        )
    )


def answered_by(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    return int(reply.rsplit(b"\r\n\r\n", 1)[1])


async def test_replicas_wake_one_by_one_with_the_load_and_sleep_newest_first():
    port, first = free_port(), consecutive_ports(4)
    config = config_from(replicated(port, first, 4, max=3, target_inflight=2))
    async with running(config) as proxy:
        pool = proxy.frontends["web"]
        replicas = [proxy.services[f"web@{i}"] for i in range(1, 5)]
        assert [r.state for r in replicas] == [State.STOPPED] * 4
        assert [str(r.backend) for r in replicas] == [f"127.0.0.1:{first + i}" for i in range(4)]

        # One client at a time (and the one before it, still closing): one is enough.
        for _ in range(10):
            assert answered_by(await http_get(port)) == first
        assert [r.state for r in replicas] == [State.RUNNING] + [State.STOPPED] * 3

        # Eight clients for 2 s: 20 ms per request on each replica; the load wakes more.
        most_awake = 0
        seen: collections.Counter[int] = collections.Counter()
        deadline = time.monotonic() + 2.0

        async def client() -> None:
            nonlocal most_awake
            while time.monotonic() < deadline:
                seen[answered_by(await http_get(port, within=20))] += 1
                most_awake = max(most_awake, pool.awake())

        await asyncio.gather(*(client() for _ in range(8)))
        assert most_awake == 3, "woken up to max, never past it"
        assert replicas[3].state is State.STOPPED and replicas[3].stats.wakes["ok"] == 0
        assert set(seen) == {first, first + 1, first + 2}, f"balanced over all three: {seen}"
        assert pool.scale_ups >= 2

        # Load gone: each sleeps on its own idle timer, the newest first (in the log's
        # order: two pauses can end within one poll).
        with proxy_log() as messages:
            await wait_until(lambda: all(r.state is State.PAUSED for r in replicas[:3]), within=20)
        paused = [m.split(":")[0] for m in messages if m.endswith("pausing -> paused (idle)")]
        assert paused == ["web@3", "web@2", "web@1"]
        # The next request wakes the oldest again (an unpause).
        assert answered_by(await http_get(port)) == first
        assert replicas[0].stats.wakes["ok"] == 2


async def test_min_replicas_run_from_the_start_and_never_sleep():
    port, first = free_port(), consecutive_ports(2)
    config = config_from(replicated(port, first, 2, min=1, target_inflight=4))
    async with running(config) as proxy:
        one, two = proxy.services["web@1"], proxy.services["web@2"]
        await wait_until(lambda: one.state is State.RUNNING, within=15)
        assert answered_by(await http_get(port)) == first
        await asyncio.sleep(1.6)  # past idle_timeout: only a replica above min may sleep
        assert one.state is State.RUNNING and two.state is State.STOPPED
        assert one.stats.sleeps.total() == 0


async def api(proxy, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """One request to the proxy's admin API over HTTP."""
    listen = proxy.config.admin.listen
    reader, writer = await asyncio.open_connection(listen.host, listen.port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        async with asyncio.timeout(30):
            response = await reader.read(-1)
    finally:
        writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(payload)


async def test_the_api_lists_replicas_and_scales_them_by_hand():
    port, first = free_port(), consecutive_ports(3)
    async with running(config_from(replicated(port, first, 3))) as proxy:
        status, scaled = await api(proxy, "POST", "/services/web/scale", b'{"count": 2}')
        assert status == 200, scaled
        assert [r["state"] for r in scaled["replicas"]] == ["running", "running", "stopped"]
        assert scaled["refused"] == {} and scaled["max"] == 3 and scaled["awake"] == 2
        # Two awake: connections spread over them (fewest attached first), none to the third.
        replies = await asyncio.gather(*(http_get(port) for _ in range(6)))
        assert {answered_by(r) for r in replies} == {first, first + 1}
        status, listing = await api(proxy, "GET", "/services")
        owners = {s["name"]: s["replica_of"] for s in listing["services"]}
        assert owners == {"web@1": "web", "web@2": "web", "web@3": "web"}
        status, shown = await api(proxy, "GET", "/services/web/replicas")
        assert status == 200 and [r["name"] for r in shown["replicas"]] == list(owners)
        assert sum(r["forwarded"] for r in shown["replicas"]) == 6
        status, scaled = await api(proxy, "POST", "/services/web/scale", b'{"count": 0}')
        assert [r["state"] for r in scaled["replicas"]] == ["paused", "paused", "stopped"]
        status, wrong = await api(proxy, "POST", "/services/web/scale", b'{"count": 4}')
        assert status == 400 and "from 0 to 3" in wrong["error"]
        status, which = await api(proxy, "POST", "/services/web/wake")
        assert status == 404 and which["replicas"] == ["web@1", "web@2", "web@3"]
        text = metrics.render(proxy).decode()
        assert 'wakeproxy_replicas{service="web",state="paused"} 2.0' in text
        assert 'wakeproxy_replicas{service="web",state="stopped"} 1.0' in text
        assert 'wakeproxy_connections_total{outcome="forwarded",service="web@1"}' in text


async def test_scale_lists_the_replicas_it_could_not_put_to_sleep():
    # README: scale puts the rest to sleep, newest first; one with open connections
    # stays, listed in "refused" with the reason.
    port, first = free_port(), consecutive_ports(3)
    command = [PYTHON, BACKEND, "--port", "{port}", "--mode", "http"]
    config = config_text(
        service(
            "web", port, first, command=command, replicas={"count": 3},
            wake_timeout=15, sleep_policy={"idle_timeout": 600},
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        replicas = [proxy.services[f"web@{i}"] for i in (1, 2, 3)]
        status, scaled = await api(proxy, "POST", "/services/web/scale", b'{"count": 3}')
        assert status == 200 and scaled["refused"] == {}
        assert [r.state for r in replicas] == [State.RUNNING] * 3
        # Three kept-alive connections: one on each replica (the fewest attached first).
        clients = []
        try:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                clients.append(writer)
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"backend\n"), 15)
            assert [r.attached for r in replicas] == [1, 1, 1]
            status, scaled = await api(proxy, "POST", "/services/web/scale", b'{"count": 1}')
            assert status == 200
            assert sorted(scaled["refused"]) == ["web@2", "web@3"], scaled["refused"]
            assert all("1 connection(s) open" in why for why in scaled["refused"].values())
            assert [r.state for r in replicas] == [State.RUNNING] * 3
        finally:
            for writer in clients:
                writer.close()
        await wait_until(lambda: not any(r.attached for r in replicas), within=15)
        status, scaled = await api(proxy, "POST", "/services/web/scale", b'{"count": 1}')
        assert status == 200 and scaled["refused"] == {}
        assert [r.state for r in replicas] == [State.RUNNING, State.PAUSED, State.PAUSED]


async def test_a_reload_adds_and_removes_replicas_and_keeps_the_others_connections(tmp_path):
    port, first = free_port(), consecutive_ports(3)
    path = tmp_path / "wakeproxy.yaml"

    def write(count: int, target: int) -> None:
        path.write_text(
            config_text(
                service(
                    "web",
                    port,
                    first,
                    command=[PYTHON, BACKEND, "--port", "{port}", "--mode", "echo"],
                    replicas={"count": count, "target_inflight": target},
                    sleep_policy={"idle_timeout": 60},
                )
            )
        )

    write(2, 10)
    async with running(load_config(str(path))) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 15) == b"before"
            held_by = proxy.services["web@1"]
            assert held_by.attached == 1

            write(3, 1)  # one more replica, a new target: web@1 and web@2 change in place
            result = await proxy.reload()
            assert (result.added, result.updated) == (["web@3"], ["web@1", "web@2"])
            pool = proxy.frontends["web"]
            assert [r.name for r in pool.backends] == ["web@1", "web@2", "web@3"]
            assert pool.scaling.target == 1 and proxy.services["web@1"] is held_by
            writer.write(b"during")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"

            write(1, 1)
            result = await proxy.reload()
            assert sorted(result.removed) == ["web@2", "web@3"]
            assert [r.name for r in proxy.frontends["web"].backends] == ["web@1"]
            writer.write(b"after!")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"after!"
            # The listener stayed: a new connection is served too.
            assert await exchange(port, b"new", half_close=True) == b"new"
        finally:
            writer.close()


@pytest.mark.docker
async def test_docker_replicas_woken_by_the_load_and_paused_newest_first(make_container):
    port, first = free_port(), consecutive_ports(2)
    names = [make_container(first, paused=True), make_container(first + 1, paused=True)]
    config = config_from(
        config_text(
            service(
                "web",
                port,
                first,
                replicas={"containers": names, "target_inflight": 1},
                wake_timeout=15,
                sleep_policy={"idle_timeout": 1},
            )
        )
    )
    since = time.time()
    async with running(config) as proxy:
        one, two = proxy.services["web@1"], proxy.services["web@2"]
        assert (one.cfg.container, two.cfg.container) == tuple(names)
        assert [one.state, two.state] == [State.PAUSED, State.PAUSED]
        # A burst: the first connection wakes web@1 and is held; the next finds one
        # replica waking with more attached than the target, and wakes web@2 beside it.
        replies = await asyncio.gather(*(http_get(port, within=20) for _ in range(10)))
        assert all(reply.endswith(b"hello from busybox\n") for reply in replies), replies
        await wait_until(lambda: one.stats.wakes["ok"] == two.stats.wakes["ok"] == 1, within=10)
        await wait_until(lambda: one.state is State.PAUSED and two.state is State.PAUSED, within=20)
    until = time.time() + 1
    # Asked for one right after the other: the engine may finish them in either order.
    assert sorted(engine_order(names, "unpause", since, until)) == sorted(names)
    assert engine_order(names, "pause", since, until) == [names[1], names[0]], "newest first"


async def test_a_replica_that_refuses_connects_is_skipped_and_its_clients_moved_until_it_is_back():
    port, first = free_port(), consecutive_ports(3)
    config = config_from(replicated(port, first, 3, min=3, target_inflight=10))
    async with running(config) as proxy:
        pool = proxy.frontends["web"]
        replicas = [proxy.services[f"web@{i}"] for i in range(1, 4)]
        await wait_until(lambda: all(r.state is State.RUNNING for r in replicas), within=15)
        second = replicas[1].runtime
        assert isinstance(second, ProcessRuntime) and second.pid is not None
        # Steady load from 6 clients until web@2 is seen back; each step waits on what
        # the proxy shows (not on fixed times a slow machine outruns: a trial connection
        # sent before the listener was back doubles the back-off past a fixed window).
        failed = 0
        mended = asyncio.Event()
        done = asyncio.Event()
        after_mend: list[int] = []  # who answered, from the mend on

        async def client() -> None:
            nonlocal failed
            while not done.is_set():
                back = mended.is_set()
                reply = await http_get(port, within=20)
                if not reply.startswith(b"HTTP/1.1 200"):
                    failed += 1
                elif back:
                    after_mend.append(answered_by(reply))

        clients = [asyncio.create_task(client()) for _ in range(6)]
        try:
            await wait_until(lambda: replicas[1].stats.accepted >= 1, within=30)
            in_flight = replicas[1].attached  # requests already sent to it
            os.kill(second.pid, signal.SIGUSR1)  # the process lives, its connects are refused
            await wait_until(lambda: pool.breakers["web@2"].state != "closed", within=30)
            await wait_until(lambda: pool.moved >= 1, within=30)  # a refused one moved
            os.kill(second.pid, signal.SIGUSR2)
            mended.set()
            # Its circuit closes again after a back-off, on a trial connection, and it
            # serves (the back-off is at most 30 s: the deadline is past it).
            await wait_until(
                lambda: pool.breakers["web@2"].state == "closed" and first + 1 in after_mend,
                within=90,
            )
        finally:
            done.set()
            await asyncio.gather(*clients)
        # Only requests already on the replica when its listener went can fail; every
        # connection whose connect was refused went to another replica instead.
        assert failed <= in_flight, (failed, in_flight)
        assert pool.moved >= 1 and pool.breakers["web@2"].opened >= 1
        assert replicas[1].state is State.RUNNING
        text = metrics.render(proxy).decode()
        assert 'wakeproxy_circuit_open_total{replica="web@2",service="web"}' in text


# Replica 2 accepts every connection and closes it at once, answering nothing, until
# SIGUSR2 makes it answer like the others (its port); the others run serial.py.
SILENT_SECOND = """
import os, signal, socket, sys
port, index = int(sys.argv[1]), sys.argv[2]
if index != "2":
    os.execv(sys.executable, [sys.executable, sys.argv[3], "--port", str(port)])
good = []
signal.signal(signal.SIGUSR2, lambda *_: good.append(1))
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(1024)
body = b"%d\\n" % port
while True:
    conn, _ = server.accept()
    with conn:
        if good:
            conn.settimeout(5)
            try:
                while b"\\r\\n\\r\\n" not in conn.recv(65536):
                    pass
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n"
                             b"Connection: close\\r\\n\\r\\n%s" % (len(body), body))
            except OSError:
                pass
"""


async def test_a_replica_that_accepts_and_closes_at_once_is_taken_out_until_it_answers():
    # Least attached favours whoever ends connections fastest: a replica that accepts
    # and closes at once drew 43% of the requests over 3 and its circuit never opened
    # (every connect completed). Its silent ends now open the circuit; a response
    # closes it again.
    port, first = free_port(), consecutive_ports(3)
    config = config_from(
        config_text(
            service(
                "web", port, first,
                command=[PYTHON, "-c", SILENT_SECOND, "{port}", "{index}", SERIAL],
                replicas={"count": 3, "min": 3, "target_inflight": 100},
                wake_timeout=15, sleep_policy={"idle_timeout": 60},
            )
        )
    )  # fmt: skip
    async with running(config) as proxy:
        pool = proxy.frontends["web"]
        replicas = [proxy.services[f"web@{i}"] for i in range(1, 4)]
        await wait_until(lambda: all(r.state is State.RUNNING for r in replicas), within=15)
        breaker = pool.breakers["web@2"]
        sent = 0
        answers: collections.Counter[int] = collections.Counter()

        async def client(total: int) -> None:
            nonlocal sent
            while sent < total:
                sent += 1
                reply = await http_get(port, within=20)
                answers[answered_by(reply) if reply else 0] += 1

        with proxy_log() as messages:
            await asyncio.gather(*(client(90) for _ in range(6)))
        placed = dict(pool.placed)
        # The requests it drew: those placed before its first silent end, then one trial
        # per back-off (1, 2, 4 ... s): a handful, not a third.
        assert placed.get("web@2", 0) <= 15, placed
        assert answers[0] == placed.get("web@2", 0), (answers, placed)  # each of them lost
        assert breaker.opened >= 1 and breaker.state != "closed"
        assert any("closed a connection without answering" in m for m in messages)
        # Its connects still complete, and that closes nothing: a response will.
        os.kill(replicas[1].runtime.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60

        async def until_closed() -> None:
            # Concurrent: a trial goes to it when it has the fewest attached.
            while breaker.state != "closed" and time.monotonic() < deadline:
                await http_get(port, within=20)

        await asyncio.gather(*(until_closed() for _ in range(6)))
        assert breaker.state == "closed"
        replies = await asyncio.gather(*(http_get(port) for _ in range(6)))
        assert first + 1 in {answered_by(r) for r in replies}


async def test_a_reload_that_drops_the_replicas_serves_the_same_address_with_one_backend(
    tmp_path,
):
    port, first = free_port(), consecutive_ports(2)
    path = tmp_path / "wakeproxy.yaml"
    path.write_text(replicated(port, first, 2))
    async with running(load_config(str(path))) as proxy:
        assert answered_by(await http_get(port)) == first
        # The same listen address, no replicas: the pool's listener closes before the
        # one-backend service opens it.
        path.write_text(
            config_text(
                service(
                    "web", port, first, command=[PYTHON, SERIAL, "--port", str(first)],
                    wake_timeout=15,
                )
            )
        )  # fmt: skip
        result = await proxy.reload()
        assert result.failed == {} and result.added == ["web"], result
        assert not any(f.replicated for f in proxy.frontends.values()) and list(proxy.services) == [
            "web"
        ]
        assert answered_by(await http_get(port)) == first
        # And back: replicas again on that address.
        path.write_text(replicated(port, first, 2))
        result = await proxy.reload()
        assert result.failed == {} and sorted(result.added) == ["web@1", "web@2"], result
        assert answered_by(await http_get(port)) == first


@pytest.mark.docker
async def test_compose_scale_replicas_follow_their_containers_and_are_woken_and_slept(
    busybox_image,
):
    # The compose file users run, with a local image. Host networking (this machine has
    # no bridge) gives every container the same address, so no traffic is sent: the
    # engine's own events show the wakes and sleeps.
    project = f"wp-test-{uuid.uuid4().hex[:8]}"
    compose = ["docker-compose", "-p", project, "-f", str(ROOT / "config" / "replicas-compose.yml")]
    env = {
        **os.environ,
        "TOOLS_IMAGE": busybox_image,
        "TOOLS_COMMAND": "sleep 3600",
        "NETWORK_MODE": "host",
    }

    def compose_run(*args: str) -> None:
        subprocess.run([*compose, *args], env=env, check=True, capture_output=True, timeout=180)

    def containers() -> list[str]:
        return sorted(
            docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                   "--format", "{{.Names}}").split()
        )  # fmt: skip

    compose_run("up", "-d", "--scale", "tools=3", "tools")
    try:
        names = containers()
        assert len(names) == 3
        for name in names:
            docker("pause", name)
        config = config_from(
            config_text(
                service(
                    "tools",
                    free_port(),
                    replicas={
                        "compose_service": "tools",
                        "compose_project": project,
                        "port": free_port(),
                    },
                    sleep_policy={"idle_timeout": 1},
                )
            )
        )
        since = time.time()
        async with running(config) as proxy:
            pool = proxy.frontends["tools"]
            assert [r.name for r in pool.backends] == ["tools@1", "tools@2", "tools@3"]
            assert [r.cfg.container for r in pool.backends] == names
            assert all(r.state is State.PAUSED for r in pool.backends) and pool.scaling.maximum == 3
            status, scaled = await api(proxy, "POST", "/services/tools/scale", b'{"count": 2}')
            assert status == 200, scaled
            assert [r["state"] for r in scaled["replicas"]] == ["running", "running", "paused"]
            # Idle: they pause again by themselves, the newest first.
            await wait_until(lambda: all(r.state is State.PAUSED for r in pool.backends), within=20)
            until = time.time() + 1
            assert sorted(engine_order(names, "unpause", since, until)) == names[:2]
            assert engine_order(names[:2], "pause", since, until) == [names[1], names[0]]
            # Scaled up by compose: the new container becomes a replica (running, it
            # sleeps on its idle timer); scaled down: the removed ones leave the pool.
            compose_run("up", "-d", "--scale", "tools=4", "tools")
            await wait_until(lambda: len(pool.backends) == 4, within=20)
            assert pool.backends[3].name == "tools@4" and pool.scaling.maximum == 4
            await wait_until(lambda: pool.backends[3].state is State.PAUSED, within=20)
            compose_run("up", "-d", "--scale", "tools=2", "tools")
            await wait_until(lambda: len(pool.backends) == 2, within=30)
            assert [r.name for r in pool.backends] == ["tools@1", "tools@2"]
            assert sorted(proxy.services) == ["tools@1", "tools@2"]
    finally:
        compose_run("down", "-t", "0")


async def test_active_health_checks_open_and_close_a_circuit_with_no_client_traffic():
    port, first = free_port(), consecutive_ports(2)
    config = config_from(replicated(port, first, 2, min=2, health_interval=0.2))
    async with running(config) as proxy:
        pool = proxy.frontends["web"]
        replicas = [proxy.services["web@1"], proxy.services["web@2"]]
        await wait_until(lambda: all(r.state is State.RUNNING for r in replicas), within=15)
        second = replicas[1].runtime
        assert isinstance(second, ProcessRuntime) and second.pid is not None
        os.kill(second.pid, signal.SIGUSR1)  # its listener goes; the process lives
        await wait_until(lambda: pool.breakers["web@2"].state == "open", within=30)
        assert replicas[1].stats.accepted == 0, "no client found it: the checks did"
        # Past the first back-off (1 s, on the proxy's clock) the failing checks keep it
        # open: they moved its end on, and no client is sent there.
        breaker, loop = pool.breakers["web@2"], asyncio.get_running_loop()
        first_until = breaker.until
        await wait_until(lambda: loop.time() > first_until + 0.5, within=30)
        assert breaker.state == "open" and breaker.until > first_until
        assert not breaker.usable(loop.time())
        replies = await asyncio.gather(*(http_get(port) for _ in range(4)))
        assert {answered_by(r) for r in replies} == {first}
        os.kill(second.pid, signal.SIGUSR2)
        await wait_until(lambda: pool.breakers["web@2"].state == "closed", within=30)
        text = metrics.render(proxy).decode()
        assert 'wakeproxy_replica_connections_total{replica="web@1",service="web"} 4.0' in text


async def test_in_a_group_the_oldest_replica_wakes_and_sleeps_with_the_group():
    port, first = free_port(), consecutive_ports(2)
    db_port, db_backend = free_port(), free_port()
    common = {"group": "g", "wake_timeout": 15, "sleep_policy": {"idle_timeout": 1}}
    text = config_text(
        service("web", port, first, command=[PYTHON, SERIAL, "--port", "{port}"],
                replicas={"count": 2}, **common),
        service("db", db_port, db_backend, command=[PYTHON, SERIAL, "--port", str(db_backend)],
                **common),
    )  # fmt: skip
    async with running(config_from(text)) as proxy:
        db, one, two = (proxy.services[n] for n in ("db", "web@1", "web@2"))
        assert answered_by(await http_get(port)) == first
        await wait_until(lambda: db.state is State.RUNNING, within=15)  # woken with its group
        assert two.state is State.STOPPED, "the group wakes the oldest replica, not all"
        await wait_until(lambda: one.state is db.state is State.PAUSED, within=20)
        assert db.stats.sleeps.total() == one.stats.sleeps.total() == 1
