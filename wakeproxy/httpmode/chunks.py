"""A chunked request body followed as its bytes pass (RFC 9112 section 7.1), sans-IO.

The proxy forwards the bytes unchanged; this only finds where the body ends (so the
next request's head is found) and hands the chunk data to whoever classifies the body.
Stricter than the RFC's grammar where leniency lets two parsers disagree on where a body
ends (request smuggling): every line ends in CRLF, a chunk size has at most 16 hex
digits and stays below 2**63 (a 17-digit size overflows a 64-bit parser behind us), no
whitespace follows it, and control characters in extensions or trailers are refused.
"""

from __future__ import annotations

import re

from .heads import MAX_HEAD

MAX_SIZE_DIGITS = 16
MAX_CHUNK = 2**63 - 1
MAX_LINE = 4096  # a chunk-size line with its extensions

_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,%d}" % MAX_SIZE_DIGITS)
_TRAILER_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*")
_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class BadChunk(Exception):
    """The chunked body breaks the framing rules: answer 400 and close."""


class ChunkedBody:
    """One chunked body. ``feed`` until it returns where the body ended."""

    __slots__ = ("_line", "_remaining", "_state", "_trailer_size")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = b""
        self._trailer_size = 0

    def feed(self, data: bytes, keep: bytearray | None = None, start: int = 0) -> int:
        """Follow the body through ``data`` from ``start``; chunk data is appended to
        ``keep``. Returns the offset just past the body's end, or -1 when it goes on."""
        i, n = start, len(data)
        while i < n:
            if self._state == _DATA:
                take = min(self._remaining, n - i)
                if keep is not None:
                    keep += data[i : i + take]
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self._line += data[i:]
                self._check_length(self._line)
                return -1
            line = self._line + data[i : end + 1]
            self._line = b""
            i = end + 1
            self._check_length(line)
            if self._line_done(line):
                return i
        return -1

    def _check_length(self, line: bytes) -> None:
        limit = MAX_HEAD if self._state == _TRAILER else MAX_LINE
        if len(line) > limit:
            raise BadChunk(f"a chunk line over {limit} bytes")

    def _line_done(self, line: bytes) -> bool:
        """Act on one complete line; True when it ended the body."""
        if not line.endswith(b"\r\n"):
            raise BadChunk("a chunk line not ended by CRLF")
        content = line[:-2]
        state = self._state
        if state == _SIZE:
            self._size_line(content)
        elif state == _DATA_END:
            if content:
                raise BadChunk("chunk data longer than its size")
            self._state = _SIZE
        elif not content:
            return True  # the blank line after the trailers
        else:
            self._trailer_size += len(line)
            if self._trailer_size > MAX_HEAD or not _TRAILER_RE.fullmatch(content):
                raise BadChunk(f"illegal trailer line {content[:80]!r}")
        return False

    def _size_line(self, content: bytes) -> None:
        size_text, _, extensions = content.partition(b";")
        # No whitespace after the size, before ";" either: node's llhttp refuses it (RFC
        # 9112's BWS there is what some parsers read as the end of the size, others not).
        if not _SIZE_RE.fullmatch(size_text):
            raise BadChunk(
                f"illegal chunk size {size_text[:40]!r} (1 to {MAX_SIZE_DIGITS} hex digits)"
            )
        size = int(size_text, 16)
        if size > MAX_CHUNK:
            raise BadChunk(f"chunk size {size_text.decode()} is over 2**63 - 1")
        if _CTL_RE.search(extensions):
            raise BadChunk("a control character in a chunk extension")
        if size == 0:
            self._state = _TRAILER
        else:
            self._state, self._remaining = _DATA, size
