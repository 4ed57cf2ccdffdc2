"""Prometheus metrics, read from the services' plain counters at scrape time.

The hot path only adds integers (per connection, per chunk); this collector turns
them into metric families when ``/metrics`` is scraped, so metrics cost nothing
between scrapes. Label values are service names and fixed words, never client
addresses. A removed service's series disappear with it.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..core.states import Outcome, State, WakeResult
from ..serve.fastpath import FastPathState
from ..serve.stats import WAKE_BUCKETS
from ..serve.status import BackendStatus, backend_status, mcp_status, pool_status

if TYPE_CHECKING:
    from .running import Running

# Exported at 0 too, so a rate() over them works before the first one happens.
TCP_OUTCOMES = (
    Outcome.FORWARDED,
    Outcome.REJECTED_OVERFLOW,
    Outcome.REJECTED_LIMIT,
    Outcome.WAKE_TIMEOUT,
    Outcome.BACKEND_ERROR,
    Outcome.IDLE_TIMEOUT,
)
HTTP_OUTCOMES = (*TCP_OUTCOMES, *(o for o in Outcome if o not in TCP_OUTCOMES))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyCollector(Collector):
    def __init__(self, proxy: Running) -> None:
        self.proxy = proxy

    def _predictions(self) -> Iterator[Metric]:
        """Predicted wakes by kind (schedule, arrivals, chain) and what became of them."""
        assert self.proxy.predictions is not None
        core = self.proxy.predictions.core
        labels = ["service", "kind"]
        families = {
            "predicted": CounterMetricFamily(
                "wakeproxy_predicted_wakes", "Wakes made ahead of a request.", labels=labels
            ),
            "used": CounterMetricFamily(
                "wakeproxy_predicted_wakes_used",
                "Predicted wakes a request came to before the backend slept again.",
                labels=labels,
            ),
            "wasted": CounterMetricFamily(
                "wakeproxy_predicted_wakes_wasted",
                "Predicted wakes that slept again with no request.",
                labels=labels,
            ),
            "awake_seconds": CounterMetricFamily(
                "wakeproxy_predicted_awake_seconds",
                "Seconds awake on predictions: from the wake to the first request (used) "
                "or to the sleep (wasted).",
                labels=labels,
            ),
        }
        predictions = self.proxy.predictions
        for name in sorted(predictions.services):
            stats = core.stats(name)
            if name not in predictions.using and not stats.get("predicted"):
                continue  # no series for services that never predict
            for kind, counts in stats.get("kinds", {}).items():
                for key, family in families.items():
                    family.add_metric([name, kind], counts[key])
        yield from families.values()

    def _pools(
        self, connections: CounterMetricFamily, answers: CounterMetricFamily
    ) -> Iterator[Metric]:
        """Services with replicas: how many replicas are in each state, the wakes the
        load asked for, and the outcomes decided before a replica took a connection
        (each replica's own series are those of a service named SERVICE@N)."""
        replicas = GaugeMetricFamily(
            "wakeproxy_replicas",
            "Replicas of a service in each state.",
            labels=["service", "state"],
        )
        scale_ups = CounterMetricFamily(
            "wakeproxy_replica_scale_ups",
            "Replicas woken because the attached connections per awake replica passed "
            "replicas.target_inflight.",
            labels=["service"],
        )
        circuits = CounterMetricFamily(
            "wakeproxy_circuit_open",
            "Times a replica's circuit opened (a connect to it failed).",
            labels=["service", "replica"],
        )
        moved = CounterMetricFamily(
            "wakeproxy_replica_moves",
            "Connections moved to another replica after their connect failed (before any "
            "byte went upstream).",
            labels=["service"],
        )
        placed = CounterMetricFamily(
            "wakeproxy_replica_connections",
            "Connections placed on each replica (mode http: each carries its requests to "
            "that one replica).",
            labels=["service", "replica"],
        )
        pools = (pool_status(f) for f in self.proxy.frontends.values() if f.replicated)
        for pool in pools:
            moved.add_metric([pool.name], pool.moved)
            for replica in pool.replicas:
                name = replica.backend.name
                circuits.add_metric([pool.name, name], replica.circuit_opened)
                placed.add_metric([pool.name, name], replica.placed)
            for each in State:
                count = sum(r.backend.state is each for r in pool.replicas)
                replicas.add_metric([pool.name, each.value], count)
            scale_ups.add_metric([pool.name], pool.scale_ups)
            counts = pool.counts
            outcomes = HTTP_OUTCOMES if pool.cfg.mode == "http" else TCP_OUTCOMES
            for outcome in outcomes:
                connections.add_metric([pool.name, outcome.value], counts.connections[outcome])
            for code, count in sorted(counts.http_answers.items()):
                answers.add_metric([pool.name, str(code)], count)
        yield from (replicas, scale_ups, circuits, moved, placed)

    def _mcp(self) -> Iterator[Metric]:
        """MCP over streamable HTTP, per listener (a service, or a pool of replicas)."""
        fronts = [
            mcp_status(f.mcp)
            for f in self.proxy.frontends.values()
            if f.mcp is not None and f.mcp.fronts()
        ]
        if not fronts:
            return
        answered = CounterMetricFamily(
            "wakeproxy_mcp_answered",
            "MCP requests the proxy answered itself (session set-up while the server slept; "
            "a session it minted and no longer holds), by method.",
            labels=["service", "method"],
        )
        opened = CounterMetricFamily(
            "wakeproxy_mcp_sessions_opened",
            "Sessions the proxy opened on a server with the client's own initialize: "
            "materialized (the proxy answered their start), resumed (their server lost them).",
            labels=["service", "how"],
        )
        failed = CounterMetricFamily(
            "wakeproxy_mcp_replays_failed",
            "Replayed initializes the server refused (the client got its answer).",
            labels=["service"],
        )
        sessions = GaugeMetricFamily(
            "wakeproxy_mcp_sessions",
            "MCP sessions the proxy holds, by whether a server knows them (open) or not yet "
            "(virtual).",
            labels=["service", "kind"],
        )
        evicted = CounterMetricFamily(
            "wakeproxy_mcp_sessions_evicted",
            "Idle sessions dropped to make room for new ones (a full table).",
            labels=["service"],
        )
        refused = CounterMetricFamily(
            "wakeproxy_mcp_sessions_refused",
            "New sessions refused (429): the table full of sessions in use, or the client's "
            "share (per address, per connection) used.",
            labels=["service"],
        )
        for front in fronts:
            name = front.name
            for method in ("initialize", "notifications/initialized", "ping", "server/discover",
                           "GET", "DELETE", "unknown session"):  # fmt: skip
                answered.add_metric([name, method], front.answered.get(method, 0))
            opened.add_metric([name, "materialized"], front.materialized)
            opened.add_metric([name, "resumed"], front.resumed)
            failed.add_metric([name], front.replays_failed)
            sessions.add_metric([name, "virtual"], front.virtual)
            sessions.add_metric([name, "open"], front.sessions - front.virtual)
            evicted.add_metric([name], front.evicted)
            refused.add_metric([name], front.refused)
        yield from (answered, opened, failed, sessions, evicted, refused)

    def collect(self) -> Iterator[Metric]:
        services = [backend_status(s) for s in self.proxy.services.values()]
        families = _service_families()
        for service in services:
            _add_service(families, service)
        found = CounterMetricFamily(
            "wakeproxy_requests_found_asleep",
            "Connections held for a wake: they found their backend asleep (or waking).",
            labels=["service"],
        )
        for service in services:
            found.add_metric([service.name], service.counts.found_asleep)
        yield found
        if self.proxy.predictions is not None and self.proxy.predictions.active:
            yield from self._predictions()
        if any(f.replicated for f in self.proxy.frontends.values()):
            yield from self._pools(families["connections"], families["http_answers"])
        yield from self._mcp()
        yield from families.values()
        yield from self._process()

    def _process(self) -> Iterator[Metric]:
        """The process itself: its version, discovery's refusals, the engines."""
        info = GaugeMetricFamily(
            "wakeproxy_build_info", "The running version.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        if self.proxy.discoveries:
            refused = GaugeMetricFamily(
                "wakeproxy_discovery_rejected",
                "1 for each labelled container or Swarm service discovery could not serve "
                "(see GET /services).",
                labels=["service"],
            )
            for name in sorted(self.proxy.rejected):
                refused.add_metric([name], 1.0)
            yield refused
        if self.proxy.engines:
            engines_up = GaugeMetricFamily(
                "wakeproxy_engine_up", "1 while the Docker engine answers.", labels=["engine"]
            )
            for name, engine in sorted(self.proxy.engines.items()):
                engines_up.add_metric([name], float(engine.up))
            yield engines_up


# Every service's families: (kind, name, help, labels beside "service"), in export order.
_SERVICE_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("histogram", "wakeproxy_wake_seconds",
     "Time from the first held connection (or wake request) to the backend being ready.", ()),
    ("counter", "wakeproxy_wakes", "Wakes by result (ok, failed, timeout).", ("result",)),
    ("counter", "wakeproxy_sleeps",
     "Sleeps by action (pause, stop) and reason (idle, api, stop_after, external).",
     ("action", "reason")),
    ("gauge", "wakeproxy_service_state", "1 for the service's current state.", ("state",)),
    ("gauge", "wakeproxy_connections_active", "Connections being forwarded.", ()),
    ("gauge", "wakeproxy_connections_held", "Connections held while the backend wakes.", ()),
    ("counter", "wakeproxy_connections", "Connections by outcome.", ("outcome",)),
    ("counter", "wakeproxy_bytes", "Bytes forwarded (client_to_backend, backend_to_client).",
     ("direction",)),
    ("counter", "wakeproxy_asleep_seconds", "Seconds the backend spent paused or stopped.", ()),
    ("counter", "wakeproxy_http_answers",
     "mode http: responses the proxy gave itself (probes, errors), by status.", ("status",)),
    ("counter", "wakeproxy_unexpected_events",
     "Events the decision core had no transition for (a bug: please report it).", ("event",)),
    ("gauge", "wakeproxy_backend_resident_bytes",
     "The backend's memory in RAM as the kernel counts it (its memory cgroup's usage; the "
     "processes' RSS where no cgroup is readable), read at scrape time.", ("source",)),
    ("gauge", "wakeproxy_backend_swapped_bytes",
     "The backend's memory in swap (cgroup swap usage, or the processes' VmSwap).", ("source",)),
    ("counter", "wakeproxy_reclaimed_bytes",
     "Bytes of backend memory given back by hibernation (cgroup usage before - after).", ()),
    ("counter", "wakeproxy_hibernations", "Hibernations by method (cgroup).",
     ("method",)),
    ("counter", "wakeproxy_hibernate_fallbacks",
     "Hibernations that fell back to a plain pause, by reason.", ("reason",)),
    ("counter", "wakeproxy_fast_path_steered",
     "fast_path kernel: connections the kernel handed straight to the backend.", ()),
    ("gauge", "wakeproxy_fast_path_state",
     "fast_path kernel: 1 for its current state (unavailable, standby, steering).", ("state",)),
    ("gauge", "wakeproxy_fast_path_unavailable",
     "fast_path kernel asked for and not running: 1 with the reason.", ("reason",)),
)  # fmt: skip
_KINDS = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


def _service_families() -> dict[str, Any]:
    """The families every service adds to, by short name (``wakeproxy_`` dropped)."""
    return {
        name.removeprefix("wakeproxy_"): _KINDS[kind](name, text, labels=["service", *labels])
        for kind, name, text, labels in _SERVICE_FAMILIES
    }


def _add_service(families: dict[str, Any], service: BackendStatus) -> None:
    """One service's series, read at scrape time from its counters."""
    name, stats = service.name, service.counts
    use = service.memory_use
    if use is not None:
        families["backend_resident_bytes"].add_metric([name, use.source], use.resident)
        families["backend_swapped_bytes"].add_metric([name, use.source], use.swapped)
    families["reclaimed_bytes"].add_metric([name], stats.reclaimed_bytes)
    for method, count in sorted(stats.hibernations.items()):
        families["hibernations"].add_metric([name, method], count)
    for reason, count in sorted(stats.hibernate_fallbacks.items()):
        families["hibernate_fallbacks"].add_metric([name, reason], count)
    cumulative, buckets = 0, []
    for bound, count in zip((*WAKE_BUCKETS, math.inf), stats.wake_buckets, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
    families["wake_seconds"].add_metric([name], buckets, sum_value=stats.wake_sum)
    for result in WakeResult:
        families["wakes"].add_metric([name, result.value], stats.wakes[result])
    for (action, reason), count in stats.sleeps.items():
        families["sleeps"].add_metric([name, action.value, reason.value], count)
    for each in State:
        families["service_state"].add_metric(
            [name, each.value], 1.0 if service.state is each else 0.0
        )
    families["connections_active"].add_metric([name], service.forwarding)
    families["connections_held"].add_metric([name], service.held)
    outcomes = HTTP_OUTCOMES if service.cfg.mode == "http" else TCP_OUTCOMES
    for outcome in outcomes:
        families["connections"].add_metric([name, outcome.value], stats.connections[outcome])
    for event, count in sorted(stats.unexpected.items()):
        families["unexpected_events"].add_metric([name, event], count)
    families["bytes"].add_metric([name, "client_to_backend"], service.bytes_up)
    families["bytes"].add_metric([name, "backend_to_client"], service.bytes_down)
    families["asleep_seconds"].add_metric([name], service.asleep_s)
    for code, count in sorted(stats.http_answers.items()):
        families["http_answers"].add_metric([name, str(code)], count)
    fast = service.fast_path
    if fast.state is not FastPathState.OFF:  # series only where it was asked for
        families["fast_path_steered"].add_metric([name], fast.steered)
        for kind in FastPathState:
            if kind is not FastPathState.OFF:
                value = 1.0 if fast.state is kind else 0.0
                families["fast_path_state"].add_metric([name, kind.value], value)
        if fast.why is not None:
            families["fast_path_unavailable"].add_metric([name, fast.why.value], 1.0)


def render(proxy: Running) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return generate_latest(registry)
