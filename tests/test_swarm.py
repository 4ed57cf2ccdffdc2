"""Docker Swarm services scaled to zero and back, on a single-node swarm of a second
dockerd this test starts (the machine's engine is never touched). Host networking:
every task listens on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.conftest import BUSYBOX_IMAGE
from tests.helpers import (
    config_from,
    config_text,
    docker,
    free_port,
    http_get,
    port_answers,
    running,
    service,
    wait_until,
)
from wakeproxy.core.states import State

pytestmark = pytest.mark.asyncio
BODY = b"hello from busybox\n"


def create_service(swarm, name: str, port: int, replicas: int = 0, labels=()) -> None:
    label_args = [arg for label in labels for arg in ("--label", label)]
    docker(
        "service", "create", "--detach", "--name", name, "--network", "host",
        "--replicas", str(replicas), "--no-resolve-image", "--stop-grace-period", "0s",
        *label_args, BUSYBOX_IMAGE,
        "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www",
        host=swarm.host, within=60,
    )  # fmt: skip


def update_events(swarm, name: str, since: float) -> int:
    out = docker(
        "events", "--since", f"{since:.3f}", "--until", f"{time.time() + 1:.3f}",
        "--filter", "type=service", "--filter", f"service={name}",
        "--filter", "event=update", "--format", "{{.Action}}",
        host=swarm.host,
    )  # fmt: skip
    return len(out.split())


async def test_a_swarm_service_at_zero_is_scaled_up_once_for_a_burst_and_back_to_zero(
    own_swarm,
):
    swarm = own_swarm
    name = f"wp-{uuid.uuid4().hex[:8]}"
    port, backend = free_port(), free_port()
    create_service(swarm, name, backend)
    config = config_from(
        config_text(
            service(
                "web", port, backend, swarm_service=name, engine="swarm", wake_timeout=30,
                sleep_policy={"idle_timeout": 1, "action": "stop"},
            ),
            engines={"swarm": {"host": swarm.host}},
        )
    )  # fmt: skip
    since = time.time()
    async with running(config) as proxy:
        web = proxy.services["web"]
        assert web.state is State.STOPPED and web.runtime.kind == "swarm"
        replies = await asyncio.gather(*(http_get(port, within=40) for _ in range(200)))
        assert all(reply.endswith(BODY) for reply in replies)
        assert web.stats.wakes["ok"] == 1
        await wait_until(lambda: web.state is State.STOPPED, within=40)
        # One scale-up for 200 clients, one scale-down: the engine's own count.
        assert update_events(swarm, name, since) == 2
        # Scaled by hand outside the proxy: followed.
        docker("service", "scale", "--detach", f"{name}=1", host=swarm.host, within=60)
        await wait_until(lambda: web.state is State.RUNNING, within=30)
        await wait_until(lambda: web.state is State.STOPPED, within=40)  # idle again


async def test_with_action_pause_its_task_containers_on_this_node_are_paused_and_unpaused(
    own_swarm,
):
    swarm = own_swarm
    name = f"wp-{uuid.uuid4().hex[:8]}"
    port, backend = free_port(), free_port()
    create_service(swarm, name, backend, replicas=1)
    await wait_until(lambda: port_answers(backend), within=60)
    (task,) = docker(
        "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}", host=swarm.host
    ).split()
    config = config_from(
        config_text(
            service(
                "web", port, backend, swarm_service=name, engine="swarm", wake_timeout=30,
                sleep_policy={"idle_timeout": 1, "action": "pause"},
            ),
            engines={"swarm": {"host": swarm.host}},
        )
    )  # fmt: skip
    since = time.time()
    async with running(config) as proxy:
        web = proxy.services["web"]
        assert web.state is State.RUNNING
        await wait_until(lambda: web.state is State.PAUSED, within=20)
        paused = docker("inspect", "-f", "{{.State.Paused}}", task, host=swarm.host)
        assert paused == "true"
        assert (await http_get(port, within=20)).endswith(BODY)
        await wait_until(lambda: web.stats.wakes["ok"] == 1, within=10)
        until = time.time() + 1
        events = docker(
            "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
            "--filter", f"container={task}", "--filter", "event=unpause", "--format", "x",
            host=swarm.host,
        )  # fmt: skip
        assert len(events.split()) == 1, "woken by unpausing its task, not a new one"
