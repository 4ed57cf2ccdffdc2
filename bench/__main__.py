"""The benchmark harness: ``python -m bench --quick`` (CI proves it runs) or ``--full``.

Each scenario runs every contender (direct to the backend, HAProxy 2.6 with one thread,
wakeproxy) in the same run on the same backend, alternating their order round by round,
and reports medians and the ratio to HAProxy measured in that run: the machine's two
cores are shared by load generator, proxy and backend, so only ratios mean anything.
Row 11 is no contest: a replay of weeks of traffic in simulated time (bench/predict.py).
Writes a Markdown report (``--out``, default bench/RESULTS.md). All traffic: 127.0.0.1.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import tempfile
from pathlib import Path

from bench import (
    coldwake,
    hibernate,
    loadgen,
    peers,
    plots,
    predict,
    predict_results,
    replicas,
    scale,
    swarm,
    targets,
)
from bench.harness import alternate, fmt, progress
from bench.report import Report, Target
from bench.wrkrows import http_mode_rows, scenario_http


def scenario_bulk(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "3. Bulk throughput"
    progress(f"{title}: starting iperf3, HAProxy, wakeproxy")
    backend = peers.iperf3_server()
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port))
        started.append(proxy := peers.wakeproxy(workdir, backend.port))
        contenders = {"direct": backend.port, "haproxy": haproxy.port, "wakeproxy": proxy.port}

        failures: list[str] = []

        def measure(name: str, port: int) -> float | None:
            # A round iperf3 could not run (after its retries) is recorded, not fatal.
            try:
                gbps = loadgen.run_iperf3(loadgen.iperf3_command(port, args.seconds))
            except loadgen.Iperf3Error as exc:
                failures.append(f"{name}: {exc}")
                progress(f"  {name}: failed: {exc}")
                return None
            progress(f"  {name}: {gbps:.2f} Gbit/s")
            return gbps

        results = alternate(contenders, args.rounds, measure)
        med = {n: targets.median([v for v in runs if v is not None]) for n, runs in results.items()}
        rss = {"haproxy": haproxy.peak_rss_mib(), "wakeproxy": proxy.peak_rss_mib()}
        targets.bulk(report, results, failures, rss["wakeproxy"])
        rows = [
            {
                "contender": name,
                "Gbit/s": fmt(value),
                "x HAProxy": fmt(value / med["haproxy"]),
                "peak RSS MiB": fmt(rss[name], 1) if name in rss else "-",
                "failed rounds": str(results[name].count(None)),
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


def docker_row_runs(report: Report, title: str, judged: tuple[Target, ...] = ()) -> bool:
    """Whether a row needing Docker and gcc can run; if not, the report says why, in the
    row's section and on each target it would have judged."""
    missing = coldwake.available()
    if missing is not None:
        progress(f"{title}: skipped: {missing}")
        report.sections.append(f"## {title}\n\nNot run: {missing}.\n")
        for target in judged:
            report.not_run(target, missing)
    return missing is None


