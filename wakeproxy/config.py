"""Configuration: YAML in, frozen dataclasses out.

Every key is checked: an unknown key, a wrong type or a bad value is reported with the
file, the line and the dotted key path (``config.yaml:14: services.web.backlog: ...``),
and all faults of a file are reported together rather than the first one alone.

The validators work on plain Python values plus an optional map of key path -> line,
so the same code (and the same error texts) can later check a JSON body that has no
lines: the location then is the key path alone.

Two shapes of service entry load:

* the full form (``listen``/``backend`` plus ``container`` or ``command``), and
* the seed's ``services.yml`` form (``image``, ``port``, ``resources``, ``auto_start``,
  ``sleep_policy``): ``port`` is both the listen port and the backend's port, the
  container is the one named after the service and its address is read from Docker.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, NeedsReload

KeyPath = tuple[str | int, ...]
_T = TypeVar("_T")

DEFAULT_CONFIG_PATH = "/etc/wakeproxy/config.yaml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SleepPolicy:
    enabled: bool = True
    idle_timeout: float = 300.0
    min_sleep_time: float = 0.0
    priority: str = "normal"
    action: str = "pause"
    stop_after: float | None = None
    memory_reservation: int | None = None

    @property
    def sleeps(self) -> bool:
        """Whether the policy ever puts the backend to sleep (high priority never does)."""
        return self.enabled and self.priority != "high"

    @property
    def idle_delay(self) -> float:
        """Seconds from the last activity to the sleep deadline."""
        return max(self.idle_timeout, self.min_sleep_time)


@dataclass(frozen=True, slots=True)
class Readiness:
    """How to tell that a freshly started backend serves (an unpaused one is ready at once)."""

    tcp: bool = True
    http: str | None = None
    interval: float = 0.01


@dataclass(frozen=True, slots=True)
class Probe:
    """A health check the proxy answers itself while the backend sleeps (mode http).

    Matches on the method (None: any), the path (query ignored) and header conditions:
    name -> text the header must contain, or ``!text`` it must not contain (an absent
    header contains nothing). A ``stream`` answer stays open as an event stream until
    the client goes away; otherwise the answer carries ``body`` and the connection closes.
    """

    path: str
    method: str | None = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 200
    content_type: str = "text/plain"
    body: str = ""
    stream: bool = False


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The per-service ``http:`` block (mode http)."""

    sse_path: str = "/sse"
    header_timeout: float = 10.0
    inflight_grace: float = 60.0
    idle_connections: str = "keep-awake"
    forwarded_headers: bool = False
    default_probe: bool = True
    probes: tuple[Probe, ...] = ()
    waiting_page: bool = False

    @property
    def matchers(self) -> tuple[Probe, ...]:
        """The configured probes, then the default one (the gateway's SSE check) if on."""
        if not self.default_probe:
            return self.probes
        gateway = Probe(
            path=self.sse_path,
            headers={"accept": "!text/event-stream"},
            content_type="text/event-stream",
            stream=True,
        )
        return (*self.probes, gateway)


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float | None = None
    memory: int | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    listen: Address
    # None in the seed form: the host is read from Docker after every start.
    backend: Address | None
    backend_port: int
    runtime: str
    container: str | None = None
    command: tuple[str, ...] | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    mode: str = "tcp"
    http: HttpSettings = HttpSettings()
    wake_on: str = "connect"
    backlog: int = 4096
    connect_timeout: float = 5.0
    idle_connection_timeout: float = 3600.0
    connect_concurrency: int = 64
    sleep_policy: SleepPolicy = SleepPolicy()
    wake_timeout: float = 30.0
    max_held_connections: int = 1024
    # Open connections at most (0: no limit); past it a new one is refused at once.
    max_connections: int = 0
    readiness: Readiness = Readiness()
    auto_start: bool = False
    stop_timeout: float = 10.0
    image: str | None = None
    resources: Resources = Resources()
    # The named policy this service uses (sleep_policy: {use: NAME}) and the keys it
    # sets beside it, which win over the policy's.
    policy: str | None = None
    policy_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Services woken (and kept awake) before this one, and the group it wakes and sleeps with.
    depends_on: tuple[str, ...] = ()
    group: str | None = None
    # "config" (the YAML file) or "labels" (a labelled container, discovered).
    source: str = "config"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9000)
    # A file holding the bearer token for POST/PUT (WAKEPROXY_ADMIN_TOKEN wins over it).
    token_file: str | None = None
    # Also require the token for GET (metrics scrapers then need it too).
    protect_reads: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class ListenRange:
    """Addresses and ports a container label may ask the proxy to listen on."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    low: int
    high: int

    def allows(self, address: Address) -> bool:
        host = "127.0.0.1" if address.host == "localhost" else address.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return ip in self.network and self.low <= address.port <= self.high

    def __str__(self) -> str:
        ports = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"{self.network}:{ports}"


# Unprivileged ports on any address: discovery is off by default, and whoever turns
# it on can narrow this with discovery.allowed_listen.
DEFAULT_ALLOWED_LISTEN = (
    ListenRange(ipaddress.ip_network("0.0.0.0/0"), 1024, 65535),
    ListenRange(ipaddress.ip_network("::/0"), 1024, 65535),
)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    # Containers labelled wakeproxy.enable=true become services (off: whoever can create
    # containers could otherwise open listeners on the proxy).
    docker_labels: bool = False
    allowed_listen: tuple[ListenRange, ...] = DEFAULT_ALLOWED_LISTEN
    # Seconds between full re-reads of the labelled containers (the event stream is the
    # fast path; this is the safety net).
    interval: float = 30.0


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    # Seconds open connections may take to finish after SIGTERM before they are closed.
    grace: float = 10.0
    # "as-is": backends stay as they are; "wake": sleeping containers are woken on the
    # way out, so they serve without the proxy.
    backends: str = "as-is"


@dataclass(frozen=True, slots=True)
class Config:
    services: Mapping[str, ServiceConfig]
    policies: Mapping[str, SleepPolicy] = field(default_factory=dict)
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    source: str | None = None


class _Bad(ValueError):
    """A value that fails its check; the message says what was expected."""


class _Problems:
    """Collects faults with their location; raised together as one ConfigError."""

    def __init__(
        self,
        source: str | None,
        lines: Mapping[KeyPath, int],
        where: Callable[[KeyPath], str | None] | None = None,
    ) -> None:
        self.source = source
        self.lines = lines
        # Names a location other than a key path (a container label), when it can.
        self.where = where
        self.items: list[str] = []

    def add(self, path: KeyPath, message: str) -> None:
        named = self.where(path) if self.where is not None else None
        if named is not None:
            self.items.append(f"{named}: {message}")
            return
        dotted = ".".join(str(p) for p in path) or "(top level)"
        line = self._line_of(path)
        if self.source is not None and line is not None:
            self.items.append(f"{self.source}:{line}: {dotted}: {message}")
        elif self.source is not None:
            self.items.append(f"{self.source}: {dotted}: {message}")
        else:
            self.items.append(f"{dotted}: {message}")

    def _line_of(self, path: KeyPath) -> int | None:
        # An error inside a value that has no line of its own (a flow list, a merged
        # key) points at the nearest enclosing key that has one.
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


# ---- scalar checks: each takes the raw value and returns the typed one or raises _Bad


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Bad(f"expected true or false, got {_describe(value)}")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"expected a number, got {_describe(value)}")
    return float(value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"expected a duration in seconds (a number), got {_describe(value)}")
    if value < 0 or value != value or value == float("inf"):
        raise _Bad(f"expected a duration of 0 seconds or more, got {_describe(value)}")
    return float(value)


def _positive_seconds(value: Any) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise _Bad(f"expected a duration above 0 seconds, got {_describe(value)}")
    return seconds


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected a whole number, got {_describe(value)}")
        if not low <= value <= high:
            raise _Bad(f"expected a whole number from {low} to {high}, got {value}")
        return value

    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            listed = ", ".join(options)
            raise _Bad(f"expected one of {listed}, got {_describe(value)}")
        return str(value)

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty string, got {_describe(value)}")
    return value


def _size(value: Any) -> int:
    """Bytes from ``256MB`` (10^6), ``256MiB`` (2^20), ``1.5G`` or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            return int(float(match.group(1)) * _SIZE_UNITS[unit])
    raise _Bad(f"expected a size such as 256MB or 256MiB, got {_describe(value)}")


