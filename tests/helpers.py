"""What the tests share: one config builder, one proxy runner, one docker helper, and the
small socket tools. Fixtures live in conftest.py; tests import helpers from here only.

All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from mcp import ClientSession

# Ports: the bench harness's (one registry: never the same port twice in a process).
from bench.peers import consecutive_ports as consecutive_ports
from bench.peers import free_port
from tests.fakes import FakeRuntime
from wakeproxy.app import Proxy
from wakeproxy.config import Address, AdminConfig, Config, ServiceConfig, parse_yaml
from wakeproxy.config.model import McpConfig
from wakeproxy.control.assembly import ProxyProcess
from wakeproxy.core.actions import Action, ArmTimer
from wakeproxy.core.events import Event, Timer, TimerFired
from wakeproxy.core.node import Node
from wakeproxy.core.orchestrator import Command, Orchestrator
from wakeproxy.core.policy import Policy
from wakeproxy.core.states import SleepAction, State
from wakeproxy.serve.backend import Backend
from wakeproxy.serve.coordinator import Coordinator
from wakeproxy.serve.frontend import Frontend

BACKEND = str(Path(__file__).parent / "backends" / "server.py")
PYTHON = sys.executable
WAKEPROXY = [sys.executable, "-m", "wakeproxy"]


# ---- config: one builder


def backend_command(port: int, mode: str = "http", *extra: str) -> list[str]:
    """The test backend (tests/backends/server.py) as a command."""
    return [PYTHON, BACKEND, "--port", str(port), "--mode", mode, *extra]


def service(name: str, listen: int, backend: int | None = None, **settings: Any) -> dict[str, Any]:
    """One service entry on 127.0.0.1; ``settings`` are its other keys as Python values."""
    entry: dict[str, Any] = {"listen": f"127.0.0.1:{listen}"}
    if backend is not None:
        entry["backend"] = f"127.0.0.1:{backend}"
    return {name: {**entry, **settings}}


def config_text(*services: dict[str, Any], admin: int | None = None, **top: Any) -> str:
    """A whole config file: the admin API on a free loopback port, top-level sections
    from ``top`` (``policies=...``, ``discovery=...``), then the services."""
    merged: dict[str, Any] = {}
    for entry in services:
        merged.update(entry)
    # What MCP servers answered is kept in memory unless a test names a file: the
    # default path is shared by every proxy on the machine.
    top.setdefault("mcp", {"state_file": None})
    data: dict[str, Any] = {"admin": {"listen": f"127.0.0.1:{admin or free_port()}"}, **top}
    if services or "discovery" not in top:
        data["services"] = merged
    return yaml.safe_dump(data, sort_keys=False)


def service_yaml(listen: int, backend: int, *, name: str = "web", **settings: Any) -> str:
    """A whole config with one service; each setting is a Python value or YAML text
    (``sleep_policy="{idle_timeout: 0.3}"``)."""
    values = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in settings.items()}
    return config_text(service(name, listen, backend, **values))


def build(*services: dict[str, Any], admin: int | None = None, **top: Any) -> Config:
    return parse_yaml(config_text(*services, admin=admin, **top), "test.yaml")


def config_from(text: str) -> Config:
    """A config from YAML text written out in a test (for line numbers and exact forms)."""
    return parse_yaml(textwrap.dedent(text), "test.yaml")


def write_config(path: Path, *services: dict[str, Any], **kw: Any) -> Path:
    path.write_text(config_text(*services, **kw))
    return path


@contextlib.asynccontextmanager
async def running(
    config: Config, *, wall_clock: Callable[[], float] | None = None
) -> AsyncIterator[Proxy]:
    """The proxy in this test's event loop, closed afterwards (``wall_clock``: what its
    schedules read as the time). Every test that runs one also checks that the decision
    core met no event it has no transition for."""
    if config.admin == AdminConfig():
        # Not the default port 9000: a developer's own proxy may be using it.
        admin = dataclasses.replace(config.admin, listen=Address("127.0.0.1", free_port()))
        config = dataclasses.replace(config, admin=admin)
    if config.mcp == McpConfig():
        # In memory: the default state file is shared by every proxy on the machine.
        config = dataclasses.replace(config, mcp=McpConfig(state_file=None))
    process = ProxyProcess(config)  # the proxy with its admin API, as `run` starts it
    proxy = process.proxy
    if wall_clock is not None:
        proxy.wall_clock = wall_clock
    await process.start()
    unexpected: dict[str, object] = {}
    try:
        yield proxy
        unexpected = {n: dict(s.stats.unexpected) for n, s in proxy.services.items()}
    finally:
        await process.close()
    assert not any(unexpected.values()), f"events with no transition: {unexpected}"


class Lone:
    """One service outside a Proxy: its frontend in front of its one backend, with a
    (strict) core of its own, for unit tests of the glue; ``start()`` and ``close()``.
    Everything else reads the backend."""

    def __init__(self, cfg: ServiceConfig, runtime: FakeRuntime) -> None:
        coordinator = Coordinator(strict=True)
        self.backend = Backend(cfg, runtime, coordinator, initial=runtime.state, reason="test")
        self.frontend = Frontend(cfg, None)
        self.frontend.update(cfg, [self.backend])

    async def start(self) -> None:
        await self.backend.start()
        await self.frontend.start()

    async def close(self) -> None:
        self.frontend.close()
        await self.backend.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def __repr__(self) -> str:
        return repr(self.backend)


def lone_service(cfg: ServiceConfig, runtime: FakeRuntime) -> Lone:
    """One service with its own (strict) core, no Proxy around it; call ``start()``."""
    return Lone(cfg, runtime)


# ---- sockets and processes


async def http_get(port: int, path: str = "/", *, within: float = 10.0) -> bytes:
    """One HTTP/1.0 request through a fresh connection; returns the whole response."""
    return await exchange(
        port,
        f"GET {path} HTTP/1.0\r\nHost: test\r\nConnection: close\r\n\r\n".encode(),
        within=within,
    )


async def exchange(
    port: int, data: bytes, *, within: float = 10.0, half_close: bool = False
) -> bytes:
    """Send ``data`` (then EOF if ``half_close``) and read until the other side closes;
    b"" when the proxy closed (or reset) without forwarding."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            if half_close:
                writer.write_eof()
            return await reader.read(-1)
        except ConnectionResetError:
            # Closing a socket with unread client bytes sends a reset: same meaning.
            return b""
        finally:
            writer.close()


