"""Row 9: replicas. Throughput through 1, 2 and 4 replicas of a backend that serves one
20 ms request at a time (``tests/backends/serial.py``: I/O-bound, so the two cores are
not what limits it), the time from a load step to a second replica serving, and the
requests that fail when a replica is killed under load.

    .venv/bin/python -m bench.replicas

The proxy runs in its own process (``wakeproxy run``); the replicas are its commands.
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, peers

SERIAL = str(Path(__file__).parent.parent / "tests" / "backends" / "serial.py")
COUNTS = (1, 2, 4)
CLIENTS = 16


@dataclass
class ReplicaResult:
    rps: dict[int, list[float]] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    step_ms: float | None = None  # load step to a second replica's first answer
    killed_in_flight: int = 0  # requests on the replica when it was killed
    killed_errors: int = -1  # wrk's errors over the run with the kill
    moved: int = 0


class ReplicatedProxy(peers.Peer):
    """wakeproxy with one service of ``count`` serial replicas."""

    def __init__(self, workdir: Path, count: int, *, minimum: int, target: int) -> None:
        self.admin_port = peers.free_port()
        self.first = peers.consecutive_ports(count)
        port = peers.free_port()
        config = workdir / f"replicas-{count}-{minimum}-{target}.yaml"
        command = json.dumps([sys.executable, SERIAL, "--port", "{port}"])
        config.write_text(
            f"admin:\n  listen: 127.0.0.1:{self.admin_port}\n"
            "services:\n"
            "  web:\n"
            f"    listen: 127.0.0.1:{port}\n"
            f"    backend: 127.0.0.1:{self.first}\n"
            f"    command: {command}\n"
            f"    replicas: {{count: {count}, min: {minimum}, target_inflight: {target}}}\n"
            "    wake_timeout: 30\n"
            "    sleep_policy: {idle_timeout: 3600}\n"
        )
        argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config)]
        super().__init__("wakeproxy", [*argv, "--log-level", "warning"], port)
        # The service listens before the admin API does: wait for that too.
        peers.wait_port(self.admin_port, self.proc, "wakeproxy admin")

    def status(self) -> dict[str, object]:
        """GET /services/web/replicas."""
        url = f"http://127.0.0.1:{self.admin_port}/services/web/replicas"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return dict(json.load(answer))

    def replicas(self) -> list[dict[str, object]]:
        found = self.status()["replicas"]
        assert isinstance(found, list)
        return found

    def wait_running(self, count: int, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while sum(r["state"] == "running" for r in self.replicas()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} replicas not running after {within} s")
            time.sleep(0.05)


def _wrk(port: int, seconds: float, clients: int) -> loadgen.WrkResult:
    return loadgen.run_wrk(loadgen.wrk_command(port, seconds, clients, churn=True))


def throughput(workdir: Path, rounds: int, seconds: float, result: ReplicaResult) -> None:
    proxies = {n: ReplicatedProxy(workdir, n, minimum=n, target=1000) for n in COUNTS}
    try:
        for n, proxy in proxies.items():
            proxy.wait_running(n)
            result.rps[n], result.errors[n] = [], 0
        for r in range(rounds):
            order = list(COUNTS[r % len(COUNTS) :] + COUNTS[: r % len(COUNTS)])
            for n in order:
                run = _wrk(proxies[n].port, seconds, CLIENTS)
                result.rps[n].append(run.rps)
                result.errors[n] += run.errors
                peers_progress(f"  {n} replica(s): {run.rps:,.0f} req/s, {run.errors} errors")
    finally:
        for proxy in proxies.values():
            proxy.stop()


def step(workdir: Path, seconds: float, result: ReplicaResult) -> None:
    """One client, then 16 at once: how long until a second replica answers."""
    proxy = ReplicatedProxy(workdir, 4, minimum=0, target=4)
    try:
        _wrk(proxy.port, 1.0, 1)
        # One client (its closing connection may linger a moment): the others stay idle.
        before = [int(str(r["forwarded"])) for r in proxy.replicas()]
        started = time.monotonic()
        load = subprocess.Popen(
            loadgen.wrk_command(proxy.port, max(seconds, 2.0), CLIENTS, churn=True),
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = started + 20
            while time.monotonic() < deadline:
                now = [int(str(r["forwarded"])) for r in proxy.replicas()]
                if any(n > b for n, b in zip(now[1:], before[1:], strict=True)):
                    result.step_ms = (time.monotonic() - started) * 1000
                    break
                time.sleep(0.005)
        finally:
            load.wait(60)
    finally:
        proxy.stop()


def failover(workdir: Path, seconds: float, result: ReplicaResult) -> None:
    """Three replicas under load; the second one's process is killed halfway."""
    proxy = ReplicatedProxy(workdir, 3, minimum=3, target=1000)
    try:
        proxy.wait_running(3)
        run_for = max(seconds, 3.0)
        load = subprocess.Popen(
            loadgen.wrk_command(proxy.port, run_for, 8, churn=True),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(run_for / 2)
        second = proxy.first + 1
        pids = subprocess.run(
            ["pgrep", "-f", f"{SERIAL} --port {second}$"], capture_output=True, text=True
        ).stdout.split()
        before = int(str(proxy.replicas()[1]["attached"]))
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        # Read again right after: connections placed on it between the two reads were
        # in flight there too (they are attached until the proxy sees them end).
        result.killed_in_flight = max(before, int(str(proxy.replicas()[1]["attached"])))
        out, _ = load.communicate(timeout=60)
        result.killed_errors = loadgen.parse_wrk(out).errors
        result.moved = int(str(proxy.status()["moved"]))
    finally:
        proxy.stop()


def peers_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(rounds: int, seconds: float) -> ReplicaResult:
    result = ReplicaResult()
    with tempfile.TemporaryDirectory(prefix="wakeproxy-replicas-") as tmp:
        workdir = Path(tmp)
        throughput(workdir, rounds, seconds, result)
        step(workdir, seconds, result)
        failover(workdir, seconds, result)
    return result


def table(result: ReplicaResult) -> list[dict[str, str]]:
    one = statistics.median(result.rps[1])
    rows = []
    for n in COUNTS:
        rps = statistics.median(result.rps[n])
        rows.append(
            {
                "replicas": str(n),
                "req/s (median)": f"{rps:,.0f}",
                "x one replica": f"{rps / one:.2f}",
                "errors": str(result.errors[n]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    peers.ensure_tools()
    result = run(args.rounds, args.seconds)
    for row in table(result):
        print(row)
    print(
        f"step to a second replica: {result.step_ms} ms; killed: {result.killed_errors} failed, "
        f"{result.killed_in_flight} in flight, {result.moved} moved"
    )


if __name__ == "__main__":
    main()
