"""JSON views of the metrics: performance, resources, cost and trends.

The same counters as ``/metrics``, arranged for people. The cost view is honest
about what sleeping saves: a paused container keeps its memory, so a pause saves
CPU time only; a stopped one saves its memory too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..core.states import WakeResult
from ..serve.status import BackendStatus, backend_status

if TYPE_CHECKING:
    from .running import Running

COST_NOTE = (
    "Pause freezes a backend: it keeps its memory, so pausing saves CPU time only; a stopped "
    "backend also frees its memory, and a hibernated one gives it back while paused. CPU "
    "saved = time asleep x resources.cpu (the service's CPU limit or reservation). Memory: "
    "memory.resident_bytes is measured now (the backend's memory cgroup, or its RSS) and "
    "memory.reclaimed_bytes_total is what hibernation gave back; memory_gib_hours_saved = "
    "time stopped x sleep_policy.memory_reservation (else resources.memory): a reservation, "
    "not a measurement. Null where the config gives no figure to multiply by."
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _significant(value: float) -> float:
    """Six significant digits: GiB-hours of a short sleep are millionths, and a fixed
    number of decimals would round most of them away."""
    return float(f"{value:.6g}")


def _percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return _ms(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {
        "count": len(ordered),
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": _ms(ordered[-1]),
    }


def _statuses(proxy: Running) -> list[BackendStatus]:
    return [backend_status(s) for s in proxy.services.values()]


def performance(proxy: Running) -> dict[str, Any]:
    def one(s: BackendStatus) -> dict[str, Any]:
        last = s.counts.last_wake_s
        return {
            "name": s.name,
            "wakes": {r.value: s.counts.wakes[r] for r in WakeResult},
            # Over the most recent wakes (up to 1024 kept per service).
            "wake_ms": _percentiles(list(s.counts.wake_seconds)),
            "last_wake_ms": _ms(last) if last is not None else None,
        }

    return {"services": [one(s) for s in _statuses(proxy)]}


def resources(proxy: Running) -> dict[str, Any]:
    def one(s: BackendStatus) -> dict[str, Any]:
        return {
            "name": s.name,
            "state": s.state.value,
            "connections": {
                "active": s.forwarding,
                "held": s.held,
                "accepted": s.counts.accepted,
                "by_outcome": {o.value: n for o, n in s.counts.connections.items()},
            },
            "bytes": {"client_to_backend": s.bytes_up, "backend_to_client": s.bytes_down},
            # Measured now (cgroup usage, or RSS where no cgroup is readable).
            "memory": s.memory,
        }

    return {"services": [one(s) for s in _statuses(proxy)]}


def cost(proxy: Running) -> dict[str, Any]:
    def one(s: BackendStatus) -> dict[str, Any]:
        paused, stopped = s.paused_s, s.stopped_s
        cpu = s.cfg.resources.cpu
        memory = s.cfg.sleep_policy.memory_reservation or s.cfg.resources.memory
        return {
            "name": s.name,
            "asleep_s": round(paused + stopped, 3),
            "paused_s": round(paused, 3),
            "stopped_s": round(stopped, 3),
            "cpu_cores": cpu,
            "cpu_seconds_saved": round((paused + stopped) * cpu, 3) if cpu else None,
            "memory_bytes": memory,
            "memory_source": "reservation" if memory else None,
            "memory": s.memory,
            "memory_gib_hours_saved": (
                _significant(stopped * memory / 2**30 / 3600) if memory else None
            ),
        }

    return {"note": COST_NOTE, "services": [one(s) for s in _statuses(proxy)]}


def trends(proxy: Running) -> dict[str, Any]:
    """Wakes and connections per UTC hour over the last 24 hours, oldest first."""
    now = int(time.time() // 3600)
    hours = list(range(now - 23, now + 1))

    def one(s: BackendStatus) -> dict[str, Any]:
        slots = [s.counts.hourly.get(h, (0, 0)) for h in hours]
        return {
            "name": s.name,
            "wakes": [slot[0] for slot in slots],
            "connections": [slot[1] for slot in slots],
        }

    return {
        "hours": [time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(h * 3600)) for h in hours],
        "services": [one(s) for s in _statuses(proxy)],
    }


VIEWS = {
    "/metrics/performance": performance,
    "/metrics/resources": resources,
    "/metrics/cost": cost,
    "/metrics/trends": trends,
}
