"""A/B of the cold wake between two checkouts of wakeproxy, in one run.

Two proxies, one per source tree (each run with its tree first on PYTHONPATH, from a
directory outside both), in front of one wakeserver container. The harness pauses the
container before every burst, then sends the burst through one proxy; the order of the
two alternates every round. Neither proxy sleeps the container itself (idle_timeout 3600),
so both only follow the pauses from the engine's events.

    git worktree add /tmp/wp-old <commit>
    cd /tmp && /path/to/.venv/bin/python -m bench.coldab /tmp/wp-old /path/to/wakeproxy 8 1,1000

(``-m bench.coldab`` needs this tree importable: run it with PYTHONPATH=/path/to/wakeproxy.)
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiodocker

from bench import coldwake, peers


def _proxy(tree: str, workdir: Path, backend: int, name: str) -> peers.Peer:
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = tree
    try:
        return peers.wakeproxy_container(workdir, backend, name)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


async def compare(trees: dict[str, str], rounds: int, sizes: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="wp-cold-ab-"))
    results: dict[tuple[str, int], list[tuple[float, float, int]]] = {
        (label, n): [] for label in trees for n in sizes
    }
    unpause: list[float] = []
    with coldwake.wakeserver("ab") as (name, backend):
        proxies = {}
        for label, tree in trees.items():
            (work / label).mkdir()
            proxies[label] = _proxy(tree, work / label, backend, name)
        try:
            async with aiodocker.Docker() as client:
                container = client.containers.container(name)
                for r in range(rounds):
                    for n in sizes:
                        order = list(proxies.items())[:: 1 if r % 2 == 0 else -1]
                        for label, proxy in order:
                            await container.pause()
                            started = time.perf_counter()
                            await container.unpause()
                            unpause.append(time.perf_counter() - started)
                            await container.pause()
                            await asyncio.sleep(0.3)  # the proxies see the pause event
                            times = [t for t in await coldwake.burst(proxy.port, n) if t]
                            p50 = statistics.median(times) if times else float("nan")
                            p99 = coldwake.percentile(times, 0.99) if times else float("nan")
                            results[(label, n)].append((p50, p99, n - len(times)))
                            await asyncio.sleep(0.3)
        finally:
            for proxy in proxies.values():
                proxy.stop()
    print(f"engine unpause p50: {statistics.median(unpause) * 1000:.2f} ms")
    for (label, n), runs in results.items():
        p50 = statistics.median(run[0] for run in runs) * 1000
        p99 = statistics.median(run[1] for run in runs) * 1000
        failed = sum(run[2] for run in runs)
        print(f"{label} N={n}: cold p50 {p50:.2f} ms, p99 {p99:.2f} ms, failed {failed}")


def main() -> None:
    old, new, rounds, sizes = sys.argv[1:5]
    trees = {"old": old, "new": new}
    asyncio.run(compare(trees, int(rounds), [int(n) for n in sizes.split(",")]))


if __name__ == "__main__":
    main()
