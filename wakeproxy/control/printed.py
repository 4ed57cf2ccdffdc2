"""What each CLI verb prints from the admin API's JSON answer: the status table, a reload's
changes, an action's outcome. Standard library only, as ``control/client.py``: the
image's health check loads this path every 2 s."""

from __future__ import annotations

# typing is left out on purpose, as in client.py (mypy reads the annotations).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
    # .get: a labelled container discovery refused has a name, a state and a reason only.
    rows = [
        (
            s["name"],
            s["state"],
            _cell(s.get("open")),
            _cell(s.get("held")),
            _cell(s.get("wakes")),
            _cell(s.get("last_wake_ms"), " ms"),
            _cell(s.get("sleeps_in_s"), " s"),
            _cell(s.get("backend")),
            _why(s),
        )
        for s in services
    ]
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (head, *rows)
    )


def _mib(value: Any) -> str:
    return f"{value / (1024 * 1024):.1f} MiB" if isinstance(value, int | float) else "-"


def format_acted(body: dict[str, Any]) -> str:
    """``NAME: STATE``, and for a hibernation what was given back."""
    line = f"{body['name']}: {body['state']}"
    memory = body.get("memory")
    if isinstance(memory, dict) and "hibernated" in memory:
        if memory.get("hibernate_problem"):
            line += f" (not hibernated: {memory['hibernate_problem']})"
        elif not memory["hibernated"]:
            line += " (not hibernated: nothing runs)"
        else:
            line += (
                f" (hibernated by {memory.get('hibernate_method') or '-'}; "
                f"{_mib(memory.get('resident_bytes'))} in RAM, "
                f"{_mib(memory.get('swapped_bytes'))} in swap)"
            )
    return line


def format_scale(body: dict[str, Any]) -> str:
    replicas = body.get("replicas", [])
    lines = [f"{body['name']}: {body['awake']} of {len(replicas)} awake"]
    lines += [f"  {r['name']}: {r['state']}" for r in replicas]
    lines += [f"  {name}: left as it is: {why}" for name, why in body.get("refused", {}).items()]
    return "\n".join(lines)


def format_all(body: dict[str, Any]) -> str:
    return "\n".join(
        f"{s['name']}: {s['state']}" + (f" ({s['error']})" if s.get("error") else "")
        for s in body["services"]
    )


def status_services(body: dict[str, Any], name: str | None) -> list[dict[str, Any]] | None:
    """Every service, or NAME's entry (or, for a service with replicas, its replicas'
    entries); None when nothing is called that."""
    services: list[dict[str, Any]] = body["services"]
    if name is None:
        return services
    chosen = [s for s in services if name in (s["name"], s.get("replica_of"))]
    return chosen or None
