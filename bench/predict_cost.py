"""What prediction costs the event loop, timed on the pure core (no proxy, no traffic).

    .venv/bin/python -m bench.predict_cost

Prints: the per-connection hook (``Predictor.arrived``, 20 services with arrivals and
chains on); ``next_wake`` for a service whose 672 slots are all likely; and for a
predictor near its bounds (4,096 services fed 200,000 random requests) the copy a save
makes on the loop (``snapshot``) and the JSON it builds in its thread, with the size.
"""

from __future__ import annotations

import random
import time
import timeit

import orjson

from wakeproxy.core.predict import Predictor, PredictSettings

START = 1_780_000_000.0
WEEK = 7 * 86400.0


def hook_us() -> float:
    predictor = Predictor("Europe/Berlin")
    for i in range(20):
        predictor.configure(f"s{i}", PredictSettings(arrivals=True, chains=True))
    now = [START]

    def one() -> None:
        now[0] += 0.01
        predictor.arrived("s1", now[0])

    count = 100_000
    return timeit.timeit(one, number=count) / count * 1e6


def next_wake_ms() -> float:
    predictor = Predictor("Europe/Berlin")
    predictor.configure("a", PredictSettings(arrivals=True))
    for week in range(6):
        for slot in range(672):
            predictor.arrived("a", START + week * WEEK + slot * 900 + 5)
    predictor.woke("a", START, 2.0)
    now = START + 6 * WEEK + 3000
    count = 200
    began = time.perf_counter()
    for i in range(count):
        predictor.next_wake("a", now + i)
    return (time.perf_counter() - began) / count * 1e3


def save_figures() -> tuple[tuple[int, int, int], float, float, int]:
    rng = random.Random(1)
    predictor = Predictor("UTC")
    names = [f"service-{i:04d}" for i in range(4096)]
    for name in names:
        predictor.configure(name, PredictSettings(arrivals=True, chains=True))
    now = START
    for _ in range(200_000):
        now += rng.uniform(0, 3)
        predictor.arrived(rng.choice(names), now)
    for name in names:
        predictor.woke(name, now, 2.0)
    began = time.perf_counter()
    snapshot = predictor.snapshot()
    copied = time.perf_counter()
    data = orjson.dumps(snapshot.state())
    built = time.perf_counter()
    return predictor.tracked(), (copied - began) * 1e3, (built - copied) * 1e3, len(data)


def main() -> None:
    print(f"arrived(), 20 services, arrivals and chains on: {hook_us():.2f} us")
    print(f"next_wake(), all 672 slots likely: {next_wake_ms():.3f} ms")
    tracked, copy_ms, json_ms, size = save_figures()
    services, pairs, slots = tracked
    print(f"near the bounds: {services} services, {pairs} pairs, {slots} slots")
    print(f"  save: copy on the loop {copy_ms:.1f} ms; JSON in its thread {json_ms:.1f} ms,")
    print(f"  {size:,} bytes")


if __name__ == "__main__":
    main()
