"""What mode http's parsing costs, per head and per followed response, on one core.

``python -m bench.heads [--count N]``: N different request heads of two kinds (wrk's GET
with a new query each time, and an MCP client's POST with its session and JSON headers),
parsed by the h11-based parser the proxy used before (tests/reference_heads.py), by the
proxy's own (wakeproxy.httpmode.heads) and, when installed, by httptools (llhttp: only
collecting the headers, the least any use of it would cost, before any check of the
proxy's own); then N small responses followed by an ``h11.Connection`` built per
response (the tracker before) and by one ``ResponseTracker`` per connection (now).
Best of 3 passes; prints a Markdown table. No sockets, no other process.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable, Iterable

import h11

from tests.reference_heads import parse_head as h11_parse_head
from wakeproxy.httpmode.heads import parse_head
from wakeproxy.httpmode.tracker import ResponseTracker


def varied_heads(count: int) -> list[bytes]:
    return [b"GET /?n=%d HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n" % i for i in range(count)]


def mcp_heads(count: int) -> list[bytes]:
    rng = random.Random(1)
    return [
        b"POST /mcp HTTP/1.1\r\nHost: localhost:8015\r\nUser-Agent: python-httpx/0.28.1\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
        b"Mcp-Session-Id: %032x\r\nMcp-Protocol-Version: 2025-06-18\r\n"
        b"Content-Length: %d\r\n\r\n" % (rng.getrandbits(128), rng.randint(200, 2000))
        for _ in range(count)
    ]


def httptools_parser() -> Callable[[bytes], object] | None:
    try:
        import httptools  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None

    class Collect:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    def parse(raw: bytes) -> object:
        sink = Collect()
        httptools.HttpRequestParser(sink).feed_data(raw)
        return sink.headers

    return parse


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"


def h11_per_response(responses: Iterable[bytes]) -> None:
    """The tracker before: a new h11.Connection for each response it follows."""
    for data in responses:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=b"GET", target="/", headers=[("Host", "x")]))
        parser.send(h11.EndOfMessage())
        parser.receive_data(data)
        while not isinstance(parser.next_event(), h11.EndOfMessage):
            pass


def one_tracker(responses: Iterable[bytes]) -> None:
    tracker = ResponseTracker()
    for data in responses:
        tracker.expect(b"GET")
        tracker.feed(data)


def parse_all(parse: Callable[[bytes], object], heads: list[bytes]) -> None:
    for raw in heads:
        parse(raw)


def best(run: Callable[[], object], passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heads", description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    count = parser.parse_args().count
    parsers: dict[str, Callable[[bytes], object]] = {
        "h11 (the parser before)": h11_parse_head,
        "wakeproxy.httpmode.heads": parse_head,
    }
    if (collect := httptools_parser()) is not None:
        parsers["httptools, headers collected only"] = collect
    print("| what | how | per second | us each |")
    print("|---|---|---|---|")
    kinds = (("wrk GET, new query", varied_heads(count)), ("MCP POST", mcp_heads(count)))
    for kind, heads in kinds:
        for name, parse in parsers.items():
            seconds = best(functools.partial(parse_all, parse, heads))
            print(f"| {kind} | {name} | {count / seconds:,.0f} | {seconds / count * 1e6:.2f} |")
    responses = [RESPONSE] * count
    for name, follow in (
        ("an h11.Connection per response (before)", h11_per_response),
        ("one ResponseTracker per connection", one_tracker),
    ):
        seconds = best(functools.partial(follow, responses))
        rate, each = count / seconds, seconds / count * 1e6
        print(f"| response followed | {name} | {rate:,.0f} | {each:.2f} |")


if __name__ == "__main__":
    main()
