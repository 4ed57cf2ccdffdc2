"""MCP over streamable HTTP, as the proxy sees it: which requests only set a session up,
what a server answered to the set-up (learned, to answer it while the server sleeps),
and the answers built from that. Pure: bytes and dicts in, bytes and decisions out.

Two protocol generations travel as ``POST`` to one endpoint (``/mcp``):

* **Handshake era** (2025-03-26, 2025-06-18, 2025-11-25): ``initialize`` (its result
  names the server and its capabilities; a stateful server mints ``Mcp-Session-Id`` in
  the answer's header), ``notifications/initialized`` (``202``), then requests carrying
  that header. ``GET`` opens the server-to-client stream, ``DELETE`` ends the session.
* **2026-07-28** (stateless): every request is one self-contained ``POST`` with
  ``Mcp-Method`` (and ``Mcp-Protocol-Version``); ``server/discover`` is the only set-up.

A gateway's health check is made of set-up only, byte-identical to a real session's
start: what is set-up is decided per request, and only the first real request of a
session (``tools/*``, ``resources/*``, anything not set-up, a batch) needs the server.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple

import orjson

# A JSON-RPC body read whole to classify it (and, for set-up, to answer it).
MAX_MESSAGE = 64 * 1024
# What is learned per service, bounded: a few protocol versions, results of sane size.
MAX_VERSIONS = 16
MAX_RESULT = 64 * 1024
MAX_AUTH = 16


class Kind(enum.Enum):
    INITIALIZE = "initialize"
    INITIALIZED = "notifications/initialized"
    PING = "ping"
    DISCOVER = "server/discover"
    # 2026-07-28's stream of server events: forwarded, never activity (like an SSE stream).
    LISTEN = "subscriptions/listen"
    WORK = "work"  # anything else: a tool call, a list, a batch, a response, not JSON-RPC


SETUP = frozenset({Kind.INITIALIZE, Kind.INITIALIZED, Kind.PING, Kind.DISCOVER})
_SETUP_METHODS = frozenset(kind.value for kind in SETUP)
_BY_METHOD = {kind.value: kind for kind in Kind if kind is not Kind.WORK}


class Message(NamedTuple):
    """One POST body, as far as the proxy's decisions go (a value: a tuple builds in a
    third of a frozen dataclass's time, and one is built for every MCP request)."""

    kind: Kind
    # The JSON-RPC id as the client wrote it (JSON text), b"" for a notification.
    id: bytes = b""
    # initialize: the protocol version asked for (params.protocolVersion).
    version: str = ""
    # A JSON-RPC request (it has an id) that is not set-up: its result may come later
    # (HTTP+SSE answers such a POST 202 and sends the result on the stream).
    expects_result: bool = False
    # A batch of set-up messages only: forwarded (a batch is never answered here), yet
    # no activity.
    setup_batch: bool = False

    @property
    def activity(self) -> bool:
        """Whether it moves the idle clock: real work only."""
        return self.kind is Kind.WORK and not self.setup_batch


WORK = Message(Kind.WORK)
# Real work the proxy cannot read (not JSON-RPC, a batch, too large): a 202 to it may
# mean a result still due, as with HTTP+SSE.
UNKNOWN = Message(Kind.WORK, expects_result=True)


def classify(body: bytes | None, method_header: bytes = b"") -> Message:
    """The message a POST carries. ``body`` None: not read (too large, or still
    streaming): the ``Mcp-Method`` header decides, and nothing large is set-up."""
    if body is None:
        kind = _BY_METHOD.get(method_header.decode("latin-1"))
        if kind is Kind.LISTEN:
            return Message(Kind.LISTEN)
        return UNKNOWN
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return UNKNOWN
    if isinstance(message, list):
        # A batch goes to the server, whatever it holds (never answered here).
        setup = bool(message) and all(
            isinstance(m, dict) and m.get("method") in _SETUP_METHODS for m in message
        )
        return Message(Kind.WORK, expects_result=True, setup_batch=setup)
    if not isinstance(message, dict):
        return UNKNOWN
    method = message.get("method")
    if method is None and ("result" in message or "error" in message):
        return WORK  # a response to the server's request: nothing comes back for it
    has_id = "id" in message
    raw_id = orjson.dumps(message["id"]) if has_id else b""
    kind = _BY_METHOD.get(method) if isinstance(method, str) else None
    if kind is None or (method_header and method_header.decode("latin-1") != method):
        # Not set-up; or a header that disagrees with its body (the server refuses such a
        # request): forwarded as it is.
        return Message(Kind.WORK, raw_id, expects_result=has_id and isinstance(method, str))
    if (kind is Kind.INITIALIZED) == has_id:
        return Message(Kind.WORK, raw_id, expects_result=has_id)  # not what it names
    version = ""
    if kind is Kind.INITIALIZE:
        params = message.get("params")
        asked = params.get("protocolVersion") if isinstance(params, dict) else None
        if not isinstance(asked, str) or not asked or len(asked) > 64:
            return Message(Kind.WORK, raw_id, expects_result=True)
        version = asked
    return Message(kind, raw_id, version)


