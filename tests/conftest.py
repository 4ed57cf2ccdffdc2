"""Fixtures: the event loops, a real Docker engine and the images the tests build.

Helpers (config builder, sockets, docker CLI) are in tests/helpers.py. Docker tests
need a real engine: in CI (CI=true) a missing engine fails them, elsewhere it skips
them. No image is pulled: test images are built FROM scratch with busybox-static, or
from a Python base made locally with debootstrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tests.helpers import docker, in_ci, port_answers

# Modules whose tests run on both loops, as uvloop's own tests/test_tcp.py does.
BOTH_LOOPS = {"test_forwarding"}
BUSYBOX_IMAGE = "wakeproxy-test/busybox:1"
PYTHON_BASE = "wakeproxy-test/python-base:bookworm"


def engine_identity() -> tuple[int, str] | None:
    """The machine's dockerd as (pid, start time), from its pid file: a restart changes it."""
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, IndexError):
        return None
    return pid, started


# The machine's engine as the suite found it; test_docker_faults checks it at the end.
MACHINE_ENGINE: tuple[int, str] | None = None


def pytest_sessionstart(session):
    global MACHINE_ENGINE
    MACHINE_ENGINE = engine_identity()


def pytest_collection_modifyitems(config, items):
    # A test that restarts an engine runs on its own: after every other test; the check
    # that the machine's engine was never touched comes last of all.
    def order(item):
        restarts = item.get_closest_marker("engine_restart") is not None
        return restarts, item.name == "test_the_machine_engine_was_never_stopped_or_restarted"

    items.sort(key=order)


def pytest_asyncio_loop_factories(config, item):
    # The proxy runs on uvloop in production: test it there, and the byte path on both.
    factories = {"uvloop": uvloop.new_event_loop}
    if os.environ.get("WAKEPROXY_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS:
        factories["asyncio"] = asyncio.new_event_loop
    return factories


@pytest.fixture(scope="session")
def docker_engine() -> None:
    try:
        answers = (
            subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        answers = False
    if not answers:
        message = "no Docker engine answers 'docker info'"
        if in_ci():
            pytest.fail(f"{message}: in CI the Docker tests must run (./dev test starts an engine)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def busybox_image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = _busybox_context(tmp_path_factory.mktemp("busybox-image"))
    docker("build", "--network", "host", "-q", "-t", BUSYBOX_IMAGE, str(context), within=120)
    return BUSYBOX_IMAGE


def _busybox_context(directory: Path) -> Path:
    shutil.copy(shutil.which("busybox") or "/bin/busybox", directory / "busybox")
    (directory / "www").mkdir()
    (directory / "www" / "index.html").write_text("hello from busybox\n")
    (directory / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nENTRYPOINT ["/bin/busybox"]\n'
    )
    return directory


def run_httpd(
    port: int,
    name: str,
    *,
    paused: bool = False,
    labels: dict[str, str] | None = None,
    shell: str | None = None,
    host: str | None = None,
) -> str:
    """A busybox httpd container (host network, 127.0.0.1 only), once it listens; its
    name. ``shell``: a busybox sh script run instead of httpd ({httpd} in it: the httpd
    command line, to exec once the script has done its part). ``host``: another engine."""
    labels = {"wakeproxy-test": "1", **(labels or {})}
    label_args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
    httpd = ["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"]
    command = httpd if shell is None else ["sh", "-c", shell.format(httpd=" ".join(httpd))]
    docker(
        "run", "-d", "--network", "host", "--name", name, *label_args, BUSYBOX_IMAGE,
        *command, host=host,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not port_answers(port):
        assert time.monotonic() < deadline, f"container {name} never listened on {port}"
        time.sleep(0.02)
    if paused:
        docker("pause", name, host=host)
    return name


class OwnEngine:
    """A second dockerd this test run started (its own data root, exec root and socket),
    for tests that stop or restart an engine: the machine's engine is never touched."""

    def __init__(self, root: Path, *, live_restore: bool = True) -> None:
        self.root = root
        self.host = f"unix://{root}/docker.sock"
        self.argv = [
            "dockerd", "--data-root", f"{root}/data", "--exec-root", f"{root}/exec",
            "--pidfile", f"{root}/docker.pid", "-H", self.host, "--bridge=none",
            "--iptables=false", "--ip-forward=false",
        ]  # fmt: skip
        if live_restore:  # containers outlive a restart (swarm mode refuses it)
            self.argv.append("--live-restore")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.root / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while not self.answers():
            assert self.process.poll() is None, (self.root / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the test's own dockerd did not answer"
            time.sleep(0.2)

    def answers(self) -> bool:
        result = subprocess.run(
            ["docker", "-H", self.host, "info"], capture_output=True, timeout=20
        )
        return result.returncode == 0

    def httpd(
        self, port: int, *, paused: bool = False, labels: dict[str, str] | None = None
    ) -> str:
        """busybox httpd on this engine (host network, 127.0.0.1 only); its name."""
        name = f"wp-own-{uuid.uuid4().hex[:10]}"
        return run_httpd(port, name, paused=paused, labels=labels, host=self.host)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM this engine (ours: its pid was recorded when it started) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


@pytest.fixture
def own_engine(
    docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OwnEngine]:
    yield from _own_engine(tmp_path_factory, live_restore=True)


@pytest.fixture
def own_swarm(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnEngine]:
    """A second dockerd of the test's own as a single-node swarm manager (advertised on
    127.0.0.1); it leaves the swarm before it stops."""
    for engine in _own_engine(tmp_path_factory, live_restore=False):
        docker("swarm", "init", "--advertise-addr", "127.0.0.1", host=engine.host, within=60)
        try:
            yield engine
        finally:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                docker("swarm", "leave", "--force", host=engine.host, within=60)


def _own_engine(
    tmp_path_factory: pytest.TempPathFactory, *, live_restore: bool
) -> Iterator[OwnEngine]:
    if os.geteuid() != 0:
        message = "a second dockerd needs root"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    # Short: a unix socket path is at most 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="wp-engine-", dir="/tmp"))
    engine = OwnEngine(root, live_restore=live_restore)
    engine.start()
    try:
        context = _busybox_context(tmp_path_factory.mktemp("own-engine-image"))
        docker(
            "build", "--network", "host", "-q", "-t", BUSYBOX_IMAGE, str(context),
            within=120, host=engine.host,
        )  # fmt: skip
        yield engine
    finally:
        if engine.process is None or engine.process.poll() is not None:
            engine.start()  # stopped by the test: back up, so its containers can be removed
        ids = docker("ps", "-aq", host=engine.host).split()
        if ids:
            docker("rm", "-f", *ids, host=engine.host)
        engine.stop()
        # dockerd leaves mounts under its roots (the data root on itself, the netns).
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{root}/")), reverse=True):
            subprocess.run(["umount", mount], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_container(busybox_image: str) -> Iterator[Callable[..., str]]:
    """Start busybox httpd containers (host network, 127.0.0.1 only); removed afterwards."""
    created: list[str] = []

    def make(
        port: int,
        *,
        paused: bool = False,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        shell: str | None = None,
    ) -> str:
        name = name or f"wp-test-{uuid.uuid4().hex[:10]}"
        created.append(name)
        return run_httpd(port, name, paused=paused, labels=labels, shell=shell)

    yield make
    for name in created:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def python_base(docker_engine) -> str:
    """A Debian bookworm Python base, made with debootstrap by ./dev (the same code that
    ./dev image falls back to where no base can be pulled)."""
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [str(root / "dev"), "python-base", PYTHON_BASE],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return PYTHON_BASE