def _port(value: Any) -> int:
    return _int_between(1, 65535)(value)


def _address(value: Any) -> Address:
    """``host:port``, ``[v6]:port``; the host must be an IP address or ``localhost``."""
    if not isinstance(value, str):
        raise _Bad(f"expected host:port such as 127.0.0.1:8080, got {_describe(value)}")
    text = value.strip()
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise _Bad(f"expected host:port such as 127.0.0.1:8080, got {_describe(value)}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise _Bad(f"{host!r} is not an IP address or host name") from None
    if not 1 <= port <= 65535:
        raise _Bad(f"port must be from 1 to 65535, got {port}")
    return Address(host, port)


def _command(value: Any) -> tuple[str, ...]:
    """A list of arguments, or one string split like a shell would (no shell runs it)."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise _Bad(f"cannot split the command: {exc}") from None
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        parts = list(value)
    else:
        raise _Bad(f"expected a list of strings or a command line, got {_describe(value)}")
    if not parts or not parts[0]:
        raise _Bad("the command is empty")
    return tuple(parts)


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Bad(f"expected a list of service names, got {_describe(value)}")
    return tuple(dict.fromkeys(value))


def _listen_range(value: Any) -> ListenRange:
    """``CIDR:PORT`` or ``CIDR:LOW-HIGH``; ``[v6-CIDR]:PORTS`` for IPv6; ``*`` for any port."""
    example = "such as 127.0.0.0/8:8000-8999 or [::1/128]:8080"
    if not isinstance(value, str):
        raise _Bad(f"expected an address range and ports {example}, got {_describe(value)}")
    match = re.fullmatch(r"\[([^\]]+)\]:(\S+)|([^:\[\]]+):(\S+)", value.strip())
    if not match:
        raise _Bad(f"expected an address range and ports {example}, got {_describe(value)}")
    host, ports = match.group(1) or match.group(3), match.group(2) or match.group(4)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise _Bad(f"{host!r} is not an address or address range (CIDR)") from None
    low_text, _, high_text = ("1-65535" if ports == "*" else ports).partition("-")
    try:
        low, high = _port(int(low_text)), _port(int(high_text or low_text))
    except (ValueError, _Bad):
        raise _Bad(f"expected ports N or N-M from 1 to 65535, got {ports!r}") from None
    if low > high:
        raise _Bad(f"the port range {ports!r} runs backwards")
    return ListenRange(network, low, high)


def _listen_ranges(value: Any) -> tuple[ListenRange, ...]:
    if not isinstance(value, list):
        raise _Bad(f"expected a list of address ranges with ports, got {_describe(value)}")
    return tuple(_listen_range(item) for item in value)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping of names to strings, got {_describe(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, dict | list) or item is None:
            raise _Bad(f"expected NAME: value pairs, got {_describe(key)}: {_describe(item)}")
        # YAML turns `DEBUG: true` into a bool; the process sees the text it would in a shell.
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


# ---- sections: a mapping checked key by key against a table of validators

Check = Callable[[Any], Any]


def _nested(value: Any) -> Any:
    """A sub-section: passed through here and checked by its own parser."""
    return value


def _section(
    data: Any, path: KeyPath, fields: Mapping[str, Check], problems: _Problems
) -> dict[str, Any] | None:
    """Check each key of ``data`` with its validator; None when ``data`` is no mapping."""
    if not isinstance(data, dict):
        problems.add(path, f"expected a mapping of settings, got {_describe(data)}")
        return None
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = fields.get(key) if isinstance(key, str) else None
        if check is None:
            problems.add((*path, str(key)), _unknown_key(key, fields))
            continue
        try:
            out[key] = check(value)
        except _Bad as exc:
            problems.add((*path, key), str(exc))
    return out


def _unknown_key(key: Any, fields: Mapping[str, Check]) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(sorted(fields))
    return f"unknown key {key!r}{hint}; known keys: {known}"


_SLEEP_FIELDS: dict[str, Check] = {
    "enabled": _bool,
    "idle_timeout": _positive_seconds,
    "min_sleep_time": _seconds,
    "priority": _choice("low", "normal", "high"),
    "action": _choice("pause", "stop"),
    "stop_after": _positive_seconds,
    "memory_reservation": _size,
}

_READINESS_FIELDS: dict[str, Check] = {
    "tcp": _bool,
    "http": _text,
    "interval": _positive_seconds,
}

_RESOURCE_FIELDS: dict[str, Check] = {
    # The seed writes cpu as a string ("0.25"); accept both.
    "cpu": lambda v: _number(float(v) if isinstance(v, str) and _is_float(v) else v),
    "memory": _size,
}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_SERVICE_FIELDS: dict[str, Check] = {
    "listen": _address,
    "backend": _address,
    "port": _port,
    "container": _text,
    "command": _command,
    "cwd": _text,
    "env": _env,
    "mode": _choice("tcp", "http"),
    "http": _nested,
    "wake_on": _choice("connect", "data"),
    "backlog": _int_between(1, 65535),
    "connect_timeout": _positive_seconds,
    "idle_connection_timeout": _seconds,
    "connect_concurrency": _int_between(1, 65535),
    "sleep_policy": _nested,
    "wake_timeout": _positive_seconds,
    "max_held_connections": _int_between(0, 1_000_000),
    "max_connections": _int_between(0, 10_000_000),
    "readiness": _nested,
    "auto_start": _bool,
    "stop_timeout": _seconds,
    "image": _text,
    "resources": _nested,
    "depends_on": _names,
    "group": _text,
}

_ADMIN_FIELDS: dict[str, Check] = {
    "listen": _address,
    "token_file": _text,
    "protect_reads": _bool,
}
_LOG_FIELDS: dict[str, Check] = {
    "level": _choice("debug", "info", "warning", "error"),
    "format": _choice("text", "json"),
}
_DISCOVERY_FIELDS: dict[str, Check] = {
    "docker_labels": _bool,
    "allowed_listen": _listen_ranges,
    "interval": _positive_seconds,
}
_SHUTDOWN_FIELDS: dict[str, Check] = {
    "grace": _seconds,
    "backends": _choice("as-is", "wake"),
}
_TOP_FIELDS: dict[str, Check] = {
    "shutdown": _nested,
    "discovery": _nested,
    "policies": _nested,
    "admin": _nested,
    "log": _nested,
    "services": _nested,
}


def parse_sleep_policy(
    data: Any, path: KeyPath, problems: _Problems, base: SleepPolicy = SleepPolicy()
) -> SleepPolicy:
    values = _section(data, path, _SLEEP_FIELDS, problems) or {}
    policy: SleepPolicy = _replace(base, values)
    if policy.stop_after is not None and policy.action == "stop":
        problems.add(
            (*path, "stop_after"),
            "stop_after turns a paused backend into a stopped one; it needs action 'pause'",
        )
    return policy


def _service_policy(
    data: Any,
    path: KeyPath,
    problems: _Problems,
    policies: Mapping[str, SleepPolicy],
    base: SleepPolicy = SleepPolicy(),
) -> tuple[SleepPolicy, str | None, dict[str, Any]]:
    """A service's sleep_policy: its own keys, or ``use: NAME`` plus keys that win over it."""
    if not (isinstance(data, dict) and "use" in data):
        return parse_sleep_policy(data, path, problems, base), None, {}
    name = data["use"]
    named = policies.get(name) if isinstance(name, str) else None
    if named is None:
        known = ", ".join(sorted(policies)) or "none"
        problems.add((*path, "use"), f"no policy named {_describe(name)}; defined: {known}")
        return base, None, {}
    overrides = {k: v for k, v in data.items() if k != "use"}
    policy = parse_sleep_policy(overrides, path, problems, named)
    # The typed overrides, kept so a later change of the named policy leaves them winning.
    checked = _section(overrides, path, _SLEEP_FIELDS, _Problems(None, {})) or {}
    return policy, name, checked


def _parse_policies(data: Any, problems: _Problems) -> dict[str, SleepPolicy]:
    if not isinstance(data, dict):
        problems.add(("policies",), f"expected a mapping of policy names, got {_describe(data)}")
        return {}
    return {
        str(name): parse_sleep_policy(entry, ("policies", str(name)), problems)
        for name, entry in data.items()
    }


def _replace(base: _T, values: Mapping[str, Any]) -> _T:
    return dataclasses.replace(base, **values)  # type: ignore[type-var]


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        raise _Bad(f"expected a path starting with / (no spaces), got {_describe(value)}")
    return value


def _header_conditions(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise _Bad(
            "expected header names mapped to text they contain (or !text they lack), "
            f"got {_describe(value)}"
        )
    return {k.lower(): v.lower() for k, v in value.items()}


_PROBE_FIELDS: dict[str, Check] = {
    "method": lambda v: None if v in ("*", "ANY", "any") else _text(v).upper(),
    "path": _path,
    "headers": _header_conditions,
    "status": _int_between(200, 599),
    "content_type": _text,
    "body": lambda v: v if isinstance(v, str) else _text(v),
    "stream": _bool,
}
_HTTP_FIELDS: dict[str, Check] = {
    "sse_path": _path,
    "header_timeout": _positive_seconds,
    "inflight_grace": _seconds,
    "idle_connections": _choice("keep-awake", "allow-sleep"),
    "forwarded_headers": _bool,
    "default_probe": _bool,
    "probes": _nested,
    "waiting_page": _bool,
}


def _parse_http(data: Any, path: KeyPath, problems: _Problems) -> HttpSettings:
    values = _section(data, path, _HTTP_FIELDS, problems) or {}
    raw_probes = values.pop("probes", [])
    probes: list[Probe] = []
    if not isinstance(raw_probes, list):
        problems.add((*path, "probes"), f"expected a list of probes, got {_describe(raw_probes)}")
        raw_probes = []
    for index, entry in enumerate(raw_probes):
        where = (*path, "probes", index)
        fields = _section(entry, where, _PROBE_FIELDS, problems)
        if fields is None:
            continue
        if "path" not in fields:
            if isinstance(entry, dict) and "path" not in entry:
                problems.add(where, "needs 'path' (the path the health check asks for)")
            continue
        probes.append(_replace(Probe(path=fields.pop("path")), fields))
    return _replace(HttpSettings(probes=tuple(probes)), values)


def _parse_readiness(data: Any, path: KeyPath, problems: _Problems) -> Readiness:
    values = _section(data, path, _READINESS_FIELDS, problems) or {}
    if values.get("http") is not None:
        if not str(values["http"]).startswith("/"):
            problems.add(
                (*path, "http"), f"expected a path starting with /, got {values['http']!r}"
            )
        if values.get("tcp") is False:
            problems.add(path, "http readiness also needs the tcp connect: drop 'tcp: false'")
    return _replace(Readiness(), values)


def _parse_service(
    name: Any, data: Any, problems: _Problems, policies: Mapping[str, SleepPolicy]
) -> ServiceConfig | None:
    path: KeyPath = ("services", str(name))
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.add(
            path,
            "a service name is 1-63 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, got {_describe(name)}",
        )
        return None
    values = _section(data, path, _SERVICE_FIELDS, problems)
    if values is None:
        return None
    # A key given with a bad value was reported already: do not also call it missing.
    given = set(data)
    before = len(problems.items)

    sleep, policy_name, overrides = _service_policy(
        values.pop("sleep_policy", {}), (*path, "sleep_policy"), problems, policies
    )
    readiness = _parse_readiness(values.pop("readiness", {}), (*path, "readiness"), problems)
    res_values = _section(
        values.pop("resources", {}), (*path, "resources"), _RESOURCE_FIELDS, problems
    )
    resources = _replace(Resources(), res_values or {})

    container = values.pop("container", None)
    command = values.pop("command", None)
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
    runtime = "process" if command is not None else "docker"
    if seed_form:
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

    if values.get("mode") is None and seed_form:
        # The seed's services are MCP servers behind the gateway: probes must not wake them.
        values["mode"] = "http"
    raw_http = values.pop("http", None)
    if raw_http is not None and values.get("mode") != "http":
        problems.add((*path, "http"), "http settings need 'mode: http'")
    http = _parse_http(raw_http or {}, (*path, "http"), problems)
    if http.idle_connections == "allow-sleep" and sleep.action == "stop":
        problems.add(
            (*path, "http", "idle_connections"),
            "allow-sleep keeps connections open under a sleeping backend; "
            "sleep action 'stop' would cut them: use action 'pause'",
        )
    if len(problems.items) > before or listen is None:
        return None
    return ServiceConfig(
        name=name,
        listen=listen,
        backend=backend,
        backend_port=backend_port,
        runtime=runtime,
        container=container,
        command=command,
        sleep_policy=sleep,
        policy=policy_name,
        policy_overrides=overrides,
        readiness=readiness,
        resources=resources,
        http=http,
        **values,
    )


def build_config(
    data: Any, *, source: str | None = None, lines: Mapping[KeyPath, int] | None = None
) -> Config:
    """Validate already-parsed data; raise ConfigError listing every fault."""
    problems = _Problems(source, lines or {})
    if data is None:
        data = {}
    top = _section(data, (), _TOP_FIELDS, problems)
    if top is None:
        raise ConfigError(problems.items)

    admin_values = _section(top.get("admin", {}), ("admin",), _ADMIN_FIELDS, problems) or {}
    log_values = _section(top.get("log", {}), ("log",), _LOG_FIELDS, problems) or {}
    shutdown_values = (
        _section(top.get("shutdown", {}), ("shutdown",), _SHUTDOWN_FIELDS, problems) or {}
    )
    discovery_values = (
        _section(top.get("discovery", {}), ("discovery",), _DISCOVERY_FIELDS, problems) or {}
    )

    policies = _parse_policies(top.get("policies", {}), problems)
    services: dict[str, ServiceConfig] = {}
    raw_services = top.get("services")
    if raw_services is None and discovery_values.get("docker_labels"):
        pass  # labelled containers are the services
    elif raw_services is None:
        problems.add(("services",), "missing: list the services to proxy under 'services:'")
    elif not isinstance(raw_services, dict):
        problems.add(
            ("services",), f"expected a mapping of service names, got {_describe(raw_services)}"
        )
    else:
        for name, entry in raw_services.items():
            service = _parse_service(name, entry, problems, policies)
            if service is not None:
                services[service.name] = service

    admin = _replace(AdminConfig(), admin_values)
    _check_listeners(services, admin, problems)
    _check_dependencies(services, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        services=services,
        policies=policies,
        admin=admin,
        log=_replace(LogConfig(), log_values),
        discovery=_replace(DiscoveryConfig(), discovery_values),
        shutdown=_replace(ShutdownConfig(), shutdown_values),
        source=source,
    )


def _check_dependencies(services: Mapping[str, ServiceConfig], problems: _Problems) -> None:
    for name, message in dependency_faults(services):
        problems.add(("services", name, "depends_on"), message)


def dependency_faults(services: Mapping[str, ServiceConfig]) -> list[tuple[str, str]]:
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


def _check_listeners(
    services: Mapping[str, ServiceConfig], admin: AdminConfig, problems: _Problems
) -> None:
    taken: dict[tuple[str, int], str] = {(admin.listen.host, admin.listen.port): "admin.listen"}
    for service in services.values():
        key = (service.listen.host, service.listen.port)
        owner = taken.get(key)
        if owner is not None:
            problems.add(
                ("services", service.name, "listen"),
                f"{service.listen} is already used by {owner}",
            )
        taken[key] = f"services.{service.name}.listen"
        if service.backend is not None and service.backend == service.listen:
            problems.add(
                ("services", service.name, "backend"),
                "the backend cannot be the proxy's own listen address",
            )


# ---- YAML with lines


def _key_lines(
    node: yaml.Node, path: KeyPath, out: dict[KeyPath, int], problems: _Problems
) -> None:
    """Record the line of every key; report keys given twice (PyYAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = key_node.value
            child = (*path, key)
            # The last occurrence wins, as it does for PyYAML's value.
            out[child] = key_node.start_mark.line + 1
            if key in seen:
                problems.add(child, "given twice; keep one")
            seen.add(key)
            _key_lines(value_node, child, out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out.setdefault((*path, index), item.start_mark.line + 1)
            _key_lines(item, (*path, index), out, problems)


def parse_yaml(text: str, source: str) -> Config:
    """Parse YAML text and validate it; errors name ``source`` and the line."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError([f"{where}: not valid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    lines: dict[KeyPath, int] = {}
    duplicates = _Problems(source, lines)
    if node is not None:
        _key_lines(node, (), lines, duplicates)
    try:
        config = build_config(data, source=source, lines=lines)
    except ConfigError as exc:
        raise ConfigError(duplicates.items + exc.problems) from None
    if duplicates.items:
        raise ConfigError(duplicates.items)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read the config file: {exc.strerror or exc}"]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: the config file is not UTF-8 text"]) from None
    return parse_yaml(text, source)


