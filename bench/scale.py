"""Row 7: one proxy with 1,000 services (process runtime, not started until needed) plus
50 real paused containers: start-up time, resident memory, CPU while idle, and a wake
of one container and one command under that load.

Start-up reads every container's state from one engine listing (no inspect per
container). All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import coldwake, peers

PROCESS_SERVICES = 1000
CONTAINERS = 50


@dataclass
class ScaleResult:
    services: int
    startup_s: float
    rss_mib: float
    idle_cpu_percent: float
    idle_seconds: float
    container_wake_ms: float | None
    command_start_ms: float | None
    # The proxy's own counters over every service: the two first-byte times show two
    # wakes answered; these show no wake failed or timed out anywhere in the proxy.
    wakes_ok: int
    wake_failures: int


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ports(count: int, start: int = 20000, end: int = 32000) -> list[int]:
    """Free ports below the kernel's ephemeral range (32768 up by default): 2,100 ports
    picked there could be taken meanwhile by any outgoing connection on the machine."""
    found: list[int] = []
    for port in range(start, end):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports from {start} to {end}")


def _wakes(admin_port: int) -> tuple[int, int]:
    """(ok, failed or timed out) summed over every service, from GET /metrics/performance."""
    url = f"http://127.0.0.1:{admin_port}/metrics/performance"
    with urllib.request.urlopen(url, timeout=30) as response:
        services = json.load(response)["services"]
    ok = sum(int(s["wakes"]["ok"]) for s in services)
    return ok, sum(int(s["wakes"]["failed"]) + int(s["wakes"]["timeout"]) for s in services)


def _server_binary(workdir: Path) -> Path:
    """bench/wakeserver.c built for the host: the command the process services run."""
    binary = workdir / "wakeserver"
    subprocess.run(
        ["gcc", "-O2", "-o", str(binary), str(coldwake.HERE / "wakeserver.c")],
        check=True,
        capture_output=True,
    )
    return binary


def run(idle_seconds: float, workdir: Path) -> tuple[ScaleResult, list[str]]:
    coldwake.build_image()
    binary = _server_binary(workdir)
    names: list[str] = []
    ports = iter(_ports(2 * (CONTAINERS + PROCESS_SERVICES) + 1))
    admin_port = next(ports)
    lines = [
        f"admin:\n  listen: 127.0.0.1:{admin_port}",
        "log: {level: warning}",
        "services:",
    ]
    container_ports: list[int] = []
    try:
        for i in range(CONTAINERS):
            port, backend = next(ports), next(ports)
            name = f"wp-bench-scale-{backend}"
            coldwake.docker(
                "run", "-d", "--network", "host", "--name", name, coldwake.IMAGE, str(backend)
            )
            names.append(name)
            peers.wait_port(backend)
            coldwake.docker("pause", name)
            container_ports.append(port)
            lines += [
                f"  c{i}:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f"    container: {name}",
            ]
        command_ports: list[int] = []
        for i in range(PROCESS_SERVICES):
            port, backend = next(ports), next(ports)
            command_ports.append(port)
            lines += [
                f"  p{i}:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f'    command: ["{binary}", "{backend}"]',
            ]
        config = workdir / "scale.yaml"
        config.write_text("\n".join(lines) + "\n")
        argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "info"]
        started = time.perf_counter()
        proxy = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            assert proxy.stderr is not None
            seen: list[str] = []
            for line in proxy.stderr:
                if "running" in line and "service(s)" in line:
                    break
                seen.append(line)
            else:
                raise RuntimeError("the proxy exited during start-up: " + "".join(seen[-5:]))
            startup = time.perf_counter() - started
            time.sleep(1.0)  # settle: the first event-stream read, timers armed
            before = _cpu_seconds(proxy.pid)
            time.sleep(idle_seconds)
            idle_cpu = (_cpu_seconds(proxy.pid) - before) / idle_seconds * 100
            rss = _rss_mib(proxy.pid)
            container_wake = asyncio.run(coldwake.first_byte(container_ports[CONTAINERS // 2]))
            command_start = asyncio.run(coldwake.first_byte(command_ports[PROCESS_SERVICES // 2]))
            wakes_ok, wake_failures = _wakes(admin_port)
        finally:
            proxy.terminate()
            proxy.communicate(timeout=60)
    finally:
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    result = ScaleResult(
        services=PROCESS_SERVICES + CONTAINERS,
        startup_s=startup,
        rss_mib=rss,
        idle_cpu_percent=idle_cpu,
        idle_seconds=idle_seconds,
        container_wake_ms=container_wake * 1000 if container_wake is not None else None,
        command_start_ms=command_start * 1000 if command_start is not None else None,
        wakes_ok=wakes_ok,
        wake_failures=wake_failures,
    )
    commands = [
        f"{PROCESS_SERVICES} services: command bench/wakeserver (host build), not started",
        f"{CONTAINERS} services: docker run --network host {coldwake.IMAGE} PORT; docker pause",
        "wakeproxy run -c scale.yaml; start-up = until its 'running N service(s)' log line",
        "idle CPU: utime+stime of the proxy over the idle window; RSS: VmRSS after it",
        "wakes: GET /metrics/performance after the two timed wakes, summed over services",
    ]
    return result, commands


def table(result: ScaleResult) -> list[dict[str, str]]:
    def ms(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "failed"

    return [
        {
            "services": str(result.services),
            "start-up s": f"{result.startup_s:.2f}",
            "RSS MiB": f"{result.rss_mib:.1f}",
            f"idle CPU % of a core ({result.idle_seconds:g} s)": f"{result.idle_cpu_percent:.2f}",
            "container wake, first byte ms": ms(result.container_wake_ms),
            "command start, first byte ms": ms(result.command_start_ms),
            "wakes ok": str(result.wakes_ok),
            "wake failures": str(result.wake_failures),
        }
    ]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        found, _ = run(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0, Path(tmp))
        print(table(found))
