"""Shared fixtures: free loopback ports, an in-process proxy, a real Docker engine.

All traffic goes to 127.0.0.1. Docker tests need a real engine: in CI (CI=true) a
missing engine fails them, elsewhere it skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from wakeproxy.app import Proxy
from wakeproxy.config import Config, parse_yaml

BACKEND = str(Path(__file__).parent / "backends" / "server.py")
PYTHON = sys.executable


# Modules whose tests run on both loops, as uvloop's own tests/test_tcp.py does.
BOTH_LOOPS = {"test_forwarding"}


def pytest_asyncio_loop_factories(config, item):
    # The proxy runs on uvloop in production: test it there, and the byte path on both.
    factories = {"uvloop": uvloop.new_event_loop}
    if os.environ.get("WAKEPROXY_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS:
        factories["asyncio"] = asyncio.new_event_loop
    return factories


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def backend_command(port: int, mode: str = "http", *extra: str) -> str:
    """A flow-style YAML list running the test backend."""
    args = [PYTHON, BACKEND, "--port", str(port), "--mode", mode, *extra]
    return "[" + ", ".join(f'"{a}"' for a in args) + "]"


def config_from(text: str) -> Config:
    return parse_yaml(textwrap.dedent(text), "test.yaml")


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[Proxy]:
    proxy = Proxy(config)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def http_get(port: int, path: str = "/", *, timeout: float = 10.0) -> bytes:
    """One HTTP/1.0 request through a fresh connection; returns the whole response."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
            return await reader.read(-1)
        finally:
            writer.close()


async def wait_until(predicate, *, timeout: float, interval: float = 0.02, what: str = "") -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of a process: R/S running or sleeping, T stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
