"""A/B of the hot-path rows (1 keep-alive, 2 churn, 4 mode http, 4b every head different,
4c an MCP client's requests) between two source trees of wakeproxy, in one run: a change
shows no row worse than before by more than the run-to-run spread, and what each tree's
process spent in CPU per request.

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

# title: (mode, churn, wrk's script: None, "varied" or "mcp")
ROWS: dict[str, tuple[str, bool, str | None]] = {
    "1. keep-alive, tcp": ("tcp", False, None),
    "2. churn, tcp": ("tcp", True, None),
    "4. mode http": ("http", False, None),
    "4b. mode http, every head different": ("http", False, "varied"),
    "4c. mode http, an MCP client's requests": ("http", False, "mcp"),
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
    mode, churn, script = ROWS[title]
    backend = peers.nginx(workdir / title.split(".")[0])
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port, mode))
        ports = {"haproxy": haproxy.port}
        pids = {"haproxy": haproxy.proc.pid}
        for name, tree in trees.items():
            started.append(peer := proxy(tree, name, workdir, backend.port, mode))
            ports[name], pids[name] = peer.port, peer.proc.pid
        rps: dict[str, list[float]] = {name: [] for name in ports}
        cpu: dict[str, list[float]] = {name: [] for name in ports}
        errors = dict.fromkeys(ports, 0)
        names = list(ports)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                argv = loadgen.wrk_command(
                    ports[name], seconds, 50, churn, varied=script == "varied", mcp=script == "mcp"
                )
                result = loadgen.run_wrk_on(argv, pids[name])
                rps[name].append(result.rps)
                cpu[name].append(result.cpu_us)
                errors[name] += result.errors
                print(f"  {title}: {name} {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
    finally:
        for peer in reversed(started):
            peer.stop()
    med = {name: statistics.median(values) for name, values in rps.items()}
    cells = [title]
    for name in names:
        low, high = min(rps[name]), max(rps[name])
        us = statistics.median(cpu[name])
        cells.append(
            f"{med[name]:,.0f} ({low:,.0f}-{high:,.0f}; {errors[name]} errors; {us:.1f} us CPU)"
        )
    cells.append(f"{med['after'] / med['before']:.3f}")
    cells.append(f"{statistics.median(cpu['after']) / statistics.median(cpu['before']):.3f}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the source tree before the change")
    parser.add_argument("after", type=Path, help="the source tree after it")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", help="rows whose title contains this (e.g. 'mode http')")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    header = [
        "row",
        "HAProxy req/s",
        "before req/s",
        "after req/s",
        "after / before",
        "CPU after / before",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with tempfile.TemporaryDirectory(prefix="wakeproxy-ab-") as tmp:
        titles = [title for title in ROWS if not args.only or args.only in title]
        cells = [row(title, trees, Path(tmp), args.rounds, args.seconds) for title in titles]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