def scenario_cold_wake(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "5. Cold wake: N simultaneous first connections to a paused container"
    if not docker_row_runs(report, title, (targets.COLD_ONE, targets.COLD_BURST)):
        return
    sizes = [1, 10] if args.quick else [1, 10, 100, 1000]
    if 1000 not in sizes:
        report.not_run(targets.COLD_BURST, "--quick sends bursts of 1 and 10 only")
    progress(f"{title}: N = {sizes}, {args.rounds} round(s) each")
    rows, commands = coldwake.run(sizes, args.rounds, workdir)
    note = (
        "Per round: the engine's own unpause (Engine API) timed; the same burst through HAProxy "
        "to the running container; then the container paused and the burst sent through "
        "wakeproxy. Medians over rounds (p50 over all cold connections). Targets: cold p50 "
        "(N=1) <= engine unpause p50 + 3 ms; p99 (N=1000, wakeproxy at its defaults) <= "
        "HAProxy's p99 + 15 ms; one unpause per burst; nothing failed."
    )
    report.table(title, note, commands, coldwake.table(rows))
    targets.cold(report, rows)
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
    if not docker_row_runs(report, title, (targets.SCALE,)):
        return
    idle = 3.0 if args.quick else 30.0
    progress(f"{title}: creating 50 containers, then {idle:g} idle seconds")
    result, commands = scale.run(idle, workdir)
    note = (
        "Targets: start-up < 2 s, RSS < 150 MiB, idle CPU < 1% of a core, no wake failed. "
        "Start-up reads the 50 containers' states from one engine listing; the 1,000 commands "
        "are not started until a connection needs one. Then one paused container is woken and "
        "one command started, each timed to the first response byte."
    )
    report.table(title, note, commands, scale.table(result))
    targets.scale(report, result)


def scenario_hibernate(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "8. Hibernate: a 200 MiB backend's memory and wakes, pause / hibernate / stop"
    rounds = 1 if args.quick else args.rounds
    progress(f"{title}: {rounds} round(s)")
    try:
        result, how = hibernate.run(rounds, workdir / "hibernate")
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        for target in (targets.HIBERNATE_MEMORY, targets.HIBERNATE_WAKE, targets.HIBERNATE_LOAD):
            report.not_run(target, str(exc) or type(exc).__name__)
        return
    note = (
        f"Process runtime, swap: {how}; medians of {rounds} round(s). In RAM: the backend's "
        "memory cgroup usage (the kernel's count; VmRSS would hide swap cache). MemAvailable "
        "gained: the machine's, once it stopped rising after the sleep (at most 10 s; a stop, "
        "which frees everything, is the reference). Wakes: to the first response byte, a small "
        "request, and one reading the whole heap; the last row is the runtime's own SIGCONT "
        "and start of the same backend."
    )
    commands = [".venv/bin/python -m bench.hibernate --rounds 5"]
    report.table(title, note, commands, hibernate.table(result))
    if result.load is not None:
        load_note = (
            f"wrk -t1 -c10 keep-alive for 3 s on a service in front of nginx, alone and while "
            f"{hibernate.MANY} other services ({hibernate.MANY_MIB} MiB heaps) are hibernated at "
            "once half a second in; rounds alternate; medians."
        )
        report.table(f"{title}: under load", load_note, commands, hibernate.load_table(result.load))
    targets.hibernate(report, result)


def scenario_replicas(report: Report, args: argparse.Namespace) -> None:
    title = "9. Replicas"
    progress(f"{title}: 1, 2 and 4 replicas of a one-request-at-a-time backend")
    result = replicas.run(args.rounds, max(args.seconds, 1.0))
    note = (
        f"wrk -t1 -c{replicas.CLIENTS} `Connection: close` through one service whose replicas"
        " each serve one request at a time, 20 ms each (tests/backends/serial.py: at most 50"
        " req/s per replica), all awake (`min` = count); rounds alternate; medians. Then a"
        " load step (1 client, then 16; `min: 0`, `target_inflight: 4`):"
        f" {_ms_or_none(result.step_ms)} from the step to a second replica's first answer."
        " Then 3 replicas under 8 clients, the second one's process killed halfway:"
        f" {result.killed_errors} request(s) failed, {result.killed_in_flight} were in flight"
        f" on it, {result.moved} connection(s) moved to another replica after a refused"
        " connect."
    )
    commands = [".venv/bin/python -m bench.replicas --rounds 3 --seconds 4"]
    report.table(title, note, commands, replicas.table(result))
    targets.replicas(report, result)


def scenario_swarm(report: Report, args: argparse.Namespace) -> None:
    title = "10. Swarm wake from 0"
    why = swarm.available()
    if why is not None:
        report.not_run(targets.SWARM_WAKE, why)
        return
    rounds = max(args.rounds, 5) if not args.quick else 2
    progress(f"{title}: a second dockerd as a single-node swarm, {rounds} round(s)")
    result = swarm.run(rounds)
    note = (
        "A second dockerd started by the harness, `swarm init --advertise-addr 127.0.0.1`, a"
        " busybox httpd service with host networking at 0 replicas. Per round: `docker"
        " service scale NAME=1` to the first response byte (raw), back to 0, then one request"
        " through wakeproxy (`swarm_service`, `action: stop`), which scales it itself; medians."
    )
    commands = [".venv/bin/python -m bench.swarm --rounds 5"]
    report.table(title, note, commands, swarm.table(result))
    targets.swarm(report, result)


def scenario_predict(report: Report) -> None:
    title = "11. Prediction replay"
    progress(f"{title}: {predict.TRACE.name}, prediction off and on, in simulated time")
    result = predict.run()
    note = (
        f"{result.requests} requests to seven MCP servers over {result.weeks} weeks"
        " (bench/predict_trace.py: Europe/Berlin working hours, habits at fixed times,"
        " irregular sessions, chains git -> filesystem p 0.8 and search -> docs p 0.6,"
        " noise), replayed through the proxy's own decision core and prediction glue on a"
        f" simulated clock: `action: stop`, idle_timeout {result.idle_timeout:g} s, every"
        f" wake a {result.wake:g} s start; on: `predict: {{arrivals: true, chains: true,"
        f" threshold: {result.threshold:g}}}` for every service. Figures of the last week"
        f" (from {result.measured_week}); the weeks before it are the learning period."
        " Cold: held, having found the backend asleep or waking. Used/wasted: the"
        " predictor's own books, with the awake hours it counts on them."
    )
    commands = [
        ".venv/bin/python -m bench.predict_trace --weeks 3 --seed 1 --out bench/predict-trace.csv",
        ".venv/bin/python -m bench.predict",
    ]
    report.table(title, note, commands, predict_results.table(result))
    report.table(
        f"{title}: per service",
        "The same week, per service: cold requests and awake hours, prediction off -> on.",
        commands[1:],
        predict_results.service_table(result),
    )
    report.table(
        f"{title}: by cause",
        "The same week, by where each request came from in the trace (a habit at a fixed"
        " time, a session at a random time of the working day, a chained follower, noise):"
        " cold requests, prediction off -> on. Only habits and chains carry a signal.",
        commands[1:],
        predict_results.cause_table(result),
    )
    targets.predict(report, result)


def _ms_or_none(value: float | None) -> str:
    return "no second replica answered" if value is None else f"{value:.0f} ms"


def main() -> None:
    peers.exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 round of 1 s each (proves it runs)")
    size.add_argument("--full", action="store_true", help="5 rounds of 10 s each")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of wakeproxy run beside this one in the mode http rows (4-4d)",
    )
    parser.add_argument(
        "--only",
        choices=["http", "tcp"],
        help="only the mode http rows (4, 4b, 4c, 4d), or rows 1 and 2 (with the fast path)",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.full else 1 if args.quick else 3)
    args.seconds = args.seconds or (10.0 if args.full else 1.0 if args.quick else 5.0)
    peers.ensure_tools()
    report = Report(args.out, targets.ALL)
    with tempfile.TemporaryDirectory(prefix="wakeproxy-bench-") as tmp:
        workdir = Path(tmp)
        if args.only == "http":
            report.expected = [t for t in report.expected if t in targets.HTTP_ROWS]
            http_mode_rows(report, args, workdir)
            report.write(args.out, args)
            print(report.targets_section())
            return
        if args.only == "tcp":
            report.expected = [t for t in report.expected if t in targets.TCP_ROWS]
            scenario_http(report, args, workdir, "keepalive")
            scenario_http(report, args, workdir, "churn")
            report.write(args.out, args)
            print(report.targets_section())
            return
        scenario_http(report, args, workdir, "keepalive")
        scenario_http(report, args, workdir, "churn")
        scenario_bulk(report, args, workdir)
        http_mode_rows(report, args, workdir)
        scenario_cold_wake(report, args, workdir)
        scenario_start_wake(report, args, workdir)
        scenario_scale(report, args, workdir)
        scenario_hibernate(report, args, workdir)
        scenario_replicas(report, args)
        scenario_swarm(report, args)
        scenario_predict(report)
    report.write(args.out, args)
    print(report.targets_section())
    progress(f"report written to {args.out}")


if __name__ == "__main__":
    main()
