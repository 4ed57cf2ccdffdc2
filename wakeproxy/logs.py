"""Log set-up: one line per event, as text or as JSON (orjson), level selectable; and a
command's output, read line by line from its pipes and logged as the proxy's own lines.

JSON lines carry ``ts`` as ISO 8601 in UTC with milliseconds (``2026-11-26T19:31:18.608Z``),
the same instant the text format starts with; nothing reads a numeric time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, cast

import orjson

# Attributes every LogRecord has; anything else was passed in ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

# A command's stdout and stderr lines are logged under this logger, with the service
# and the stream (JSON: fields; text: a ``[service] `` prefix).
BACKEND_LOGGER = "wakeproxy.backend"
backend_log = logging.getLogger(BACKEND_LOGGER)


def _iso(seconds: float) -> str:
    whole = time.gmtime(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{int(seconds % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    @staticmethod
    def converter(seconds: float | None = None) -> time.struct_time:
        return time.gmtime(seconds)

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        if record.name == BACKEND_LOGGER and "service" in record.__dict__:
            # Whose line it is, in front, as the JSON format says it in a field.
            prefixed = f"[{record.__dict__['service']}] {record.getMessage()}"
            record = logging.makeLogRecord({**record.__dict__, "msg": prefixed, "args": None})
        return super().format(record)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("wakeproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# ---- a command's output

# A line longer than this is cut there (the rest, up to its newline, is dropped): one
# line never holds more memory than this, however long the command writes without one.
MAX_LINE = 16 * 1024
# What a stream of a command's output may cost the proxy: a line costs 1 plus 1 per KiB,
# this many a second (a burst of as many at once); past it lines are dropped, counted,
# and the count logged a second later.
OUTPUT_BUDGET = 1000.0
DROP_REPORT_AFTER = 1.0
# Past the budget the pipe is read once per FLOOD_PAUSE (what one read takes, up to
# 256 KiB, counted and dropped) instead of at every write: read at every write, a
# command like `yes` keeps the proxy's loop busy with nothing but its pipe. A command
# writing more than about 5 MB/s (256 KiB per FLOOD_PAUSE) for longer than its pipe
# (PIPE_SIZE) holds then waits on its writes: slowed, never stopped.
FLOOD_PAUSE = 0.05
PIPE_SIZE = 1024 * 1024


class OutputBudget:
    """A token bucket: what one stream of a command's output may log."""

    __slots__ = ("_at", "_tokens", "rate")

    def __init__(self, rate: float = OUTPUT_BUDGET) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def spent(self) -> bool:
        """Not even one line's worth left."""
        self._refill()
        return self._tokens < 1

    def take(self, cost: float) -> bool:
        self._refill()
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True


class OutputLines(asyncio.Protocol):
    """One stream (``stdout`` or ``stderr``) of a service's command, read from its pipe
    on the loop (never blocking it) and logged line by line under ``wakeproxy.backend``
    with ``service`` and ``stream``; bounded as ``MAX_LINE`` and the budget say.
    ``done`` resolves once the pipe ended (the command and all it spawned closed it)."""

    def __init__(self, service: str, stream: str, budget: OutputBudget | None = None) -> None:
        self.service = service
        self.stream = stream
        self.budget = budget or OutputBudget()
        self._transport: asyncio.ReadTransport | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._partial = bytearray()
        self._cutting = False  # inside a line already cut at MAX_LINE: drop to its end
        self.dropped = 0
        self._report: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's pipe transport is not an asyncio.ReadTransport subclass, but is one.
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        if self.budget.spent():
            # Flooded: this read's lines are counted, not split, decoded and logged.
            self._skip(data, 0)
            return
        at = 0
        # Line by line with find, not split: past the budget the rest is only counted.
        while (end := data.find(b"\n", at)) >= 0:
            piece, at = data[at:end], end + 1
            if self._cutting:
                self._cutting = False
                self._partial.clear()
                continue
            line = bytes(self._partial) + piece if self._partial else piece
            self._partial.clear()
            if not self._emit(line):
                self._skip(data, at)
                return
        self._keep(data[at:])

    def _skip(self, data: bytes, at: int) -> None:
        """The lines of ``data`` from ``at`` dropped and counted; what follows its last
        newline kept; the next read a moment later (the pipe holds what comes meanwhile)."""
        self._drop(data.count(b"\n", at))
        last = data.rfind(b"\n", at)
        if last >= 0:
            self._partial.clear()
            self._cutting = False
        self._keep(data[max(last + 1, at) :])
        if self._transport is not None and self._resume is None:
            self._transport.pause_reading()
            loop = asyncio.get_running_loop()
            self._resume = loop.call_later(FLOOD_PAUSE, self._read_again)

    def _read_again(self) -> None:
        self._resume = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _keep(self, tail: bytes) -> None:
        """The part of a line seen so far; at MAX_LINE it is logged, cut, and the rest
        of that line dropped as it comes."""
        if self._cutting:
            return
        self._partial += tail
        if len(self._partial) > MAX_LINE:
            self._emit(bytes(self._partial[: MAX_LINE + 1]))
            self._partial.clear()
            self._cutting = True

    def _emit(self, line: bytes) -> bool:
        """Log one line (cut at MAX_LINE) if the budget allows; False when it did not."""
        cut = len(line) > MAX_LINE
        if cut:
            line = line[:MAX_LINE]
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return True  # a blank line says nothing
        if not self.budget.take(1 + len(line) / 1024):
            self._drop(1)
            return False
        extra: dict[str, Any] = {"service": self.service, "stream": self.stream}
        if cut:
            extra["cut_at"] = MAX_LINE
            text += f" [cut at {MAX_LINE} bytes]"
        backend_log.info("%s", text, extra=extra)
        return True

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._report is None and count:
            loop = asyncio.get_running_loop()
            self._report = loop.call_later(DROP_REPORT_AFTER, self._say_dropped)

    def _say_dropped(self) -> None:
        self._report = None
        if self.dropped:
            backend_log.warning(
                "%s: %d line(s) of %s dropped (output over %g lines a second)",
                self.service,
                self.dropped,
                self.stream,
                self.budget.rate,
                extra={"service": self.service, "stream": self.stream, "dropped": self.dropped},
            )
            self.dropped = 0

    def eof_received(self) -> bool | None:
        if self._partial and not self._cutting:
            self._emit(bytes(self._partial))  # a last line without its newline
        self._partial.clear()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in (self._report, self._resume):
            if handle is not None:
                handle.cancel()
        self._resume = None
        self._say_dropped()
        if not self.done.done():
            self.done.set_result(None)
