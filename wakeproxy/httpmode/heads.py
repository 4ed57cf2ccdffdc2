"""Request heads: found in the byte stream, validated by one grammar, read on demand.

The proxy's own parser, in place of h11's public ``Request`` (which built and validated
every header in Python: several times the cost per head; ``python -m bench.heads``).
One regular expression checks the whole head against RFC 9112's grammar as h11 reads it
(method and header names are tokens, the target is visible ASCII, a value is visible
bytes, spaces and tabs), stricter where a server behind the proxy could read the same
bytes differently (request smuggling):

* every line ends in CRLF: no bare LF (node's llhttp refuses it, others accept it), no
  bare CR anywhere;
* the version is HTTP/1.0 or HTTP/1.1;
* no control character in a header value (h11 lets all but NUL and whitespace through,
  llhttp refuses them);
* no folded line (obs-fold), no space before a header's colon;
* at most one Content-Length, decimal digits only, below 2**63 (a signed 64-bit parser
  behind reads it as the proxy does); Transfer-Encoding only ``chunked``, given once,
  never with Content-Length (RFC 9112 section 6.1); exactly one Host in HTTP/1.1.

A valid head's headers are not copied out: ``Head.get`` finds a header in the head's
lowercased bytes when a decision asks for it (a request reads a handful of them).
tests/reference_heads.py keeps the h11-based parser this replaced; the tests hold this
one to refusing everything it refused, and to reading the rest the same.
"""

from __future__ import annotations

import re

MAX_HEAD = 16 * 1024
# A body length a 64-bit signed parser behind the proxy reads as the proxy does.
MAX_LENGTH = 2**63 - 1
MAX_LENGTH_DIGITS = 19
# h11's own end-of-head rule: a blank line, with or without CR (a head with bare LFs is
# found, then refused, rather than waited on until header_timeout).
HEAD_END = re.compile(rb"\n\r?\n")

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# A header line: a token, a colon, then visible bytes, spaces and tabs (the value with
# its optional whitespace around it: one character class, matched as one tight loop).
_FIELD = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n"
_REQUEST_LINE = rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])\r\n"
_HEAD_RE = re.compile(_REQUEST_LINE + rb"(?:" + _FIELD + rb")*\r\n")
_REQUEST_LINE_RE = re.compile(_REQUEST_LINE)
_FIELD_RE = re.compile(_FIELD)
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Head:
    """What the proxy's decisions need from one valid request head."""

    __slots__ = (
        "_low",
        "chunked",
        "keep_alive",
        "length",
        "method",
        "path",
        "query",
        "raw",
        "session",
        "upgrade",
    )

    def __init__(self, raw: bytes, low: bytes, method: bytes, target: bytes) -> None:
        self.raw = raw  # through its blank line, as the client sent it
        self._low = low
        self.method = method
        self.path, _, self.query = target.partition(b"?")  # query: the target after "?"
        self.chunked = False
        self.length = 0
        # HTTP/1.1 without "Connection: close", or HTTP/1.0 with "Connection: keep-alive".
        self.keep_alive = True
        # Asks for another protocol: CONNECT, or an Upgrade header with the "upgrade"
        # token in Connection (RFC 9110 7.8): it applies once the server answers 101.
        self.upgrade = False
        # Mcp-Session-Id (b"": none): routing reads it at every request.
        self.session = b""

    def __repr__(self) -> str:
        return f"<Head {self.method.decode()} {self.path[:60]!r} length={self.length}>"

    def get(self, name: bytes) -> bytes:
        """The value of header ``name`` (lowercase), b"" when absent; a header given
        twice has its values joined with ", " (RFC 9110 section 5.3)."""
        low = self._low
        key = b"\r\n" + name + b":"
        at = low.find(key)
        if at < 0:
            return b""
        value, at = self._value(at + len(key))
        at = low.find(key, at)
        if at < 0:
            return value
        values = [value]
        while at >= 0:
            value, at = self._value(at + len(key))
            values.append(value)
            at = low.find(key, at)
        return b", ".join(values)

    def _value(self, start: int) -> tuple[bytes, int]:
        end = self._low.index(b"\r\n", start)
        return self.raw[start:end].strip(b" \t"), end

    def count(self, name: bytes) -> int:
        """How many lines of header ``name`` (lowercase) the head has."""
        return self._low.count(b"\r\n" + name + b":")

    @property
    def has_body(self) -> bool:
        return self.chunked or self.length > 0


