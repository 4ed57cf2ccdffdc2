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
