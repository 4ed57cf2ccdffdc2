"""Row 8: memory and wake latency of pause, hibernate (with and without prefetch) and stop.

A 200 MiB Python backend (``bench/holder.py``) on the process runtime, the proxy in this
process. Per round and mode: the backend is woken and its whole heap read (all resident),
put to sleep with that mode, and its memory read as the kernel counts it (its memory
cgroup's usage; the machine's MemAvailable). Then the wake latency to the first response
byte: a small request, and after another sleep a request reading all its memory. Next to
them, the runtime's own operations timed the same way: SIGCONT to a frozen copy of the
backend, and a start of it, each to the first response byte.

    .venv/bin/python -m bench.hibernate --rounds 5

Needs swap: made here as a file when the machine has none (root), removed at the end.
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench import loadgen, peers
from bench.peers import free_port
from wakeproxy.app import Proxy
from wakeproxy.config import parse_yaml
from wakeproxy.core.states import SleepAction, WakeResult
from wakeproxy.host.memory import meminfo, swap_total

HOLDER = str(Path(__file__).parent / "holder.py")
HOLD_MIB = 200
MIB = 1 << 20
MANY, MANY_MIB = 50, 8  # the hibernations at once, and the heap of each
MODES = ("pause", "hibernate", "hibernate+prefetch", "stop")


@dataclass
class ModeResult:
    resident_awake: list[int] = field(default_factory=list)
    resident_asleep: list[int] = field(default_factory=list)
    available_gain: list[int] = field(default_factory=list)
    small_ms: list[float] = field(default_factory=list)
    touch_ms: list[float] = field(default_factory=list)
    failures: int = 0


@dataclass
class LoadResult:
    """Keep-alive p99 on one service, alone and while MANY others hibernate at once."""

    quiet_p99_ms: list[float] = field(default_factory=list)
    busy_p99_ms: list[float] = field(default_factory=list)
    errors: int = 0
    hibernated: int = 0  # of MANY x rounds
    reclaim_s: list[float] = field(default_factory=list)  # all MANY, wall time
    # How late the proxy's own loop ran a 1 ms timer while they hibernated: a stall of
    # the loop, as opposed to CPU the kernel's reclaim took from everyone.
    loop_lag_ms: list[float] = field(default_factory=list)


@dataclass
class Result:
    modes: dict[str, ModeResult]
    sigcont_ms: list[float]
    start_ms: list[float]
    rounds: int
    load: LoadResult | None = None


SWAP_PREFIX = "/var/tmp/wakeproxy-bench-swap-"


def remove_leftover_swap(prefix: str = SWAP_PREFIX) -> list[str]:
    """Swap files an earlier run made and could not remove (it was killed): those whose
    maker (the pid in the name) is gone are switched off and deleted. Only regular files
    of root's (the folder is world-writable: a link or another user's file named so is
    never touched) and only swap the kernel lists is switched off. Returns them."""
    active = {line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]}
    removed = []
    for path in Path(prefix).parent.glob(Path(prefix).name + "*"):
        pid = path.name.removeprefix(Path(prefix).name).split("-")[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # not one of ours (no pid), or its run is still going
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != 0:
            continue
        if str(path) in active:
            subprocess.run(["swapoff", str(path)], check=False, capture_output=True)
        try:
            path.unlink()
        except OSError as exc:  # still swapped on (swapoff refused): the next run retries
            print(f"could not remove {path}: {exc}", file=sys.stderr)
            continue
        removed.append(str(path))
    return removed


@contextmanager
def swap_file() -> Iterator[str]:
    """Yields how swap is provided; makes (and removes) a file when there is none. A
    SIGTERM during the run still removes it (the bench is often stopped that way); what
    a SIGKILL left is removed by the next run."""
    if os.geteuid() == 0:
        for leftover in remove_leftover_swap():
            print(f"removed a swap file a killed run left: {leftover}", file=sys.stderr)
    if swap_total() > 0:
        yield "the machine's own swap"
        return
    if os.geteuid() != 0:
        raise RuntimeError("no swap, and making a swap file needs root")
    path = Path(f"{SWAP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    previous = signal.getsignal(signal.SIGTERM)
    peers.exit_on_sigterm()
    try:
        subprocess.run(["fallocate", "-l", "1536M", str(path)], check=True)
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        subprocess.run(["swapon", str(path)], check=True)
        yield "a 1.5 GiB swap file made for the run"
    finally:
        subprocess.run(["swapoff", str(path)], check=False)
        path.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)


async def request(port: int, path: str = "/") -> float:
    """Seconds to the first response byte (the whole response is read)."""
    started = time.perf_counter()
    async with asyncio.timeout(60):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        await reader.readexactly(1)
        elapsed = time.perf_counter() - started
        await reader.read(-1)
        writer.close()
    return elapsed


def config(port: int, backend: int, admin: int, mode: str) -> str:
    prefetch = "true" if mode == "hibernate+prefetch" else "false"
    return (
        f"admin: {{listen: 127.0.0.1:{admin}}}\n"
        "services:\n"
        "  big:\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend}\n"
        f'    command: ["{sys.executable}", "{HOLDER}", "--port", "{backend}", '
        f'"--hold", "{HOLD_MIB}"]\n'
        "    readiness: {http: /}\n"
        f"    sleep_policy: {{idle_timeout: 3600, prefetch: {prefetch}}}\n"
    )


async def settle(seconds: float = 0.5) -> int:
    await asyncio.sleep(seconds)
    return meminfo("MemAvailable")


async def settled_gain(before: int) -> int:
    """MemAvailable once it stops rising (at most 10 s): this VM hands freed pages to its
    host over seconds (MemFree +127 MiB 0.2 s after a 200 MiB process died, +204 in 6 s)."""
    last = await settle(1.0)
    for _ in range(18):
        now = await settle(0.5)
        if now - last < 4 * MIB:
            return now - before
        last = now
    return last - before


ASLEEP_WITHIN = 240.0  # seconds for a sleep (and a reclaim) to end: see asleep()


async def one_mode(mode: str, rounds: int) -> ModeResult:
    result = ModeResult()
    port, backend, admin = free_port(), free_port(), free_port()
    proxy = Proxy(parse_yaml(config(port, backend, admin, mode), "bench"))
    await proxy.start()
    big = proxy.services["big"]
    action = {"pause": SleepAction.PAUSE, "stop": SleepAction.STOP}.get(mode, SleepAction.HIBERNATE)

    async def asleep() -> None:
        # The last client's close reaches the proxy a moment later; the proxy offers no
        # event for either wait. Bounded: a reclaim of the 200 MiB heap takes about a
        # second here, but 30-41 s beside two busy loops (2026-12-06), where a bound of
        # 60 s was hit. A reclaim that fails (counted as a fallback) ends the wait too:
        # the row counts it as a failure.
        fallbacks = sum(big.stats.hibernate_fallbacks.values())
        try:
            async with asyncio.timeout(ASLEEP_WITHIN):
                while big.attached:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                await big.sleep(action)
                while (  # noqa: ASYNC110
                    action is SleepAction.HIBERNATE
                    and not big.hibernator.hibernated
                    and sum(big.stats.hibernate_fallbacks.values()) == fallbacks
                ):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise RuntimeError(
                f"{mode}: not asleep after {ASLEEP_WITHIN:.0f} s ({big.state.value}, "
                f"{big.attached} attached, hibernated={big.hibernator.hibernated})"
            ) from None

    try:
        for _ in range(rounds):
            await request(port, "/checksum")  # awake, every page resident
            await asyncio.sleep(0.2)
            use = big.hibernator.memory()
            available = await settle()
            await asleep()
            gone = big.hibernator.memory() if action is not SleepAction.STOP else None
            if use is not None:
                result.resident_awake.append(use.resident)
                result.resident_asleep.append(gone.resident if gone else 0)
            result.available_gain.append(await settled_gain(available))
            result.small_ms.append(await request(port) * 1000)
            await request(port, "/checksum")
            await asleep()
            await settle(0.3)
            result.touch_ms.append(await request(port, "/checksum") * 1000)
        wakes = big.stats.wakes
        result.failures = wakes[WakeResult.FAILED] + wakes[WakeResult.TIMEOUT]
        result.failures += sum(big.stats.hibernate_fallbacks.values())
    finally:
        await proxy.close()
    return result


async def runtime_own(rounds: int) -> tuple[list[float], list[float]]:
    """SIGCONT to a frozen holder, and a start of one, each to the first response byte."""
    sigcont, start = [], []
    for _ in range(rounds):
        backend = free_port()
        began = time.perf_counter()
        command = [sys.executable, HOLDER, "--port", str(backend), "--hold", str(HOLD_MIB)]
        proc = subprocess.Popen(command)  # noqa: ASYNC220 - timed from here: no loop hop
        try:
            async with asyncio.timeout(60):  # the holder builds its heap first
                while True:
                    try:
                        await request(backend)
                        break
                    except OSError:
                        await asyncio.sleep(0.005)
            start.append((time.perf_counter() - began) * 1000)
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.3)
            began = time.perf_counter()
            proc.send_signal(signal.SIGCONT)
            await request(backend)
            sigcont.append((time.perf_counter() - began) * 1000)
        finally:
            proc.kill()
            proc.wait()
    return sigcont, start


def many_config(
    web: int, nginx: tuple[list[str], int], admin: int, ports: list[tuple[int, int]]
) -> str:
    argv, nginx_port = nginx
    lines = [
        f"admin: {{listen: 127.0.0.1:{admin}}}",
        "services:",
        "  web:",
        f"    listen: 127.0.0.1:{web}",
        f"    backend: 127.0.0.1:{nginx_port}",
        f"    command: {json.dumps(argv)}",
        "    sleep_policy: {enabled: false}",
    ]
    for i, (port, backend) in enumerate(ports):
        lines += [
            f"  h{i}:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            f'    command: ["{sys.executable}", "{HOLDER}", "--port", "{backend}", '
            f'"--hold", "{MANY_MIB}"]',
            "    readiness: {http: /}",
            "    sleep_policy: {idle_timeout: 3600}",
        ]
    return "\n".join(lines) + "\n"


async def loop_lag(out: list[float]) -> None:
    """Append how late each 1 ms sleep wakes, until cancelled."""
    while True:
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        out.append(time.perf_counter() - began - 0.001)


async def under_load(rounds: int, workdir: Path, seconds: float = 3.0) -> LoadResult:
    """wrk keep-alive on ``web`` for ``seconds``, alone and with MANY hibernating at once
    half a second in; the rounds alternate, so the machine's drift hits both alike."""
    result = LoadResult()
    ports = [(free_port(), free_port()) for _ in range(MANY)]
    web, admin = free_port(), free_port()
    # web: nginx as a command of the proxy's, never put to sleep.
    cfg = parse_yaml(many_config(web, peers.nginx_command(workdir), admin, ports), "bench")
    proxy = Proxy(cfg)
    await proxy.start()
    many = [proxy.services[f"h{i}"] for i in range(MANY)]
    try:
        await request(web)
        await asyncio.gather(*(request(port) for port, _ in ports))  # all started
        argv = loadgen.wrk_command(web, seconds, 10, churn=False)
        for _ in range(rounds):
            quiet = await asyncio.to_thread(loadgen.run_wrk, argv)
            busy_run = asyncio.ensure_future(asyncio.to_thread(loadgen.run_wrk, argv))
            await asyncio.sleep(0.5)
            began = time.perf_counter()
            lags: list[float] = []
            probe = asyncio.ensure_future(loop_lag(lags))
            await asyncio.gather(*(s.sleep(SleepAction.HIBERNATE) for s in many))
            await asyncio.gather(*(s.hibernator.settled() for s in many))
            result.reclaim_s.append(time.perf_counter() - began)
            probe.cancel()
            result.loop_lag_ms.append(max(lags, default=0.0) * 1000)
            result.hibernated += sum(s.hibernator.hibernated for s in many)
            busy = await busy_run
            result.quiet_p99_ms.append(quiet.p99_ms)
            result.busy_p99_ms.append(busy.p99_ms)
            result.errors += quiet.errors + busy.errors
            await asyncio.gather(*(request(port) for port, _ in ports))  # awake again
    finally:
        await proxy.close()
    return result