# Where a client may carry credentials to an MCP server (beside the query string).
CREDENTIAL_HEADERS = (b"authorization", b"cookie", b"x-api-key")


def credentials(get: Callable[[bytes], bytes], query: bytes) -> bytes:
    """A request's credentials as one value (b"": none): its Authorization, Cookie and
    X-API-Key headers and its query string. ``get``: the head's header lookup."""
    parts = [get(name) for name in CREDENTIAL_HEADERS] + [query]
    return b"\0".join(parts) if any(parts) else b""


def auth_key(credentials: bytes) -> str:
    """What is kept of a request's credentials: a digest, never the token."""
    return hashlib.sha256(credentials).hexdigest()


@dataclass(slots=True)
class Answer:
    """A set-up answer the server gave, to give again: a JSON-RPC response whose id is
    the asking request's (``echo_id``: the server echoed it; else its body is kept as is,
    as a legacy server's error to ``server/discover`` names a fixed id)."""

    status: int
    content_type: str
    # The JSON-RPC response, parsed: {"jsonrpc", "id", "result" | "error"}.
    message: dict[str, Any]
    echo_id: bool = True
    # initialize: the server minted Mcp-Session-Id (stateful); False: a stateless one.
    stateful: bool = False

    def body(self, request_id: bytes) -> bytes:
        data = orjson.dumps(self.message)
        if not self.echo_id:
            return data
        # {"jsonrpc":"2.0","id":...,...}: the id as the client wrote it.
        message = dict(self.message)
        message["id"] = orjson.Fragment(request_id)
        return orjson.dumps(message)

    def to_state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "content_type": self.content_type,
            "message": self.message,
            "echo_id": self.echo_id,
            "stateful": self.stateful,
        }

    @classmethod
    def from_state(cls, data: object, where: str) -> Answer:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping")
        status, content_type, message = (
            data.get("status"),
            data.get("content_type"),
            data.get("message"),
        )
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 500:
            raise ValueError(f"{where}.status: {status!r}")
        if not isinstance(content_type, str) or len(content_type) > 200:
            raise ValueError(f"{where}.content_type: {content_type!r}")
        if not _response_like(message):
            raise ValueError(f"{where}.message: not a JSON-RPC response")
        assert isinstance(message, dict)
        return cls(
            status,
            content_type,
            message,
            echo_id=data.get("echo_id") is not False,
            stateful=data.get("stateful") is True,
        )


def _response_like(message: object) -> bool:
    return (
        isinstance(message, dict)
        and ("result" in message or "error" in message)
        and len(orjson.dumps(message)) <= MAX_RESULT
    )


def response_in(content_type: bytes, body: bytes, request_id: bytes) -> dict[str, Any] | None:
    """The JSON-RPC response to ``request_id`` in a response body: JSON, or an event
    stream whose ``data:`` lines carry it (the SDK's servers answer a POST either way)."""
    if b"text/event-stream" in content_type:
        candidates = [orjson_or_none(data) for data in _sse_data(body)]
    else:
        candidates = [orjson_or_none(body)]
    for message in candidates:
        if not _response_like(message):
            continue
        assert isinstance(message, dict)
        # A legacy server's error to server/discover names no id of the request.
        mismatched = request_id and orjson.dumps(message.get("id")) != request_id
        if mismatched and "error" not in message:
            continue
        return message
    return None


