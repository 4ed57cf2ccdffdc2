"""Rows 5 and 6: N simultaneous first connections to a paused (row 5) or stopped (row 6)
container, through wakeproxy.

The backend is ``wakeserver.c`` (a listen backlog of 4096) in a FROM-scratch container on
host networking. Per round: the container is paused (the proxy follows the engine's
event), N clients connect at once and each times its first response byte; the engine's
own unpause is timed in the same round, and HAProxy in front of the running container
takes the same burst. ``docker events`` counts unpause calls: one per cold burst. Row 6
does the same with ``action: stop``: the engine's own start (until the server answers)
next to a burst through wakeproxy, which starts the container and probes it (readiness).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker

from bench import peers

IMAGE = "wakeproxy-bench/wakeserver:1"
HERE = Path(__file__).parent


def docker(*args: str) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip()


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_image() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-static",
                "-o",
                str(context / "wakeserver"),
                str(HERE / "wakeserver.c"),
            ],
            check=True,
            capture_output=True,
        )
        (context / "Dockerfile").write_text(
            'FROM scratch\nCOPY wakeserver /wakeserver\nENTRYPOINT ["/wakeserver"]\n'
        )
        subprocess.run(
            ["docker", "build", "--network", "host", "-q", "-t", IMAGE, str(context)],
            check=True,
            capture_output=True,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )


async def first_byte(port: int) -> float | None:
    """Seconds to the first response byte, or None when the connection failed."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            await reader.readexactly(1)
            elapsed = time.perf_counter() - started
            await reader.read(-1)
            writer.close()
            return elapsed
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


async def burst(port: int, n: int) -> list[float | None]:
    return await asyncio.gather(*(first_byte(port) for _ in range(n)))


@dataclass
class Row:
    n: int
    cold: list[float] = field(default_factory=list)  # wakeproxy, paused backend (all rounds)
    cold_p99: list[float] = field(default_factory=list)  # per round
    warm_p99: list[float] = field(default_factory=list)  # HAProxy, running backend, per round
    unpause: list[float] = field(default_factory=list)  # the engine's own, per round
    unpause_calls: list[int] = field(default_factory=list)
    failed: int = 0


