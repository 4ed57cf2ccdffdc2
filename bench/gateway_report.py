"""What one run of the gateway bench (bench/gateway.py) saw per service, how it is judged
(asleep through every window, woken once per call) and the table it prints."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

ASLEEP = ("stopped", "paused")
IDLE_TIMEOUT = 5


@dataclass
class Window:
    """What one observation saw for one service."""

    states: set[str] = field(default_factory=set)
    wakes: tuple[int, int] = (0, 0)
    answered: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    unreachable: int = 0
    gateway_status: set[str] = field(default_factory=set)
    last_seen_age: float = 0.0
    samples: int = 0

    @property
    def checks(self) -> int:
        """Health checks seen: each starts with server/discover (auto) or initialize."""
        return max(self.sent["server/discover"], self.sent["initialize"])


@dataclass
class Result:
    action: str
    service: str
    register_s: float = 0.0
    windows: list[Window] = field(default_factory=list)
    calls: list[tuple[str, float, int, str]] = field(default_factory=list)  # when, s, wakes+, text
    asleep_again_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    wakes_first: int = 0
    wakes_last: int = 0


def judge(result: Result) -> None:
    for i, window in enumerate(result.windows, 1):
        if window.states - set(ASLEEP):
            result.problems.append(f"window {i}: states {sorted(window.states)}")
        if window.wakes[1] != window.wakes[0]:
            result.problems.append(f"window {i}: woken {window.wakes[1] - window.wakes[0]}x")
        if window.unreachable:
            result.problems.append(f"window {i}: gateway unreachable in {window.unreachable}")
        if sum(window.answered.values()) <= 0:
            result.problems.append(f"window {i}: the proxy answered nothing")
    for when, _, woken, text in result.calls:
        if text != "HI!":
            result.problems.append(f"call {when}: {text}")
        if woken != (1 if when.startswith("asleep") else 0):
            result.problems.append(f"call {when}: {woken} wakes")


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows = [
        f"gateway checks every {args.interval} s ({args.connect_mode}), "
        f"{args.observe:.0f} s per window, idle_timeout {IDLE_TIMEOUT} s",
        "",
        "| action | server | checks per window (proxy answered) | wakes in windows | states"
        " | gateway reachable | lastSeen max age s | call asleep ms | call awake ms"
        " | asleep again s | wakes start -> end | register s | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        checks = ", ".join(
            f"{w.checks if not args.no_relay else '-'}"
            f" ({max(w.answered['server/discover'], w.answered['initialize'])})"
            for w in r.windows
        )
        woken = ", ".join(str(w.wakes[1] - w.wakes[0]) for w in r.windows)
        states = "/".join(sorted(set().union(*(w.states for w in r.windows))))
        reachable = sum(w.samples - w.unreachable for w in r.windows)
        samples = sum(w.samples for w in r.windows)
        age = max(w.last_seen_age for w in r.windows)
        asleep = ", ".join(f"{s * 1000:.0f}" for w, s, _, _ in r.calls if w.startswith("asleep"))
        awake = ", ".join(f"{s * 1000:.0f}" for w, s, _, _ in r.calls if w.startswith("awake"))
        again = ", ".join(f"{s:.1f}" for s in r.asleep_again_s)
        rows.append(
            f"| {r.action} | {r.service} | {checks} | {woken} | {states} | {reachable}/{samples}"
            f" | {age:.1f} | {asleep} | {awake} | {again} | {r.wakes_first} -> {r.wakes_last}"
            f" | {r.register_s:.2f} | {'; '.join(r.problems) or 'none'} |"
        )
    sent = Counter[str]()
    for r in results:
        for w in r.windows:
            sent.update(w.sent)
    rows += ["", "sent by the gateway in the windows (all servers): " + str(dict(sent))]
    return "\n".join(rows)
