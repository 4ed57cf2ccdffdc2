"""One service with ``replicas:`` as the replicas' own configs.

Each replica is run like a one-backend service (its runtime, its state, its idle
timer) under the name ``SERVICE@N`` (N from 1, oldest first; ``@`` is never in a
service's own name, so no replica can clash with one). The service's listener and
balancer are the pool's (``wakeproxy.pool``); what the replicas differ in is here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from .model import Address, ServiceConfig

SEPARATOR = "@"


def replica_name(service: str, index: int) -> str:
    return f"{service}{SEPARATOR}{index}"


def expand(cfg: ServiceConfig) -> list[ServiceConfig]:
    """The configs the proxy runs for one configured service: itself without replicas,
    else one per replica."""
    spec = cfg.replicas
    if spec is None:
        return [cfg]
    out: list[ServiceConfig] = []
    for i in range(spec.count):
        index = i + 1
        port = (cfg.backend.port if cfg.backend is not None else cfg.backend_port) + i
        fill = {"{port}": str(port), "{index}": str(index)}
        sleep = cfg.sleep_policy
        if i < spec.minimum:
            sleep = dataclasses.replace(sleep, enabled=False)  # min: never slept
        out.append(
            dataclasses.replace(
                cfg,
                name=replica_name(cfg.name, index),
                backend=(Address(cfg.backend.host, port) if cfg.backend is not None else None),
                backend_port=port,
                container=spec.containers[i] if spec.containers else cfg.container,
                command=_filled(cfg.command, fill) if cfg.command is not None else None,
                env={key: _fill(value, fill) for key, value in cfg.env.items()},
                sleep_policy=sleep,
                # min: woken with the proxy; auto_start: the first one is.
                auto_start=i < spec.minimum or (i == 0 and cfg.auto_start),
                replica_of=cfg.name,
                replica=index,
            )
        )
    return out


def expand_all(services: Iterable[ServiceConfig]) -> dict[str, ServiceConfig]:
    """Every config the proxy runs, by name (a service's replicas in their order).

    A dependency on a service with replicas is one on its oldest replica: the one its
    first connection wakes.
    """
    configs = list(services)
    replicated = {cfg.name for cfg in configs if cfg.replicas is not None}
    out: dict[str, ServiceConfig] = {}
    for cfg in configs:
        if replicated & set(cfg.depends_on):
            depends_on = tuple(replica_name(d, 1) if d in replicated else d for d in cfg.depends_on)
            cfg = dataclasses.replace(cfg, depends_on=depends_on)
        out.update((r.name, r) for r in expand(cfg))
    return out


def replica_sets(services: Mapping[str, ServiceConfig]) -> dict[str, list[str]]:
    """Service -> its replicas' names, oldest first, from configs ``expand`` made."""
    sets: dict[str, list[str]] = {}
    for cfg in sorted(services.values(), key=lambda c: c.replica):
        if cfg.replica_of is not None:
            sets.setdefault(cfg.replica_of, []).append(cfg.name)
    return sets


def _filled(command: tuple[str, ...], fill: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(_fill(arg, fill) for arg in command)


def _fill(text: str, fill: Mapping[str, str]) -> str:
    for placeholder, value in fill.items():
        text = text.replace(placeholder, value)
    return text
