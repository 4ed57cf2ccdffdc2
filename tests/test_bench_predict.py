"""Row 11's replay runs on small traces and its books balance. Speed is never asserted."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from bench import predict, predict_results, predict_trace, targets
from bench.report import Report, Status

START = date(2025, 6, 2)  # a Monday
WEEK = 7 * 86400.0


def regular(weeks: int) -> list[predict_trace.Request]:
    """Every weekday git at 09:00:30 Berlin, filesystem 5 s later, nothing else."""
    out = []
    for n in range(7 * weeks):
        day = START + timedelta(days=n)
        if day.weekday() < 5:
            at = predict_trace.at(day, 9 * 60 + 0.5)
            out += [(at, "git", "habit"), (at + 5.0, "filesystem", "chain")]
    return out


def test_the_generator_is_seeded_and_its_file_reads_back(tmp_path):
    trace = predict_trace.generate(2, seed=7)
    assert trace == predict_trace.generate(2, seed=7)
    assert trace != predict_trace.generate(2, seed=8)
    assert trace == sorted(trace)
    assert {name for _, name, _ in trace} <= set(predict_trace.SERVICES)
    path = tmp_path / "trace.csv"
    predict_trace.write(path, trace)
    assert path.read_text().splitlines()[0] == "epoch_seconds,service,cause"
    assert {cause for _, _, cause in trace} <= set(predict_trace.CAUSES)
    assert predict_trace.read(path) == trace
    with pytest.raises(ValueError, match="not a Monday"):
        predict_trace.generate(1, seed=1, start=START + timedelta(days=1))


def test_a_generated_trace_of_two_services_replays_with_consistent_counts():
    trace = [r for r in predict_trace.generate(2, seed=3) if r[1] in ("git", "filesystem")]
    result = predict.run(trace)
    assert result.weeks == 2
    assert result.measured_to - result.measured_from == WEEK  # no DST change in June
    measured = [r for r in trace if result.measured_from <= r[0] < result.measured_to]
    for run in (result.off, result.on):
        total = run.total
        assert set(run.services) == {"git", "filesystem"}
        assert total.requests == len(measured)
        assert total.failed == 0
        assert 0 < total.cold <= total.requests
        # Each held request waits at most one wake (its own or the one under way).
        assert 0 < total.held_seconds <= total.cold * result.wake + 1e-6
        for figures in run.services.values():
            assert 0 < figures.awake_seconds <= WEEK
    # Off, every wake is a request's: the request that found the backend stopped.
    assert result.off.total.wakes == result.off.total.found_asleep
    assert result.off.predicted is None and result.on.predicted is not None
    rows = predict_results.table(result)
    assert [row["prediction"] for row in rows] == ["off", "on"]
    assert rows[0]["requests"] == rows[1]["requests"] == str(len(measured))


def test_a_perfectly_regular_trace_is_predicted_and_its_awake_time_is_the_idle_rule():
    result = predict.run(regular(3), idle_timeout=300.0, wake=2.0)
    off, on = result.off.total, result.on.total
    assert off.requests == on.requests == 10
    # Off: every request finds its backend stopped and waits the whole start; each
    # backend is awake from its request to the idle timeout after the start.
    assert (off.found_asleep, off.found_waking) == (10, 0)
    assert off.held_seconds == pytest.approx(10 * 2.0)
    assert off.awake_seconds == pytest.approx(10 * (2.0 + 300.0))
    # On: learned over two weeks, the third is woken ahead.
    assert on.cold < off.cold
    assert on.held_seconds < off.held_seconds
    assert on.failed == 0
    assert result.on.predicted is not None
    assert sum(counts[1] for counts in result.on.predicted.values()) > 0  # used


def test_the_target_reads_the_replay():
    report = Report(predict.TRACE.parent / "RESULTS.md", targets.ALL)
    result = predict.run(regular(3))
    targets.predict(report, result)
    measured, status = report.verdict(targets.PREDICT)
    assert measured.startswith(f"{result.cold_removed:.0%} fewer (10 -> {result.on.total.cold})")
    met = result.cold_removed >= 0.5 and result.extra_awake <= 0.2
    assert status is (Status.MET if met else Status.NOT_MET)