def orjson_or_none(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _sse_data(body: bytes) -> list[bytes]:
    """The data of each event in an event stream (``data:`` lines joined by LF)."""
    events: list[bytes] = []
    lines: list[bytes] = []
    for line in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line:
            if lines:
                events.append(b"\n".join(lines))
                lines = []
        elif line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if lines:
        events.append(b"\n".join(lines))
    return events


@dataclass(slots=True)
class Learned:
    """What one service answered to set-up, from the real handshakes that passed through.

    ``initialize`` is kept per protocol version asked (a server answers each with the
    version it speaks), ``discover`` per ``Mcp-Protocol-Version`` header (a handshake-era
    server's error included: a 2026 client then falls back to ``initialize``, which is
    answered too). A server that answered a request with no ``Authorization`` header is
    open; one that needed credentials is answered for the ones it accepted only.
    """

    endpoint: str = ""
    initialize: dict[str, Answer] = field(default_factory=dict)
    discover: dict[str, Answer] = field(default_factory=dict)
    open: bool = False
    auth: list[str] = field(default_factory=list)  # digests, most recent last

    @property
    def known(self) -> bool:
        return bool(self.initialize or self.discover)

    def server_name(self) -> str:
        for answer in (*self.initialize.values(), *self.discover.values()):
            result = answer.message.get("result")
            if not isinstance(result, dict):
                continue
            info = result.get("serverInfo")
            if not isinstance(info, dict):
                meta = result.get("_meta")
                info = (
                    meta.get("io.modelcontextprotocol/serverInfo")
                    if isinstance(meta, dict)
                    else None
                )
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                return str(info["name"])
        return ""

    def admits(self, path: str, credentials: bytes) -> bool:
        """Whether a set-up request may be answered from what was learned: to the
        endpoint it was learned on, with credentials the server accepted, or none where
        it needed none."""
        if path != self.endpoint:
            return False
        if self.open and not credentials:
            return True
        return bool(credentials) and auth_key(credentials) in self.auth

    def learn(
        self,
        kind: Kind,
        key: str,
        path: str,
        credentials: bytes,
        answer: Answer,
    ) -> bool:
        """Keep a server's answer; True when it changed what is known. Only a result
        (not an error) says the credentials it came with, or none, are enough."""
        table = self.initialize if kind is Kind.INITIALIZE else self.discover
        if key not in table and len(table) >= MAX_VERSIONS:
            return False
        changed = path != self.endpoint or table.get(key) != answer
        if path != self.endpoint:
            # Another endpoint: nothing learned of the old one applies, credentials too.
            self.initialize.clear()
            self.discover.clear()
            self.auth.clear()
            self.open = False
            self.endpoint = path
        table[key] = answer
        if "result" not in answer.message:
            return changed
        if credentials:
            digest = auth_key(credentials)
            if digest not in self.auth:
                self.auth.append(digest)
                del self.auth[:-MAX_AUTH]
                changed = True
        elif not self.open:
            self.open = changed = True
        return changed

    def refused(self, path: str, credentials: bytes) -> bool:
        """The server refused a request (401, 403) on the endpoint: the credentials it
        came with (or none) are not enough any more. True when that changed anything."""
        if path != self.endpoint:
            return False
        if not credentials:
            changed, self.open = self.open, False
            return changed
        digest = auth_key(credentials)
        if digest in self.auth:
            self.auth.remove(digest)
            return True
        return False

    def versions(self) -> list[str]:
        return sorted(self.initialize)

    def to_state(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "initialize": {k: v.to_state() for k, v in self.initialize.items()},
            "discover": {k: v.to_state() for k, v in self.discover.items()},
            "open": self.open,
            "auth": list(self.auth),
        }

    @classmethod
    def from_state(cls, data: object, where: str) -> Learned:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping")
        endpoint = data.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("/") or len(endpoint) > 2048:
            raise ValueError(f"{where}.endpoint: {endpoint!r}")
        tables: list[dict[str, Answer]] = []
        for name in ("initialize", "discover"):
            raw = data.get(name, {})
            if not isinstance(raw, dict) or len(raw) > MAX_VERSIONS:
                raise ValueError(f"{where}.{name}: expected at most {MAX_VERSIONS} entries")
            tables.append(
                {
                    str(key)[:64]: Answer.from_state(value, f"{where}.{name}.{key}")
                    for key, value in raw.items()
                }
            )
        auth = data.get("auth", [])
        if not isinstance(auth, list) or not all(isinstance(a, str) and len(a) == 64 for a in auth):
            raise ValueError(f"{where}.auth: expected digests")
        return cls(endpoint, tables[0], tables[1], data.get("open") is True, auth[-MAX_AUTH:])


# ---- answers the proxy gives while the server sleeps


def _http(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a learned status HTTP does not name
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{k}: {v}" for k, v in headers)]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def answer_bytes(
    status: int, body: bytes, *, content_type: str = "application/json", session: bytes = b"",
    extra: tuple[tuple[str, str], ...] = (), close: bool = False,
) -> bytes:  # fmt: skip
    headers = [("Content-Type", content_type)] if body or status != 202 else []
    if session:
        headers.append(("Mcp-Session-Id", session.decode("latin-1")))
    headers.extend(extra)
    if close:
        headers.append(("Connection", "close"))
    return _http(status, headers, body)


def pong(request_id: bytes) -> bytes:
    return b'{"jsonrpc":"2.0","id":' + request_id + b',"result":{}}'


def error_body(code: int, message: str, request_id: bytes = b"null") -> bytes:
    return orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": orjson.Fragment(request_id or b"null"),
            "error": {"code": code, "message": message},
        }
    )
