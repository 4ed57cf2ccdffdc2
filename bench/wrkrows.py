"""The rows wrk measures (1 keep-alive, 2 churn, 4, 4b and 4c mode http) and the
fairness row (4d): each contender in the same run, the baseline checkout and the same
proxy in tcp mode beside them for the mode http rows."""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

from bench import fairness, loadgen, peers, plots, targets
from bench.harness import alternate, fmt, progress
from bench.report import Report, Row


def http_rows(results: dict[str, list[loadgen.WrkResult]]) -> list[Row]:
    med = {
        name: {
            key: statistics.median(getattr(r, key) for r in runs)
            for key in ("rps", "p50_ms", "p99_ms", "cpu_us")
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
            "CPU us/req": fmt(m["cpu_us"], 1),
            "errors": str(errors[name]),
        }
        for name, m in med.items()
    ]


_HTTP_ROWS = {
    "keepalive": "1. Keep-alive small requests",
    "churn": "2. Connection churn",
    "http": "4. HTTP mode: keep-alive small requests through mode http",
    "http-varied": "4b. HTTP mode, every request head different",
    "http-mcp": "4c. HTTP mode, an MCP client's requests",
}
BASELINE = "wakeproxy (baseline)"
TCP_MODE = "wakeproxy (tcp mode)"


def scenario_http(report: Report, args: argparse.Namespace, workdir: Path, kind: str) -> None:
    title = _HTTP_ROWS[kind]
    churn = kind == "churn"
    mode = "http" if kind.startswith("http") else "tcp"
    varied, mcp = kind == "http-varied", kind == "http-mcp"
    # Rows 1 and 2 also run the kernel's fast path, where it can load.
    no_fast = peers.fast_path_why() if kind in ("keepalive", "churn") else "tcp rows only"
    progress(f"{title}: starting nginx, HAProxy, wakeproxy")
    started: list[peers.Peer] = []
    try:
        if no_fast is None:  # nginx is that proxy's command; everyone reaches it
            fast, backend_port, backend_pid = peers.wakeproxy_fast(workdir / kind)
            started.append(fast)
        else:
            started.append(backend := peers.nginx(workdir / kind))
            backend_port, backend_pid = backend.port, backend.proc.pid
        started.append(haproxy := peers.haproxy(backend_port, mode))
        extra = "    mode: http\n" if mode == "http" else ""
        started.append(proxy := peers.wakeproxy(workdir, backend_port, extra))
        contenders = {"direct": backend_port, "haproxy": haproxy.port, "wakeproxy": proxy.port}
        pids = {"direct": backend_pid, "haproxy": haproxy.proc.pid}
        pids["wakeproxy"] = proxy.proc.pid
        if no_fast is None:
            contenders[targets.FAST], pids[targets.FAST] = fast.port, fast.proc.pid
        if churn:  # the runtime's own ceiling: what is left over it is wakeproxy's own
            started.append(floor := peers.bare(backend_port))
            contenders["bare uvloop"] = floor.port
            pids["bare uvloop"] = floor.proc.pid
        if args.baseline is not None and mode == "http":
            started.append(base := peers.wakeproxy(workdir, backend_port, extra, args.baseline))
            contenders[BASELINE], pids[BASELINE] = base.port, base.proc.pid
        if mode == "http":  # what mode http costs: the same proxy passing bytes only
            started.append(tcp := peers.wakeproxy(workdir, backend_port))
            contenders[TCP_MODE], pids[TCP_MODE] = tcp.port, tcp.proc.pid
        connections = 50

        def measure(name: str, port: int) -> loadgen.WrkResult:
            argv = loadgen.wrk_command(
                port, args.seconds, connections, churn, varied=varied, mcp=mcp
            )
            result = loadgen.run_wrk_on(argv, pids[name])
            progress(
                f"  {name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.3f} ms,"
                f" {result.cpu_us:.1f} us CPU a request"
            )
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
            + (" wrk repeats one request head." if kind == "http" else "")
            + (" varied.lua gives every request its own query string." if varied else "")
            + (
                " mcp_mix.lua: POST /mcp, a JSON-RPC tools/call of 200-2,000 bytes with its own"
                " id, one of 16 Mcp-Session-Id values, answered by nginx as an event stream"
                " (wakeproxy reads each body whole to classify it, and follows the answers)."
                if mcp
                else ""
            )
            + (
                " CPU us/req: the contender's own process (utime + stime over the run) per"
                " request wrk completed."
            )
            + (
                f" `{BASELINE}`: the checkout in {args.baseline}, in the same run."
                if BASELINE in contenders
                else ""
            )
            + (
                f" `{TCP_MODE}`: the same proxy in tcp mode (bytes passed, nothing read):"
                " what mode http costs over it."
                if TCP_MODE in contenders
                else ""
            )
            + (
                " `bare uvloop` is bench/bare.py: a Protocol-pair forwarder with nothing but"
                " the connect and the copy, on the same loop."
                if churn
                else ""
            )
            + (
                " `wakeproxy fast path` is a second wakeproxy with `fast_path: kernel` whose"
                " command is the nginx every contender reaches: it runs, so the kernel hands"
                " each new connection to nginx's own listener (the proxy accepts none). Its"
                " sk_lookup program runs on every SYN in the namespace, the other contenders'"
                " too (a SYN with no route costs at most two hash-map lookups)."
                if targets.FAST in contenders
                else ""
            )
        )
        command = shlex.join(
            loadgen.wrk_command(9999, args.seconds, connections, churn, varied=varied, mcp=mcp)
        )
        report.table(title, note, [command.replace("9999", "PORT")], http_rows(results))
        targets.http(report, kind, results, absent={targets.FAST: no_fast})
        report.plot(*latency_plot)
    finally:
        for peer in reversed(started):
            peer.stop()


