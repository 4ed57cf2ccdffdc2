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


INITIALIZE = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}'
)


async def initialize(port: int) -> float:
    """One ``POST initialize`` on a fresh connection, to the end of its answer (the
    set-up request a check starts with, without the SDK's own cost)."""
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json, text/event-stream\r\nContent-Length: {len(INITIALIZE)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + INITIALIZE)
    answer = await asyncio.wait_for(reader.read(-1), 30)
    elapsed = time.perf_counter() - started
    writer.close()
    if b'"serverInfo"' not in answer:
        raise RuntimeError(f"no initialize result through 127.0.0.1:{port}: {answer[:200]!r}")
    return elapsed


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
    labels = [
        f"{what}, {where}"
        for what in ("SDK health check", "POST initialize")
        for where in ("asleep (the proxy answers)", "awake (forwarded)", "direct to the server")
    ]
    times: dict[str, list[float]] = {label: [] for label in labels}
    try:
        service = proxy.services["echo"]
        await check(port)  # the first one wakes the server and teaches the proxy
        assert service.mcp is not None and service.mcp.learned.known
        for _ in range(rounds):
            deadline = time.monotonic() + 10
            while service.attached and time.monotonic() < deadline:  # noqa: ASYNC110 - a check's close
                await asyncio.sleep(0.005)
            await service.sleep(SleepAction.PAUSE)
            times[labels[0]].append(await check(port))
            times[labels[3]].append(await initialize(port))
            assert service.state is State.PAUSED, "a health check woke the server"
            await service.wake("bench")
            times[labels[1]].append(await check(port))
            times[labels[4]].append(await initialize(port))
            times[labels[2]].append(await check(backend))
            times[labels[5]].append(await initialize(backend))
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
        print(f"| {args.rounds} rounds | median ms | p90 ms | max ms |")
        print("|---|---|---|---|")
        for label, seconds in times.items():
            ms = sorted(s * 1000 for s in seconds)
            p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
            print(f"| {label} | {statistics.median(ms):.2f} | {p90:.2f} | {ms[-1]:.2f} |")


if __name__ == "__main__":
    main()
