"""The bench tools run and print their tables. Speed is never asserted in a test."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.docker


def test_wake_bench_runs_and_prints_its_table(docker_engine):
    result = subprocess.run(
        [sys.executable, "-m", "bench.wake", "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "ms" not in line
    ]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [
        "engine unpause",
        "cold request via proxy",
        "warm request via proxy",
        "direct request",
    ]
    for row in rows:
        assert all(float(cell) > 0 for cell in row.split("|")[2:5])


@pytest.mark.timeout(300)
def test_harness_quick_run_writes_a_report(tmp_path, docker_engine):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    titles = (
        "1. Keep-alive small requests",
        "2. Connection churn",
        "3. Bulk throughput",
        "4. HTTP mode",
        "4b. HTTP mode, every request head different",
    )
    for title in titles:
        assert f"## {title}" in report
    # Every contender measured something, and the reference row is HAProxy itself.
    for contender in ("direct", "haproxy", "wakeproxy"):
        assert report.count(f"| {contender} |") == 5
    assert report.count("| haproxy | ") == 5 and "| 1.00 |" in report
    # Through mode http every response was a 2xx (wrk counts others as errors).
    for section in report.split("## 4")[1:3]:
        wakeproxy_row = next(
            line for line in section.splitlines() if line.startswith("| wakeproxy")
        )
        assert wakeproxy_row.rstrip().endswith("| 0 |"), wakeproxy_row
    # The targets, judged by the harness from this run's figures (quick: no N=1000 burst).
    targets = report.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for figure in (
        "1. keep-alive req/s",
        "2. churn",
        "3. bulk",
        "4. HTTP mode",
        "5. cold wake p50",
        "7. 1,000",
    ):
        assert f"| {figure}" in targets, figure
    assert (
        "| 5. cold wake p99, 1000 at once | <= HAProxy p99 + 15 ms | not run | **no** |" in targets
    )
    # Plots next to the report, linked from it (matplotlib is a test extra).
    for name in ("latency-keepalive", "latency-churn", "latency-http", "cold-wake"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in report
    # Rows 6 and 7 ran on the real engine too, and nothing failed.
    start = report.split("## 6. Stop/start wake", 1)[1].split("## 7.", 1)[0]
    assert "Not run" not in start and "| 1 |" in start
    assert start.split("| 1 |", 1)[1].splitlines()[0].rstrip().endswith("| 0 |")
    scaled = report.split("## 7. Scale", 1)[1]
    assert "| 1050 |" in scaled and "failed" not in scaled.split("| 1050 |", 1)[1].splitlines()[0]
    # The cold-wake row ran on the real engine: N=1 and N=10, one unpause per burst, none failed.
    cold = report.split("## 5. Cold wake", 1)[1].split("## 6.", 1)[0]
    assert "Not run" not in cold
    lines = [line for line in cold.splitlines() if line.startswith(("| 1 |", "| 10 |"))]
    assert len(lines) == 2, cold
    for line in lines:
        cells = [c.strip() for c in line.split("|")]
        assert cells[-3] == "1" and cells[-2] == "0", line  # unpause calls, failed
