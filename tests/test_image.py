"""The deployment image and the gateway example's images, built for real and run next to
paused containers; the gateway example's compose file, checked as compose reads it.

No image can be pulled here: the Python base is made with debootstrap (Debian bookworm,
minbase + python3) and imported with ``docker import``; the builds then run ``pip``
inside with host networking. The base is cached under its tag. The wakeproxy image runs
twice: as the README runs it, and hardened with exactly the options the compose example
gives it (read from config/docker-compose.yml). The gateway's own image is not built
here (about 500 MB of packages): the compose file's reference to it is checked instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    WAKEPROXY,
    call_text,
    config_from,
    container_status,
    docker,
    free_port,
    in_ci,
    mcp_client,
    port_answers,
    running,
    service_yaml,
    wait_until,
)
from wakeproxy.core.states import SleepAction, SleepReason, State

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).parent.parent
# Tagged per checkout: two checkouts testing at once on one engine never run each
# other's build (./dev clean removes every wakeproxy-test/ image).
_CHECKOUT = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
IMAGE = f"wakeproxy-test/wakeproxy:{_CHECKOUT}"
MCP_SERVER_IMAGE = f"wakeproxy-test/mcp-server:{_CHECKOUT}"
SOCKET = "/var/run/docker.sock"
COMPOSE = ROOT / "config" / "docker-compose.yml"
EXAMPLE_CONFIG = ROOT / "config" / "gateway-example.yaml"
STATE_DIR = "/var/lib/wakeproxy"


def compose(env_file: Path | None, gid: str = "4242") -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of the gateway example: the file as compose reads it."""
    if shutil.which("docker-compose") is None:
        if in_ci():
            pytest.fail("docker-compose is missing (./dev test installs it)")
        pytest.skip("docker-compose is not installed")
    env_args = ["--env-file", str(env_file)] if env_file is not None else []
    # The file's defaults, not what this shell may have exported for a build.
    env = {k: v for k, v in os.environ.items() if k not in ("BASE_IMAGE", "GATEWAY_VERSION")}
    return subprocess.run(
        ["docker-compose", *env_args, "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, timeout=60, env={**env, "DOCKER_GID": gid},
    )  # fmt: skip


def example_env(directory: Path) -> Path:
    """config/example.env as config/example-secrets writes it (run in a copy of config/)."""
    shutil.copy(ROOT / "config" / "example-secrets", directory / "example-secrets")
    result = subprocess.run(
        [str(directory / "example-secrets")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    env = directory / "example.env"
    assert env.stat().st_mode & 0o077 == 0, "the secrets are readable by others"
    return env


def example_services(tmp_path: Path, gid: str = "4242") -> dict[str, Any]:
    result = compose(example_env(tmp_path), gid)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def test_the_gateway_example_parses_and_fits_its_configs(tmp_path):
    result = compose(None)
    assert result.returncode != 0 and "run config/example-secrets" in result.stderr
    services = example_services(tmp_path)
    proxy = services["wakeproxy"]
    # Hardened as the original design asks of its services.
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert proxy["security_opt"] == ["no-new-privileges:true"]
    assert proxy["user"].split(":")[0] not in ("0", "root")
    assert "/tmp" in proxy["tmpfs"] and proxy["group_add"] == ["4242"]
    # Compose 1.29 renders file format 2.x volumes as strings.
    assert f"{SOCKET}:{SOCKET}:rw" in proxy["volumes"]
    assert f"{EXAMPLE_CONFIG}:/etc/wakeproxy/config.yaml:ro" in proxy["volumes"]
    assert f"wakeproxy-state:{STATE_DIR}:rw" in proxy["volumes"]
    assert proxy["environment"]["WAKEPROXY_ADMIN_TOKEN"]
    assert proxy["ports"] == ["127.0.0.1:9000:9000/tcp"]

    # Each of wakeproxy's services is a container of the file listening on that port,
    # registered with the gateway at wakeproxy's address on that port.
    example = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert example["admin"]["listen"] == "0.0.0.0:9000"
    registering = (ROOT / "config" / "register-servers").read_text()
    by_container = {s.get("container_name"): s for s in services.values()}
    for name, entry in example["services"].items():
        server = by_container[entry["container"]]
        assert server["command"][-2:] == ["--port", str(entry["port"])], name
        assert server["read_only"] is True and server["cap_drop"] == ["ALL"], name
        assert server["restart"] == "no", f"{name}: wakeproxy decides when it runs"
        assert f"{name}:{entry['port']}" in registering
    assert "http://wakeproxy:$port/mcp" in registering

    gateway = services["gateway"]
    assert gateway["environment"]["SSRF_ALLOW_PRIVATE_NETWORKS"] == "true"
    assert gateway["depends_on"]["wakeproxy"]["condition"] == "service_healthy"
    for service in services.values():  # every image is built here, from config/
        build = Path(service["build"]["context"])
        assert (build / "Dockerfile").exists() and build.is_relative_to(ROOT)
        assert service["build"]["args"]["BASE_IMAGE"] == "python:3.12-slim"

    env = {**os.environ, "WAKEPROXY_ADMIN_TOKEN": "a-test-token"}
    for config, count in ((EXAMPLE_CONFIG, 2), (ROOT / "config" / "services.yml", 2)):
        result = subprocess.run(
            [*WAKEPROXY, "check", "-c", str(config)],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert result.returncode == 0 and f"ok, {count} service(s)" in result.stdout, (
            result.stdout + result.stderr
        )


@pytest.fixture(scope="session")
def wakeproxy_image(python_base) -> str:
    # Built as the README says: ./dev image (here with the test's base and tag).
    result = subprocess.run(
        [str(ROOT / "dev"), "image"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "BASE_IMAGE": python_base, "IMAGE": IMAGE},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return IMAGE


# Compose keys of wakeproxy's service the hardened run carries over, and those it cannot:
# the build, the image (the test's own), the port (host networking here), the restart.
_CARRIED = {"user", "read_only", "cap_drop", "security_opt", "tmpfs", "group_add", "volumes",
            "environment"}  # fmt: skip
_NOT_CARRIED = {"build", "image", "ports", "restart"}


def compose_run_options(proxy: dict[str, Any], state_volume: str, config: Path) -> list[str]:
    """docker run's options for compose's wakeproxy service: the same hardening, the same
    mounts, with this test's config file and state volume."""
    assert set(proxy) <= _CARRIED | _NOT_CARRIED, f"not carried over: {set(proxy) - _CARRIED}"
    options = ["--user", proxy["user"]]
    if proxy.get("read_only"):
        options.append("--read-only")
    options += [arg for cap in proxy.get("cap_drop", []) for arg in ("--cap-drop", cap)]
    options += [arg for opt in proxy.get("security_opt", []) for arg in ("--security-opt", opt)]
    options += [arg for path in proxy.get("tmpfs", []) for arg in ("--tmpfs", path)]
    options += [arg for gid in proxy.get("group_add", []) for arg in ("--group-add", gid)]
    for volume in proxy["volumes"]:
        source, target, mode = volume.rsplit(":", 2)
        if target == "/etc/wakeproxy/config.yaml":
            source = str(config)
        elif not source.startswith("/"):  # a named volume: the test's own
            source = state_volume
        options += ["-v", f"{source}:{target}:{mode}"]
    for key, value in proxy.get("environment", {}).items():
        options += ["-e", f"{key}={value}"]
    return options


@pytest.mark.docker
@pytest.mark.parametrize("run", ["as-readme", "hardened-as-compose"])
def test_image_wakes_a_paused_container_and_turns_healthy(
    wakeproxy_image, make_container, tmp_path, run
):
    backend, port, admin = free_port(), free_port(), free_port()
    target = make_container(backend, paused=True)
    config = tmp_path / "config.yaml"
    text = service_yaml(port, backend, container=target, sleep_policy="{idle_timeout: 600}")
    config.write_text(text.replace("  listen: 127.0.0.1:", f"  listen: 127.0.0.1:{admin}\n  #", 1))
    config.chmod(0o644)
    config.parent.chmod(0o755)
    name = f"wp-test-image-{port}"
    group = str(os.stat(SOCKET).st_gid)
    volume = f"wp-test-state-{uuid.uuid4().hex[:10]}"
    if run == "as-readme":
        options = ["--group-add", group, "-v", f"{SOCKET}:{SOCKET}",
                   "-v", f"{config}:/etc/wakeproxy/config.yaml:ro"]  # fmt: skip
    else:
        proxy = example_services(tmp_path, gid=group)["wakeproxy"]
        options = compose_run_options(proxy, volume, config)
    docker(
        "run", "-d", "--name", name, "--label", "wakeproxy-test=1", "--network", "host",
        *options, wakeproxy_image,  # no WAKEPROXY_ADMIN: the health check reads admin.listen
    )  # fmt: skip
    try:
        info = json.loads(docker("inspect", name))[0]
        if run == "as-readme":
            assert info["Config"]["User"] == "wakeproxy"  # not root
        else:
            host = info["HostConfig"]
            assert info["Config"]["User"] == "10001:10001"
            assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
            assert host["SecurityOpt"] == ["no-new-privileges:true"]
            assert "/tmp" in host["Tmpfs"] and host["GroupAdd"] == [group]
        deadline = time.monotonic() + 60
        while docker("inspect", "-f", "{{.State.Health.Status}}", name) != "healthy":
            assert docker("inspect", "-f", "{{.State.Status}}", name) == "running", docker(
                "logs", name
            )
            assert time.monotonic() < deadline, "never turned healthy: " + docker("logs", name)
            time.sleep(0.5)
        # Still paused: healthy proxy, nothing woke it (a connect would: wake_on connect).
        assert docker("inspect", "-f", "{{.State.Status}}", target) == "paused"
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.endswith(b"hello from busybox\n")
        assert docker("inspect", "-f", "{{.State.Status}}", target) == "running"
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        assert "web: paused -> waking (connection while paused)" in logs
        if run != "as-readme":
            # Where it may write, it can; elsewhere the file system refuses.
            docker("exec", name, "touch", f"{STATE_DIR}/written", "/tmp/written")
            refused = subprocess.run(
                ["docker", "exec", name, "touch", "/etc/wakeproxy/written"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def example_mcp_image(python_base: str) -> str:
    """The gateway example's MCP server image, built from config/images/mcp-server as
    docs/deploy.md says, on the local Python base."""
    docker(
        "build", "--network", "host", "-q", "--build-arg", f"BASE_IMAGE={python_base}",
        "-t", MCP_SERVER_IMAGE, str(ROOT / "config" / "images" / "mcp-server"), within=600,
    )  # fmt: skip
    return MCP_SERVER_IMAGE


@pytest.mark.docker
@pytest.mark.asyncio
async def test_the_example_mcp_servers_wake_for_tool_calls_and_notes_outlive_a_pause(
    example_mcp_image, tmp_path
):
    # Hardened as compose runs them; host networking on loopback instead of compose's network.
    server = example_services(tmp_path)["mcp-notes"]
    hardening = ["--read-only", *(a for c in server["cap_drop"] for a in ("--cap-drop", c))]
    hardening += [a for o in server["security_opt"] for a in ("--security-opt", o)]
    names: dict[str, str] = {}
    ports: dict[str, tuple[int, int]] = {}  # role: (wakeproxy's port, the server's)
    try:
        for role in ("clock", "notes"):
            ports[role] = (free_port(), free_port())
            names[role] = f"wp-test-example-{role}-{uuid.uuid4().hex[:8]}"
            docker(
                "run", "-d", "--name", names[role], "--label", "wakeproxy-test=1",
                "--network", "host", *hardening, example_mcp_image,
                "--role", role, "--host", "127.0.0.1", "--port", str(ports[role][1]),
            )  # fmt: skip
        for role, (_, backend) in ports.items():
            await wait_until(lambda b=backend: port_answers(b), within=60, interval=0.1)
            docker("pause", names[role])
        lines = ["services:"]
        for role, (port, backend) in ports.items():
            lines += [
                f"  {role}:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f"    container: {names[role]}",
                "    mode: http",
                "    sleep_policy: {idle_timeout: 600}",
            ]
        async with running(config_from("\n".join(lines))) as proxy:
            clock, notes = proxy.services["clock"], proxy.services["notes"]
            assert clock.state is State.PAUSED and notes.state is State.PAUSED
            async with mcp_client(ports["clock"][0]) as (session, result, _):
                assert result.serverInfo.name == "example-clock"
                days = await call_text(
                    session, "days_between", start="2026-01-01", end="2026-03-01"
                )
                assert days == "59"
                assert (await call_text(session, "now", timezone="Europe/Berlin"))[-6:] in (
                    "+01:00",
                    "+02:00",
                )
            assert container_status(names["clock"]) == "running"
            async with mcp_client(ports["notes"][0]) as (session, _, _):
                assert (await call_text(session, "remember", text="milk")).startswith("noted")
            await wait_until(lambda: notes.stats.wakes["ok"] == 1, within=10)
            # Forced: the client's last connection may not have closed yet.
            await notes.sleep(SleepAction.PAUSE, SleepReason.API, force=True)
            assert container_status(names["notes"]) == "paused"
            async with mcp_client(ports["notes"][0]) as (session, _, _):
                assert await call_text(session, "recall") == "milk"
            assert notes.stats.wakes["ok"] == 2 and clock.stats.wakes["ok"] == 1
    finally:
        for name in names.values():
            docker("rm", "-f", name)


GATEWAY_IMAGE = "wakeproxy-test/gateway:1.0.7"
# The gateway's settings for a run on loopback: strong secrets (it refuses weak ones),
# loopback targets allowed (SSRF protection refuses them by default), checks every 3 s.
_GATEWAY_ENV = {
    "PLATFORM_ADMIN_EMAIL": "admin@example.com",
    "SSRF_ALLOW_LOCALHOST": "true",
    "MCPGATEWAY_ADMIN_API_ENABLED": "true",
    "HEALTH_CHECK_INTERVAL": "3",
}
_SECRETS = ("JWT_SECRET_KEY", "AUTH_ENCRYPTION_SECRET", "PLATFORM_ADMIN_PASSWORD",
            "DEFAULT_USER_PASSWORD", "BASIC_AUTH_PASSWORD")  # fmt: skip
_ASLEEP = {"clock": "stopped", "notes": "paused"}


def _until(what: str, check: Callable[[], bool], within: float = 120) -> None:
    """Poll ``check`` (an HTTP error counts as not yet) until it holds."""
    import httpx

    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.25)


@dataclass
class GatewayExample:
    """The gateway example's containers on loopback (host networking)."""

    admin: int = field(default_factory=free_port)
    gateway: int = field(default_factory=free_port)
    # role: (wakeproxy's port, the server's own)
    ports: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {role: (free_port(), free_port()) for role in _ASLEEP}
    )
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def name(self, role: str) -> str:
        return f"wp-test-gw-{role}-{self.suffix}"

    def config(self) -> str:
        """wakeproxy's config: gateway-example.yaml's services, on loopback addresses."""
        lines = [f"admin: {{listen: 127.0.0.1:{self.admin}}}", "services:"]
        for role, (port, backend) in self.ports.items():
            action = "stop" if _ASLEEP[role] == "stopped" else "pause"
            lines += [
                f"  {role}:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f"    container: {self.name(role)}",
                "    mode: http",
                "    wake_timeout: 25",
                f"    sleep_policy: {{idle_timeout: 4, action: {action}}}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, images: dict[str, str], compose: dict[str, Any], tmp_path: Path) -> None:
        server = compose["mcp-clock"]
        hardening = ["--read-only", *(a for c in server["cap_drop"] for a in ("--cap-drop", c))]
        hardening += [a for o in server["security_opt"] for a in ("--security-opt", o)]
        run = ["run", "-d", "--label", "wakeproxy-test=1", "--network", "host"]
        for role, (_, backend) in self.ports.items():
            docker(
                *run, "--name", self.name(role), *hardening, images["mcp"],
                "--role", role, "--host", "127.0.0.1", "--port", str(backend),
            )  # fmt: skip
        config = tmp_path / "config.yaml"
        config.write_text(self.config())
        config.chmod(0o644)
        tmp_path.chmod(0o755)
        options = compose_run_options(compose["wakeproxy"], self.name("state"), config)
        docker(*run, "--name", self.name("proxy"), *options, images["proxy"])
        secrets = {key: uuid.uuid4().hex + uuid.uuid4().hex for key in _SECRETS}
        env = [arg for k, v in {**_GATEWAY_ENV, **secrets}.items() for arg in ("-e", f"{k}={v}")]
        docker(
            *run, "--name", self.name("gateway"), *env, images["gateway"],
            "python", "-m", "mcpgateway.cli", "--host", "127.0.0.1", "--port", str(self.gateway),
        )  # fmt: skip

    def remove(self) -> None:
        for role in (*self.ports, "proxy", "gateway"):
            subprocess.run(
                ["docker", "rm", "-f", "-v", self.name(role)], capture_output=True, timeout=60
            )
        subprocess.run(
            ["docker", "volume", "rm", "-f", self.name("state")], capture_output=True, timeout=60
        )


@pytest.mark.docker
@pytest.mark.timeout(1200)  # the gateway's image: about 3 min to build, cached after
def test_the_gateway_image_calls_the_example_servers_through_the_hardened_proxy(
    python_base, wakeproxy_image, example_mcp_image, tmp_path
):
    """The gateway example with every image of it, on loopback instead of compose's
    network: the gateway built from config/images/gateway (1.0.7: the Python base here
    is 3.11), registered as config/register-servers does; its checks of the sleeping
    servers wake nothing, each tool call wakes its server once."""
    import httpx  # the test extra's; only this opt-in test needs it here

    docker(
        "build", "--network", "host", "-q", "--build-arg", f"BASE_IMAGE={python_base}",
        "--build-arg", "GATEWAY_VERSION=1.0.7", "-t", GATEWAY_IMAGE,
        str(ROOT / "config" / "images" / "gateway"), within=900,
    )  # fmt: skip
    example = GatewayExample()
    images = {"mcp": example_mcp_image, "proxy": wakeproxy_image, "gateway": GATEWAY_IMAGE}
    compose = example_services(tmp_path, gid=str(os.stat(SOCKET).st_gid))
    try:
        example.start(images, compose, tmp_path)
        with httpx.Client(timeout=90) as http:
            base = f"http://127.0.0.1:{example.gateway}"

            def services() -> dict[str, Any]:
                answer = http.get(f"http://127.0.0.1:{example.admin}/services").json()
                return {s["name"]: s for s in answer["services"]}

            def call(tool: str, **arguments: Any) -> str:
                body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": tool, "arguments": arguments}}  # fmt: skip
                answer = http.post(f"{base}/rpc", json=body, headers=auth).json()
                return str(answer["result"]["content"][0]["text"])

            _until("the gateway's /health", lambda: http.get(f"{base}/health").is_success)
            # As config/register-servers does: a token minted in the gateway's container.
            token = docker(
                "exec", example.name("gateway"), "python", "-m",
                "mcpgateway.utils.create_jwt_token", "-u", "admin@example.com", "--admin",
                "-e", "10",
            ).splitlines()[-1]  # fmt: skip
            auth = {"Authorization": f"Bearer {token}"}
            for role, (port, _) in example.ports.items():
                body = {"name": role, "url": f"http://127.0.0.1:{port}/mcp",
                        "transport": "STREAMABLEHTTP"}  # fmt: skip
                answer = http.post(f"{base}/gateways", json=body, headers=auth)
                assert answer.is_success, answer.text

            _until("both asleep", lambda: all(
                services()[role]["state"] == state for role, state in _ASLEEP.items()
            ))  # fmt: skip
            before = services()
            time.sleep(10)  # three checks of each server by the gateway
            after = services()
            for role, state in _ASLEEP.items():
                assert after[role]["wakes"] == before[role]["wakes"], f"a check woke {role}"
                assert after[role]["state"] == state
                checks = after[role]["mcp"]["answered"].get("initialize", 0)
                assert checks > before[role]["mcp"]["answered"].get("initialize", 0)

            assert call("clock-days-between", start="2026-01-01", end="2026-03-01") == "59"
            assert call("notes-remember", text="milk").startswith("noted")
            woken = services()
            assert {r: woken[r]["wakes"] - after[r]["wakes"] for r in _ASLEEP} == {
                "clock": 1,
                "notes": 1,
            }
            _until("notes asleep again", lambda: services()["notes"]["state"] == "paused")
            assert call("notes-recall") == "milk", "the pause kept its memory"
            assert services()["notes"]["wakes"] == woken["notes"]["wakes"] + 1
    finally:
        example.remove()
