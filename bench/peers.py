"""The processes a benchmark runs: backends, HAProxy, wakeproxy. Each in its own process,
on 127.0.0.1, started and stopped by the harness."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from wakeproxy.host.bpf import BpfError
from wakeproxy.host.steering import Steering

HERE = Path(__file__).parent
TOOLS = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk", "iperf3": "iperf3"}


def ensure_tools(tools: tuple[str, ...] = tuple(TOOLS)) -> None:
    """Install Debian's packages for the peers that are missing (needs root); ``tools``:
    only these (the tests install iperf3 alone for its own test)."""
    missing = [TOOLS[tool] for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *missing], check=True, capture_output=True, env=env
    )


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, never one handed out before in this process: binding port 0
    twice in a row can return the same port, and one config often needs several."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def consecutive_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (replicas listen on backend + i),
    below the kernel's ephemeral range (32768 up): there any outgoing connection on the
    machine may take one meanwhile. None of them is handed out again."""
    start = random.randrange(20000, 31000)
    for first in range(start, start + 1000):
        ports = range(first, first + count)
        if any(port in _HANDED_OUT for port in ports):
            continue
        if all(_bindable(port) for port in ports):
            _HANDED_OUT.update(ports)
            return first
    raise RuntimeError(f"no {count} consecutive free ports from {start}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, name: str = "", within: float = 20
) -> None:
    deadline = time.monotonic() + within
    while True:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {within}s")
        time.sleep(0.05)


def exit_on_sigterm() -> None:
    """A SIGTERM (how a bench is usually stopped) unwinds like an exception: every peer's
    ``stop``, temporary folder and swap file is cleaned up, where the default action left
    nginx, HAProxy and the proxies running in their own sessions."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


class Peer:
    """A started process; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self.port = port
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(port, self.proc, name)

    def peak_rss_mib(self, pid: int | None = None) -> float:
        status = Path(f"/proc/{pid or self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def nginx(workdir: Path) -> Peer:
    argv, port = nginx_command(workdir)
    return Peer("nginx", argv, port)


def nginx_command(workdir: Path) -> tuple[list[str], int]:
    """nginx serving the small body on a free port, configured in ``workdir``; not started."""
    port = free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = (
        (HERE / "nginx.conf")
        .read_text()
        .replace("@DIR@", str(workdir))
        .replace("@PORT@", str(port))
    )
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return ["nginx", "-c", str(path)], port


def iperf3_server() -> Peer:
    port = free_port()
    return Peer("iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], port)


def haproxy(backend_port: int, mode: str = "tcp") -> Peer:
    port = free_port()
    cfg = HERE / f"haproxy-{mode}.cfg"
    env = {"LISTEN_PORT": str(port), "BACKEND_PORT": str(backend_port)}
    return Peer("haproxy", ["haproxy", "-db", "-f", str(cfg)], port, env)


def bare(backend_port: int) -> Peer:
    """The bare uvloop forwarder (bench/bare.py): the runtime's own ceiling."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare", str(port), str(backend_port)]
    return Peer("bare uvloop", argv, port)


def wakeproxy(
    workdir: Path, backend_port: int, extra: str = "", source: Path | None = None
) -> Peer:
    """wakeproxy forwarding to a backend that is already up (sleep disabled).

    The process runtime needs a command it owns; ``sleep`` stands in, since the
    backend under test is shared with the other contenders and started by the harness.
    ``source``: a checkout whose package runs instead of this one (an A/B in one run:
    started there, its tree first on the path).
    """
    port = free_port()
    config = workdir / f"wakeproxy-{port}.yaml"
    config.write_text(
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        "services:\n"
        "  bench:\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend_port}\n"
        '    command: ["sleep", "1000000"]\n'
        "    auto_start: true\n"
        "    readiness: {tcp: false}\n"
        "    sleep_policy: {enabled: false}\n" + extra
    )
    argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "warning"]
    if source is not None:
        return Peer("wakeproxy", argv, port, {"PYTHONPATH": str(source)}, cwd=source)
    return Peer("wakeproxy", argv, port)


def wakeproxy_container(
    workdir: Path,
    backend_port: int,
    container: str,
    action: str = "pause",
    concurrency: int | None = None,
) -> Peer:
    """wakeproxy in front of a container, with the docker runtime (cold-wake rows): at
    its defaults (the release paced to the backend's accept queue, early connects during
    the unpause) unless ``concurrency`` sets connect_concurrency."""
    port = free_port()
    config = workdir / f"wakeproxy-cold-{action}.yaml"
    config.write_text(
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        "services:\n"
        "  cold:\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend_port}\n"
        f"    container: {container}\n"
        f"    sleep_policy: {{idle_timeout: 3600, action: {action}}}\n"
        + (f"    connect_concurrency: {concurrency}\n" if concurrency else "")
    )
    argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "warning"]
    return Peer("wakeproxy", argv, port)


def fast_path_why() -> str | None:
    """Why the kernel's fast path cannot load here (None: it can)."""
    try:
        Steering().close()
    except (BpfError, OSError) as exc:
        return str(exc)
    return None


def wakeproxy_fast(workdir: Path) -> tuple[Peer, int, int]:
    """wakeproxy with ``fast_path: kernel`` in front of nginx, which it runs as its
    command (the fast path takes the listener from the backend's own processes); the
    row's other contenders reach the same nginx. Returns once the kernel steers:
    (the proxy, nginx's port, nginx's master pid)."""
    workdir.mkdir(parents=True, exist_ok=True)
    nginx_argv, backend_port = nginx_command(workdir)
    port, admin = free_port(), free_port()
    config = workdir / "wakeproxy-fast.yaml"
    config.write_text(
        f"admin:\n  listen: 127.0.0.1:{admin}\n"
        "services:\n"
        "  bench:\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend_port}\n"
        f"    command: {json.dumps(nginx_argv)}\n"
        "    auto_start: true\n"
        "    fast_path: kernel\n"
        "    sleep_policy: {enabled: false}\n"
    )
    argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "warning"]
    peer = Peer("wakeproxy fast path", argv, port)
    try:
        wait_port(backend_port, peer.proc, peer.name)
        _wait_steering(admin)
    except BaseException:
        peer.stop()
        raise
    return peer, backend_port, int((workdir / "nginx.pid").read_text())


def _wait_steering(admin: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    seen = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/services", timeout=5) as answer:
                (service,) = json.load(answer)["services"]
        except urllib.error.URLError:  # the admin API listens after the services do
            time.sleep(0.05)
            continue
        seen = service["fast_path"]
        if seen and seen["state"] == "steering":
            return
        time.sleep(0.05)
    raise RuntimeError(f"the fast path did not steer within {within:g}s: {seen}")