# ---- live changes (the admin API): same validators and texts, key paths instead of lines

LIVE_KEYS = ("sleep_policy", "wake_timeout", "max_held_connections", "idle_connection_timeout")
# What a reload may change on a running service without closing its listener or its
# connections; a change to anything else (listen, backend, runtime...) replaces it.
IN_PLACE_KEYS = (
    *LIVE_KEYS,
    "policy",
    "policy_overrides",
    "max_connections",
    "connect_timeout",
    "connect_concurrency",
    "readiness",
    "depends_on",
    "group",
    "http",
    "auto_start",
    "image",
    "resources",
)


def changes_in_place(old: ServiceConfig, new: ServiceConfig) -> bool:
    """Whether ``new`` differs from ``old`` only in keys a running service can take."""
    kept = {key: getattr(old, key) for key in IN_PLACE_KEYS}
    return dataclasses.replace(new, **kept) == old


def update_service(
    cfg: ServiceConfig, body: Any, policies: Mapping[str, SleepPolicy]
) -> ServiceConfig:
    """``cfg`` with a partial JSON body applied; ConfigError (400) or NeedsReload (409)."""
    path: KeyPath = ("services", cfg.name)
    problems = _Problems(None, {})
    if not isinstance(body, dict):
        raise ConfigError([f"expected a JSON object of settings, got {_describe(body)}"])
    for key in body:
        if key not in _SERVICE_FIELDS:
            problems.add((*path, str(key)), _unknown_key(key, _SERVICE_FIELDS))
    if problems.items:
        raise ConfigError(problems.items)
    static = [key for key in body if key not in LIVE_KEYS]
    if static:
        raise NeedsReload(f"{', '.join(static)} needs a reload; live keys: {', '.join(LIVE_KEYS)}")
    values: dict[str, Any] = {}
    for key in ("wake_timeout", "max_held_connections", "idle_connection_timeout"):
        if key in body:
            try:
                values[key] = _SERVICE_FIELDS[key](body[key])
            except _Bad as exc:
                problems.add((*path, key), str(exc))
    if "sleep_policy" in body:
        raw = body["sleep_policy"]
        if isinstance(raw, dict) and "use" not in raw and cfg.policy is not None:
            # Keys changed beside a named policy become overrides of it.
            raw = {"use": cfg.policy, **cfg.policy_overrides, **raw}
        sleep, name, overrides = _service_policy(
            raw, (*path, "sleep_policy"), problems, policies, base=cfg.sleep_policy
        )
        values.update(sleep_policy=sleep, policy=name, policy_overrides=overrides)
    if problems.items:
        raise ConfigError(problems.items)
    return dataclasses.replace(cfg, **values)


