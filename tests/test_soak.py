"""Integrity soak (short, for CI): random data with SHA-256 checks through four services
(tcp and http modes, pause and stop actions) while they sleep and wake over and over.

Idle timeouts of 0.3 s and clients that pause between connections make every service
sleep and wake many times during the run. Nothing may be lost or corrupted, no
connection may fail, and descriptors must be back where they started. The longer soak
is ``python -m bench.soak`` (the same test with more rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random

import pytest

from tests.helpers import backend_command, config_from, free_port, running, wait_until

pytestmark = pytest.mark.asyncio

SERVICES = {
    # name: (mode, backend mode, action)
    "tcp-pause": ("tcp", "echo", "pause"),
    "tcp-stop": ("tcp", "echo", "stop"),
    "http-pause": ("http", "http", "pause"),
    "http-stop": ("http", "http", "stop"),
}


def soak_config(ports: dict[str, tuple[int, int]]) -> str:
    lines = ["services:"]
    for name, (mode, backend_mode, action) in SERVICES.items():
        port, backend = ports[name]
        lines += [
            f"  {name}:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            f"    command: {backend_command(backend, backend_mode)}",
            f"    mode: {mode}",
            "    wake_timeout: 20",
            f"    sleep_policy: {{idle_timeout: 0.3, action: {action}}}",
        ]
    return "\n".join(lines) + "\n"


async def tcp_round(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


async def http_round(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"POST /echo HTTP/1.1\r\nHost: soak\r\nContent-Length: {len(data)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + data)
        await writer.drain()
        reply = await reader.read()
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200 "), status
        return body
    finally:
        writer.close()


# bench/soak.py runs this test longer through the environment.
ROUNDS = int(os.environ.get("WAKEPROXY_SOAK_ROUNDS", "25"))
CLIENTS = int(os.environ.get("WAKEPROXY_SOAK_CLIENTS", "16"))


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(int(os.environ.get("WAKEPROXY_SOAK_TIMEOUT", "180")))
async def test_integrity_while_services_sleep_and_wake():
    ports = {name: (free_port(), free_port()) for name in SERVICES}
    rng = random.Random(20261126)
    checked = 0

    async def client(number: int, rounds: int) -> None:
        nonlocal checked
        for _ in range(rounds):
            name = rng.choice(list(SERVICES))
            size = rng.choice([0, 1, 1000, 70_000, 300_000])
            data = rng.randbytes(size)
            send = http_round if SERVICES[name][0] == "http" else tcp_round
            got = await asyncio.wait_for(send(ports[name][0], data), 30)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), (name, size)
            checked += 1
            # Quiet spells longer than the idle timeout: services go to sleep meanwhile.
            await asyncio.sleep(rng.choice([0.0, 0.05, 0.5]))

    async with running(config_from(soak_config(ports))) as proxy:
        await asyncio.gather(*(client(n, 3) for n in range(8)))  # warm-up: every backend up
        services = list(proxy.services.values())
        await wait_until(lambda: not any(s.connections for s in services), within=30)
        fds_before = open_descriptors()
        wakes_before = sum(s.stats.wakes["ok"] for s in proxy.services.values())
        await asyncio.gather(*(client(n, ROUNDS) for n in range(CLIENTS)))
        # The last connections closed on both sides (the proxy's own table), then the
        # descriptors come back to where they were: a leak never does (30 s to show it).
        await wait_until(lambda: not any(s.connections for s in services), within=30)
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: open_descriptors() <= fds_before + 2, within=30)
        wakes = sum(s.stats.wakes["ok"] for s in proxy.services.values()) - wakes_before
        sleeps = {name: sum(s.stats.sleeps.values()) for name, s in proxy.services.items()}
        failures = {
            name: {k: v for k, v in s.stats.connections.items() if k != "forwarded"}
            for name, s in proxy.services.items()
        }
        fds_after = open_descriptors()
    assert checked == 8 * 3 + CLIENTS * ROUNDS
    assert wakes >= 8, f"the services barely slept: {wakes} wakes"
    assert all(count >= 2 for count in sleeps.values()), sleeps
    assert all(not outcome for outcome in failures.values()), failures
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
