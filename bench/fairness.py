"""The loop's fairness: one client pipelines a flood of different request heads, another
sends one small request at a time on its own connection; the second one's latency.

``flood`` sends ``FLOOD_BYTES`` (9 MB, the size that stalled another service's request for
3.1-3.5 s in issue 26) of pipelined heads, each with its own query string, as fast as the
contender takes them, and reads (and drops) every answer; meanwhile ``probe`` times
keep-alive GETs on another connection until the flood is done. Bounded: the flood stops
at its byte count or after ``LIMIT`` seconds, whichever comes first. Loopback only.
"""

from __future__ import annotations

import contextlib
import math
import socket
import statistics
import threading
import time
from dataclasses import dataclass

FLOOD_BYTES = 9 * 1024 * 1024
LIMIT = 60.0
_BATCH = 256 * 1024
_REQUEST = b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n"


@dataclass(frozen=True)
class FloodResult:
    latencies_ms: list[float]  # the other client's requests, during the flood
    flood_seconds: float
    flood_requests: int  # heads the flood sent
    answered: int  # responses the flood read back (before its end or the limit)

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        if not values:
            return float("nan")
        return values[max(0, math.ceil(q / 100 * len(values)) - 1)]  # nearest rank

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


def _heads(total: int) -> list[bytes]:
    """Batches of pipelined heads, every one different, ``total`` bytes in all."""
    batches, batch, size, n = [], bytearray(), 0, 0
    while size < total:
        head = b"GET /?flood=%d HTTP/1.1\r\nHost: flood\r\nX-Filler: %08d\r\n\r\n" % (n, n)
        batch += head
        size += len(head)
        n += 1
        if len(batch) >= _BATCH:
            batches.append(bytes(batch))
            batch.clear()
    if batch:
        batches.append(bytes(batch))
    return batches


def _count_answers(sock: socket.socket, stop: threading.Event, seen: list[int]) -> None:
    tail = b""
    while not stop.is_set():
        try:
            data = sock.recv(1 << 20)
        except OSError:
            return
        if not data:
            return
        # An answer is counted by its status line (nginx's answers carry no others).
        data = tail + data
        seen[0] += data.count(b"HTTP/1.1 ")
        tail = data[-8:]
        seen[0] -= tail.count(b"HTTP/1.1 ")


def flood(port: int, total: int = FLOOD_BYTES, limit: float = LIMIT) -> FloodResult:
    batches = _heads(total)
    requests = sum(batch.count(b"\r\n\r\n") for batch in batches)
    stop, seen = threading.Event(), [0]
    timed: list[tuple[float, float]] = []
    with socket.create_connection(("127.0.0.1", port)) as hose:
        hose.settimeout(limit)
        reader = threading.Thread(target=_count_answers, args=(hose, stop, seen), daemon=True)
        reader.start()
        prober = threading.Thread(target=probe, args=(port, stop, timed, limit), daemon=True)
        prober.start()
        time.sleep(0.2)  # the probe's connection is up and warm before the flood
        start = time.monotonic()
        deadline = start + limit
        try:
            for batch in batches:
                hose.sendall(batch)
                if time.monotonic() > deadline:
                    break
            while seen[0] < requests and time.monotonic() < deadline:
                time.sleep(0.01)
        except OSError:
            pass  # the contender closed on the flood: what was timed still counts
        elapsed = time.monotonic() - start
        stop.set()
        prober.join(limit)
        with contextlib.suppress(OSError):  # the contender may have closed it
            hose.shutdown(socket.SHUT_RDWR)
        reader.join(5)
    during = [ms for at, ms in timed if at >= start]
    return FloodResult(during, elapsed, requests, seen[0])


def probe(port: int, stop: threading.Event, timed: list[tuple[float, float]], limit: float) -> None:
    """One keep-alive GET at a time until ``stop``: when each started, and its time to
    its whole answer (ms)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(limit)
        while not stop.is_set():
            at, start = time.monotonic(), time.perf_counter()
            sock.sendall(_REQUEST)
            data = b""
            while not data.endswith(b"hello\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            timed.append((at, (time.perf_counter() - start) * 1000))
            time.sleep(0.002)
