"""The admin API's status page (``GET /``): the data of ``GET /services`` for people.

Rendered from the very dicts ``/services`` and ``/services/NAME/replicas`` answer with
(``api.service_status``, ``api.replicas_view``), so the page and the JSON cannot drift apart;
the one figure the JSON lacks, connections forwarded, is the counter ``/metrics`` exports as
``wakeproxy_connections_total{outcome="forwarded"}``.

Self-contained on purpose: the admin API often runs where nothing outside is reachable, so
the page has no external asset, no script and no framework; it reloads itself with a meta
refresh. Every value that comes from a user (service names, reasons, error text, what an MCP
server called itself) is HTML-escaped, and the Content-Security-Policy forbids scripts, so
even a missed escape could not run one.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.states import State

CONTENT_TYPE = "text/html; charset=utf-8"
REFRESH_S = 5
HEADERS = (
    ("Cache-Control", "no-store"),
    # Styles inline, nothing else: no script, no image, no request to anywhere.
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
_KNOWN_STATES = frozenset(s.value for s in State)
_DASH = "\u2013"
COLUMNS = (
    "service", "state", "why", "RAM", "swap", "last wake", "wakes", "forwarded",
    "open / held", "last activity", "sleeps in", "listen \u2192 backend",
)  # fmt: skip

_STYLE = """
:root { color-scheme: light dark; --line: #d0d7de; --muted: #57606a; --bg2: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --line: #30363d; --muted: #8b949e; --bg2: #161b22; }
}
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
header p { margin: 0 0 1em; color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .35em .6em; text-align: left;
  vertical-align: top; }