async def echo_server(
    port: int, *, answers_while: Callable[[], bool] | None = None
) -> asyncio.Server:
    """A TCP echo backend on 127.0.0.1:port. ``answers_while``: it answers only while
    this holds (a frozen process: the kernel accepts, nothing answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if answers_while is not None:
                    await wait_until(answers_while, within=60, interval=0.005)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)


def listener_drops(port: int) -> int:
    """What the kernel dropped at the TCP listener on 127.0.0.1:``port`` (this network
    namespace: the process runtime's commands, containers on host networking): a SYN or
    a handshake's last ACK that met a full accept queue (``tcp_listendrop``: the
    per-socket count behind the namespace-wide TcpExt ListenDrops, shown by ``ss -ltnm``
    as ``d`` in ``skmem``). Per listener, so other work on the machine does not move it.
    A dropped SYN is what a client sees as a one-second retry: this is that fact itself,
    where a duration would only stand for it."""
    from wakeproxy.net.sockdiag import _HEADER, _MESSAGE, _REQUEST

    skmeminfo, drops = 7, 8  # INET_DIAG_SKMEMINFO: u32s, SK_MEMINFO_DROPS the 9th
    listen_state = 1 << 10
    request = _REQUEST.pack(
        socket.AF_INET, socket.IPPROTO_TCP, 1 << (skmeminfo - 1), 0, listen_state
    )
    header = _HEADER.pack(_HEADER.size + len(request), 20, 0x1 | 0x300, 1, 0)  # dump
    found: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as sock:  # sock_diag
        sock.settimeout(5)
        sock.send(header + request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                if kind in (2, 3) or length < _HEADER.size:  # NLMSG_ERROR, NLMSG_DONE
                    assert found, f"no TCP listener on 127.0.0.1:{port} here"
                    return sum(found)
                message = _MESSAGE.unpack_from(data, offset + _HEADER.size)
                source = socket.inet_ntoa(message[6][:4])
                if int.from_bytes(message[4], "big") == port and source in (
                    "127.0.0.1",
                    "0.0.0.0",
                ):
                    # The attributes after the message: (length, type, payload), aligned.
                    attr = offset + _HEADER.size + _MESSAGE.size
                    while attr + 4 <= offset + length:
                        attr_len, attr_type = struct.unpack_from("=HH", data, attr)
                        if attr_len < 4:
                            break
                        if attr_type == skmeminfo:
                            found.append(struct.unpack_from("=I", data, attr + 4 + 4 * drops)[0])
                        attr += (attr_len + 3) & ~3
                offset += (length + 3) & ~3


def serving(proxy: Proxy, name: str, port: int | None = None) -> bool:
    """Whether service ``name`` is listed and its listener open (on ``port``, if given): a
    service added while the proxy runs is listed a moment before its port is bound."""
    front = proxy.frontends.get(name)
    if name not in proxy.services or front is None or not front.listening:
        return False
    return port is None or front.cfg.listen.port == port


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def wait_until(
    predicate: Callable[[], bool], *, within: float, interval: float = 0.02
) -> None:
    """Poll a condition the code under test offers no event for (tests only)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the proxy exposes no event to await here
            await asyncio.sleep(interval)


