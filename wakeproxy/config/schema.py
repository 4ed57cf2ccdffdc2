"""The schema: which keys each section takes, how each is checked, and the rules that
span keys and services (one runtime, one listen address per service, dependencies that
exist and form no cycle). ``build_config`` reports every fault of a file at once.

Two shapes of service entry load:

* the full form (``listen``/``backend`` plus ``container`` or ``command``), and
* the seed's ``services.yml`` form (``image``, ``port``, ``resources``, ``auto_start``,
  ``sleep_policy``): ``port`` is both the listen port and the backend's port, the
  container is the one named after the service and its address is read from Docker.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import socket
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, get_args

from ..core.states import SleepAction
from ..errors import ConfigError
from . import checks as check
from .checks import Check, Problems, describe, nested, section
from .model import (
    LOCAL_ENGINE,
    Address,
    AdminConfig,
    Config,
    DiscoveryConfig,
    EngineConfig,
    FastPath,
    HttpSettings,
    IdleConnections,
    KeyPath,
    LogConfig,
    LogFormat,
    LogLevel,
    McpConfig,
    McpMode,
    Mode,
    PredictionConfig,
    Priority,
    Probe,
    Readiness,
    ReclaimMethod,
    Replicas,
    Resources,
    RuntimeKind,
    ServiceConfig,
    ShutdownBackends,
    ShutdownConfig,
    SleepPolicy,
    WakeOn,
)

_T = TypeVar("_T")
DEFAULT_POLICY = SleepPolicy()
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

SLEEP_FIELDS: dict[str, Check] = {
    "enabled": check.boolean,
    "idle_timeout": check.positive_seconds,
    "min_sleep_time": check.seconds,
    "priority": check.choice(*get_args(Priority)),
    "action": check.enum_choice(SleepAction),
    "stop_after": check.positive_seconds,
    "hibernate_after": check.seconds,
    "reclaim": check.choice(*get_args(ReclaimMethod)),
    "prefetch": check.boolean,
    "memory_reservation": check.size,
    "keep_awake": check.windows,
    "asleep_windows": check.windows,
    "predict": check.predict,
}

_READINESS_FIELDS: dict[str, Check] = {
    "tcp": check.boolean,
    "http": check.text,
    "interval": check.positive_seconds,
}

_RESOURCE_FIELDS: dict[str, Check] = {
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

_ENGINE_FIELDS: dict[str, Check] = {
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


_REPLICA_FIELDS: dict[str, Check] = {
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

_ADMIN_FIELDS: dict[str, Check] = {
    "listen": check.address,
    "token_file": check.text,
    "protect_reads": check.boolean,
}
_LOG_FIELDS: dict[str, Check] = {
    "level": check.choice(*get_args(LogLevel)),
    "format": check.choice(*get_args(LogFormat)),
}
_DISCOVERY_FIELDS: dict[str, Check] = {
    "docker_labels": check.boolean,
    "allowed_listen": check.listen_ranges,
    "interval": check.positive_seconds,
    "engines": check.names,
}
_SHUTDOWN_FIELDS: dict[str, Check] = {
    "grace": check.seconds,
    "backends": check.choice(*get_args(ShutdownBackends)),
}
_PREDICTION_FIELDS: dict[str, Check] = {
    "state_file": lambda v: None if v is None else check.text(v),
    "timezone": check.zone,
    "save_interval": check.positive_seconds,
}
_MCP_FIELDS: dict[str, Check] = {
    "state_file": lambda v: None if v is None else check.text(v),
    "max_sessions": check.int_between(1, 1_000_000),
    "sessions_per_client": check.int_between(1, 1_000_000),
}
_TOP_FIELDS: dict[str, Check] = {
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


def parse_sleep_policy(
    data: Any, path: KeyPath, problems: Problems, base: SleepPolicy = DEFAULT_POLICY
) -> SleepPolicy:
    values = section(data, path, SLEEP_FIELDS, problems) or {}
    policy: SleepPolicy = replace(base, values)
    for key, why in policy_faults(policy):
        problems.add((*path, key), why)
    return policy


NOT_FOR_REPLICAS = (
    "keep_awake, asleep_windows and predict are not for a service with replicas "
    "(its replicas follow the load)"
)


def predicts(policy: SleepPolicy) -> bool:
    """Whether the policy wakes ahead or by schedule (windows, arrivals, chains)."""
    predict = policy.predict
    return bool(policy.keep_awake or policy.asleep_windows or predict.arrivals or predict.chains)


def policy_faults(policy: SleepPolicy) -> list[tuple[str, str]]:
    """(key, why) for each rule across a sleep policy's keys."""
    faults = []
    if policy.stop_after is not None and policy.action is SleepAction.STOP:
        faults.append(
            (
                "stop_after",
                "stop_after turns a paused backend into a stopped one; it needs action 'pause'",
            )
        )
    if policy.hibernate_after is not None and policy.action is SleepAction.STOP:
        faults.append(
            (
                "hibernate_after",
                "hibernate_after gives a paused backend's memory back; it needs action 'pause' "
                "or 'hibernate'",
            )
        )
    return faults


