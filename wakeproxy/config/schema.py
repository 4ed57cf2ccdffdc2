"""The schema: a config's sections parsed with their key tables (config/fields.py), the
sleep policies (config/policies.py), and the rules that span keys and services (one
runtime, one listen address per service, dependencies that exist and form no cycle:
config/crosscheck.py). ``build_config`` reports every fault of a file at once.

Two shapes of service entry load:

* the full form (``listen``/``backend`` plus ``container`` or ``command``), and
* the seed's ``services.yml`` form (``image``, ``port``, ``resources``, ``auto_start``,
  ``sleep_policy``): ``port`` is both the listen port and the backend's port, the
  container is the one named after the service and its address is read from Docker.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ..core.states import SleepAction
from ..errors import ConfigError
from .checks import Problems, describe, section
from .crosscheck import dependency_faults, listener_faults
from .fields import (
    ADMIN_FIELDS,
    DISCOVERY_FIELDS,
    ENGINE_FIELDS,
    HTTP_FIELDS,
    LOG_FIELDS,
    MCP_FIELDS,
    PREDICTION_FIELDS,
    PROBE_FIELDS,
    READINESS_FIELDS,
    REPLICA_FIELDS,
    RESOURCE_FIELDS,
    SERVICE_FIELDS,
    SHUTDOWN_FIELDS,
    TOP_FIELDS,
    replace,
)
from .model import (
    LOCAL_ENGINE,
    Address,
    AdminConfig,
    Config,
    DiscoveryConfig,
    EngineConfig,
    HttpSettings,
    KeyPath,
    LogConfig,
    McpConfig,
    PredictionConfig,
    Probe,
    Readiness,
    Replicas,
    Resources,
    RuntimeKind,
    ServiceConfig,
    ShutdownConfig,
    SleepPolicy,
)
from .policies import (
    NOT_FOR_REPLICAS,
    combination_faults,
    parse_policies,
    predicts,
    service_policy,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _parse_http(data: Any, path: KeyPath, problems: Problems) -> HttpSettings:
    values = section(data, path, HTTP_FIELDS, problems) or {}
    raw_probes = values.pop("probes", [])
    probes: list[Probe] = []
    if not isinstance(raw_probes, list):
        problems.add((*path, "probes"), f"expected a list of probes, got {describe(raw_probes)}")
        raw_probes = []
    for index, entry in enumerate(raw_probes):
        where = (*path, "probes", index)
        fields = section(entry, where, PROBE_FIELDS, problems)
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
    values = section(data, path, REPLICA_FIELDS, problems)
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
        values = section(entry, path, ENGINE_FIELDS, problems)
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
    values = section(data, path, READINESS_FIELDS, problems) or {}
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
        values.pop("resources", {}), (*path, "resources"), RESOURCE_FIELDS, problems
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
    top = section(data, (), TOP_FIELDS, problems)
    if top is None:
        raise ConfigError(problems.items)

    admin_values = section(top.get("admin", {}), ("admin",), ADMIN_FIELDS, problems) or {}
    log_values = section(top.get("log", {}), ("log",), LOG_FIELDS, problems) or {}
    shutdown_values = (
        section(top.get("shutdown", {}), ("shutdown",), SHUTDOWN_FIELDS, problems) or {}
    )
    discovery_values = (
        section(top.get("discovery", {}), ("discovery",), DISCOVERY_FIELDS, problems) or {}
    )
    prediction_values = (
        section(top.get("prediction", {}), ("prediction",), PREDICTION_FIELDS, problems) or {}
    )

    mcp_values = section(top.get("mcp", {}), ("mcp",), MCP_FIELDS, problems) or {}

    policies = parse_policies(top.get("policies", {}), problems)
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
    for name, key, why in listener_faults(sketches.values(), admin.listen):
        problems.add(("services", name, key), why)
    for name, why in dependency_faults(sketches):
        problems.add(("services", name, "depends_on"), why)
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