class _Recorder(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextlib.contextmanager
def proxy_log() -> Iterator[list[str]]:
    """Every message the proxy logs (DEBUG too), in order: for what happened in what
    order (a dependency running before its dependent's command even started)."""
    messages: list[str] = []
    logger = logging.getLogger("wakeproxy")
    handler, level = _Recorder(messages), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def first_index(messages: list[str], text: str) -> int:
    """Where the first message containing ``text`` is (an assertion names it if none)."""
    for index, message in enumerate(messages):
        if text in message:
            return index
    raise AssertionError(f"no log message contains {text!r}: {messages}")


def engine_order(names: Iterable[str], action: str, since: float, until: float) -> list[str]:
    """The containers in the order the engine reports ``action`` for them."""
    filters = [arg for name in names for arg in ("--filter", f"container={name}")]
    out = docker(
        "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", *filters,
        "--filter", f"event={action}", "--format", "{{.Actor.Attributes.name}}",
    )  # fmt: skip
    return [line.strip() for line in out.splitlines() if line.strip()]


def proc_state(pid: int) -> str:
    """The kernel's one-letter state of a process: R/S running or sleeping, T stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def start_proxy(
    config: Path,
    port: int,
    *extra: str,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``wakeproxy run`` as its own process (``prefix``: a wrapper such as setpriv;
    ``env``: its environment, else this one's)."""
    proc = subprocess.Popen(
        [*prefix, *WAKEPROXY, "run", "-c", str(config), *extra],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 15
    while not port_answers(port):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the proxy never listened"
        time.sleep(0.05)
    return proc


def pids_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# ---- Docker: the real engine, through its CLI


def docker(*args: str, within: float = 60, host: str | None = None) -> str:
    """The docker CLI; ``host``: another engine's socket (unix://...) than the default."""
    result = subprocess.run(
        ["docker", *(("-H", host) if host else ()), *args],
        capture_output=True,
        text=True,
        timeout=within,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    if result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def container_status(name: str) -> str:
    return docker("inspect", "-f", "{{.State.Status}}", name)


def engine_events(name: str, action: str, since: float, until: float) -> int:
    """How many times the engine itself reports ``action`` for the container."""
    out = docker(
        "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}",
        "--filter", f"container={name}", "--filter", f"event={action}", "--format", "{{.Action}}",
    )  # fmt: skip
    return len([line for line in out.splitlines() if line.strip()])


# ---- the pure core with a fake clock: timers fire when the test moves the clock


@dataclass
class FakeGlue:
    """The orchestrator (strict) with a clock the test moves by hand."""

    now: float = 0.0
    core: Orchestrator = field(default_factory=lambda: Orchestrator(strict=True))
    timers: dict[tuple[str, Timer], float] = field(default_factory=dict)
    log: list[Command] = field(default_factory=list)
    # Called with every batch of commands the core returns (model-based tests check them).
    observer: Callable[[list[Command]], None] | None = None

    def add(self, name: str, state: State = State.RUNNING, **policy: object) -> Node:
        settings: dict[str, object] = {"idle_delay": 10.0, **policy}
        if isinstance(settings.get("action"), str):
            settings["action"] = SleepAction(settings["action"])
        self._record(self.core.add(name, Policy(**settings), state, "test", self.now))  # type: ignore[arg-type]
        return self.core.nodes[name]

    def link(self, links: dict[str, tuple[Iterable[str], str | None]]) -> None:
        full = {name: (tuple(deps), group) for name, (deps, group) in links.items()}
        self._record(self.core.relink(full, self.now))

    def feed(self, name: str, event: Event) -> list[Action]:
        """Feed one event; returns the actions addressed to ``name``."""
        commands = self.core.handle(name, event, self.now)
        self._record(commands)
        return [action for target, action in commands if target == name]

    def _record(self, commands: list[Command]) -> None:
        self.log.extend(commands)
        if self.observer is not None:
            self.observer(commands)
        for name, action in commands:
            if isinstance(action, ArmTimer):
                self.timers[(name, action.timer)] = action.at

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, firing every timer due on the way, in time order."""
        while True:
            due = [(at, key) for key, at in self.timers.items() if at <= to]
            if not due:
                break
            at, key = min(due, key=lambda item: (item[0], item[1][0], item[1][1].value))
            del self.timers[key]
            self.now = max(self.now, at)
            self.feed(key[0], TimerFired(key[1]))
        self.now = to

    def actions(self, name: str, kind: type[Action]) -> list[Action]:
        return [a for target, a in self.log if target == name and isinstance(a, kind)]

    def clear(self) -> None:
        self.log.clear()


async def admin_call(
    proxy, method: str, path: str, *, token: str | None = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request to the admin API; returns status, headers and body."""
    listen = proxy.config.admin.listen
    reader, writer = await asyncio.open_connection(listen.host, listen.port)
    try:
        if raw is None:
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            raw = f"{method} {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n".encode()
        writer.write(raw)
        async with asyncio.timeout(20):
            response = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def admin_put(proxy, path: str, payload: bytes, token: str | None = None):
    """A PUT with a JSON body to the admin API; returns status and the JSON answer."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    raw = (
        f"PUT {path} HTTP/1.1\r\nHost: a\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    status, _, body = await admin_call(proxy, "PUT", path, raw=raw)
    return status, orjson.loads(body)


# ---- MCP: the real SDK's server and client

MCP_SERVER = str(Path(__file__).parent / "backends" / "mcp_server.py")


def mcp_yaml(port: int, backend: int, transport: str, *lines: str, ping: float = 15) -> str:
    command = [PYTHON, MCP_SERVER, "--port", str(backend), "--transport", transport]
    command += ["--ping", str(ping)]
    return "\n".join(
        [
            "admin:",
            f"  listen: 127.0.0.1:{free_port()}",
            "services:",
            "  echo:",
            f"    listen: 127.0.0.1:{port}",
            f"    backend: 127.0.0.1:{backend}",
            "    command: [" + ", ".join(f'"{a}"' for a in command) + "]",
            "    mode: http",
            "    wake_timeout: 30",
            *(f"    {line}" for line in lines),
        ]
    )


@contextlib.asynccontextmanager
async def mcp_session(port: int, transport: str) -> AsyncIterator[ClientSession]:
    """The SDK's own client, as the gateway uses it, through the proxy."""
    async with mcp_client(port, transport) as (session, _, _):
        yield session


@dataclass
class McpClient:
    """A session of the SDK's client: its initialize result and its session id."""

    session: ClientSession
    result: Any  # mcp.types.InitializeResult
    session_id: Callable[[], str | None]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.session, self.result, self.session_id))


@contextlib.asynccontextmanager
async def mcp_client(port: int, transport: str = "streamable-http") -> AsyncIterator[McpClient]:
    """The SDK's own client (1.x) through the proxy: initialize, then the session. On the
    way out it ends the session (streamable HTTP: a DELETE). Entering and leaving it is
    the gateway's health check: initialize, initialized, the GET stream, DELETE."""
    from mcp.client import streamable_http
    from mcp.client.sse import sse_client

    async with contextlib.AsyncExitStack() as stack:
        get_id: Callable[[], str | None] = lambda: None  # noqa: E731 - SSE has none
        if transport == "sse":
            read, write = await stack.enter_async_context(
                sse_client(f"http://127.0.0.1:{port}/sse")
            )
        else:
            # streamable_http_client replaced streamablehttp_client (deprecated) in newer SDKs.
            client = getattr(streamable_http, "streamable_http_client", None)
            client = client or streamable_http.streamablehttp_client
            url = f"http://127.0.0.1:{port}/mcp"
            read, write, get_id = await stack.enter_async_context(client(url))
        session = await stack.enter_async_context(ClientSession(read, write))
        result = await asyncio.wait_for(session.initialize(), 60)
        yield McpClient(session, result, get_id)


async def call_text(session: ClientSession, tool: str, within: float = 30, **args: Any) -> str:
    """A tool's text answer (the call must succeed)."""
    result = await asyncio.wait_for(session.call_tool(tool, args), within)
    assert not result.isError, result
    block = result.content[0]
    assert block.type == "text"
    return block.text


async def shout(session: ClientSession, text: str) -> str:
    return await call_text(session, "shout", text=text)


async def paused(service: Backend) -> None:
    """Started once (a cold process start), then paused: the state the tests wake from."""
    await service.wake("test set-up")
    await service.sleep("pause", "api")
    assert service.state is State.PAUSED


async def whoami(session: ClientSession, within: float = 30) -> int:
    return int(await call_text(session, "whoami", within))


# ---- systemd: the unit and its drop-ins in config/

FAST_PATH_DROP_IN = Path(__file__).parent.parent / "config" / "wakeproxy-fast-path.conf"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Each key of a unit file's [Service] section with its values (a key may be given
    twice)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found