def scenario_fairness(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    title = "4d. HTTP mode, fairness: another client during a pipelined flood"
    progress(f"{title}: starting nginx, HAProxy, wakeproxy")
    backend = peers.nginx(workdir / "fairness")
    started = [backend]
    try:
        started.append(haproxy := peers.haproxy(backend.port, "http"))
        extra = "    mode: http\n"
        started.append(proxy := peers.wakeproxy(workdir, backend.port, extra))
        contenders = {"haproxy": haproxy.port, "wakeproxy": proxy.port}
        if args.baseline is not None:
            started.append(base := peers.wakeproxy(workdir, backend.port, extra, args.baseline))
            contenders[BASELINE] = base.port

        def measure(name: str, port: int) -> fairness.FloodResult:
            result = fairness.flood(port)
            progress(
                f"  {name}: p99 {result.percentile(99):.1f} ms over {len(result.latencies_ms)}"
                f" requests, flood {result.flood_seconds:.1f} s"
            )
            return result

        results = alternate(contenders, args.rounds, measure)
        rows = fairness_rows(results)
        note = (
            f"One client pipelines {fairness.FLOOD_BYTES // 2**20} MiB of request heads, each"
            " with its own query string, as fast as the contender takes them, and reads every"
            " answer; another sends one keep-alive GET at a time (2 ms apart) on its own"
            " connection to the same service until the flood's last answer came (at most"
            f" {fairness.LIMIT:g} s). Its latency during the flood, medians over rounds of each"
            " round's percentile. Target: wakeproxy's p99 <= 20 ms."
        )
        commands = ["python -m bench (row 4d: bench/fairness.py, flood() against each port)"]
        report.table(title, note, commands, rows)
        targets.fairness(report, results["wakeproxy"])
    finally:
        for peer in reversed(started):
            peer.stop()


def fairness_rows(results: dict[str, list[fairness.FloodResult]]) -> list[Row]:
    def med(values: list[float]) -> str:
        return fmt(statistics.median(values), 1)

    return [
        {
            "contender": name,
            "p50 ms": med([r.p50 for r in runs]),
            "p99 ms": med([r.percentile(99) for r in runs]),
            "max ms": med([max(r.latencies_ms, default=float("nan")) for r in runs]),
            "requests timed": str(sum(len(r.latencies_ms) for r in runs)),
            "flood s": med([r.flood_seconds for r in runs]),
            "flood answered": ", ".join(f"{r.answered}/{r.flood_requests}" for r in runs),
        }
        for name, runs in results.items()
    ]


def http_mode_rows(report: Report, args: argparse.Namespace, workdir: Path) -> None:
    for kind in ("http", "http-varied", "http-mcp"):
        scenario_http(report, args, workdir, kind)
    scenario_fairness(report, args, workdir)
    if args.baseline is None:
        report.not_run(targets.HTTP_CPU, "no --baseline checkout to compare with")
