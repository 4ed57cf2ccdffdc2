"""What the proxy answers itself in mode http: probes, errors, the waiting page; and
which requests are not activity (MCP session set-up)."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

import orjson

from ..config import Probe
from ..core.states import Outcome
from .heads import Head

# JSON-RPC methods that only set up, keep or tear down an MCP session.
SESSION_METHODS = frozenset({"initialize", "notifications/initialized", "ping"})

# Why the proxy refused a connection -> the status a client reads, and why.
REFUSALS: dict[Outcome, tuple[int, str]] = {
    Outcome.REJECTED_OVERFLOW: (503, "too many connections for this service; retry shortly"),
    Outcome.REJECTED_LIMIT: (503, "too many connections for this service; retry shortly"),
    Outcome.WAKE_TIMEOUT: (504, "the backend did not wake in time"),
    Outcome.BACKEND_ERROR: (502, "the backend could not be reached"),
    # The MCP spec's answer for a session the server does not know: start a new one.
    Outcome.SESSION_GONE: (404, "session not found: its replica is gone; start a new session"),
}
WAITING_PAGE = (
    '<!doctype html><meta http-equiv="refresh" content="2"><title>Starting</title>'
    "<p>The service is starting; this page reloads by itself.</p>\n"
)


@dataclass(frozen=True, slots=True)
class ProbeRule:
    """A Probe compiled for matching against heads."""

    probe: Probe
    method: bytes | None
    path: bytes
    # (header, lowercased text, whether it must be present)
    conditions: tuple[tuple[bytes, bytes, bool], ...]

    def matches(self, head: Head) -> bool:
        if head.path != self.path or (self.method is not None and head.method != self.method):
            return False
        for name, text, present in self.conditions:
            if (text in head.get(name).lower()) is not present:
                return False
        return True


def compile_probes(probes: tuple[Probe, ...]) -> tuple[ProbeRule, ...]:
    return tuple(
        ProbeRule(
            probe=probe,
            method=probe.method.encode() if probe.method is not None else None,
            path=probe.path.encode("latin-1"),
            conditions=tuple(
                (
                    name.encode("latin-1"),
                    want.lstrip("!").encode("latin-1"),
                    not want.startswith("!"),
                )
                for name, want in probe.headers.items()
            ),
        )
        for probe in probes
    )


def session_only(body: bytes) -> bool:
    """Whether a JSON-RPC body only sets up or keeps an MCP session (not activity)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    messages = message if isinstance(message, list) else [message]
    return bool(messages) and all(
        isinstance(m, dict) and m.get("method") in SESSION_METHODS for m in messages
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a configured probe status HTTP does not name
        return "Unknown"


def answer(
    status: int,
    body: str = "",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
    stream: bool = False,
    keep_alive: bool = False,
    head_only: bool = False,
) -> bytes:
    """A complete response the proxy gives itself; it closes the connection after,
    unless ``keep_alive`` (a probe answered on a connection that stays open)."""
    lines = [f"HTTP/1.1 {status} {_phrase(status)}", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if stream:
        lines.append("Cache-Control: no-store")
    else:
        lines.append(f"Content-Length: {len(body.encode())}")
    if not keep_alive:
        lines.append("Connection: close")
    # A HEAD answer says the body's length but carries none (RFC 9110 section 9.3.2).
    return ("\r\n".join(lines) + "\r\n\r\n" + ("" if stream or head_only else body)).encode()
