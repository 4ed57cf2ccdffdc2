"""The reference for wakeproxy.httpmode.heads: the h11-based parser the proxy used before
its own (h11's public ``Request`` validating the lines split here), as it was. The tests
hold the proxy's parser to refusing every head this refuses and to reading every head
both accept the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass

import h11

from wakeproxy.httpmode.heads import BadRequest

# A body length a 64-bit signed parser behind the proxy reads as the proxy does.
MAX_LENGTH = 2**63 - 1
MAX_LENGTH_DIGITS = 19
_LINE_END = re.compile(rb"\r?\n")


@dataclass(frozen=True, slots=True)
class Head:
    """What the proxy's decisions need from one request head."""

    method: bytes
    path: bytes
    # Lowercased names; a header given twice has its values joined with ", ".
    headers: dict[bytes, bytes]
    chunked: bool
    length: int
    # HTTP/1.1 without "Connection: close", or HTTP/1.0 with "Connection: keep-alive".
    keep_alive: bool = True
    query: bytes = b""  # the target after "?"
    # Asks for another protocol: CONNECT, or an Upgrade header with the "upgrade"
    # token in Connection (RFC 9110 7.8): it applies once the server answers 101.
    upgrade: bool = False

    def get(self, name: bytes) -> bytes:
        return self.headers.get(name, b"")

    @property
    def has_body(self) -> bool:
        return self.chunked or self.length > 0


def parse_head(raw: bytes) -> Head:
    """One request head, through its blank line. The lines are split here; h11's public
    ``Request`` validates every part (method, target, version, header names and values,
    Content-Length and Transfer-Encoding rules), as it does for its own parser. Stricter
    than h11 where a server behind may read the head differently: every line ends in
    CRLF (node's llhttp refuses a bare LF, others accept it), and Content-Length fits a
    signed 64-bit integer (as chunk sizes must)."""
    if raw.count(b"\n") != raw.count(b"\r\n"):
        raise BadRequest(400, "a line of the head ends in a bare LF (CRLF required)")
    lines = _LINE_END.split(raw)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise BadRequest(400, f"illegal request line {lines[0][:80]!r}")
    pairs = []
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest(400, f"a header line without ':' {line[:80]!r}")
        pairs.append((name, value.strip(b" \t")))
    try:
        request = h11.Request(
            method=parts[0], target=parts[1], headers=pairs, http_version=parts[2][5:]
        )
    except h11.ProtocolError as exc:
        raise BadRequest(exc.error_status_hint, str(exc)) from exc
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers:
        headers[name] = headers[name] + b", " + value if name in headers else value
    length = headers.get(b"content-length")
    if length is not None and (len(length) > MAX_LENGTH_DIGITS or int(length) > MAX_LENGTH):
        raise BadRequest(400, f"Content-Length {length[:40].decode()} is over 2**63 - 1")
    if length is not None and b"transfer-encoding" in headers:
        # RFC 9112 section 6.1: a request with both may be a smuggling attempt, and an
        # intermediary must not forward both; refusing it is the safe choice.
        raise BadRequest(400, "both Content-Length and Transfer-Encoding")
    options = {token.strip() for token in headers.get(b"connection", b"").lower().split(b",")}
    if request.http_version == b"1.0":
        keep_alive = b"keep-alive" in options
    else:
        keep_alive = b"close" not in options
    upgrade = request.method == b"CONNECT" or (
        b"upgrade" in options and bool(headers.get(b"upgrade"))
    )
    return Head(
        upgrade=upgrade,
        method=request.method,
        path=request.target.partition(b"?")[0],
        query=request.target.partition(b"?")[2],
        headers=headers,
        chunked=b"transfer-encoding" in headers,  # h11 allows only "chunked"
        length=int(length) if length else 0,
        keep_alive=keep_alive,
    )