def percentile(values: list[float], q: float) -> float:
    """NaN when every connection failed: ``failed`` counts them; the run goes on."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def measure(
    sizes: list[int], rounds: int, proxy_port: int, haproxy_port: int, name: str
) -> list[Row]:
    rows = [Row(n) for n in sizes]
    async with aiodocker.Docker() as client:
        container = client.containers.container(name)
        for row in rows:
            for _ in range(rounds):
                # The engine's own unpause, through the Engine API.
                await container.pause()
                started = time.perf_counter()
                await container.unpause()
                row.unpause.append(time.perf_counter() - started)
                # HAProxy, same burst, running backend.
                warm = [t for t in await burst(haproxy_port, row.n) if t is not None]
                row.warm_p99.append(percentile(warm, 0.99))
                # Cold: pause, let the proxy see the engine's event, then the burst.
                await container.pause()
                await asyncio.sleep(0.3)
                since = time.time()
                times = await burst(proxy_port, row.n)
                until = time.time() + 0.5
                row.failed += sum(1 for t in times if t is None)
                ok = [t for t in times if t is not None]
                row.cold.extend(ok)
                row.cold_p99.append(percentile(ok, 0.99))
                await asyncio.sleep(0.5)
                events = docker(
                    "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
                    "--filter", f"container={name}", "--filter", "event=unpause", "--format", "x",
                )  # fmt: skip
                row.unpause_calls.append(len(events.split()))
    return rows


@dataclass
class StartRow:
    n: int
    cold: list[float] = field(default_factory=list)  # through wakeproxy, stopped backend
    engine: list[float] = field(default_factory=list)  # docker start to the first byte
    failed: int = 0


async def wait_first_byte(port: int) -> None:
    # Polling is the measurement: the engine offers no "server is answering" event.
    while await first_byte(port) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.002)


async def measure_start(
    sizes: list[int], rounds: int, proxy_port: int, backend: int, name: str
) -> list[StartRow]:
    rows = [StartRow(n) for n in sizes]
    async with aiodocker.Docker() as client:
        container = client.containers.container(name)
        for row in rows:
            for _ in range(rounds):
                # The engine's own start, until the server answers its first request.
                await container.stop(t=0)
                started = time.perf_counter()
                await container.start()
                await asyncio.wait_for(wait_first_byte(backend), 30)
                row.engine.append(time.perf_counter() - started)
                # Stopped again; the proxy follows the engine's event; then the burst.
                await container.stop(t=0)
                await asyncio.sleep(0.3)
                times = await burst(proxy_port, row.n)
                row.failed += sum(1 for t in times if t is None)
                row.cold.extend(t for t in times if t is not None)
    return rows


def start_table(rows: list[StartRow]) -> list[dict[str, str]]:
    out = []
    for row in rows:
        engine = statistics.median(row.engine) * 1000
        cold_p50 = statistics.median(row.cold) * 1000 if row.cold else float("nan")
        out.append(
            {
                "N": str(row.n),
                "engine start to first byte p50 ms": f"{engine:.1f}",
                "through wakeproxy p50 ms": f"{cold_p50:.1f}",
                "difference ms": f"{cold_p50 - engine:.1f}",
                "p99 ms": f"{percentile(row.cold, 0.99) * 1000:.1f}" if row.cold else "-",
                "failed": str(row.failed),
            }
        )
    return out


@contextlib.contextmanager
def wakeserver(kind: str) -> Iterator[tuple[str, int]]:
    """A running wakeserver container on host networking: (name, port); removed after."""
    build_image()
    backend = peers.free_port()
    name = f"wp-bench-{kind}-{backend}"
    docker("run", "-d", "--network", "host", "--name", name, IMAGE, str(backend))
    try:
        peers.wait_port(backend)
        yield name, backend
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def run_start(sizes: list[int], rounds: int, workdir: Path) -> tuple[list[StartRow], list[str]]:
    with wakeserver("start") as (name, backend):
        proxy = peers.wakeproxy_container(workdir, backend, name, "stop")
        try:
            rows = asyncio.run(measure_start(sizes, rounds, proxy.port, backend, name))
        finally:
            proxy.stop()
    commands = [
        f"docker run -d --network host {IMAGE} PORT   # then docker stop -t 0",
        "wakeproxy: container runtime, sleep_policy {action: stop}, readiness: tcp every 10 ms",
        "engine: Engine API start, then GET / until the first response byte",
    ]
    return rows, commands


def run(sizes: list[int], rounds: int, workdir: Path) -> tuple[list[Row], list[str]]:
    """Set up the container and the contenders, measure, tear down."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 clients, 2 fds each
    started: list[peers.Peer] = []
    try:
        with wakeserver("cold") as (name, backend):
            try:
                started.append(haproxy := peers.haproxy(backend))
                started.append(proxy := peers.wakeproxy_container(workdir, backend, name))
                rows = asyncio.run(measure(sizes, rounds, proxy.port, haproxy.port, name))
            finally:
                for peer in reversed(started):
                    peer.stop()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    commands = [
        f"docker run -d --network host {IMAGE} PORT   # bench/wakeserver.c, backlog 4096",
        "wakeproxy: container runtime at its defaults (release paced to the accept queue, "
        "read from the kernel; early connects during the unpause), pause followed from engine "
        "events",
        "client: N asyncio connections at once, GET /, time to the first response byte",
    ]
    return rows, commands


def table(rows: list[Row]) -> list[dict[str, str]]:
    out = []
    for row in rows:
        unpause = statistics.median(row.unpause) * 1000
        cold_p50 = statistics.median(row.cold) * 1000 if row.cold else float("nan")
        cold_p99 = statistics.median(row.cold_p99) * 1000
        warm_p99 = statistics.median(row.warm_p99) * 1000
        out.append(
            {
                "N": str(row.n),
                "engine unpause p50 ms": f"{unpause:.2f}",
                "cold p50 ms": f"{cold_p50:.2f}",
                "cold p50 - unpause ms": f"{cold_p50 - unpause:.2f}",
                "cold p99 ms": f"{cold_p99:.2f}",
                "cold max ms": f"{max(row.cold) * 1000:.2f}" if row.cold else "-",
                "HAProxy warm p99 ms": f"{warm_p99:.2f}",
                "p99 - HAProxy p99 ms": f"{cold_p99 - warm_p99:.2f}",
                "unpause calls per burst": "/".join(str(c) for c in row.unpause_calls),
                "failed": str(row.failed),
            }
        )
    return out


def available() -> str | None:
    """Why the row cannot run here, or None."""
    if shutil.which("docker") is None or not engine_answers():
        return "no Docker engine answers `docker info` (./dev test starts one)"
    if shutil.which("gcc") is None:
        return "gcc is needed to build bench/wakeserver.c"
    return None
