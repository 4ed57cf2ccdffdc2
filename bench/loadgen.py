"""Load generators and their parsers: wrk (HTTP keep-alive and churn), iperf3 (bulk)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    # wrk's latency distribution: percentile -> ms (50, 75, 90, 99).
    percentiles: dict[int, float]
    requests: int = 0  # completed in the run
    # The CPU the contender's own process spent per request (us), when measured.
    cpu_us: float = float("nan")


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


VARIED = str(Path(__file__).parent / "varied.lua")
MCP_MIX = str(Path(__file__).parent / "mcp_mix.lua")


def wrk_command(
    port: int,
    seconds: float,
    connections: int,
    churn: bool,
    *,
    varied: bool = False,
    mcp: bool = False,
) -> list[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if churn:
        argv += ["-H", "Connection: close"]  # a new connection per request
    if varied:
        argv += ["-s", VARIED]  # a different request head each time
    if mcp:
        argv += ["-s", MCP_MIX]  # an MCP client's POSTs, answered SSE-framed
    return [*argv, f"http://127.0.0.1:{port}/"]


def cpu_seconds(pid: int) -> float:
    """utime + stime so far (/proc/PID/stat), in seconds, of a process and its children
    (nginx's worker does the work its master started)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in [pid, *map(int, children)]:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_wrk_on(argv: list[str], pid: int) -> WrkResult:
    """wrk, and the CPU process ``pid`` spent per request meanwhile."""
    before = cpu_seconds(pid)
    result = run_wrk(argv)
    spent = cpu_seconds(pid) - before
    per = spent / result.requests * 1e6 if result.requests else float("nan")
    return dataclasses.replace(result, cpu_us=per)


def run_wrk(argv: list[str]) -> WrkResult:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    """wrk's report: req/s, latency percentiles, and errors (socket errors plus answers
    that were not 2xx or 3xx)."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    percentiles = {int(q): _ms(v) for q, v in re.findall(r"\s(50|75|90|99)%\s+(\S+)", out)}
    p50, p99 = percentiles[50], percentiles[99]
    errors = 0
    if found := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors = sum(int(n) for n in found.groups())
    if found := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(found.group(1))
    done = re.search(r"(\d+) requests in", out)
    return WrkResult(rps, p50, p99, errors, percentiles, int(done.group(1)) if done else 0)


def iperf3_command(port: int, seconds: float) -> list[str]:
    return ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"]


class Iperf3Error(RuntimeError):
    """iperf3 gave no result; the message is iperf3's own error text."""


def _iperf3_once(argv: list[str]) -> float:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = {}
    # iperf3 3.12 -J exits 0 even when the test never ran: the JSON then has an empty
    # "end" and an "error" ("the server is busy running a test. try again later",
    # "unable to connect to server: Connection refused").
    received = out.get("end", {}).get("sum_received")
    if received is not None and "error" not in out:
        return float(received["bits_per_second"]) / 1e9
    why = out.get("error") or done.stderr.strip() or f"no result, exit status {done.returncode}"
    raise Iperf3Error(f"iperf3: {why}")


def run_iperf3(argv: list[str], retries: int = 2, pause: float = 1.0) -> float:
    """Received throughput in Gbit/s, or Iperf3Error after ``retries`` more tries.

    A test can fail on its control connection now and then (seen once through a proxy
    in a quick run): the server may still be busy with the previous test, so try again
    after a pause rather than lose the whole harness run to one flake.
    """
    for attempt in range(1, retries + 1):
        try:
            return _iperf3_once(argv)
        except Iperf3Error as exc:
            print(f"bench: {exc}; trying again ({attempt} of {retries})", file=sys.stderr)
            time.sleep(pause)
    return _iperf3_once(argv)
