"""The deployment image, built for real and run next to a paused container.

No image can be pulled here: the Python base is made with debootstrap (Debian
bookworm, minbase + python3) and imported with ``docker import``; the build then
runs ``pip`` inside with host networking. The base is cached under its tag.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import docker, free_port, service_yaml

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).parent.parent
IMAGE = "wakeproxy-test/wakeproxy:test"
SOCKET = "/var/run/docker.sock"


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


def test_image_wakes_a_paused_container_and_turns_healthy(
    wakeproxy_image, make_container, tmp_path
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
    docker(
        "run", "-d", "--name", name, "--network", "host", "--group-add", group,
        "-v", f"{SOCKET}:{SOCKET}", "-v", f"{config}:/etc/wakeproxy/config.yaml:ro",
        wakeproxy_image,  # no WAKEPROXY_ADMIN: the health check reads admin.listen
    )  # fmt: skip
    try:
        info = json.loads(docker("inspect", name))[0]
        assert info["Config"]["User"] == "wakeproxy"  # not root
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
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