def combination_faults(http: HttpSettings, sleep: SleepPolicy) -> list[tuple[KeyPath, str]]:
    """(key path under the service, why) for each rule across a service's own keys: the
    file and every live change (API, a named policy's edit) are held to the same ones."""
    faults: list[tuple[KeyPath, str]] = [
        (("sleep_policy", key), why) for key, why in policy_faults(sleep)
    ]
    if http.idle_connections == "allow-sleep" and sleep.action is SleepAction.STOP:
        faults.append(
            (
                ("http", "idle_connections"),
                "allow-sleep keeps connections open under a sleeping backend; "
                "sleep action 'stop' would cut them: use action 'pause'",
            )
        )
    return faults


def service_policy(
    data: Any,
    path: KeyPath,
    problems: Problems,
    policies: Mapping[str, SleepPolicy],
    base: SleepPolicy = DEFAULT_POLICY,
) -> tuple[SleepPolicy, str | None, dict[str, Any]]:
    """A service's sleep_policy: its own keys, or ``use: NAME`` plus keys that win over it."""
    if not (isinstance(data, dict) and "use" in data):
        return parse_sleep_policy(data, path, problems, base), None, {}
    name = data["use"]
    named = policies.get(name) if isinstance(name, str) else None
    if named is None:
        known = ", ".join(sorted(policies)) or "none"
        problems.add((*path, "use"), f"no policy named {describe(name)}; defined: {known}")
        return base, None, {}
    overrides = {k: v for k, v in data.items() if k != "use"}
    policy = parse_sleep_policy(overrides, path, problems, named)
    # Kept as given (the form they are validated in), so a later change of the named
    # policy leaves them winning and a live edit can merge them with its own raw keys
    # and validate the whole again: parsed windows or predict settings are no valid input.
    return policy, name, overrides


def _parse_policies(data: Any, problems: Problems) -> dict[str, SleepPolicy]:
    if not isinstance(data, dict):
        problems.add(("policies",), f"expected a mapping of policy names, got {describe(data)}")
        return {}
    return {
        str(name): parse_sleep_policy(entry, ("policies", str(name)), problems)
        for name, entry in data.items()
    }


def replace(base: _T, values: Mapping[str, Any]) -> _T:
    return dataclasses.replace(base, **values)  # type: ignore[type-var]