def parse_head(raw: bytes) -> Head:
    """One request head, through its blank line (see the module's rules)."""
    match = _HEAD_RE.fullmatch(raw)
    if match is None:
        raise BadRequest(400, _why(raw))
    method, target, minor = match.groups()
    low = raw.lower()
    head = Head(raw, low, method, target)
    # The framing headers are read from the lowercased bytes: their values are compared
    # without case (digits, "chunked", connection options).
    found = _field(low, b"\r\ntransfer-encoding:")
    if found is not None:
        if found[1]:
            raise BadRequest(501, "multiple Transfer-Encoding headers")
        if found[0] != b"chunked":
            raise BadRequest(501, "Only Transfer-Encoding: chunked is supported")
        head.chunked = True
    found = _field(low, b"\r\ncontent-length:")
    if found is not None:
        head.length = _content_length(*found)
        if head.chunked:
            # RFC 9112 section 6.1: a request with both may be a smuggling attempt, and
            # an intermediary must not forward both; refusing it is the safe choice.
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    hosts = low.count(b"\r\nhost:")
    if hosts != 1 and (hosts or minor == b"1"):
        raise BadRequest(
            400, "Found multiple Host: headers" if hosts else "Missing mandatory Host: header"
        )
    found = _field(low, b"\r\nconnection:")
    if found is not None:
        value = head.get(b"connection").lower() if found[1] else found[0]
        options = {token.strip() for token in value.split(b",")}
        head.keep_alive = b"keep-alive" in options if minor == b"0" else b"close" not in options
        head.upgrade = b"upgrade" in options and bool(head.get(b"upgrade"))
    elif minor == b"0":
        head.keep_alive = False
    if method == b"CONNECT":
        head.upgrade = True
    if b"\r\nmcp-session-id:" in low:
        head.session = head.get(b"mcp-session-id")
    return head


def _field(low: bytes, key: bytes) -> tuple[bytes, bool] | None:
    """The (lowercased) value of the first header line ``key`` starts, and whether
    another follows; None when there is none."""
    at = low.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = low.index(b"\r\n", start)
    return low[start:end].strip(b" \t"), low.find(key, end) >= 0


def _content_length(text: bytes, again: bool) -> int:
    if again:
        raise BadRequest(400, "more than one Content-Length")
    if not text.isdigit():
        raise BadRequest(400, f"bad Content-Length {text[:40]!r}")
    if len(text) > MAX_LENGTH_DIGITS or int(text) > MAX_LENGTH:
        raise BadRequest(400, f"Content-Length {text[:40].decode()} is over 2**63 - 1")
    return int(text)


def _why(raw: bytes) -> str:
    """Why a head does not match the grammar, for the 400 a client reads (the slow path:
    only refused heads come here)."""
    if raw.count(b"\n") != raw.count(b"\r\n"):
        return "a line of the head ends in a bare LF (CRLF required)"
    if raw.count(b"\r") != raw.count(b"\r\n"):
        return "a bare CR in the head"
    lines = raw[:-4].split(b"\r\n")
    if not _REQUEST_LINE_RE.fullmatch(lines[0] + b"\r\n"):
        if lines[0].count(b" ") == 2 and lines[0].split(b" ")[2].startswith(b"HTTP/"):
            version = lines[0].rsplit(b" ", 1)[1]
            if not re.fullmatch(rb"HTTP/1\.[01]", version):
                return f"HTTP version {version[:20]!r} is not supported (1.0 and 1.1 are)"
        return f"illegal request line {lines[0][:80]!r}"
    for line in lines[1:]:
        if _FIELD_RE.fullmatch(line + b"\r\n"):
            continue
        if line[:1] in (b" ", b"\t"):
            return f"a folded header line (obs-fold) {line[:80]!r}"
        name, colon, value = line.partition(b":")
        if not colon:
            return f"a header line without ':' {line[:80]!r}"
        if not re.fullmatch(_TOKEN, name):
            return f"Illegal header name {name[:80]!r}"
        if _CONTROL_RE.search(value):
            return f"a control character in the value of {name[:80]!r}"
        return f"Illegal header line {line[:80]!r}"
    return "illegal request head"


def with_header(raw: bytes, name: bytes, value: bytes) -> bytes:
    """A request head (through its blank line) with header ``name`` set to ``value``:
    every line of that name replaced by one, or one added after the request line."""
    lines = raw.split(b"\n")
    prefix = name.lower() + b":"
    kept = [lines[0], *(line for line in lines[1:] if not line.lower().startswith(prefix))]
    crlf = b"\r" if lines[0].endswith(b"\r") else b""
    kept.insert(1, name + b": " + value + crlf)
    return b"\n".join(kept)


def without_header(raw: bytes, name: bytes) -> bytes:
    """A request head without any line of header ``name``."""
    prefix = name.lower() + b":"
    lines = raw.split(b"\n")
    return b"\n".join(
        [lines[0], *(line for line in lines[1:] if not line.lower().startswith(prefix))]
    )
