"""Cold-wake latency: a request to a paused container through wakeproxy, next to
the engine's own unpause time, measured in the same run (alternating, medians).

    .venv/bin/python -m bench.wake --rounds 30

Needs a Docker engine (``./dev test`` starts one) and /bin/busybox (busybox-static).
All traffic goes to 127.0.0.1. This is the first row of the bench harness (issue 7);
the full harness with HAProxy and wrk comes with it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import uvloop

from bench import coldwake
from bench.peers import free_port
from wakeproxy.app import Proxy
from wakeproxy.config import parse_yaml
from wakeproxy.core.states import State
from wakeproxy.runtimes.docker import DockerRuntime

IMAGE = "wakeproxy-bench/busybox:1"


def docker(*args: str) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip()


def build_image(host: str | None = None) -> None:
    """The busybox httpd image (FROM scratch), on the default engine or ``host``'s."""
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        shutil.copy(shutil.which("busybox") or "/bin/busybox", context / "busybox")
        (context / "www").mkdir()
        (context / "www" / "index.html").write_text("hello\n")
        (context / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nENTRYPOINT ["/bin/busybox"]\n'
        )
        engine = ["-H", host] if host is not None else []
        docker(*engine, "build", "--network", "host", "-q", "-t", IMAGE, str(context))


async def first_byte(port: int) -> float:
    elapsed = await coldwake.first_byte(port)
    if elapsed is None:
        raise RuntimeError(f"no response through 127.0.0.1:{port}")
    return elapsed


async def measure(rounds: int) -> dict[str, list[float]]:
    backend, port = free_port(), free_port()
    name = f"wp-bench-{backend}"
    docker("run", "-d", "--network", "host", "--name", name, IMAGE,
           "httpd", "-f", "-p", f"127.0.0.1:{backend}", "-h", "/www")  # fmt: skip
    config = parse_yaml(
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        f"services:\n  web:\n    listen: 127.0.0.1:{port}\n    backend: 127.0.0.1:{backend}\n"
        f"    container: {name}\n    sleep_policy: {{enabled: false}}\n",
        "bench",
    )
    labels = (
        "engine unpause",
        "cold request via proxy",
        "warm request via proxy",
        "direct request",
    )
    results: dict[str, list[float]] = {label: [] for label in labels}
    proxy = Proxy(config)
    try:
        await asyncio.sleep(0.3)
        await proxy.start()
        service = proxy.services["web"]
        runtime = service.runtime
        assert isinstance(runtime, DockerRuntime)
        for _ in range(rounds):
            # The engine's own unpause, through the same client the proxy uses.
            await runtime.pause()
            started = time.perf_counter()
            await runtime.unpause()
            results["engine unpause"].append(time.perf_counter() - started)
            # A cold request: the proxy holds it, unpauses once, forwards it.
            await runtime.pause()
            service.runtime.on_change(State.PAUSED, "bench")
            results["cold request via proxy"].append(await first_byte(port))
            results["warm request via proxy"].append(await first_byte(port))
            results["direct request"].append(await first_byte(backend))
    finally:
        await proxy.close()
        # Blocking is fine here: the measurement is over.
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)  # noqa: ASYNC221
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    build_image()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(measure(args.rounds))
    print(f"| figure ({args.rounds} rounds) | median ms | p90 ms | max ms |")
    print("|---|---|---|---|")
    for label, values in results.items():
        ms = sorted(v * 1000 for v in values)
        p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
        print(f"| {label} | {statistics.median(ms):.2f} | {p90:.2f} | {ms[-1]:.2f} |")


if __name__ == "__main__":
    main()
