"""PNG plots for the report (matplotlib, a bench-only extra: ``pip install -e .[bench]``).

Latency distributions per contender for the HTTP rows (wrk's 50/75/90/99th percentiles,
medians over rounds) and cold-wake time against the number of simultaneous clients.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.coldwake import Row
    from bench.loadgen import WrkResult


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def latency(path: Path, title: str, results: dict[str, list[WrkResult]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        quantiles = sorted(runs[0].percentiles)
        values = [statistics.median(r.percentiles[q] for r in runs) for q in quantiles]
        ax.plot([str(q) for q in quantiles], values, marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency ms (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cold_wake(path: Path, rows: list[Row]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [row.n for row in rows]
    ms = 1000.0
    ax.plot(sizes, [statistics.median(r.cold) * ms for r in rows], marker="o", label="cold p50")
    ax.plot(sizes, [statistics.median(r.cold_p99) * ms for r in rows], marker="o", label="cold p99")
    ax.plot(
        sizes,
        [statistics.median(r.warm_p99) * ms for r in rows],
        marker="s",
        label="HAProxy warm p99",
    )
    ax.plot(
        sizes, [statistics.median(r.unpause) * ms for r in rows], marker="^", label="engine unpause"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("simultaneous first connections (N)")
    ax.set_ylabel("ms to the first response byte (log)")
    ax.set_title("Cold wake of a paused container", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