_PROBE_FIELDS: dict[str, Check] = {
    "method": lambda v: None if v in ("*", "ANY", "any") else check.text(v).upper(),
    "path": check.url_path,
    "headers": check.header_conditions,
    "status": check.int_between(200, 599),
    "content_type": check.text,
    "body": lambda v: v if isinstance(v, str) else check.text(v),
    "stream": check.boolean,
}
_HTTP_FIELDS: dict[str, Check] = {
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


def _parse_http(data: Any, path: KeyPath, problems: Problems) -> HttpSettings:
    values = section(data, path, _HTTP_FIELDS, problems) or {}
    raw_probes = values.pop("probes", [])
    probes: list[Probe] = []
    if not isinstance(raw_probes, list):
        problems.add((*path, "probes"), f"expected a list of probes, got {describe(raw_probes)}")
        raw_probes = []
    for index, entry in enumerate(raw_probes):
        where = (*path, "probes", index)
        fields = section(entry, where, _PROBE_FIELDS, problems)
        if fields is None:
            continue
        if "path" not in fields:
            if isinstance(entry, dict) and "path" not in entry:
                problems.add(where, "needs 'path' (the path the health check asks for)")
            continue
        probes.append(replace(Probe(path=fields.pop("path")), fields))
    return replace(HttpSettings(probes=tuple(probes)), values)


def _parse_replicas(
    data: Any, path: KeyPath, problems: Problems, service: Mapping[str, Any]
) -> Replicas | None:
    """``replicas:``, checked against the service's own keys (``service``)."""
    values = section(data, path, _REPLICA_FIELDS, problems)
    if values is None or len(values) < len(data):
        return None  # a key's fault is named: the rest would only add noise
    containers: tuple[str, ...] = values.get("containers", ())
    count = values.get("count", len(containers))
    before = len(problems.items)
    compose = values.get("compose_service")
    if compose is not None:
        clash = [k for k in ("count", "containers") if k in values] + [
            k for k in ("container", "command", "backend") if k in service
        ]
        if clash:
            problems.add(
                path,
                f"compose_service finds its containers (each at its own address, on "
                f"replicas.port): drop {', '.join(repr(k) for k in clash)}",
            )
        if "port" not in values:
            problems.add(path, "needs 'port' (where each compose container's server listens)")
        count = 0
    elif "port" in values or "compose_project" in values:
        key = "port" if "port" in values else "compose_project"
        problems.add((*path, key), "is for compose_service replicas only")
    elif containers:
        if "count" in values and count != len(containers):
            problems.add((*path, "count"), f"is {count} but 'containers' names {len(containers)}")
        if "container" in service or "command" in service:
            problems.add(path, "'containers' replaces the service's 'container'/'command'")
    elif service.get("command") is not None:
        if "count" not in values:
            problems.add(path, "needs 'count' (how many copies of the command)")
        placeholder = any("{port}" in arg for arg in service["command"]) or any(
            "{port}" in value for value in service.get("env", {}).values()
        )
        if count > 1 and not placeholder:
            problems.add(
                path,
                "each replica listens on its own port: put {port} in 'command' or 'env' "
                "(replica i gets the backend's port + i)",
            )
    elif "container" in service:
        problems.add(path, "replicas of containers are listed in 'containers', one each")
    elif "count" not in values:
        problems.add(path, "needs 'containers' (docker) or 'count' with a 'command'")
    else:
        problems.add(
            path, "'count' copies need a 'command' (containers are listed in 'containers')"
        )
    most = values.get("max", count)
    if "max" in values and most > count and compose is None:
        problems.add((*path, "max"), f"is {most}, past the {count} replica(s) there are")
    if values.get("min", 0) > most and (compose is None or "max" in values):
        problems.add((*path, "min"), f"is {values['min']}, past 'max' ({most})")
    if len(problems.items) > before or (count == 0 and compose is None):
        return None
    named = {
        "min": "minimum",
        "max": "maximum",
        "target_inflight": "target_inflight",
        "compose_service": "compose_service",
        "compose_project": "compose_project",
        "health_interval": "health_interval",
    }
    return replace(
        Replicas(count=count, containers=containers),
        {named[key]: value for key, value in values.items() if key in named},
    )


def _parse_engines(data: Any, problems: Problems) -> dict[str, EngineConfig]:
    if not isinstance(data, dict):
        problems.add(("engines",), f"expected a mapping of engine names, got {describe(data)}")
        return {}
    engines: dict[str, EngineConfig] = {}
    for name, entry in data.items():
        path: KeyPath = ("engines", str(name))
        values = section(entry, path, _ENGINE_FIELDS, problems)
        if values is None:
            continue
        host = values.get("host")
        if host is None:
            if isinstance(entry, dict) and "host" not in entry:
                problems.add(path, "needs 'host' (unix:///path/docker.sock or tcp://HOST:PORT)")
            continue
        if not host.startswith(("unix://", "tcp://")):
            problems.add((*path, "host"), f"expected unix:///path or tcp://HOST:PORT, got {host!r}")
            continue
        if "cert_path" in values and not host.startswith("tcp://"):
            problems.add((*path, "cert_path"), "TLS certificates are for a tcp:// host")
            continue
        engines[str(name)] = replace(EngineConfig(name=str(name), host=host), values)
    return engines


def _check_engines(
    services: Mapping[str, ServiceConfig], engines: Mapping[str, EngineConfig], problems: Problems
) -> None:
    known = {LOCAL_ENGINE, *engines}
    swarm: dict[tuple[str, str], str] = {}
    for cfg in services.values():
        path: KeyPath = ("services", cfg.name, "engine")
        if cfg.runtime == "process" and cfg.engine != LOCAL_ENGINE:
            problems.add(path, "an engine is for containers; a command runs here")
        elif cfg.engine not in known:
            problems.add(path, f"no engine {cfg.engine!r}; engines: {', '.join(sorted(known))}")
        if cfg.swarm_service is not None:
            # Each would scale it on its own idle clock: one would sleep it under the other.
            owner = swarm.setdefault((cfg.engine, cfg.swarm_service), cfg.name)
            if owner != cfg.name:
                problems.add(
                    ("services", cfg.name, "swarm_service"),
                    f"Swarm service {cfg.swarm_service!r} is already service {owner!r}'s: "
                    "one wakeproxy service per Swarm service",
                )


def _parse_readiness(data: Any, path: KeyPath, problems: Problems) -> Readiness:
    values = section(data, path, _READINESS_FIELDS, problems) or {}
    if values.get("http") is not None:
        if not str(values["http"]).startswith("/"):
            problems.add(
                (*path, "http"), f"expected a path starting with /, got {values['http']!r}"
            )
        if values.get("tcp") is False:
            problems.add(path, "http readiness also needs the tcp connect: drop 'tcp: false'")
    return replace(Readiness(), values)


@dataclasses.dataclass(frozen=True, slots=True)
class Sketch:
    """What the checks across services need of one, kept for a service with faults of
    its own too: every fault of a file is reported in one pass."""

    name: str
    listen: Address | None
    backend: Address | None
    depends_on: tuple[str, ...]


def parse_service(
    name: Any,
    data: Any,
    problems: Problems,
    policies: Mapping[str, SleepPolicy],
    sketches: dict[str, Sketch] | None = None,
) -> ServiceConfig | None:
    path: KeyPath = ("services", str(name))
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.add(
            path,
            "a service name is 1-63 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, got {describe(name)}",
        )
        return None
    values = section(data, path, SERVICE_FIELDS, problems)
    if values is None:
        return None
    if sketches is not None:
        port = values.get("port")
        seed_listen = Address("0.0.0.0", port) if isinstance(port, int) else None
        sketches[name] = Sketch(
            name,
            values.get("listen", seed_listen),
            values.get("backend"),
            tuple(values.get("depends_on", ())),
        )
    # A key given with a bad value was reported already: do not also call it missing.
    given = set(data)
    before = len(problems.items)

    sleep, policy_name, overrides = service_policy(
        values.pop("sleep_policy", {}), (*path, "sleep_policy"), problems, policies
    )
    readiness = _parse_readiness(values.pop("readiness", {}), (*path, "readiness"), problems)
    res_values = section(
        values.pop("resources", {}), (*path, "resources"), _RESOURCE_FIELDS, problems
    )
    resources = replace(Resources(), res_values or {})
    replicas = _service_replicas(data, values, path, problems, given, sleep)
    backend_of = _service_backend(name, data, values, path, problems, given, sleep, replicas)
    if values.get("mode") is None and backend_of.seed_form:
        # The seed's services are MCP servers behind the gateway: probes must not wake them.
        values["mode"] = "http"
    raw_http = values.pop("http", None)
    if raw_http is not None and values.get("mode") != "http":
        problems.add((*path, "http"), "http settings need 'mode: http'")
    http = _parse_http(raw_http or {}, (*path, "http"), problems)
    for where, why in combination_faults(http, sleep):
        if where[0] != "sleep_policy":  # the policy's own rules were checked with it
            problems.add((*path, *where), why)
    if len(problems.items) > before or backend_of.listen is None:
        return None
    return ServiceConfig(
        name=name,
        listen=backend_of.listen,
        backend=backend_of.backend,
        backend_port=backend_of.backend_port,
        runtime=backend_of.runtime,
        container=backend_of.container,
        command=backend_of.command,
        sleep_policy=sleep,
        policy=policy_name,
        policy_overrides=overrides,
        readiness=readiness,
        resources=resources,
        http=http,
        replicas=replicas,
        **values,
    )


def _service_replicas(
    data: Any,
    values: dict[str, Any],
    path: KeyPath,
    problems: Problems,
    given: set[str],
    sleep: SleepPolicy,
) -> Replicas | None:
    """A service's ``replicas`` block; the keys it stands for count as given."""
    if "replicas" not in values:
        return None
    replicas = _parse_replicas(
        values.pop("replicas"), (*path, "replicas"), problems, {**data, **values}
    )
    if replicas is None or replicas.containers or replicas.discovered:
        given.add("container")  # given there (or its faults named there already)
    if replicas is None or replicas.discovered:
        given.add("backend")  # compose containers: each at its own address
    if predicts(sleep):
        problems.add((*path, "sleep_policy"), NOT_FOR_REPLICAS)
    return replicas


@dataclasses.dataclass(frozen=True)
class _BackendOf:
    """Where a service's backend is, and what runs it (``parse_service``'s part)."""

    runtime: RuntimeKind
    container: str | None
    command: tuple[str, ...] | None
    listen: Address | None
    backend: Address | None
    backend_port: int
    seed_form: bool


def _service_backend(
    name: str,
    data: Any,
    values: dict[str, Any],
    path: KeyPath,
    problems: Problems,
    given: set[str],
    sleep: SleepPolicy,
    replicas: Replicas | None,
) -> _BackendOf:
    """The runtime (container, command or Swarm service) and the addresses, with the
    rules that tie them together (the seed's ``port`` form among them)."""
    swarm_service = values.get("swarm_service")
    if swarm_service is not None:
        _check_swarm_service(path, problems, given, sleep)
    elif "swarm_replicas" in values:
        problems.add((*path, "swarm_replicas"), "is for a 'swarm_service'")
    container = values.pop("container", None)
    command = values.pop("command", None)
    if replicas is not None and replicas.containers:
        container = replicas.containers[0]
    port = values.pop("port", None)
    listen = values.pop("listen", None)
    backend = values.pop("backend", None)
    seed_form = container is None and command is None and port is not None

    if container is not None and command is not None:
        problems.add(
            path, "set either 'container' (docker runtime) or 'command' (process runtime), not both"
        )
    elif not given & {"container", "command", "port"}:
        problems.add(path, "needs 'container' (docker runtime) or 'command' (process runtime)")
    runtime: RuntimeKind = (
        "process" if command is not None else "swarm" if swarm_service is not None else "docker"
    )
    if seed_form and swarm_service is None:
        container = name
    if runtime == "process" and port is not None:
        problems.add(
            (*path, "port"),
            "'port' is the seed form's shorthand for a container on its own address; "
            "a command needs 'listen' and 'backend'",
        )

    if listen is None:
        if port is None and not given & {"listen", "port"}:
            problems.add(path, "needs 'listen' (the proxy's address for this service)")
        elif port is not None:
            # The seed form serves other containers on a compose network: listen on all
            # addresses, on the port the gateway was told.
            listen = Address("0.0.0.0", port)
    if backend is None and "backend" not in given and (runtime == "process" or port is None):
        problems.add(path, "needs 'backend' (where the service's own server listens)")
    backend_port = backend.port if backend is not None else (port or 0)
    if replicas is not None and replicas.discovered:
        backend_port = data["replicas"]["port"]
    return _BackendOf(runtime, container, command, listen, backend, backend_port, seed_form)


def _check_swarm_service(
    path: KeyPath, problems: Problems, given: set[str], sleep: SleepPolicy
) -> None:
    if given & {"container", "command", "replicas"}:
        problems.add(
            path, "set one of 'swarm_service', 'container' or 'command' (and no 'replicas')"
        )
    if sleep.action is SleepAction.HIBERNATE or sleep.hibernate_after is not None:
        problems.add(
            (*path, "sleep_policy", "action"),
            "a Swarm service sleeps by scaling to 0 (action: stop) or by pausing its "
            "tasks on this engine's node (action: pause); it does not hibernate",
        )
    given.add("container")  # the swarm service is this one's backend
    if "backend" not in given:
        problems.add(path, "needs 'backend' (where the Swarm service's tasks listen)")
        given.add("backend")


def build_config(
    data: Any, *, source: str | None = None, lines: Mapping[KeyPath, int] | None = None
) -> Config:
    """Validate already-parsed data; raise ConfigError listing every fault."""
    problems = Problems(source, lines or {})
    if data is None:
        data = {}
    top = section(data, (), _TOP_FIELDS, problems)
    if top is None:
        raise ConfigError(problems.items)

    admin_values = section(top.get("admin", {}), ("admin",), _ADMIN_FIELDS, problems) or {}
    log_values = section(top.get("log", {}), ("log",), _LOG_FIELDS, problems) or {}
    shutdown_values = (
        section(top.get("shutdown", {}), ("shutdown",), _SHUTDOWN_FIELDS, problems) or {}
    )
    discovery_values = (
        section(top.get("discovery", {}), ("discovery",), _DISCOVERY_FIELDS, problems) or {}
    )
    prediction_values = (
        section(top.get("prediction", {}), ("prediction",), _PREDICTION_FIELDS, problems) or {}
    )

    mcp_values = section(top.get("mcp", {}), ("mcp",), _MCP_FIELDS, problems) or {}

    policies = _parse_policies(top.get("policies", {}), problems)
    engines = _parse_engines(top.get("engines", {}), problems)
    services: dict[str, ServiceConfig] = {}
    sketches: dict[str, Sketch] = {}
    raw_services = top.get("services")
    if raw_services is None and discovery_values.get("docker_labels"):
        pass  # labelled containers are the services
    elif raw_services is None:
        problems.add(("services",), "missing: list the services to proxy under 'services:'")
    elif not isinstance(raw_services, dict):
        problems.add(
            ("services",), f"expected a mapping of service names, got {describe(raw_services)}"
        )
    else:
        for name, entry in raw_services.items():
            service = parse_service(name, entry, problems, policies, sketches)
            if service is not None:
                services[service.name] = service

    admin = replace(AdminConfig(), admin_values)
    # Across services, those with faults of their own included: one pass, every fault.
    _check_listeners(sketches, admin, problems)
    _check_dependencies(sketches, problems)
    _check_engines(services, engines, problems)
    known = {LOCAL_ENGINE, *engines}
    for name in discovery_values.get("engines") or ():
        if name not in known:
            problems.add(
                ("discovery", "engines"),
                f"no engine {name!r}; engines: {', '.join(sorted(known))}",
            )
    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        services=services,
        engines=engines,
        policies=policies,
        admin=admin,
        log=replace(LogConfig(), log_values),
        discovery=replace(DiscoveryConfig(), discovery_values),
        shutdown=replace(ShutdownConfig(), shutdown_values),
        prediction=replace(PredictionConfig(), prediction_values),
        mcp=replace(McpConfig(), mcp_values),
        source=source,
    )


