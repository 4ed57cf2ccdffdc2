"""The benchmark harness: ``python -m bench --quick`` (CI proves it runs) or ``--full``.

Each scenario runs every contender (direct to the backend, HAProxy 2.6 with one thread,
wakeproxy) in the same run on the same backend, alternating their order round by round,
and reports medians and the ratio to HAProxy measured in that run: the machine's two
cores are shared by load generator, proxy and backend, so only ratios mean anything.
Writes a Markdown report (``--out``, default bench/RESULTS.md). All traffic: 127.0.0.1.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import wakeproxy
from bench import coldwake, loadgen, peers, plots, scale

Row = dict[str, str]
T = TypeVar("T")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0]


class Report:
    def __init__(self, out: Path) -> None:
        self.sections: list[str] = []
        self.plots = out.parent / "plots"
        # (figure, target, measured, met) for the project's targets, in row order.
        self.targets: list[tuple[str, str, str, bool]] = []

    def target(self, figure: str, target: str, measured: str, met: bool) -> None:
        self.targets.append((figure, target, measured, met))

    def _targets_section(self) -> str:
        if not self.targets:
            return ""
        lines = ["## Targets", "", "| figure | target | measured | met |", "|---|---|---|---|"]
        for figure, target, measured, met in self.targets:
            lines.append(f"| {figure} | {target} | {measured} | {'yes' if met else '**no**'} |")
        if not all(met for *_, met in self.targets):
            lines += [
                "",
                "What holds the rows marked **no** back, profiled: [PROFILES.md](PROFILES.md).",
            ]
        return "\n".join(lines) + "\n"

    def plot(self, name: str, title: str, draw: Callable[[Path], None]) -> None:
        """Draw a PNG next to the report and link it from the last section."""
        if not plots.available():
            self.sections.append(
                "(No plot: matplotlib is not installed; `pip install -e .[bench]`.)\n"
            )
            return
        self.plots.mkdir(parents=True, exist_ok=True)
        draw(self.plots / name)
        self.sections.append(f"![{title}](plots/{name})\n")

    def table(self, title: str, note: str, commands: list[str], rows: list[Row]) -> None:
        head = list(rows[0])
        lines = [f"## {title}", "", note, ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
        lines += ["", "Commands:", "", "```", *commands, "```", ""]
        self.sections.append("\n".join(lines))
        print("\n".join(lines))

    def write(self, path: Path, args: argparse.Namespace) -> None:
        header = [
            "# wakeproxy benchmark results",
            "",
            f"Produced by `{shlex.join(['python', '-m', 'bench', *sys.argv[1:]])}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"- machine: {platform.machine()}, {subprocess.getoutput('nproc')} cores, "
            f"{platform.platform()}",
            f"- Python {platform.python_version()}, wakeproxy {wakeproxy.__version__}",
            f"- {version(['haproxy', '-v'])}",
            f"- {version(['nginx', '-v'])}; {version(['wrk', '--version'])}; "
            f"{version(['iperf3', '--version'])}",
            f"- rounds per contender: {args.rounds}, {args.seconds:g} s each; contenders "
            "alternate order each round; figures are medians; ratios are to HAProxy "
            "in the same run.",
            "",
        ]
        body = "\n".join([self._targets_section(), *self.sections])
        path.write_text("\n".join(header) + "\n" + body)


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


def http_targets(report: Report, kind: str, results: dict[str, list[loadgen.WrkResult]]) -> None:
    def med(name: str, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in results[name]))

    ratio = med("wakeproxy", "rps") / med("haproxy", "rps")
    p99 = med("wakeproxy", "p99_ms") / med("haproxy", "p99_ms")
    if kind == "keepalive":
        report.target(
            "1. keep-alive req/s, tcp mode", ">= 0.95 x HAProxy", f"{ratio:.2f} x", ratio >= 0.95
        )
        report.target("1. keep-alive p99 latency", "<= 1.3 x HAProxy", f"{p99:.2f} x", p99 <= 1.3)
    elif kind == "churn":
        report.target("2. churn req/s", ">= 0.8 x HAProxy", f"{ratio:.2f} x", ratio >= 0.8)
    elif kind == "http":
        report.target("4. HTTP mode req/s", ">= 0.6 x HAProxy http", f"{ratio:.2f} x", ratio >= 0.6)
    else:
        report.target(
            "4b. HTTP mode req/s, every head different", ">= 0.6 x HAProxy http", f"{ratio:.2f} x",
            ratio >= 0.6,
        )  # fmt: skip


def http_rows(results: dict[str, list[loadgen.WrkResult]]) -> list[Row]:
    med = {
        name: {
            key: statistics.median(getattr(r, key) for r in runs)
            for key in ("rps", "p50_ms", "p99_ms")
        }
        for name, runs in results.items()
    }
    errors = {name: sum(r.errors for r in runs) for name, runs in results.items()}
    ref = med["haproxy"]
    return [
        {
            "contender": name,
            "req/s": fmt(m["rps"], 0),
            "x HAProxy": fmt(m["rps"] / ref["rps"]),
            "p50 ms": fmt(m["p50_ms"], 3),
            "p99 ms": fmt(m["p99_ms"], 3),
            "p99 x HAProxy": fmt(m["p99_ms"] / ref["p99_ms"]),
            "errors": str(errors[name]),
        }
        for name, m in med.items()
    ]


_HTTP_ROWS = {
    "keepalive": "1. Keep-alive small requests",
    "churn": "2. Connection churn",
    "http": "4. HTTP mode: keep-alive small requests through mode http",
    "http-varied": "4b. HTTP mode, every request head different",
}


def scenario_http(report: Report, args: argparse.Namespace, workdir: Path, kind: str) -> None:
    title = _HTTP_ROWS[kind]
    churn = kind == "churn"
    mode = "http" if kind.startswith("http") else "tcp"
    varied = kind == "http-varied"
    progress(f"{title}: starting nginx, HAProxy, wakeproxy")
    backend = peers.nginx(workdir / kind)
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port, mode))
        extra = "    mode: http\n" if mode == "http" else ""
        started.append(proxy := peers.wakeproxy(workdir, backend.port, extra))
        contenders = {"direct": backend.port, "haproxy": haproxy.port, "wakeproxy": proxy.port}
        connections = 50

        def measure(name: str, port: int) -> loadgen.WrkResult:
            argv = loadgen.wrk_command(port, args.seconds, connections, churn, varied=varied)
            result = loadgen.run_wrk(argv)
            progress(f"  {name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.3f} ms")
            return result

        results = alternate(contenders, args.rounds, measure)
        latency_plot = (
            f"latency-{kind}.png",
            title,
            lambda path: plots.latency(path, title, results),
        )
        note = (
            f"wrk, 1 thread, {connections} connections, "
            + ("`Connection: close` (a new connection per request)" if churn else "keep-alive")
            + ", to nginx returning a 6-byte body."
            + (
                " HAProxy in `mode http` (haproxy-http.cfg), wakeproxy in `mode: http`."
                if mode == "http"
                else ""
            )
            + (
                " wrk repeats one request head; wakeproxy does not parse a head again when it"
                " is byte for byte the connection's previous one (row 4b measures without it)."
                if kind == "http"
                else ""
            )
            + (
                " varied.lua gives every request its own query string, so every head is parsed."
                if varied
                else ""
            )
        )
        command = shlex.join(
            loadgen.wrk_command(9999, args.seconds, connections, churn, varied=varied)
        )
        report.table(title, note, [command.replace("9999", "PORT")], http_rows(results))
        http_targets(report, kind, results)
        report.plot(*latency_plot)
    finally:
        for peer in reversed(started):
            peer.stop()


def scenario_bulk(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "3. Bulk throughput"
    progress(f"{title}: starting iperf3, HAProxy, wakeproxy")
    backend = peers.iperf3_server()
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port))
        started.append(proxy := peers.wakeproxy(workdir, backend.port))
        contenders = {"direct": backend.port, "haproxy": haproxy.port, "wakeproxy": proxy.port}

        def measure(name: str, port: int) -> float:
            gbps = loadgen.run_iperf3(loadgen.iperf3_command(port, args.seconds))
            progress(f"  {name}: {gbps:.2f} Gbit/s")
            return gbps

        results = alternate(contenders, args.rounds, measure)
        med = {name: statistics.median(v) for name, v in results.items()}
        rss = {"haproxy": haproxy.peak_rss_mib(), "wakeproxy": proxy.peak_rss_mib()}
        ratio = med["wakeproxy"] / med["haproxy"]
        report.target(
            "3. bulk throughput, proxy RSS",
            ">= 1.2 x HAProxy, RSS < 100 MiB",
            f"{ratio:.2f} x, {rss['wakeproxy']:.0f} MiB",
            ratio >= 1.2 and rss["wakeproxy"] < 100,
        )
        rows = [
            {
                "contender": name,
                "Gbit/s": fmt(value),
                "x HAProxy": fmt(value / med["haproxy"]),
                "peak RSS MiB": fmt(rss[name], 1) if name in rss else "-",
            }
            for name, value in med.items()
        ]
        report.table(
            title,
            "iperf3, one stream, client to server, through each contender (no splice).",
            [shlex.join(loadgen.iperf3_command(9999, args.seconds)).replace("9999", "PORT")],
            rows,
        )
    finally:
        for peer in reversed(started):
            peer.stop()


def cold_targets(report: Report, rows: list[coldwake.Row]) -> None:
    by_n = {row.n: row for row in rows}
    one = by_n[1]
    extra = (statistics.median(one.cold) - statistics.median(one.unpause)) * 1000
    report.target(
        "5. cold wake p50, one client", "<= engine unpause p50 + 3 ms", f"{extra:+.2f} ms",
        extra <= 3.0,
    )  # fmt: skip
    burst = by_n.get(1000)
    if burst is None:
        report.target("5. cold wake p99, 1000 at once", "<= HAProxy p99 + 15 ms", "not run", False)
        return
    extra = (statistics.median(burst.cold_p99) - statistics.median(burst.warm_p99)) * 1000
    clean = all(c == 1 for c in burst.unpause_calls) and burst.failed == 0
    calls = "/".join(map(str, burst.unpause_calls))
    report.target(
        "5. cold wake p99, 1000 at once",
        "<= HAProxy warm p99 + 15 ms; 1 unpause; 0 failed",
        f"{extra:+.1f} ms; unpause calls {calls}; {burst.failed} failed",
        extra <= 15.0 and clean,
    )


def docker_row_runs(report: Report, title: str) -> bool:
    """Whether a row needing Docker and gcc can run; if not, the report says why."""
    missing = coldwake.available()
    if missing is not None:
        progress(f"{title}: skipped: {missing}")
        report.sections.append(f"## {title}\n\nNot run: {missing}.\n")
    return missing is None


def scenario_cold_wake(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "5. Cold wake: N simultaneous first connections to a paused container"
    if not docker_row_runs(report, title):
        return
    sizes = [1, 10] if args.quick else [1, 10, 100, 1000]
    progress(f"{title}: N = {sizes}, {args.rounds} round(s) each")
    rows, commands = coldwake.run(sizes, args.rounds, workdir)
    note = (
        "Per round: the engine's own unpause (Engine API) timed; the same burst through HAProxy "
        "to the running container; then the container paused and the burst sent through "
        "wakeproxy. Medians over rounds (p50 over all cold connections). Targets: cold p50 "
        "(N=1) <= engine unpause p50 + 3 ms; p99 (N=1000) <= HAProxy's p99 + 15 ms; one unpause "
        "per burst; nothing failed."
    )
    report.table(title, note, commands, coldwake.table(rows))
    cold_targets(report, rows)
    report.plot("cold-wake.png", "Cold wake vs N", lambda path: plots.cold_wake(path, rows))


def scenario_start_wake(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "6. Stop/start wake: first connections to a stopped container"
    if not docker_row_runs(report, title):
        return
    sizes = [1] if args.quick else [1, 10, 100]
    progress(f"{title}: N = {sizes}, {args.rounds} round(s) each")
    rows, commands = coldwake.run_start(sizes, args.rounds, workdir)
    note = (
        "For comparison with row 5: `action: stop` frees the container's memory but a wake is a "
        "start plus a readiness probe. Per round: the engine's own start timed to the server's "
        "first response byte; then the container stopped and the burst sent through wakeproxy."
    )
    report.table(title, note, commands, coldwake.start_table(rows))


def scenario_scale(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "7. Scale: 1,000 commands and 50 paused containers in one proxy"
    if not docker_row_runs(report, title):
        return
    idle = 3.0 if args.quick else 30.0
    progress(f"{title}: creating 50 containers, then {idle:g} idle seconds")
    result, commands = scale.run(idle, workdir)
    note = (
        "Targets: start-up < 2 s, RSS < 150 MiB, idle CPU < 1% of a core. Start-up reads the 50 "
        "containers' states from one engine listing; the 1,000 commands are not started until a "
        "connection needs one. Then one paused container is woken and one command started, each "
        "timed to the first response byte."
    )
    report.table(title, note, commands, scale.table(result))
    report.target(
        "7. 1,000 services",
        "start < 2 s, RSS < 150 MiB, idle CPU < 1% of a core",
        f"{result.startup_s:.2f} s, {result.rss_mib:.0f} MiB, {result.idle_cpu_percent:.2f}%",
        result.startup_s < 2 and result.rss_mib < 150 and result.idle_cpu_percent < 1,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 round of 1 s each (proves it runs)")
    size.add_argument("--full", action="store_true", help="5 rounds of 10 s each")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.full else 1 if args.quick else 3)
    args.seconds = args.seconds or (10.0 if args.full else 1.0 if args.quick else 5.0)
    peers.ensure_tools()
    report = Report(args.out)
    with tempfile.TemporaryDirectory(prefix="wakeproxy-bench-") as tmp:
        workdir = Path(tmp)
        scenario_http(report, args, workdir, "keepalive")
        scenario_http(report, args, workdir, "churn")
        scenario_bulk(report, args, workdir)
        scenario_http(report, args, workdir, "http")
        scenario_http(report, args, workdir, "http-varied")
        scenario_cold_wake(report, args, workdir)
        scenario_start_wake(report, args, workdir)
        scenario_scale(report, args, workdir)
    report.write(args.out, args)
    progress(f"report written to {args.out}")


if __name__ == "__main__":
    main()
