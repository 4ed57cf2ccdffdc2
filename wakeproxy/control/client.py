"""``wakeproxy status|sleep|wake``: a small client of the admin API (stdlib only)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from ..config import Address, AdminConfig
from .admin import TOKEN_ENV

DEFAULT_ADMIN = os.environ.get("WAKEPROXY_ADMIN", "http://127.0.0.1:9000")
EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 3


def client_token(token_file: str | None) -> str | None:
    """The environment variable wins; else the token file; whitespace stripped."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    if token_file:
        return Path(token_file).read_text(encoding="utf-8").strip() or None
    return None


def request(admin: str, method: str, path: str, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(admin.rstrip("/") + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        # A wake answers once the backend is ready: allow for a long wake_timeout.
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


def admin_url(listen: Address) -> str:
    """Where a client on this host reaches an admin API listening on ``listen``."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def health(admin: AdminConfig) -> int:
    """``wakeproxy health``: 0 when the admin API answers /health, else 1 (the image's
    HEALTHCHECK). The address is the config's admin.listen; $WAKEPROXY_ADMIN overrides."""
    url = os.environ.get("WAKEPROXY_ADMIN") or admin_url(admin.listen)
    try:
        token = client_token(admin.token_file)
        req = urllib.request.Request(url.rstrip("/") + "/health")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=2) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"wakeproxy: unhealthy: {url}/health: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return EXIT_API_ERROR
    return 0 if ok else EXIT_API_ERROR


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _why(service: dict[str, Any]) -> str:
    reason = str(service.get("reason", ""))
    error = service.get("last_error")
    if error and service.get("state") != "failed":
        # Failed, then re-read as stopped: the reason alone would lose why.
        reason += f"; last error: {error['reason']}"
    return reason


def format_reload(result: dict[str, Any]) -> str:
    """What a reload did: each kind of change that happened, or "no changes", and the
    counts of what stayed, failed or needs a restart."""
    lines = [
        f"{key}: {', '.join(result[key])}"
        for key in ("added", "removed", "replaced", "updated")
        if result[key]
    ]
    lines += [f"failed: {name}: {why}" for name, why in result["failed"].items()]
    if result["needs_restart"]:
        lines.append(f"needs a restart: {', '.join(result['needs_restart'])}")
    changed = any(result[key] for key in ("added", "removed", "replaced", "updated"))
    summary = (
        f"{len(result['unchanged'])} unchanged, {len(result['failed'])} failed, "
        f"{len(result['needs_restart'])} needing a restart"
    )
    lines.append(("" if changed else "no changes; ") + summary)
    return "\n".join(lines)


def format_status(services: list[dict[str, Any]]) -> str:
    head = ("SERVICE", "STATE", "OPEN", "HELD", "WAKES", "LAST WAKE", "SLEEPS IN", "BACKEND", "WHY")
    rows = [
        (
            s["name"],
            s["state"],
            _cell(s["open"]),
            _cell(s["held"]),
            _cell(s["wakes"]),
            _cell(s["last_wake_ms"], " ms"),
            _cell(s["sleeps_in_s"], " s"),
            _cell(s["backend"]),
            _why(s),
        )
        for s in services
    ]
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (head, *rows)
    )


def run(command: str, admin: str, token_file: str | None, name: str | None, force: bool) -> int:
    try:
        token = client_token(token_file)
        if command == "status":
            status, body = request(admin, "GET", "/services", token)
        elif command == "reload":
            status, body = request(admin, "POST", "/reload", token)
        else:
            query = "?force=true" if force else ""
            status, body = request(admin, "POST", f"/services/{name}/{command}{query}", token)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"wakeproxy: cannot reach the admin API at {admin}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if status != 200:
        error = str(body.get("error", body))
        if body.get("forceable"):
            # The API's hint names its query parameter; here the flag is what to type.
            error = f"{body['reason']}; add --force to {command} anyway"
        print(f"wakeproxy: {status}: {error}", file=sys.stderr)
        for problem in body.get("problems", ()):
            print(problem, file=sys.stderr)
        return EXIT_API_ERROR
    if command == "status":
        print(format_status(body["services"]))
    elif command == "reload":
        print(format_reload(body))
    else:
        print(f"{body['name']}: {body['state']}")
    return 0
