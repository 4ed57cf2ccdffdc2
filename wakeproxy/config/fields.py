"""Which keys each section of the config takes, each with its check (config/checks.py),
and ``replace``, which makes a section's dataclass from the checked values. The tables are
the schema's vocabulary: config/schema.py parses with them, config/live.py checks live
changes with them, tests/test_config_fuzz.py draws keys from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar, get_args

from ..core.states import SleepAction
from . import checks as check
from .checks import Check, describe, nested
from .model import (
    FastPath,
    IdleConnections,
    LogFormat,
    LogLevel,
    McpMode,
    Mode,
    Priority,
    ReclaimMethod,
    ShutdownBackends,
    WakeOn,
)

_T = TypeVar("_T")


def replace(base: _T, values: Mapping[str, Any]) -> _T:
    """``base`` with the checked ``values`` of its section (keys are its field names)."""
    return dataclasses.replace(base, **values)  # type: ignore[type-var]


SLEEP_FIELDS: dict[str, Check] = {
    "enabled": check.boolean,
    "idle_timeout": check.positive_seconds,
    "min_sleep_time": check.seconds,
    "priority": check.choice(*get_args(Priority)),
    "action": check.enum_choice(SleepAction),
    "stop_after": check.positive_seconds,
    "hibernate_after": check.seconds,
    "reclaim": check.choice(*get_args(ReclaimMethod), gone={"pageout": check.PAGEOUT_GONE}),
    "prefetch": check.boolean,
    "memory_reservation": check.size,
    "keep_awake": check.windows,
    "asleep_windows": check.windows,
    "predict": check.predict,
}

READINESS_FIELDS: dict[str, Check] = {
    "tcp": check.boolean,
    "http": check.text,
    "interval": check.positive_seconds,
}

RESOURCE_FIELDS: dict[str, Check] = {
    # The seed writes cpu as a string ("0.25"); accept both.
    "cpu": lambda v: check.number(float(v) if isinstance(v, str) and check.is_float(v) else v),
    "memory": check.size,
}


SERVICE_FIELDS: dict[str, Check] = {
    "listen": check.address,
    "backend": check.address,
    "port": check.port,
    "container": check.text,
    "command": check.command,
    "cwd": check.text,
    "env": check.env,
    "mode": check.choice(*get_args(Mode)),
    "http": nested,
    "wake_on": check.choice(*get_args(WakeOn)),
    "fast_path": check.choice(*get_args(FastPath)),
    "backlog": check.int_between(1, 65535),
    "connect_timeout": check.positive_seconds,
    "idle_connection_timeout": check.seconds,
    "connect_concurrency": check.int_between(1, 65535),
    "sleep_policy": nested,
    "wake_timeout": check.positive_seconds,
    "max_held_connections": check.int_between(0, 1_000_000),
    "max_connections": check.int_between(0, 10_000_000),
    "readiness": nested,
    "auto_start": check.boolean,
    "stop_timeout": check.seconds,
    "image": check.text,
    "resources": nested,
    "depends_on": check.names,
    "group": check.text,
    "replicas": nested,
    "engine": check.text,
    "swarm_service": check.text,
    "swarm_replicas": check.int_between(1, 1000),
}

ENGINE_FIELDS: dict[str, Check] = {
    "host": check.text,
    "cert_path": check.text,
    "tls_verify": check.boolean,
}


def _containers(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise check.Bad(f"expected a list of container names, got {describe(value)}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise check.Bad(f"expected container names (non-empty strings), got {describe(value)}")
    if len(set(value)) != len(value):
        twice = next(v for v in value if value.count(v) > 1)
        raise check.Bad(f"names the container {twice!r} twice")
    return tuple(value)


REPLICA_FIELDS: dict[str, Check] = {
    "count": check.int_between(1, 256),
    "containers": _containers,
    "min": check.int_between(0, 256),
    "max": check.int_between(1, 256),
    "target_inflight": check.int_between(1, 1_000_000),
    "compose_service": check.text,
    "compose_project": check.text,
    "port": check.port,
    "health_interval": check.seconds,
}

ADMIN_FIELDS: dict[str, Check] = {
    "listen": check.address,
    "token_file": check.text,
    "protect_reads": check.boolean,
}
LOG_FIELDS: dict[str, Check] = {
    "level": check.choice(*get_args(LogLevel)),
    "format": check.choice(*get_args(LogFormat)),
}
DISCOVERY_FIELDS: dict[str, Check] = {
    "docker_labels": check.boolean,
    "allowed_listen": check.listen_ranges,
    "interval": check.positive_seconds,
    "engines": check.names,
}
SHUTDOWN_FIELDS: dict[str, Check] = {
    "grace": check.seconds,
    "backends": check.choice(*get_args(ShutdownBackends)),
}
PREDICTION_FIELDS: dict[str, Check] = {
    "state_file": lambda v: None if v is None else check.text(v),
    "timezone": check.zone,
    "save_interval": check.positive_seconds,
}
MCP_FIELDS: dict[str, Check] = {
    "state_file": lambda v: None if v is None else check.text(v),
    "max_sessions": check.int_between(1, 1_000_000),
    "sessions_per_client": check.int_between(1, 1_000_000),
}
TOP_FIELDS: dict[str, Check] = {
    "prediction": nested,
    "mcp": nested,
    "engines": nested,
    "shutdown": nested,
    "discovery": nested,
    "policies": nested,
    "admin": nested,
    "log": nested,
    "services": nested,
}


PROBE_FIELDS: dict[str, Check] = {
    "method": lambda v: None if v in ("*", "ANY", "any") else check.text(v).upper(),
    "path": check.url_path,
    "headers": check.header_conditions,
    "status": check.int_between(200, 599),
    "content_type": check.text,
    "body": lambda v: v if isinstance(v, str) else check.text(v),
    "stream": check.boolean,
}
HTTP_FIELDS: dict[str, Check] = {
    "sse_path": check.url_path,
    "header_timeout": check.positive_seconds,
    "inflight_grace": check.seconds,
    "idle_connections": check.choice(*get_args(IdleConnections)),
    "forwarded_headers": check.boolean,
    "trust_forwarded_from": check.networks,
    "default_probe": check.boolean,
    "probes": nested,
    "waiting_page": check.boolean,
    "max_partial_heads": check.int_between(1, 10_000_000),
    "max_probe_streams": check.int_between(0, 10_000_000),
    "mcp": check.switch(*get_args(McpMode)),
    "mcp_resume": check.boolean,
}
