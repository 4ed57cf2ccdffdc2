"""Labels (discovery) on a container or a Swarm service: the same keys and checks as a
YAML service entry, with errors that name the container (or Swarm service) and the label."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from ..errors import ConfigError
from .checks import Problems
from .model import KeyPath, ListenRange, ServiceConfig, SleepPolicy
from .schema import parse_service

LABEL_PREFIX = "wakeproxy."
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_DEPENDS_ON_LABEL = "com.docker.compose.depends_on"
# On every task container of a Swarm service: the service's own labels are what counts.
SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
# wakeproxy.KEY -> where the value goes in a YAML service entry.
_LABEL_SERVICE_KEYS = (
    "port", "listen", "backend", "mode", "wake_on", "backlog", "connect_timeout",
    "idle_connection_timeout", "connect_concurrency", "wake_timeout", "max_held_connections",
    "auto_start", "stop_timeout", "group", "depends_on",
)  # fmt: skip
_LABEL_PATHS: dict[str, KeyPath] = {
    **{key: (key,) for key in _LABEL_SERVICE_KEYS},
    **{
        key: ("sleep_policy", key)
        for key in (
            "idle_timeout",
            "min_sleep_time",
            "priority",
            "action",
            "stop_after",
            "hibernate_after",
            "reclaim",
            "prefetch",
            "keep_awake",
            "asleep_windows",
            "predict",
        )
    },
    "policy": ("sleep_policy", "use"),
    "readiness": ("readiness", "http"),
    "swarm_replicas": ("swarm_replicas",),
}
# Labels that are text as they stand; the others are read as YAML scalars (300, 1.5, true).
_LABEL_TEXT = {
    "listen", "backend", "mode", "wake_on", "group", "priority", "action", "policy", "reclaim",
}  # fmt: skip
_LABEL_OWN = {"enable", "name"}  # read by discovery itself


def label_enabled(labels: Mapping[str, str]) -> bool:
    return labels.get(LABEL_PREFIX + "enable", "").strip().lower() in ("true", "1", "yes")


def label_service_name(container: str, labels: Mapping[str, str]) -> str:
    """wakeproxy.name, else the compose service, else the container's (or Swarm
    service's) name."""
    return (
        labels.get(LABEL_PREFIX + "name")
        or labels.get(COMPOSE_SERVICE_LABEL)
        or container.lstrip("/")
    ).strip()


def _label_scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, int | float | bool) else text


def _label_mapping(text: str) -> Any:
    """A YAML flow mapping (``{arrivals: true, threshold: 0.6}``); else the text, which
    the key's check then refuses, naming the label."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_label(key: str, short: str) -> str:
    known = ", ".join(LABEL_PREFIX + k for k in sorted({*_LABEL_PATHS, *_LABEL_OWN}))
    close = difflib.get_close_matches(short, list(_LABEL_PATHS), n=1)
    hint = f" (did you mean {LABEL_PREFIX + close[0]!r}?)" if close else ""
    return f"unknown label {key!r}{hint}; known: {known}"


def _label_value(short: str, text: str) -> Any:
    """A label's text as the YAML entry's value for its key."""
    if short == "depends_on":
        return [part.strip() for part in text.split(",") if part.strip()]
    if short in ("keep_awake", "asleep_windows"):
        # Windows hold commas (mon,wed 08:00-12:00): several are split on ";".
        return [part.strip() for part in text.split(";") if part.strip()]
    if short == "predict":
        return _label_mapping(text)
    if short in _LABEL_TEXT:
        return text.strip()
    return _label_scalar(text.strip())


def service_from_labels(
    container: str,
    labels: Mapping[str, str],
    *,
    policies: Mapping[str, SleepPolicy],
    allowed_listen: tuple[ListenRange, ...],
    managed: Collection[str] = (),
    swarm: bool = False,
    engine: str | None = None,
) -> ServiceConfig:
    """A service for a labelled container (with ``swarm``: a labelled Swarm service, so
    ``container`` is its name) on ``engine`` (None: the local one); ConfigError naming
    the container and label.

    Dependencies from compose's own depends_on label count only where they name a
    service the proxy manages (``managed``): compose also lists databases and the like
    that never sleep. wakeproxy.depends_on names must all exist.
    """
    name = label_service_name(container, labels)
    where_label: dict[KeyPath, str] = {}
    entry: dict[str, Any] = {"swarm_service" if swarm else "container": container}
    if engine is not None:
        entry["engine"] = engine
    subject = f"Swarm service {container}" if swarm else f"container {container}"
    problems: list[str] = []
    for key, text in labels.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        short = key[len(LABEL_PREFIX) :]
        if short in _LABEL_OWN:
            continue
        path = _LABEL_PATHS.get(short)
        if path is None:
            problems.append(f"{subject}: {_unknown_label(key, short)}")
            continue
        where_label[("services", name, *path)] = key
        target = entry
        for part in path[:-1]:
            target = target.setdefault(str(part), {})
        target[str(path[-1])] = _label_value(short, text)
    if "port" not in entry and "listen" not in entry:
        problems.append(
            f"{subject}: needs label {LABEL_PREFIX}port (listen and backend port) "
            f"or {LABEL_PREFIX}listen with {LABEL_PREFIX}backend"
        )
        raise ConfigError(problems)
    compose = [
        item.split(":", 1)[0].strip()
        for item in labels.get(COMPOSE_DEPENDS_ON_LABEL, "").split(",")
        if item.strip()
    ]
    extra = [dep for dep in compose if dep in managed and dep != name]
    if extra:
        entry["depends_on"] = [*entry.get("depends_on", []), *extra]

    def where(path: KeyPath) -> str:
        for end in range(len(path), 2, -1):
            label = where_label.get(path[:end])
            if label is not None:
                return f"{subject}: label {label}"
        if len(path) >= 3 and path[2] == "depends_on":
            return f"{subject}: label {COMPOSE_DEPENDS_ON_LABEL}"
        return subject

    collected = Problems(None, {}, where)
    service = parse_service(name, entry, collected, policies)
    if service is None or problems or collected.items:
        raise ConfigError(problems + collected.items)
    if not any(r.allows(service.listen) for r in allowed_listen):
        label = LABEL_PREFIX + ("listen" if "listen" in entry else "port")
        ranges = ", ".join(str(r) for r in allowed_listen) or "none"
        raise ConfigError(
            [
                f"{subject}: label {label}: listening on {service.listen} is "
                f"outside discovery.allowed_listen ({ranges})"
            ]
        )
    return dataclasses.replace(service, source="labels")
