"""The configuration's model: frozen dataclasses, with every choice typed.

Built by ``schema`` from YAML (``source``), container labels (``labels``) or a JSON
body of the admin API (``live``); the rest of the proxy reads only these types.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..core.predict import PredictSettings
from ..core.schedule import Window
from ..core.states import SleepAction

KeyPath = tuple[str | int, ...]
DEFAULT_CONFIG_PATH = "/etc/wakeproxy/config.yaml"

# The choices, spelled once: the validators list their options from these.
Mode = Literal["tcp", "http"]
WakeOn = Literal["connect", "data"]
# off: the proxy forwards every connection; kernel: while the backend runs, the kernel
# hands new connections straight to its own listener (serve.fastpath).
FastPath = Literal["off", "kernel"]
Priority = Literal["low", "normal", "high"]
# How a hibernating backend's memory is given back: at its memory cgroup (the kernel frees
# the pages). "auto" is the same, kept as the default's name.
ReclaimMethod = Literal["auto", "cgroup"]
IdleConnections = Literal["keep-awake", "allow-sleep"]
McpMode = Literal["auto", "off"]
RuntimeKind = Literal["docker", "process", "swarm"]
Source = Literal["config", "labels"]
ShutdownBackends = Literal["as-is", "wake"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]


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
    priority: Priority = "normal"
    action: SleepAction = SleepAction.PAUSE
    stop_after: float | None = None
    # Paused this long -> memory given back (action hibernate: 0 unless set).
    hibernate_after: float | None = None
    reclaim: ReclaimMethod = "auto"
    # After a wake from hibernation, fetch the swapped pages back in the background.
    prefetch: bool = False
    memory_reservation: int | None = None
    # Weekly windows: kept awake inside (woken at the start, never slept by the idle
    # timer), or left asleep (slept at the start, never woken but by a request).
    keep_awake: tuple[Window, ...] = ()
    asleep_windows: tuple[Window, ...] = ()
    # Wakes ahead of learned arrivals and of services that usually follow this one.
    predict: PredictSettings = field(default_factory=PredictSettings)

    def view(self) -> dict[str, Any]:
        """JSON-able, as the API shows it (and takes it back): windows as their text."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["keep_awake"] = [w.text for w in self.keep_awake]
        out["asleep_windows"] = [w.text for w in self.asleep_windows]
        out["predict"] = asdict(self.predict)
        return out

    @property
    def hibernates_after(self) -> float | None:
        """Seconds paused before the memory is given back, or None for never."""
        if self.hibernate_after is None and self.action is SleepAction.HIBERNATE:
            return 0.0
        return self.hibernate_after

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
    the client goes away; otherwise the answer carries ``body`` (none for HEAD) and the
    connection stays open for the client's next request, unless it asked to close.
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
    idle_connections: IdleConnections = "keep-awake"
    forwarded_headers: bool = False
    # Peers (addresses, networks) whose own X-Forwarded-* the proxy keeps and extends:
    # another proxy in front. From anyone else they are dropped (a client would choose
    # its own address, host and scheme).
    trust_forwarded_from: tuple[str, ...] = ()
    default_probe: bool = True
    probes: tuple[Probe, ...] = ()
    waiting_page: bool = False
    # Connections holding part of a request head (up to 16 KiB each) at most.
    max_partial_heads: int = 1024
    # Probes answered as an event stream held open at most (each holds a descriptor);
    # past it, a probe is answered and its connection closed.
    max_probe_streams: int = 1024
    # MCP over streamable HTTP: "auto" answers session set-up (initialize, ping,
    # server/discover...) from what the server answered before while it sleeps, and
    # wakes it for the first real request; "off" forwards everything.
    mcp: McpMode = "auto"
    # A session whose server was stopped (or whose replica went) is opened again on the
    # new instance with the client's own initialize; False: the client gets a 404.
    mcp_resume: bool = True

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


# The engine a service uses unless it names another: DOCKER_HOST (and DOCKER_CERT_PATH,
# DOCKER_TLS_VERIFY), else the local socket. ``engines:`` may define it too.
LOCAL_ENGINE = "local"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One Docker engine of ``engines:``: ``host`` as DOCKER_HOST spells it
    (``unix:///path``, ``tcp://HOST:PORT``); with ``cert_path`` (a directory holding
    ca.pem, cert.pem and key.pem, as DOCKER_CERT_PATH) TLS with client certificates,
    the engine's certificate verified against ca.pem unless ``tls_verify: false``."""

    name: str
    host: str
    cert_path: str | None = None
    tls_verify: bool = True


