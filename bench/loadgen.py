"""Load generators and their parsers: wrk (HTTP keep-alive and churn), iperf3 (bulk)."""

from __future__ import annotations

import json
import re
import subprocess
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


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot read a latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


VARIED = str(Path(__file__).parent / "varied.lua")


def wrk_command(
    port: int, seconds: float, connections: int, churn: bool, *, varied: bool = False
) -> list[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if churn:
        argv += ["-H", "Connection: close"]  # a new connection per request
    if varied:
        argv += ["-s", VARIED]  # a different request head each time
    return [*argv, f"http://127.0.0.1:{port}/"]


def run_wrk(argv: list[str]) -> WrkResult:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
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
    return WrkResult(rps, p50, p99, errors, percentiles)


def iperf3_command(port: int, seconds: float) -> list[str]:
    return ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"]


def run_iperf3(argv: list[str]) -> float:
    """Received throughput in Gbit/s."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
