"""A gateway health check of a streamable-HTTP MCP server, through wakeproxy: answered by
the proxy while the server sleeps, forwarded while it is awake, and straight to the
server; rounds alternate, medians reported.

    .venv/bin/python -m bench.mcp_health --rounds 20

A health check is what mcp-context-forge sends every health interval: the MCP SDK's
client opening a session and closing it (initialize, notifications/initialized, the GET
stream, DELETE), each a fresh client. The server is the SDK's FastMCP
(tests/backends/mcp_server.py) under the process runtime, paused between the asleep
rounds. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import sys
import time
from pathlib import Path

import uvloop
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from bench.peers import free_port
from wakeproxy.app import Proxy
from wakeproxy.config import parse_yaml
from wakeproxy.core.states import SleepAction, State

SERVER = Path(__file__).parent.parent / "tests" / "backends" / "mcp_server.py"


async def check(port: int) -> float:
    """One health check's time, in seconds."""
    started = time.perf_counter()
    async with (
        streamablehttp_client(f"http://127.0.0.1:{port}/mcp") as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await asyncio.wait_for(session.initialize(), 30)
    return time.perf_counter() - started


async def measure(rounds: int) -> dict[str, list[float]]:
    port, backend = free_port(), free_port()
    command = [
        sys.executable,
        str(SERVER),
        "--port",
        str(backend),
        "--transport",
        "streamable-http",
    ]
    config = parse_yaml(
        "\n".join(
            [
                "admin:",
                f"  listen: 127.0.0.1:{free_port()}",
                "mcp: {state_file: null}",
                "services:",
                "  echo:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                "    command: [" + ", ".join(f'"{a}"' for a in command) + "]",
                "    mode: http",
                "    wake_timeout: 30",
                "    sleep_policy: {idle_timeout: 3600}",
            ]
        ),
        "bench",
    )
    proxy = Proxy(config)
    await proxy.start()
    times: dict[str, list[float]] = {"asleep (the proxy answers)": [], "awake (forwarded)": []}
    times["direct to the server"] = []
    try:
        service = proxy.services["echo"]
        await check(port)  # the first one wakes the server and teaches the proxy
        assert service.mcp is not None and service.mcp.learned.known
        for _ in range(rounds):
            await service.sleep(SleepAction.PAUSE)
            times["asleep (the proxy answers)"].append(await check(port))
            assert service.state is State.PAUSED, "a health check woke the server"
            await service.wake("bench")
            times["awake (forwarded)"].append(await check(port))
            times["direct to the server"].append(await check(backend))
    finally:
        await proxy.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        times = uvloop.run(measure(args.rounds))
        print(f"| health check ({args.rounds} rounds) | median ms | p90 ms | max ms |")
        print("|---|---|---|---|")
        for label, seconds in times.items():
            ms = sorted(s * 1000 for s in seconds)
            p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
            print(f"| {label} | {statistics.median(ms):.2f} | {p90:.2f} | {ms[-1]:.2f} |")


if __name__ == "__main__":
    main()
