"""One service with ``replicas:`` as the replicas' own configs.

Each replica is run like a one-backend service (its runtime, its state, its idle
timer) under the name ``SERVICE@N`` (N from 1, oldest first; ``@`` is never in a
service's own name, so no replica can clash with one). The service's listener and
balancer are the pool's (``wakeproxy.serve.pool``); what the replicas differ in is here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..core.replicas import Scaling
from .model import Address, Replicas, ServiceConfig

SEPARATOR = "@"
# What docker compose (v1 and v2) labels each container of a service with.
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_NUMBER = "com.docker.compose.container-number"
# A compose service's containers: (name, container number), in number order.
Members = Sequence[tuple[str, int]]


def replica_name(service: str, index: int) -> str:
    return f"{service}{SEPARATOR}{index}"


def compose_members(listing: Iterable[Mapping[str, Any]], spec: Replicas) -> list[tuple[str, int]]:
    """The containers of ``spec``'s compose service in one engine listing, by number."""
    found = []
    for entry in listing:
        labels = entry.get("Labels") or {}
        if labels.get(COMPOSE_SERVICE) != spec.compose_service:
            continue
        if spec.compose_project is not None and labels.get(COMPOSE_PROJECT) != spec.compose_project:
            continue
        names = entry.get("Names") or [str(entry.get("Id", ""))]
        number = str(labels.get(COMPOSE_NUMBER, ""))
        found.append((str(names[0]).lstrip("/"), int(number) if number.isdigit() else 0))
    return sorted(found, key=lambda member: (member[1], member[0]))


def expand(cfg: ServiceConfig, members: Members = ()) -> list[ServiceConfig]:
    """The configs the proxy runs for one configured service: itself without replicas,
    else one per replica (for compose replicas, one per container in ``members``, named
    by its container number so a container keeps its name as others come and go)."""
    spec = cfg.replicas
    if spec is None:
        return [cfg]
    if spec.discovered:
        return [_compose_replica(cfg, spec, name, number) for name, number in members]
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
                # In a group the oldest replica stands for the service: the group's wake
                # wakes it, and it sleeps with the group once the newer ones slept.
                group=cfg.group if i == 0 else None,
                replica_of=cfg.name,
                replica=index,
            )
        )
    return out


def _compose_replica(
    cfg: ServiceConfig, spec: Replicas, container: str, number: int
) -> ServiceConfig:
    sleep = cfg.sleep_policy
    if number <= spec.minimum:
        sleep = dataclasses.replace(sleep, enabled=False)
    return dataclasses.replace(
        cfg,
        name=replica_name(cfg.name, number),
        container=container,
        backend=None,  # its own address, read from Docker
        sleep_policy=sleep,
        auto_start=number <= spec.minimum or (number == 1 and cfg.auto_start),
        group=cfg.group if number == 1 else None,
        replica_of=cfg.name,
        replica=number,
    )


def expand_all(
    services: Iterable[ServiceConfig],
    members: Callable[[ServiceConfig], Members] | None = None,
) -> dict[str, ServiceConfig]:
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
        spec = cfg.replicas
        found = members(cfg) if spec is not None and spec.discovered and members else ()
        out.update((r.name, r) for r in expand(cfg, found))
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


def scaling_of(cfg: ServiceConfig, replicas: int = 0) -> Scaling:
    """The config's scaling; ``max`` unset for compose replicas: as many as there are."""
    spec = cfg.replicas
    assert spec is not None
    most = spec.maximum or (replicas if spec.discovered else spec.count)
    return Scaling(spec.minimum, most, spec.target_inflight)