@dataclass(frozen=True, slots=True)
class Replicas:
    """``replicas:``: several backends behind one listener, woken as the load needs.

    Replica i (from 0) is the command with ``{port}`` (and ``{index}``, from 1) filled
    in and the backend's port + i, or the i-th of ``containers``; or, for
    ``compose_service``, every container ``docker compose`` runs for that service
    (``--scale``), found by its labels as they come and go, each at its own address.
    """

    count: int
    containers: tuple[str, ...] = ()
    compose_service: str | None = None
    compose_project: str | None = None  # None: any project
    # Seconds between active health checks of the running replicas (the readiness
    # probe); 0: none, a replica's circuit opens only when a connect to it fails.
    health_interval: float = 0.0
    minimum: int = 0  # awake even when idle (started with the proxy, never slept)
    maximum: int = 0  # awake at most; 0: count
    # Attached connections per awake replica past which the next one is woken.
    target_inflight: int = 10

    @property
    def discovered(self) -> bool:
        """The replicas are the engine's containers of a compose service."""
        return self.compose_service is not None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    listen: Address
    # None in the seed form: the host is read from Docker after every start.
    backend: Address | None
    backend_port: int
    runtime: RuntimeKind
    container: str | None = None
    command: tuple[str, ...] | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    mode: Mode = "tcp"
    http: HttpSettings = HttpSettings()
    wake_on: WakeOn = "connect"
    fast_path: FastPath = "off"
    backlog: int = 4096
    connect_timeout: float = 5.0
    idle_connection_timeout: float = 3600.0
    # None: paced to the backend's accept queue, read from the kernel (see backlog.py).
    connect_concurrency: int | None = None
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
    source: Source = "config"
    replicas: Replicas | None = None
    # docker: the engine (of ``engines:``) the container is on; swarm: a manager's.
    engine: str = LOCAL_ENGINE
    # swarm runtime: the Swarm service, and its replica count while awake.
    swarm_service: str | None = None
    swarm_replicas: int = 1
    # Set on one replica's own config (see config.replicas.expand): the service it
    # belongs to and its place, from 1 (oldest first).
    replica_of: str | None = None
    replica: int = 0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9000)
    # A file holding the bearer token for POST/PUT (WAKEPROXY_ADMIN_TOKEN wins over it).
    token_file: str | None = None
    # Also require the token for GET (metrics scrapers then need it too).
    protect_reads: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"


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
    # The engines whose labels count (None: every engine, local and engines:).
    engines: tuple[str, ...] | None = None

    def engine_names(self, engines: Iterable[str]) -> list[str]:
        """Which engines label discovery reads, of ``engines`` (``engines:``'s names)."""
        if not self.docker_labels:
            return []
        return sorted(self.engines if self.engines is not None else {LOCAL_ENGINE, *engines})


@dataclass(frozen=True, slots=True)
class PredictionConfig:
    # Where the learned tables are kept across restarts (None: in memory only). Not
    # writable: one warning, and the proxy runs with them in memory.
    state_file: str | None = "/var/lib/wakeproxy/prediction.json"
    # The zone of the learned 15-minute slots of the week (people keep local hours).
    timezone: str = "UTC"
    # Seconds between saves of changed tables (and one at shutdown).
    save_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class McpConfig:
    # What each service's MCP server answered to set-up, across restarts (None: in
    # memory only). Not writable: one warning, and it is kept in memory.
    state_file: str | None = "/var/lib/wakeproxy/mcp.json"
    # Sessions a service keeps (its clients' ids, replica pins, a replay's initialize),
    # and how many one client address may hold.
    max_sessions: int = 10_000
    sessions_per_client: int = 1_000


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    # Seconds open connections may take to finish after SIGTERM before they are closed.
    grace: float = 10.0
    # "as-is": backends stay as they are; "wake": sleeping containers are woken on the
    # way out, so they serve without the proxy.
    backends: ShutdownBackends = "as-is"


@dataclass(frozen=True, slots=True)
class Config:
    services: Mapping[str, ServiceConfig]
    policies: Mapping[str, SleepPolicy] = field(default_factory=dict)
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    prediction: PredictionConfig = PredictionConfig()
    mcp: McpConfig = McpConfig()
    engines: Mapping[str, EngineConfig] = field(default_factory=dict)
    source: str | None = None
