"""A/B of the hot-path rows (1 keep-alive, 2 churn, 4 mode http, 4b every head different)
between two source trees of wakeproxy, in one run: a refactor shows no row worse than
before by more than the run-to-run spread.

    git worktree add /tmp/wp-before <commit>
    cd /tmp && PYTHONPATH=/path/to/wakeproxy /path/to/.venv/bin/python -m bench.ab \\
        /tmp/wp-before /path/to/wakeproxy --rounds 5 --seconds 5

Each tree runs as its own ``wakeproxy run`` (its tree first on PYTHONPATH, from a folder
outside both) in front of one nginx, next to HAProxy; wrk (1 thread, 50 connections) runs
against each in turn, the order rotating every round. Prints per row the medians, the
spread (lowest and highest round) and after / before. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import loadgen, peers

ROWS = {
    "1. keep-alive, tcp": ("tcp", False, False),
    "2. churn, tcp": ("tcp", True, False),
    "4. mode http": ("http", False, False),
    "4b. mode http, every head different": ("http", False, True),
}


def proxy(tree: Path, name: str, workdir: Path, backend: int, mode: str) -> peers.Peer:
    """``wakeproxy run`` from ``tree`` (the same config for both trees)."""
    port = peers.free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"admin:\n  listen: 127.0.0.1:{peers.free_port()}\n"
        "services:\n"
        "  bench:\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend}\n"
        '    command: ["sleep", "1000000"]\n'
        "    auto_start: true\n"
        "    readiness: {tcp: false}\n"
        "    sleep_policy: {enabled: false}\n" + (f"    mode: {mode}\n" if mode == "http" else "")
    )
    argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "warning"]
    return peers.Peer(name, argv, port, env={"PYTHONPATH": str(tree)})


def row(
    title: str, trees: dict[str, Path], workdir: Path, rounds: int, seconds: float
) -> list[str]:
    mode, churn, varied = ROWS[title]
    backend = peers.nginx(workdir / title.split(".")[0])
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port, mode))
        ports = {"haproxy": haproxy.port}
        for name, tree in trees.items():
            started.append(peer := proxy(tree, name, workdir, backend.port, mode))
            ports[name] = peer.port
        rps: dict[str, list[float]] = {name: [] for name in ports}
        errors = dict.fromkeys(ports, 0)
        names = list(ports)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                argv = loadgen.wrk_command(ports[name], seconds, 50, churn, varied=varied)
                result = loadgen.run_wrk(argv)
                rps[name].append(result.rps)
                errors[name] += result.errors
                print(f"  {title}: {name} {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
    finally:
        for peer in reversed(started):
            peer.stop()
    med = {name: statistics.median(values) for name, values in rps.items()}
    cells = [title]
    for name in names:
        low, high = min(rps[name]), max(rps[name])
        cells.append(f"{med[name]:,.0f} ({low:,.0f}-{high:,.0f}; {errors[name]} errors)")
    cells.append(f"{med['after'] / med['before']:.3f}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the source tree before the change")
    parser.add_argument("after", type=Path, help="the source tree after it")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    header = ["row", "HAProxy req/s", "before req/s", "after req/s", "after / before"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with tempfile.TemporaryDirectory(prefix="wakeproxy-ab-") as tmp:
        cells = [row(title, trees, Path(tmp), args.rounds, args.seconds) for title in ROWS]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
