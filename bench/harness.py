"""What every row of the harness shares: progress lines, contenders in rotating order,
numbers as the report prints them."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def alternate(
    contenders: dict[str, int], rounds: int, measure: Callable[[str, int], T]
) -> dict[str, list[T]]:
    """Run ``measure(name, port)`` for every contender, rotating the order each round."""
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(measure(name, contenders[name]))
    return results


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"