def update_policy(policy: SleepPolicy, name: str, body: Any) -> SleepPolicy:
    problems = _Problems(None, {})
    updated = parse_sleep_policy(body, ("policies", name), problems, base=policy)
    if problems.items:
        raise ConfigError(problems.items)
    return updated


def with_policy(cfg: ServiceConfig, policy: SleepPolicy) -> ServiceConfig:
    """``cfg`` following a changed named policy, its own overrides still winning."""
    return dataclasses.replace(cfg, sleep_policy=_replace(policy, cfg.policy_overrides))


# ---- container labels (discovery): the same keys and checks as a YAML service entry

LABEL_PREFIX = "wakeproxy."
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_DEPENDS_ON_LABEL = "com.docker.compose.depends_on"
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
        for key in ("idle_timeout", "min_sleep_time", "priority", "action", "stop_after")
    },
    "policy": ("sleep_policy", "use"),
    "readiness": ("readiness", "http"),
}
# Labels that are text as they stand; the others are read as YAML scalars (300, 1.5, true).
_LABEL_TEXT = {"listen", "backend", "mode", "wake_on", "group", "priority", "action", "policy"}
_LABEL_OWN = {"enable", "name"}  # read by discovery itself


def label_enabled(labels: Mapping[str, str]) -> bool:
    return labels.get(LABEL_PREFIX + "enable", "").strip().lower() in ("true", "1", "yes")


