"""Row 10: a Docker Swarm service woken from 0 replicas through wakeproxy, next to the raw
``docker service scale`` to its first response.

The swarm is a second ``dockerd`` this row starts itself (its own data root, exec root,
pid file and socket under a temporary directory; no bridge, no iptables), made a
single-node manager advertised on 127.0.0.1, and removed at the end: the machine's own
engine is never touched. The service is busybox httpd with host networking (127.0.0.1).
Per round: the raw wake (scale to 1 through the Engine API, then GET until the first
response byte), scaled back to 0; then one request through wakeproxy, which scales it
itself (``action: stop`` slept it again in between).

    .venv/bin/python -m bench.swarm --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import coldwake, peers, wake
from wakeproxy.app import Proxy
from wakeproxy.config import parse_yaml
from wakeproxy.core.states import State
from wakeproxy.errors import WakeproxyError
from wakeproxy.serve.backend import Backend

IMAGE = wake.IMAGE


@dataclass
class SwarmResult:
    raw: list[float] = field(default_factory=list)  # scale call to the first byte
    proxied: list[float] = field(default_factory=list)  # a request through the proxy
    failed: int = 0
    scale_ups: list[int] = field(default_factory=list)  # service updates per proxied wake
    errors: list[str] = field(default_factory=list)  # why rounds failed


def available() -> str | None:
    """Why this row cannot run here, or None."""
    if os.geteuid() != 0:
        return "a second dockerd needs root"
    if shutil.which("dockerd") is None or shutil.which("busybox") is None:
        return "needs dockerd and busybox"
    return None


def _docker(host: str, *args: str, within: float = 120) -> str:
    out = subprocess.run(
        ["docker", "-H", host, *args], capture_output=True, text=True, timeout=within
    )
    if out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


@contextlib.contextmanager
def own_swarm() -> Iterator[str]:
    """A second dockerd as a single-node swarm manager: its socket (unix://...)."""
    root = Path(tempfile.mkdtemp(prefix="wp-bench-swarm-", dir="/tmp"))
    host = f"unix://{root}/docker.sock"
    argv = [
        "dockerd", "--data-root", f"{root}/data", "--exec-root", f"{root}/exec",
        "--pidfile", f"{root}/docker.pid", "-H", host, "--bridge=none",
        "--iptables=false", "--ip-forward=false",
    ]  # fmt: skip
    with open(root / "dockerd.log", "ab") as log:
        daemon = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", host, "info"], capture_output=True).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the bench's own dockerd did not start")
            time.sleep(0.2)
        _docker(host, "swarm", "init", "--advertise-addr", "127.0.0.1")
        yield host
    finally:
        with contextlib.suppress(Exception):
            _docker(host, "swarm", "leave", "--force", within=60)
        daemon.terminate()  # ours: started just above
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(60)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


async def _first_byte_after(start: float, port: int, within: float = 30) -> float:
    deadline = start + within
    while await coldwake.first_byte(port) is None:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"nothing answered on 127.0.0.1:{port}")
        await asyncio.sleep(0.002)
    return time.perf_counter() - start


def _updates(host: str, service: str, since: float) -> int:
    out = _docker(
        host, "events", "--since", f"{since:.3f}", "--until", f"{time.time() + 0.5:.3f}",
        "--filter", "type=service", "--filter", f"service={service}",
        "--filter", "event=update", "--format", "x",
    )  # fmt: skip
    return len(out.split())


async def _measure(host: str, rounds: int) -> SwarmResult:
    result = SwarmResult()
    backend, port = peers.free_port(), peers.free_port()
    name = f"wp-bench-{backend}"
    _docker(
        host, "service", "create", "--detach", "--name", name, "--network", "host",
        "--replicas", "0", "--no-resolve-image", "--stop-grace-period", "0s", IMAGE,
        "httpd", "-f", "-p", f"127.0.0.1:{backend}", "-h", "/www",
    )  # fmt: skip
    config = parse_yaml(
        f"admin:\n  listen: 127.0.0.1:{peers.free_port()}\n"
        f"engines:\n  swarm: {{host: '{host}'}}\n"
        f"services:\n  web:\n    listen: 127.0.0.1:{port}\n    backend: 127.0.0.1:{backend}\n"
        f"    swarm_service: {name}\n    engine: swarm\n    wake_timeout: 30\n"
        "    sleep_policy: {idle_timeout: 3600, action: stop}\n",
        "bench",
    )
    proxy = Proxy(config)
    await proxy.start()
    try:
        web = proxy.services["web"]
        for _ in range(rounds):
            try:
                await _round(host, name, port, backend, web, result)
            except (TimeoutError, WakeproxyError) as exc:
                # A task that does not go (or come) in time: this round fails, the row
                # goes on (and says why).
                print(f"swarm round failed: {exc or 'timed out'}", file=sys.stderr)
                result.failed += 1
                result.errors.append(str(exc) or "timed out")
    finally:
        await proxy.close()
    return result


async def _round(
    host: str, name: str, port: int, backend: int, web: Backend, result: SwarmResult
) -> None:
    """One round: the raw scale to the first byte, then one wake through the proxy."""
    # Raw: the scale call, then GET until the server answers.
    started = time.perf_counter()
    _docker(host, "service", "scale", "--detach", f"{name}=1")
    result.raw.append(await _first_byte_after(started, backend))
    _docker(host, "service", "scale", "--detach", f"{name}=0")
    await asyncio.wait_for(_until(lambda: web.state is State.STOPPED), 60)
    await asyncio.wait_for(_until_closed(backend), 60)
    # Through wakeproxy: one request wakes it.
    since = time.time()
    elapsed = await coldwake.first_byte(port)
    if elapsed is None:
        result.failed += 1
    else:
        result.proxied.append(elapsed)
    await asyncio.wait_for(_until(lambda: web.attached == 0), 10)  # closed
    await web.sleep(web.cfg.sleep_policy.action)
    await asyncio.wait_for(_until_closed(backend), 60)
    result.scale_ups.append(_updates(host, name, since) - 1)  # less our scale to 0


async def _until(predicate: Callable[[], bool]) -> None:
    # Polling is the measurement's wait: the proxy's state offers no event to await here.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def _until_closed(port: int) -> None:
    """The task is gone: nothing listens on its port any more."""
    while await coldwake.first_byte(port) is not None:  # noqa: ASYNC110 - no event for it
        await asyncio.sleep(0.05)


def run(rounds: int) -> SwarmResult:
    with own_swarm() as host:
        wake.build_image(host)
        return asyncio.run(_measure(host, rounds))


def table(result: SwarmResult) -> list[dict[str, str]]:
    raw = statistics.median(result.raw) * 1000 if result.raw else float("nan")
    proxied = statistics.median(result.proxied) * 1000 if result.proxied else float("nan")
    return [
        {
            "rounds": str(len(result.raw)),
            "raw scale to first byte, ms (median)": f"{raw:.0f}",
            "through wakeproxy, ms (median)": f"{proxied:.0f}",
            "difference ms": f"{proxied - raw:+.0f}",
            "scale-ups per wake": "/".join(map(str, result.scale_ups)),
            "failed": str(result.failed) + (f" ({result.errors[0]})" if result.errors else ""),
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    why = available()
    if why is not None:
        raise SystemExit(f"bench.swarm: {why}")
    for row in table(run(args.rounds)):
        print(row)


if __name__ == "__main__":
    main()