th { background: var(--bg2); font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { font-weight: 600; white-space: nowrap; }
tr.replica td.name { font-weight: 400; padding-left: 1.8em; }
tr.pool td { background: var(--bg2); }
tr.detail td { border-bottom-style: dashed; color: var(--muted); font-size: .92em; }
.badge { display: inline-block; padding: 0 .55em; border-radius: 1em; color: #fff;
  background: #6e7781; font-weight: 600; }
.badge.running { background: #1a7f37; }
.badge.paused, .badge.stopped { background: #0969da; }
.badge.waking, .badge.pausing, .badge.stopping { background: #9a6700; }
.badge.failed { background: #cf222e; }
.note { color: var(--muted); }
code { font-size: .95em; }
"""


def render(
    services: list[dict[str, Any]],
    pools: list[dict[str, Any]],
    forwarded: Mapping[str, int],
    *,
    version: str,
    now: float,
) -> bytes:
    """The whole document. ``services``: the entries of ``GET /services``; ``pools``:
    ``replicas_view`` of each service with replicas; ``forwarded``: connections forwarded
    per service (replicas by their own names)."""
    states = Counter(str(s.get("state")) for s in services)
    summary = ", ".join(f"{n} {_e(state)}" for state, n in sorted(states.items()))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    rows = "".join(_rows(services, {p["name"]: p for p in pools}, forwarded, now))
    if not services:
        rows = f'<tr><td colspan="{len(COLUMNS)}" class="note">no services</td></tr>'
    head = "".join(f"<th>{_e(c)}</th>" for c in COLUMNS)
    count = len(services)
    document = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wakeproxy: {count} service{"" if count == 1 else "s"}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>wakeproxy</h1>
<p id="summary">{count} service{"" if count == 1 else "s"}{": " + summary if summary else ""}
 &middot; as of <time>{stamp}</time> &middot; refreshes every {REFRESH_S} s &middot;
version {_e(version)} &middot; <a href="/services">JSON</a> &middot;
<a href="/metrics">metrics</a></p>
</header>
<table id="services">
<thead><tr>{head}</tr></thead>
<tbody>
{rows}</tbody>
</table>
<p class="note">last wake: how long the last wake took; forwarded: connections forwarded to
the backend; why: the reason of the last state change.</p>
</body>
</html>
"""
    return document.encode()


def _rows(
    services: list[dict[str, Any]],
    pools: Mapping[str, dict[str, Any]],
    forwarded: Mapping[str, int],
    now: float,
) -> Iterable[str]:
    """Every service in the order of ``/services``; a service with replicas where its
    first replica is, as one row of its own followed by its replicas."""
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for entry in services:
        if entry.get("replica_of"):
            by_pool.setdefault(entry["replica_of"], []).append(entry)
    shown: set[str] = set()
    for entry in services:
        owner = entry.get("replica_of")
        if not owner:
            yield from _service_rows(entry, forwarded, now, None)
            continue
        if owner in shown:
            continue
        shown.add(owner)
        replicas = by_pool[owner]
        pool = pools.get(owner)
        if pool is not None:
            yield _pool_row(pool, sum(forwarded.get(r["name"], 0) for r in replicas))
            yield from _detail(owner, pool.get("mcp"), None)
        details = {r["name"]: r for r in (pool or {}).get("replicas", [])}
        for replica in replicas:
            yield from _service_rows(replica, forwarded, now, details.get(replica["name"]))


def _service_rows(
    entry: dict[str, Any],
    forwarded: Mapping[str, int],
    now: float,
    replica: dict[str, Any] | None,
) -> Iterable[str]:
    name = str(entry.get("name"))
    state = str(entry.get("state"))
    memory = entry.get("memory") or {}
    why = _e(entry.get("reason"))
    if memory.get("hibernated"):
        why += ' <span class="note">(hibernated)</span>'
    if replica is not None and replica.get("circuit") not in (None, "closed"):
        why += f' <span class="note">(circuit {_e(replica["circuit"])})</span>'
    kind = "service replica" if entry.get("replica_of") else "service"
    owner = entry.get("replica_of")
    extra = f' data-replica-of="{_e(owner)}"' if owner else ""
    cells = [
        f'<td class="name">{_e(name)}</td>',
        f'<td class="state">{_badge(state)}</td>',
        f'<td class="why">{why}</td>',
        f'<td class="num ram">{_bytes(memory.get("resident_bytes"))}</td>',
        f'<td class="num swap">{_bytes(memory.get("swapped_bytes"))}</td>',
        f'<td class="num last-wake">{_ms(entry.get("last_wake_ms"))}</td>',
        f'<td class="num wakes">{_num(entry.get("wakes"))}</td>',
        f'<td class="num forwarded">{_num(forwarded.get(name))}</td>',
        f'<td class="num open">{_num(entry.get("open"))} / {_num(entry.get("held"))}</td>',
        f'<td class="last-activity">{_ago(entry.get("last_activity"), now)}</td>',
        f'<td class="sleeps-in">{_seconds(entry.get("sleeps_in_s"))}</td>',
        f'<td class="backend">{_e(entry.get("listen"))} \u2192 {_e(entry.get("backend"))}</td>',
    ]
    yield (
        f'<tr class="{kind}" data-service="{_e(name)}" data-state="{_e(state)}"{extra}>'
        + "".join(cells)
        + "</tr>\n"
    )
    sessions = replica.get("sessions") if replica is not None else None
    yield from _detail(name, entry.get("mcp"), entry.get("last_error"), sessions)


def _pool_row(pool: dict[str, Any], forwarded: int) -> str:
    name, state = str(pool.get("name")), str(pool.get("state"))
    why = (
        f"{_num(pool.get('awake'))} of {len(pool.get('replicas', []))} replicas awake "
        f"(min {_num(pool.get('min'))}, max {_num(pool.get('max'))}); "
        f"{_num(pool.get('scale_ups'))} scale-ups"
    )
    blank = "<td></td>"
    cells = [
        f'<td class="name">{_e(name)}</td>',
        f'<td class="state">{_badge(state)}</td>',
        f'<td class="why">{why}</td>',
        blank * 4,
        f'<td class="num forwarded">{_num(forwarded)}</td>',
        blank * 3,
        f'<td class="backend">{_e(pool.get("listen"))} \u2192 replicas</td>',
    ]
    return (
        f'<tr class="pool" data-pool="{_e(name)}" data-state="{_e(state)}">'
        + "".join(cells)
        + "</tr>\n"
    )


def _detail(
    name: str,
    mcp: dict[str, Any] | None,
    last_error: dict[str, Any] | None,
    sessions: int | None = None,
) -> Iterable[str]:
    """A second line under a service: its MCP figures, its last error."""
    parts = []
    if mcp and _mcp_seen(mcp):
        server = mcp.get("server") or "not yet seen"
        versions = ", ".join(str(v) for v in mcp.get("versions") or []) or _DASH
        answered = mcp.get("answered") or {}
        said = ", ".join(f"{_e(method)} {_num(n)}" for method, n in answered.items()) or "none"
        parts.append(
            f'<span class="mcp">MCP: server <b>{_e(server)}</b> (versions {_e(versions)}); '
            f"sessions {_num(mcp.get('sessions'))} ({_num(mcp.get('sessions_virtual'))} "
            f"virtual); answered while asleep: {said}; materialized "
            f"{_num(mcp.get('materialized'))}, resumed {_num(mcp.get('resumed'))}, replays "
            f"failed {_num(mcp.get('replays_failed'))}</span>"
        )
    if sessions:
        parts.append(f'<span class="sessions">{_num(sessions)} MCP sessions pinned here</span>')
    if last_error:
        at = last_error.get("at")
        when = time.strftime("%H:%M:%S UTC", time.gmtime(at)) if isinstance(at, float | int) else ""
        parts.append(
            f'<span class="last-error">last error {_e(when)}: {_e(last_error.get("reason"))}</span>'
        )
    if parts:
        yield (
            f'<tr class="detail" data-detail-of="{_e(name)}"><td></td>'
            f'<td colspan="{len(COLUMNS) - 1}">{" &middot; ".join(parts)}</td></tr>\n'
        )


def _mcp_seen(mcp: dict[str, Any]) -> bool:
    """Whether an MCP client or server was ever seen here: mode http has MCP on by
    default, and a plain web backend's line would say nothing but zeros."""
    counts = ("sessions", "materialized", "resumed", "replays_failed", "sessions_refused")
    return bool(mcp.get("server") or mcp.get("answered") or any(mcp.get(k) for k in counts))


def _e(value: object) -> str:
    """Text for HTML: ``None`` as a dash, everything escaped (quotes too: attributes)."""
    return _DASH if value is None else html.escape(str(value), quote=True)


def _badge(state: str) -> str:
    # The class only from the fixed words: a state is never user text, but say so here.
    kind = state if state in _KNOWN_STATES else "unknown"
    return f'<span class="badge {kind}">{_e(state)}</span>'


def _num(value: object) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else _DASH


def _bytes(value: object) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return _DASH
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, float | int) else _DASH


def _seconds(value: object) -> str:
    if not isinstance(value, float | int):
        return _DASH
    return _span(float(value))


def _ago(value: object, now: float) -> str:
    if not isinstance(value, float | int):
        return _DASH
    return f"{_span(max(0.0, now - value))} ago"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