def _check_dependencies(services: Mapping[str, Sketch], problems: Problems) -> None:
    for name, message in dependency_faults(services):
        problems.add(("services", name, "depends_on"), message)


class _Dependent(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def depends_on(self) -> tuple[str, ...]: ...


def dependency_faults(services: Mapping[str, _Dependent]) -> list[tuple[str, str]]:
    """(service, why) for each dependency that does not exist or closes a cycle."""
    faults: list[tuple[str, str]] = []
    for service in services.values():
        for name in service.depends_on:
            if name not in services:
                known = ", ".join(sorted(services))
                faults.append((service.name, f"no service named {name!r}; services: {known}"))
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done" or name not in services:
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            faults.append((path[-1], f"a dependency cycle: {cycle}"))
            return
        state[name] = "visiting"
        for dependency in services[name].depends_on:
            visit(dependency, [*path, name])
        state[name] = "done"

    for name in services:
        visit(name, [])
    return faults


@functools.cache
def _bound(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a listener on ``host`` binds: localhost is what the resolver says
    (the hosts file: 127.0.0.1, and ::1 where it lists it), as it is for the listener."""
    if host == "localhost":
        try:
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            found = []
        addresses = {ipaddress.ip_address(str(info[4][0])) for info in found}
        return sorted(addresses, key=str) or [ipaddress.ip_address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return []


def overlaps(a: Address, b: Address) -> bool:
    """Whether two listen addresses take the same port: the same address, or one is
    the wildcard of the other's family (Linux refuses 127.0.0.1:P beside 0.0.0.0:P even
    with SO_REUSEADDR; asyncio binds IPv6 sockets v6-only, so :: takes only IPv6)."""
    if a.port != b.port:
        return False
    for x in _bound(a.host):
        for y in _bound(b.host):
            if x == y or (x.version == y.version and (x.is_unspecified or y.is_unspecified)):
                return True
    return False


def _reaches(backend: Address, listen: Address) -> bool:
    """Whether connecting to ``backend`` would reach the proxy's own ``listen``: the
    same address, or a loopback one on a wildcard listener (loopback is this network
    namespace's own; another host's address on a wildcard listener is not)."""
    if backend.port != listen.port:
        return False
    for x in _bound(backend.host):
        for y in _bound(listen.host):
            local = x.is_loopback or x.is_unspecified
            if x == y or (y.is_unspecified and x.version == y.version and local):
                return True
    return False


def _check_listeners(
    services: Mapping[str, Sketch], admin: AdminConfig, problems: Problems
) -> None:
    taken: list[tuple[Address, str]] = [(admin.listen, "admin.listen")]
    for service in services.values():
        if service.listen is None:
            continue
        for address, owner in taken:
            if overlaps(service.listen, address):
                same = "" if address == service.listen else f" ({address}: the same port)"
                problems.add(
                    ("services", service.name, "listen"),
                    f"{service.listen} is already used by {owner}{same}",
                )
                break
        taken.append((service.listen, f"services.{service.name}.listen"))
        if service.backend is not None and _reaches(service.backend, service.listen):
            problems.add(
                ("services", service.name, "backend"),
                f"the backend {service.backend} is the proxy's own listen address "
                f"({service.listen}): it would connect to itself",
            )
