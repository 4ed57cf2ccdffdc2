"""What a prediction replay (bench/predict.py) measured: each service's week in each run
(off, on), the predictor's books, and the tables the report prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import date, datetime

from bench import predict_trace

ZONE = predict_trace.ZONE


@dataclass
class Figures:
    """One service's measured week in one run."""

    requests: int = 0
    # By the trace's cause (habit, session, chain, noise): what could be foreseen.
    requests_by_cause: Counter[str] = field(default_factory=Counter)
    cold_by_cause: Counter[str] = field(default_factory=Counter)
    found_asleep: int = 0  # held: this request's arrival started the wake
    found_waking: int = 0  # held behind a wake already under way
    held_seconds: float = 0.0
    awake_seconds: float = 0.0
    wakes: int = 0
    failed: int = 0

    @property
    def cold(self) -> int:
        return self.found_asleep + self.found_waking

    def add(self, other: Figures) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Run:
    """One replay of the trace: per service, and the predictor's books (None: off)."""

    services: dict[str, Figures]
    # kind -> [predicted, used, wasted, awake seconds], the measured week's
    predicted: dict[str, list[float]] | None = None

    @property
    def total(self) -> Figures:
        out = Figures()
        for figures in self.services.values():
            out.add(figures)
        return out


@dataclass
class PredictResult:
    trace: str
    requests: int  # in the whole trace
    learned_from: float
    measured_from: float
    measured_to: float
    idle_timeout: float
    wake: float
    threshold: float
    off: Run
    on: Run

    @property
    def weeks(self) -> int:
        """Weeks of the trace, the measured one included."""
        return round((self.measured_to - self.learned_from) / (7 * 86400))

    @property
    def measured_week(self) -> date:
        """The measured week's Monday."""
        return datetime.fromtimestamp(self.measured_from, ZONE).date()

    @property
    def cold_removed(self) -> float:
        """The share of the cold requests with prediction off that prediction took away."""
        off, on = self.off.total.cold, self.on.total.cold
        return (off - on) / off if off else 0.0

    @property
    def extra_awake(self) -> float:
        off, on = self.off.total.awake_seconds, self.on.total.awake_seconds
        return on / off - 1.0 if off else 0.0


def _predicted(run: Run) -> str:
    """``arrivals 4/8 (2.3 h)``: used/wasted, and the awake hours the predictor
    counts on them (a used one: from its wake to the request)."""
    if run.predicted is None:
        return "-"
    parts = [
        f"{kind} {c[1]:.0f}/{c[2]:.0f} ({c[3] / 3600:.1f} h)"
        for kind, c in run.predicted.items()
        if any(c[:3])
    ]
    return ", ".join(parts) or "none"


def table(result: PredictResult) -> list[dict[str, str]]:
    rows = []
    for label, run_ in (("off", result.off), ("on", result.on)):
        t = run_.total
        on = run_ is result.on
        rows.append(
            {
                "prediction": label,
                "requests": str(t.requests),
                "cold (asleep + waking)": f"{t.cold} ({t.found_asleep} + {t.found_waking})",
                "cold removed": f"{result.cold_removed:.0%}" if on else "-",
                "mean added latency ms": f"{t.held_seconds / t.requests * 1000:.0f}"
                if t.requests
                else "-",
                "wakes": str(t.wakes),
                "awake h": f"{t.awake_seconds / 3600:.1f}",
                "extra awake": f"{result.extra_awake:+.0%}" if on else "-",
                "predicted wakes used/wasted": _predicted(run_),
                "failed": str(t.failed),
            }
        )
    return rows


def cause_table(result: PredictResult) -> list[dict[str, str]]:
    """Cold requests by where they came from: which ones any predictor could foresee."""
    off, on = result.off.total, result.on.total
    rows = []
    for cause in sorted(off.requests_by_cause):
        before, after = off.cold_by_cause[cause], on.cold_by_cause[cause]
        rows.append(
            {
                "cause": cause,
                "requests": str(off.requests_by_cause[cause]),
                "cold off -> on": f"{before} -> {after}",
                "removed": f"{(before - after) / before:.0%}" if before else "-",
            }
        )
    return rows


def service_table(result: PredictResult) -> list[dict[str, str]]:
    """Per service: cold requests and awake hours, off -> on."""
    rows = []
    for name, off in result.off.services.items():
        on = result.on.services[name]
        rows.append(
            {
                "service": name,
                "requests": str(off.requests),
                "cold off -> on": f"{off.cold} -> {on.cold}",
                "awake h off -> on": f"{off.awake_seconds / 3600:.2f} -> "
                f"{on.awake_seconds / 3600:.2f}",
            }
        )
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
    return "\n".join(lines)
