"""Docker Swarm services scaled to zero and back, on a single-node swarm of a second
dockerd this test starts (the machine's engine is never touched). Host networking:
every task listens on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import yaml

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
    serving,
    wait_until,
)
from wakeproxy.core.states import State

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
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


def swarm_config(swarm, name: str, port: int, backend: int, action: str):
    """One service "web" on the Swarm service ``name`` of the test's swarm engine."""
    return config_from(
        config_text(
            service(
                "web", port, backend, swarm_service=name, engine="swarm", wake_timeout=30,
                sleep_policy={"idle_timeout": 1, "action": action},
            ),
            engines={"swarm": {"host": swarm.host}},
        )
    )  # fmt: skip


def running_tasks(swarm, name: str) -> list[str]:
    """The task containers of Swarm service ``name`` the engine lists as running."""
    return docker(
        "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}", host=swarm.host
    ).split()


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
    config = swarm_config(swarm, name, port, backend, "stop")
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
    # busybox listens as soon as it runs, before dockerd has marked its container running
    # (a window a loaded machine widens): wait for the engine to list the task, which is
    # also what the proxy's start-up listing must see to read the service running.
    await wait_until(lambda: len(running_tasks(swarm, name)) == 1, within=60, interval=0.1)
    await wait_until(lambda: port_answers(backend), within=60)
    (task,) = running_tasks(swarm, name)
    config = swarm_config(swarm, name, port, backend, "pause")
    since = time.time()
    async with running(config) as proxy:
        web = proxy.services["web"]
        assert web.state is State.RUNNING
        await wait_until(lambda: web.state is State.PAUSED, within=20)
        paused = docker("inspect", "-f", "{{.State.Paused}}", task, host=swarm.host)
        assert paused == "true"
        assert (await http_get(port, within=20)).endswith(BODY)
        await wait_until(lambda: web.stats.wakes["ok"] == 1, within=30)
        until = time.time() + 1
        events = docker(
            "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
            "--filter", f"container={task}", "--filter", "event=unpause", "--format", "x",
            host=swarm.host,
        )  # fmt: skip
        assert len(events.split()) == 1, "woken by unpausing its task, not a new one"


def stack_file(path, backend: int, listen: int) -> str:
    """A stack of two services at 0 replicas on host networking, wakeproxy.* in
    deploy.labels: ``web`` whole, ``typo`` with a misspelt label."""
    labels = {
        "wakeproxy.enable": "true",
        "wakeproxy.listen": f"127.0.0.1:{listen}",
        "wakeproxy.backend": f"127.0.0.1:{backend}",
        "wakeproxy.action": "stop",
        "wakeproxy.idle_timeout": "1",
        "wakeproxy.wake_timeout": "30",
    }
    command = ["httpd", "-f", "-p", f"127.0.0.1:{backend}", "-h", "/www"]
    common = {
        "image": BUSYBOX_IMAGE,
        "command": command,
        "stop_grace_period": "0s",
        "networks": ["hostnet"],
    }
    stack = {
        "version": "3.8",
        "services": {
            "web": {**common, "deploy": {"replicas": 0, "labels": labels}},
            "typo": {
                **common,
                "deploy": {
                    "replicas": 0,
                    "labels": {**labels, "wakeproxy.listen": f"127.0.0.1:{free_port()}",
                               "wakeproxy.idle_timout": "1"},
                },
            },
        },
        "networks": {"hostnet": {"external": True, "name": "host"}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(stack))
    return str(path)


async def test_a_stack_deployed_with_wakeproxy_labels_is_discovered_woken_and_slept(
    own_swarm, tmp_path
):
    swarm = own_swarm
    stack = f"wp{uuid.uuid4().hex[:6]}"
    port, backend = free_port(), free_port()
    config = config_from(
        config_text(
            engines={"swarm": {"host": swarm.host}},
            discovery={
                "docker_labels": True,
                "engines": ["swarm"],  # not the machine's engine: the suite's other tests use it
                "allowed_listen": ["127.0.0.0/8:1024-65535"],
                "interval": 600,  # longer than the test: the service events do the work
            },
        )
    )
    plain, plain_port, plain_backend = f"lab-{stack}", free_port(), free_port()
    async with running(config) as proxy:
        assert not proxy.services
        # A labelled container on the same (not the local) engine: discovered there too.
        docker(
            "run", "-d", "--network", "host", "--name", plain,
            "--label", "wakeproxy.enable=true",
            "--label", f"wakeproxy.listen=127.0.0.1:{plain_port}",
            "--label", f"wakeproxy.port={plain_backend}",
            BUSYBOX_IMAGE, "httpd", "-f", "-p", f"127.0.0.1:{plain_backend}", "-h", "/www",
            host=swarm.host,
        )  # fmt: skip
        await wait_until(lambda: serving(proxy, plain, plain_port), within=20)
        assert proxy.services[plain].cfg.engine == "swarm"
        assert (await http_get(plain_port, within=20)).endswith(BODY)
        file = stack_file(tmp_path / "stack.yml", backend, port)
        docker("stack", "deploy", "-c", file, stack, host=swarm.host, within=60)
        name = f"{stack}_web"
        await wait_until(lambda: serving(proxy, name, port), within=20)
        web = proxy.services[name]
        assert web.runtime.kind == "swarm" and web.cfg.engine == "swarm"
        assert web.state is State.STOPPED
        # The misspelt label: refused, named, the other service unaffected.
        await wait_until(lambda: f"{stack}_typo" in proxy.rejected, within=20)
        why = proxy.rejected[f"{stack}_typo"]
        assert f"Swarm service {stack}_typo" in why and "wakeproxy.idle_timout" in why
        assert (await http_get(port, within=40)).endswith(BODY)
        assert web.stats.wakes["ok"] == 1
        await wait_until(lambda: web.state is State.STOPPED, within=40)  # scaled to 0 again
        replicas = docker(
            "service", "inspect", "-f", "{{.Spec.Mode.Replicated.Replicas}}", name,
            host=swarm.host,
        )  # fmt: skip
        assert replicas == "0"
        # The stack removed: its service goes, and with it the listener.
        docker("stack", "rm", stack, host=swarm.host, within=60)
        await wait_until(lambda: name not in proxy.services, within=20)
        await wait_until(lambda: not port_answers(port), within=20)