async def measure(rounds: int, workdir: Path | None) -> Result:
    modes = {mode: await one_mode(mode, rounds) for mode in MODES}
    sigcont, start = await runtime_own(rounds)
    load = await under_load(rounds, workdir) if workdir is not None else None
    return Result(modes, sigcont, start, rounds, load)


def run(rounds: int, workdir: Path | None = None) -> tuple[Result, str]:
    """``workdir``: where nginx runs for the under-load part (None: that part is skipped)."""
    with swap_file() as how:
        return uvloop.run(measure(rounds, workdir)), how


def _mib(values: list[int]) -> str:
    return f"{statistics.median(values) / MIB:,.1f}" if values else "-"


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f}" if values else "-"


def table(result: Result) -> list[dict[str, str]]:
    rows = []
    for mode, r in result.modes.items():
        rows.append(
            {
                "mode": mode,
                "in RAM awake (MiB)": _mib(r.resident_awake),
                "in RAM asleep (MiB)": _mib(r.resident_asleep),
                "MemAvailable gained (MiB)": _mib(r.available_gain),
                "small-request wake p50 (ms)": _ms(r.small_ms),
                "full-touch wake p50 (ms)": _ms(r.touch_ms),
                "failures": str(r.failures),
            }
        )
    rows.append(
        {
            "mode": "runtime's own: SIGCONT / start to first byte",
            "in RAM awake (MiB)": "-",
            "in RAM asleep (MiB)": "-",
            "MemAvailable gained (MiB)": "-",
            "small-request wake p50 (ms)": f"{_ms(result.sigcont_ms)} / {_ms(result.start_ms)}",
            "full-touch wake p50 (ms)": "-",
            "failures": "0",
        }
    )
    return rows


def load_table(load: LoadResult) -> list[dict[str, str]]:
    ratio = statistics.median(load.busy_p99_ms) / statistics.median(load.quiet_p99_ms)
    return [
        {
            "keep-alive p99, alone (ms)": _ms(load.quiet_p99_ms),
            f"keep-alive p99, {MANY} hibernating (ms)": _ms(load.busy_p99_ms),
            "ratio": f"{ratio:.2f} x",
            f"all {MANY} reclaimed (s)": _ms([s * 1000 for s in load.reclaim_s]).replace(",", "")
            + " ms",
            "proxy loop lag, max (ms)": _ms(load.loop_lag_ms),
            "hibernated": f"{load.hibernated} of {MANY * len(load.busy_p99_ms)}",
            "wrk errors": str(load.errors),
        }
    ]


def _print(rows: list[dict[str, str]]) -> None:
    head = list(rows[0])
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(row[h] for h in head))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hibernate")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wakeproxy-bench-") as tmp:
        result, how = run(args.rounds, Path(tmp))
    print(f"swap: {how}; {args.rounds} round(s); medians")
    _print(table(result))
    if result.load is not None:
        _print(load_table(result.load))


if __name__ == "__main__":
    main()
