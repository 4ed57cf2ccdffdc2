"""The traffic trace row 11 replays: one developer's agent calling seven MCP servers for
some weeks, generated from a seed (the same seed, the same file, byte for byte).

    .venv/bin/python -m bench.predict_trace --weeks 3 --seed 1 --out bench/predict-trace.csv

What is in it, all times Europe/Berlin wall clock, weeks from Monday 00:00 (``--start``):

* **Working days.** Monday to Friday; each one is a day off (no sessions, only noise)
  with p 0.05. A working day starts at 09:00 + N(0, 15 min), clipped to 08:30-09:30,
  and ends at U(17:00, 18:30). Lunch starts at U(12:00, 12:30) and lasts U(30, 60)
  min: no session starts in it (the dip). No sessions at weekends.
* **Sessions.** A session is 1 + Poisson(3) requests to one service, the gaps between
  them Exp(mean 45 s), at least 1 s. Session starts per working day, per service:

  ====================  =======================================================
  git                   one at the day's start + U(1, 5) min, then Poisson(3)
  filesystem            Poisson(1) (and the chain from git, below)
  search                Poisson(2.5)
  docs                  Poisson(0.5) (and the chain from search)
  db                    Poisson(1.5)
  jira                  one at 09:50 + N(0, 3 min) (before a 10:00 stand-up)
  browser               one at 14:00 + N(0, 5 min) on Mon, Wed, Fri; Poisson(0.5)
  ====================  =======================================================

  "Poisson(k)" sessions start at times uniform over the day's working hours outside
  lunch (a session may run on past lunch's start or the day's end).
* **Chains.** Every session request to git is followed by one to filesystem with p
  0.8, every one to search by one to docs with p 0.6, each U(0.5, 8) s later (the
  agent's next tool call). Followers do not chain further.
* **Noise.** Poisson(3) requests a day on every day, weekends too, each at a uniform
  time of the 24 hours to a uniformly chosen service (a cron job, a colleague, a
  stray client); no chains.

The file: ``epoch_seconds,service,cause`` with a header line, epoch seconds to the
millisecond, sorted by time (then name). ``cause`` says where a request came from, so the
replay can tell which cold requests any predictor could have foreseen: ``habit`` (a
session of git's day start, jira's stand-up, browser's afternoon), ``session`` (one at a
random time of the working day), ``chain`` (a follower), ``noise``. About 60 requests a
working day.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ZONE = ZoneInfo("Europe/Berlin")
SERVICES = ("git", "filesystem", "search", "docs", "db", "jira", "browser")
# Session starts a working day at random times (Poisson means), per service.
IRREGULAR = {
    "git": 3.0,
    "filesystem": 1.0,
    "search": 2.5,
    "docs": 0.5,
    "db": 1.5,
    "jira": 0.0,
    "browser": 0.5,
}
CHAINS = {"git": ("filesystem", 0.8), "search": ("docs", 0.6)}
CHAIN_DELAY = (0.5, 8.0)
SESSION_MEAN_EXTRA = 3.0  # requests beyond the first, Poisson
GAP_MEAN = 45.0
GAP_MIN = 1.0
NOISE_PER_DAY = 3.0
DAY_OFF = 0.05
DEFAULT_START = date(2025, 6, 2)  # a Monday, no DST change for weeks

Request = tuple[float, str, str]  # epoch seconds, service, cause
CAUSES = ("habit", "session", "chain", "noise")


def poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method: the means here are small."""
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def at(day: date, minutes: float) -> float:
    """Epoch seconds of ``minutes`` after local midnight of ``day`` (wall clock)."""
    whole = int(minutes)
    local = datetime.combine(day, time(whole // 60, whole % 60), ZONE)
    return local.timestamp() + (minutes - whole) * 60.0


def session(rng: random.Random, service: str, start: float, cause: str) -> Iterator[Request]:
    """One session's requests, and their chained followers."""
    now = start
    for i in range(1 + poisson(rng, SESSION_MEAN_EXTRA)):
        if i:
            now += max(GAP_MIN, rng.expovariate(1.0 / GAP_MEAN))
        yield now, service, cause
        chain = CHAINS.get(service)
        if chain is not None and rng.random() < chain[1]:
            yield now + rng.uniform(*CHAIN_DELAY), chain[0], "chain"


def working_day(rng: random.Random, day: date) -> Iterator[Request]:
    start = min(max(540.0 + rng.gauss(0.0, 15.0), 510.0), 570.0)
    end = rng.uniform(1020.0, 1110.0)
    lunch = rng.uniform(720.0, 750.0)
    lunch_end = lunch + rng.uniform(30.0, 60.0)
    morning, afternoon = lunch - start, end - lunch_end

    def anytime() -> float:
        x = rng.uniform(0.0, morning + afternoon)
        return start + x if x < morning else lunch_end + (x - morning)

    yield from session(rng, "git", at(day, start + rng.uniform(1.0, 5.0)), "habit")
    yield from session(rng, "jira", at(day, 590.0 + rng.gauss(0.0, 3.0)), "habit")
    if day.weekday() in (0, 2, 4):
        yield from session(rng, "browser", at(day, 840.0 + rng.gauss(0.0, 5.0)), "habit")
    for service in SERVICES:
        for _ in range(poisson(rng, IRREGULAR[service])):
            yield from session(rng, service, at(day, anytime()), "session")


def generate(weeks: int, seed: int, start: date = DEFAULT_START) -> list[Request]:
    """The trace, sorted; ``start`` must be a Monday."""
    if start.weekday() != 0:
        raise ValueError(f"start {start} is not a Monday")
    rng = random.Random(seed)
    out: list[Request] = []
    for n in range(7 * weeks):
        day = start + timedelta(days=n)
        if day.weekday() < 5 and rng.random() >= DAY_OFF:
            out.extend(working_day(rng, day))
        midnight, next_midnight = at(day, 0.0), at(day + timedelta(days=1), 0.0)
        noise = poisson(rng, NOISE_PER_DAY)
        out.extend(
            (rng.uniform(midnight, next_midnight), rng.choice(SERVICES), "noise")
            for _ in range(noise)
        )
    out = [(round(t, 3), name, cause) for t, name, cause in out]
    out.sort()
    return out


def write(path: Path, requests: list[Request]) -> None:
    lines = [
        "epoch_seconds,service,cause",
        *(f"{t:.3f},{name},{cause}" for t, name, cause in requests),
    ]
    path.write_text("\n".join(lines) + "\n")


def read(path: Path) -> list[Request]:
    """A trace file as written by ``write`` (sorted again: a hand-edited one may not be)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines()):
        if n == 0 and line.startswith("epoch_seconds"):
            continue
        if line.strip():
            when, name, *cause = line.split(",")  # a trace without causes: "unknown"
            out.append((float(when), name.strip(), cause[0].strip() if cause else "unknown"))
    out.sort()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weeks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=date.fromisoformat, default=DEFAULT_START)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "predict-trace.csv")
    args = parser.parse_args()
    requests = generate(args.weeks, args.seed, args.start)
    write(args.out, requests)
    print(f"{len(requests)} requests over {args.weeks} weeks from {args.start} to {args.out}")


if __name__ == "__main__":
    main()