def label_service_name(container: str, labels: Mapping[str, str]) -> str:
    """wakeproxy.name, else the compose service, else the container's name."""
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


def service_from_labels(
    container: str,
    labels: Mapping[str, str],
    *,
    policies: Mapping[str, SleepPolicy],
    allowed_listen: tuple[ListenRange, ...],
    managed: Collection[str] = (),
) -> ServiceConfig:
    """A service for a labelled container; ConfigError naming the container and label.

    Dependencies from compose's own depends_on label count only where they name a
    service the proxy manages (``managed``): compose also lists databases and the like
    that never sleep. wakeproxy.depends_on names must all exist.
    """
    name = label_service_name(container, labels)
    where_label: dict[KeyPath, str] = {}
    entry: dict[str, Any] = {"container": container}
    problems: list[str] = []
    for key, text in labels.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        short = key[len(LABEL_PREFIX) :]
        if short in _LABEL_OWN:
            continue
        path = _LABEL_PATHS.get(short)
        if path is None:
            known = ", ".join(LABEL_PREFIX + k for k in sorted({*_LABEL_PATHS, *_LABEL_OWN}))
            close = difflib.get_close_matches(short, list(_LABEL_PATHS), n=1)
            hint = f" (did you mean {LABEL_PREFIX + close[0]!r}?)" if close else ""
            problems.append(f"container {container}: unknown label {key!r}{hint}; known: {known}")
            continue
        if short == "depends_on":
            value: Any = [part.strip() for part in text.split(",") if part.strip()]
        elif short in _LABEL_TEXT:
            value = text.strip()
        else:
            value = _label_scalar(text.strip())
        where_label[("services", name, *path)] = key
        target = entry
        for part in path[:-1]:
            target = target.setdefault(str(part), {})
        target[str(path[-1])] = value
    if "port" not in entry and "listen" not in entry:
        problems.append(
            f"container {container}: needs label {LABEL_PREFIX}port (listen and backend port) "
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
                return f"container {container}: label {label}"
        if len(path) >= 3 and path[2] == "depends_on":
            return f"container {container}: label {COMPOSE_DEPENDS_ON_LABEL}"
        return f"container {container}"

    collected = _Problems(None, {}, where)
    service = _parse_service(name, entry, collected, policies)
    if service is None or problems or collected.items:
        raise ConfigError(problems + collected.items)
    if not any(r.allows(service.listen) for r in allowed_listen):
        label = LABEL_PREFIX + ("listen" if "listen" in entry else "port")
        ranges = ", ".join(str(r) for r in allowed_listen) or "none"
        raise ConfigError(
            [
                f"container {container}: label {label}: listening on {service.listen} is "
                f"outside discovery.allowed_listen ({ranges})"
            ]
        )
    return dataclasses.replace(service, source="labels")
