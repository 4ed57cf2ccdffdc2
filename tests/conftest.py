"""Shared fixtures: free loopback ports, an in-process proxy, a real Docker engine.

All traffic goes to 127.0.0.1. Docker tests need a real engine: in CI (CI=true) a
missing engine fails them, elsewhere it skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from bench.peers import free_port  # one port picker for tests and bench
from wakeproxy.app import Proxy
from wakeproxy.config import Address, AdminConfig, Config, parse_yaml

BACKEND = str(Path(__file__).parent / "backends" / "server.py")
PYTHON = sys.executable


# Modules whose tests run on both loops, as uvloop's own tests/test_tcp.py does.
BOTH_LOOPS = {"test_forwarding"}


def pytest_collection_modifyitems(config, items):
    # A test that restarts the engine runs on its own: after every other test.
    items.sort(key=lambda item: item.get_closest_marker("engine_restart") is not None)


def pytest_asyncio_loop_factories(config, item):
    # The proxy runs on uvloop in production: test it there, and the byte path on both.
    factories = {"uvloop": uvloop.new_event_loop}
    if os.environ.get("WAKEPROXY_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS:
        factories["asyncio"] = asyncio.new_event_loop
    return factories


def backend_command(port: int, mode: str = "http", *extra: str) -> str:
    """A flow-style YAML list running the test backend."""
    args = [PYTHON, BACKEND, "--port", str(port), "--mode", mode, *extra]
    return "[" + ", ".join(f'"{a}"' for a in args) + "]"


def service_yaml(port: int, backend: int, *, name: str = "web", **settings: object) -> str:
    """A config with one service on 127.0.0.1: listen, backend and the given keys."""
    lines = [
        "admin:",
        f"  listen: 127.0.0.1:{free_port()}",
        "services:",
        f"  {name}:",
        f"    listen: 127.0.0.1:{port}",
        f"    backend: 127.0.0.1:{backend}",
        *(f"    {key}: {value}" for key, value in settings.items()),
    ]
    return "\n".join(lines) + "\n"


def config_from(text: str) -> Config:
    return parse_yaml(textwrap.dedent(text), "test.yaml")


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Proxy]:
    if config.admin == AdminConfig():
        # Not the default port 9000: a developer's own proxy may be using it.
        admin = dataclasses.replace(config.admin, listen=Address("127.0.0.1", free_port()))
        config = dataclasses.replace(config, admin=admin)
    proxy = Proxy(config)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def http_get(port: int, path: str = "/", *, within: float = 10.0) -> bytes:
    """One HTTP/1.0 request through a fresh connection; returns the whole response."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
            return await reader.read(-1)
        except ConnectionResetError:
            return b""  # closed by the proxy with our request unread: no response
        finally:
            writer.close()


async def wait_until(predicate, *, within: float, interval: float = 0.02) -> None:
    """Poll a condition the code under test offers no event for (tests only)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the proxy exposes no event to await here
            await asyncio.sleep(interval)


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of a process: R/S running or sleeping, T stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# ---- Docker: a real engine, images built FROM scratch with busybox-static

BUSYBOX_IMAGE = "wakeproxy-test/busybox:1"


def docker(*args: str, within: float = 60) -> str:
    result = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=within,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    if result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


@pytest.fixture(scope="session")
def docker_engine() -> None:
    try:
        answers = (
            subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        answers = False
    if not answers:
        message = "no Docker engine answers 'docker info'"
        if in_ci():
            pytest.fail(f"{message}: in CI the Docker tests must run (./dev test starts an engine)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def busybox_image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    busybox = shutil.which("busybox") or "/bin/busybox"
    context = tmp_path_factory.mktemp("busybox-image")
    shutil.copy(busybox, context / "busybox")
    (context / "www").mkdir()
    (context / "www" / "index.html").write_text("hello from busybox\n")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nENTRYPOINT ["/bin/busybox"]\n'
    )
    docker("build", "--network", "host", "-q", "-t", BUSYBOX_IMAGE, str(context), within=120)
    return BUSYBOX_IMAGE


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def make_container(busybox_image: str) -> Iterator[Callable[..., str]]:
    """Start busybox httpd containers (host network, 127.0.0.1 only); removed afterwards."""
    created: list[str] = []

    def make(
        port: int,
        *,
        paused: bool = False,
        name: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> str:
        name = name or f"wp-test-{uuid.uuid4().hex[:10]}"
        created.append(name)
        label_args = [arg for k, v in (labels or {}).items() for arg in ("--label", f"{k}={v}")]
        docker(
            "run", "-d", "--network", "host", "--name", name, "--label", "wakeproxy-test=1",
            *label_args, busybox_image, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not port_answers(port):
            assert time.monotonic() < deadline, f"container {name} never listened on {port}"
            time.sleep(0.02)
        if paused:
            docker("pause", name)
        return name

    yield make
    for name in created:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=30)


def container_status(name: str) -> str:
    return docker("inspect", "-f", "{{.State.Status}}", name)


def engine_events(name: str, action: str, since: float, until: float) -> int:
    """How many times the engine itself reports ``action`` for the container."""
    out = docker(
        "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
        "--filter", f"container={name}", "--filter", f"event={action}", "--format", "{{.Action}}",
    )  # fmt: skip
    return len([line for line in out.splitlines() if line.strip()])


# ---- a Python base image, made locally (no image can be pulled here)

PYTHON_BASE = "wakeproxy-test/python-base:bookworm"


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def python_base(docker_engine, tmp_path_factory) -> str:
    if (
        subprocess.run(["docker", "image", "inspect", PYTHON_BASE], capture_output=True).returncode
        == 0
    ):
        return PYTHON_BASE
    rootfs = tmp_path_factory.mktemp("rootfs")
    subprocess.run(
        [
            "debootstrap", "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
            "bookworm", str(rootfs), _mirror(),
        ],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(
        Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    )
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # behave like the official python:*-slim images
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        subprocess.run(
            ["docker", "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
             "-", PYTHON_BASE],
            stdin=tar.stdout, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    assert tar.returncode == 0
    return PYTHON_BASE
