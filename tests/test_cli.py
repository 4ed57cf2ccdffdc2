"""The ``wakeproxy`` command as users run it: a separate process, signals, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.backends.server import payload
from tests.helpers import (
    WAKEPROXY,
    backend_command,
    consecutive_ports,
    free_port,
    in_ci,
    pids_with,
    port_answers,
    proc_state,
    service_yaml,
    start_proxy,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WAKEPROXY, *args], capture_output=True, text=True, timeout=30, env=env)


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "wakeproxy 0.1.0"


def test_check_accepts_a_good_file_and_rejects_a_bad_one_with_exit_2(tmp_path):
    good = write(
        tmp_path, "services:\n  a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: a}\n"
    )
    result = cli("check", "-c", str(good))
    assert result.returncode == 0 and "ok, 1 service(s)" in result.stdout
    bad = write(tmp_path, "services:\n  a:\n    listen: 127.0.0.1:1\n    backlog: -3\n")
    for command in ("check", "run"):
        result = cli(command, "-c", str(bad))
        assert result.returncode == 2
        assert (
            f"{bad}:4: services.a.backlog: expected a whole number from 1 to 65535, got -3"
            in result.stderr
        )


def test_check_reports_what_run_refuses_and_warns_of_a_missing_executable(tmp_path):
    # Before the fix check passed all of these; run refused the first two at start.
    public = write(
        tmp_path,
        "admin: {listen: 0.0.0.0:9000}\n"
        "services:\n  a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: a}\n",
    )
    env = {k: v for k, v in os.environ.items() if k != "WAKEPROXY_ADMIN_TOKEN"}
    result = cli("check", "-c", str(public), env=env)
    assert result.returncode == 2
    why = "admin.listen: 0.0.0.0:9000 is not a loopback address and no admin token"
    assert why in result.stderr
    missing = write(
        tmp_path,
        "services:\n"
        "  a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, command: [no-such-server-xyz]}\n"
        "  b: {listen: 127.0.0.1:3, backend: 127.0.0.1:4, command: [./bin/nope]}\n",
    )
    result = cli("check", "-c", str(missing))
    assert result.returncode == 0 and "ok, 2 service(s)" in result.stdout
    assert "warning: services.a.command: 'no-such-server-xyz' is not on PATH" in result.stderr
    assert "warning: services.b.command: './bin/nope' does not exist" in result.stderr


def test_every_fault_of_a_file_in_one_pass(tmp_path):
    # A service with faults of its own still takes part in the checks across services:
    # before, the clash and the unknown dependency showed only once its fault was fixed.
    bad = write(
        tmp_path,
        """
        services:
          a:
            listen: 127.0.0.1:7000
            backend: 127.0.0.1:7001
            container: a
            backlog: lots
            depends_on: [ghost]
          b: {listen: 127.0.0.1:7000, backend: 127.0.0.1:7002, container: b}
        """,
    )
    result = cli("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any("services.a.backlog: expected a whole number" in line for line in lines), lines
    assert any("services.a.depends_on: no service named 'ghost'" in line for line in lines)
    assert any(
        "services.b.listen: 127.0.0.1:7000 is already used by services.a.listen" in line
        for line in lines
    ), lines


def test_admin_listen_override_is_held_to_the_files_rules(tmp_path):
    config = write(
        tmp_path, "services:\n  a: {listen: 127.0.0.1:7300, backend: 127.0.0.1:2, container: a}\n"
    )
    result = cli("run", "-c", str(config), "--admin-listen", "127.0.0.1:7300")
    assert result.returncode == 2
    assert "--admin-listen: 127.0.0.1:7300 is already used by services.a.listen" in result.stderr
    result = cli("run", "-c", str(config), "--admin-listen", "nowhere")
    assert result.returncode == 2 and "--admin-listen: expected host:port" in result.stderr


def test_config_path_from_the_environment(tmp_path):
    good = write(
        tmp_path, "services:\n  a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: a}\n"
    )
    result = cli("check", env={**os.environ, "WAKEPROXY_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr


def test_sigterm_shuts_down_cleanly_and_ends_the_commands(tmp_path):
    port, backend = free_port(), free_port()
    config = write(
        tmp_path,
        service_yaml(
            port,
            backend,
            command=backend_command(backend, "http"),
            sleep_policy="{idle_timeout: 0.3}",
        ),
    )
    proxy = start_proxy(config, port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
        marker = f"--port {backend} "
        [pid] = pids_with(marker)
        deadline = time.monotonic() + 10
        while proc_state(pid) not in ("T", "t"):  # SIGTERM must end it paused (SIGCONT first)
            assert time.monotonic() < deadline, "the command was never paused"
            time.sleep(0.02)
    finally:
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=30)
    assert proxy.returncode == 0, err
    assert "web: running -> pausing (idle)" in err
    assert "shutting down" in err
    assert pids_with(marker) == []


def test_listen_address_in_use_exits_1_with_the_reason(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write(
            tmp_path,
            f"services:\n  web: {{listen: 127.0.0.1:{port}, backend: 127.0.0.1:1, command: [x]}}\n",
        )
        result = subprocess.run(
            [*WAKEPROXY, "run", "-c", str(config)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert (
        f"service web: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    )


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(240)
def test_256_mib_to_a_slow_reader_is_identical_and_memory_stays_low(tmp_path):
    size, seed = 256 * 1024 * 1024, 7
    port, backend = free_port(), free_port()
    command = backend_command(backend, "source", "--size", str(size), "--seed", str(seed))
    config = write(
        tmp_path,
        service_yaml(port, backend, name="bulk", command=command, sleep_policy="{enabled: false}"),
    )
    expected = hashlib.sha256()
    for block in payload(seed, size):
        expected.update(block)
    proxy = start_proxy(config, port)
    try:
        digest, total, reads = hashlib.sha256(), 0, 0
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            while data := sock.recv(64 * 1024):
                digest.update(data)
                total += len(data)
                reads += 1
                if reads % 4 == 0:
                    time.sleep(0.001)  # a reader slower than the backend writes
        assert total == size
        assert digest.hexdigest() == expected.hexdigest()
        peak = peak_rss_mib(proxy.pid)
        assert peak < 100, f"proxy peak RSS {peak:.1f} MiB"
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.communicate(timeout=30)


def test_json_logs_carry_the_state_change_fields(tmp_path):
    port, backend = free_port(), free_port()
    config = write(tmp_path, service_yaml(port, backend, command=backend_command(backend, "http")))
    proxy = start_proxy(config, port, "--log-format", "json")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=30)
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    change = next(e for e in entries if e.get("from") == "stopped")
    assert change["service"] == "web" and change["state"] == "waking"
    assert change["reason"] == "connection while stopped" and change["level"] == "info"
    assert any("wake_ms" in e for e in entries)


def test_status_sleep_and_wake_commands(tmp_path):
    port, backend, admin_port = free_port(), free_port(), free_port()
    text = service_yaml(port, backend, command=backend_command(backend, "http"))
    text = text.replace(
        "admin:\n  listen: 127.0.0.1:", f"admin:\n  listen: 127.0.0.1:{admin_port}\n  #", 1
    )
    config = write(tmp_path, text)
    env = {**os.environ, "WAKEPROXY_ADMIN_TOKEN": " t0k \n"}
    proxy = subprocess.Popen(
        [*WAKEPROXY, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True, env=env
    )
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.monotonic() + 15
        while not port_answers(admin_port):
            assert proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        result = cli("status", "--admin", admin)
        assert result.returncode == 0, result.stderr
        head, row = result.stdout.splitlines()
        assert head.split()[:3] == ["SERVICE", "STATE", "OPEN"]
        assert row.split()[:2] == ["web", "stopped"]
        # Writes need the token: from the environment (whitespace stripped), or a file.
        result = cli("wake", "web", "--admin", admin)
        assert result.returncode == 1 and "401" in result.stderr
        token = tmp_path / "token"
        token.write_text("t0k\n")
        result = cli("wake", "web", "--admin", admin, "--token-file", str(token))
        assert (result.returncode, result.stdout) == (0, "web: running\n"), result.stderr
        result = cli("sleep", "web", "--admin", admin, env=env)
        assert (result.returncode, result.stdout) == (0, "web: paused\n"), result.stderr
        assert cli("status", "--admin", admin).stdout.splitlines()[1].split()[1] == "paused"
        # Refused with a connection open: the hint names the CLI's flag, not the API's.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")
            result = cli("sleep", "web", "--admin", admin, env=env)
            assert result.returncode == 1
            assert "409: 1 connection(s) open; add --force to sleep anyway" in result.stderr
            assert "?force" not in result.stderr
            result = cli("sleep", "web", "--force", "--admin", admin, env=env)
            assert (result.returncode, result.stdout) == (0, "web: paused\n"), result.stderr
        result = cli("reload", "--admin", admin, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "no changes; 1 unchanged, 0 failed, 0 needing a restart\n"
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.communicate(timeout=30)
    result = cli("status", "--admin", admin)
    assert result.returncode == 3 and "cannot reach the admin API" in result.stderr


def test_the_stack_and_replica_examples_parse_and_their_configs_load():
    root = Path(__file__).parent.parent
    if shutil.which("docker-compose") is None:
        if in_ci():
            pytest.fail("docker-compose is missing (./dev test installs it)")
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        ["docker-compose", "-f", str(root / "config/wakeproxy-stack.yml"), "config"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)["services"]
    assert stack["web"]["deploy"]["replicas"] == 0
    assert stack["wakeproxy"]["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    for name, count in (("stack.yaml", 1), ("replicas.yaml", 1)):
        result = cli("check", "-c", str(root / "config" / name))
        assert result.returncode == 0 and f"ok, {count} service(s)" in result.stdout, name


# ---- the admin API's client: light, and it finds its proxy (issue 28)

# What the client path must never import: the proxy and its dependencies.
HEAVY = {"wakeproxy.app", "wakeproxy.config", "aiodocker", "aiohttp", "uvloop"}
HEAVY |= {"prometheus_client", "h11", "orjson", "wakeproxy.serve", "wakeproxy.control.admin"}
# Loaded with the CLI as the console script loads it; prints the modules at the end.
MODULES_OF = (
    "import json, sys\n"
    "from wakeproxy.control.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(json.dumps(sorted(sys.modules)))\n"
    "sys.exit(code)\n"
)


def client_config(tmp_path: Path, admin_port: int, *, web: int, backend: int, first: int) -> Path:
    """A proxy with a token in a file named relative to the config, a command service
    and one with two replicas."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("s3cret\n")
    tools = free_port()
    text = f"""\
        admin:
          listen: 127.0.0.1:{admin_port}
          token_file: secrets/token
        mcp: {{state_file: null}}
        prediction: {{state_file: null}}
        services:
          web:
            listen: 127.0.0.1:{web}
            backend: 127.0.0.1:{backend}
            command: {json.dumps(backend_command(backend, "http"))}
            sleep_policy: {{idle_timeout: 600}}
          tools:
            listen: 127.0.0.1:{tools}
            backend: 127.0.0.1:{first}
            command: {json.dumps(backend_command(0, "http")).replace('"0"', '"{port}"')}
            replicas: {{count: 2}}
            sleep_policy: {{idle_timeout: 600}}
        """
    return write(tmp_path, text)


def run_proxy(config: Path, admin_port: int, log: Path) -> subprocess.Popen[bytes]:
    """``wakeproxy run``, its log in a file (a pipe nobody reads would fill and block it),
    once its admin API answers."""
    with log.open("wb") as out:
        proxy = subprocess.Popen([*WAKEPROXY, "run", "-c", str(config)], stderr=out)
    deadline = time.monotonic() + 15
    while not port_answers(admin_port):
        assert proxy.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the admin API never answered"
        time.sleep(0.05)
    return proxy


def stop_proxy(proxy: subprocess.Popen[bytes]) -> None:
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(timeout=30)


def client_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would tell the client where to go."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAKEPROXY_")}
    return {**env, **extra}


def from_root(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI started from / (as systemd starts things): paths must not depend on it."""
    return subprocess.run(
        [*WAKEPROXY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or client_env(),
        cwd="/",
    )


def test_every_verb_finds_the_proxy_from_the_config_alone(tmp_path):
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    proxy = run_proxy(config, admin_port, tmp_path / "proxy.log")
    c = ("-c", str(config))
    try:
        result = from_root("status", *c)
        assert result.returncode == 0, result.stderr
        rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
        assert rows == [["web", "stopped"], ["tools@1", "stopped"], ["tools@2", "stopped"]]
        # The token comes from admin.token_file, relative to the config file's folder.
        result = from_root("wake", "web", *c)
        assert (result.returncode, result.stdout) == (0, "web: running\n"), result.stderr
        result = from_root("status", "web", *c, "-o", "json")
        [entry] = json.loads(result.stdout)["services"]
        assert (entry["name"], entry["state"]) == ("web", "running")
        assert from_root("status", "tools", *c, "-o", "name").stdout == "tools@1\ntools@2\n"
        result = from_root("sleep", "web", *c)
        assert (result.returncode, result.stdout) == (0, "web: paused\n"), result.stderr
        result = from_root("stop", "web", *c, "-o", "json")
        assert json.loads(result.stdout) == {"name": "web", "state": "stopped"}, result.stderr
        assert from_root("wake", "web", *c).returncode == 0
        result = from_root("hibernate", "web", *c)
        assert result.returncode == 0 and result.stdout.startswith("web: paused ("), result
        result = from_root("scale", "tools", "2", *c)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "tools: 2 of 2 awake",
            "  tools@1: running",
            "  tools@2: running",
        ]
        result = from_root("scale", "tools", "0", *c)
        assert result.stdout.splitlines()[0] == "tools: 0 of 2 awake", result.stderr
        result = from_root("wake-all", *c)
        assert result.returncode == 0, result.stderr
        assert sorted(result.stdout.splitlines()) == [
            "tools@1: running",
            "tools@2: running",
            "web: running",
        ]
        # The newest replica first: an older one does not sleep while a newer is awake.
        assert from_root("sleep", "tools@2", *c).stdout == "tools@2: paused\n"
        result = from_root("sleep-all", *c)
        assert result.returncode == 0, result.stdout
        assert set(result.stdout.splitlines()) == {
            "tools@1: paused",
            "tools@2: paused",
            "web: paused",
        }
        result = from_root("reload", *c)
        # (A reload counts what the proxy runs: each replica.)
        assert result.stdout == "no changes; 3 unchanged, 0 failed, 0 needing a restart\n"
        result = from_root("metrics", *c)
        assert 'wakeproxy_service_state{service="web",state="paused"} 1.0' in result.stdout
        assert from_root("health", *c).returncode == 0
        assert from_root("status", "nothing-here", *c).returncode == 1
        # The same with the config from the environment instead of -c.
        env = client_env(WAKEPROXY_CONFIG=str(config))
        assert from_root("wake", "web", env=env).stdout == "web: running\n"
        # And with no flag and no environment, from the config's own folder.
        here = subprocess.run(
            [*WAKEPROXY, "sleep", "web"],
            capture_output=True,
            text=True,
            timeout=60,
            env=client_env(),
            cwd=tmp_path,
        )
        assert (here.returncode, here.stdout) == (0, "web: paused\n"), here.stderr
        # What `status` and `health` load: the client alone, never the proxy. This is
        # what keeps them cheap (0.6 s of CPU before, mostly imports).
        for verb in ("status", "health"):
            result = subprocess.run(
                [sys.executable, "-c", MODULES_OF, verb, *c],
                capture_output=True,
                text=True,
                timeout=60,
                env=client_env(),
            )
            assert result.returncode == 0, result.stderr
            loaded = set(json.loads(result.stdout.splitlines()[-1]))
            heavy = {m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY}
            assert heavy == set(), f"{verb} imported {sorted(heavy)}"
            assert "wakeproxy.control.client" in loaded
    finally:
        stop_proxy(proxy)


def test_the_admin_address_comes_from_the_flag_then_the_environment_then_the_config(tmp_path):
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    dead = free_port()  # nothing listens there
    elsewhere = write(tmp_path / "secrets", f"admin: {{listen: 127.0.0.1:{dead}}}\n")
    live, gone = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{dead}"
    proxy = run_proxy(config, admin_port, tmp_path / "proxy.log")
    try:
        # --admin wins over $WAKEPROXY_ADMIN ...
        result = from_root("status", "--admin", gone, env=client_env(WAKEPROXY_ADMIN=live))
        assert result.returncode == 3 and f"{gone} (--admin)" in result.stderr
        assert from_root("status", "--admin", live, env=client_env(WAKEPROXY_ADMIN=gone)).stdout
        # ... $WAKEPROXY_ADMIN over the config ...
        result = from_root("status", "-c", str(config), env=client_env(WAKEPROXY_ADMIN=gone))
        assert result.returncode == 3 and "($WAKEPROXY_ADMIN)" in result.stderr
        # ... -c over $WAKEPROXY_CONFIG, which is used without -c.
        env = client_env(WAKEPROXY_CONFIG=str(elsewhere))
        assert from_root("status", "-c", str(config), env=env).returncode == 0
        result = from_root("status", env=env)
        assert result.returncode == 3 and f"admin.listen in {elsewhere}" in result.stderr
        # HOST:PORT is taken for http://HOST:PORT.
        assert from_root("status", "--admin", f"127.0.0.1:{admin_port}").returncode == 0
    finally:
        stop_proxy(proxy)
    # A config that cannot be read is a config problem: exit 2, naming the file.
    result = from_root("status", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.yaml'}: cannot read the config file" in result.stderr


def test_where_the_client_looks_in_order_without_a_proxy(tmp_path, monkeypatch):
    from wakeproxy.config import DEFAULT_CONFIG_PATH as PROXY_DEFAULT
    from wakeproxy.config.source import MAX_CONFIG_BYTES as PROXY_MAX
    from wakeproxy.control import admin
    from wakeproxy.control.client import (
        DEFAULT_CONFIG_PATH,
        MAX_CONFIG_BYTES,
        TOKEN_ENV,
        find_target,
    )

    # Spelled twice (the client must not import the proxy's modules): they agree.
    assert (TOKEN_ENV, DEFAULT_CONFIG_PATH, MAX_CONFIG_BYTES) == (
        admin.TOKEN_ENV,
        PROXY_DEFAULT,
        PROXY_MAX,
    )
    (tmp_path / "token").write_text("from-config\n")
    config = write(tmp_path, "admin:\n  listen: '0.0.0.0:7001'\n  token_file: token\n")
    flag = tmp_path / "flag-token"
    flag.write_text("from-flag")
    target = find_target(None, None, str(config), {})
    # A wildcard listen address is asked on loopback; the token file is the config's.
    assert (target.url, target.token) == ("http://127.0.0.1:7001", "from-config")
    target = find_target("http://h:1/", str(flag), str(config), {TOKEN_ENV: " env "})
    assert (target.url, target.token, target.token_from) == ("http://h:1", "env", f"${TOKEN_ENV}")
    target = find_target(None, str(flag), None, {"WAKEPROXY_CONFIG": str(config)})
    assert (target.url, target.token) == ("http://127.0.0.1:7001", "from-flag")
    assert find_target(None, None, None, {"WAKEPROXY_ADMIN": "http://[::1]:5"}).url == (
        "http://[::1]:5"
    )
    if not Path(DEFAULT_CONFIG_PATH).exists():
        target = find_target(None, None, None, {})
        assert (target.url, target.token) == ("http://127.0.0.1:9000", None)
    # An alias bomb elsewhere in the file costs nothing: only admin: is read.
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    config.write_text(bomb + "admin: {listen: '[::]:7002'}\n")
    assert find_target(None, None, str(config), {}).url == "http://[::1]:7002"


def test_a_401_says_how_to_pass_the_token(tmp_path):
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    proxy = run_proxy(config, admin_port, tmp_path / "proxy.log")
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        result = from_root("wake", "web", "--admin", admin)
        assert result.returncode == 1
        assert "401: missing or wrong bearer token (none was sent)" in result.stderr
        assert "--token-file FILE or $WAKEPROXY_ADMIN_TOKEN" in result.stderr
        result = from_root("wake", "web", "--admin", admin, env=client_env(**{TOKEN: "wrong"}))
        assert result.returncode == 1
        assert "(the token sent came from $WAKEPROXY_ADMIN_TOKEN)" in result.stderr
        result = from_root("wake", "web", "--admin", admin, "--token-file", "/nonexistent")
        assert result.returncode == 2
        assert "--token-file: cannot read /nonexistent: No such file" in result.stderr
    finally:
        stop_proxy(proxy)


TOKEN = "WAKEPROXY_ADMIN_TOKEN"


def test_status_watch_redraws_until_ctrl_c(tmp_path):
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    proxy = run_proxy(config, admin_port, tmp_path / "proxy.log")
    try:
        watcher = subprocess.Popen(
            [*WAKEPROXY, "status", "--watch", "0.1", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(),
        )
        assert watcher.stdout is not None
        frames = 0
        for _ in range(200):  # bounded: three frames are a dozen lines
            line = watcher.stdout.readline()
            assert line, watcher.communicate()[1]
            frames += line.startswith("every 0.1 s, ")
            if frames == 3:
                break
        assert frames == 3
        watcher.send_signal(signal.SIGINT)
        _out, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        assert "Traceback" not in err
    finally:
        stop_proxy(proxy)


def completion_env() -> dict[str, str]:
    # The completion calls `wakeproxy` for service names: the one of this venv.
    return client_env(PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def test_completion_scripts(tmp_path):
    result = cli("completion", "bash")
    assert result.returncode == 0 and "complete -F _wakeproxy wakeproxy" in result.stdout
    script = tmp_path / "wakeproxy.bash"
    script.write_text(result.stdout)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        shell = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            '_wakeproxy; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(
            ["bash", "-c", shell], capture_output=True, text=True, timeout=30, env=completion_env()
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("wakeproxy", "sta") == ["status"]
    assert complete("wakeproxy", "sleep", "--f") == ["--force"]
    assert complete("wakeproxy", "status", "-o", "") == ["table", "json", "name"]
    assert complete("wakeproxy", "completion", "") == ["bash", "zsh"]
    has_venv_cli = (Path(sys.executable).parent / "wakeproxy").exists()
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    proxy = run_proxy(config, admin_port, tmp_path / "proxy.log")
    try:
        if has_venv_cli:
            # Service names come from the proxy the line names.
            assert complete("wakeproxy", "wake", "-c", str(config), "") == [
                "web",
                "tools@1",
                "tools@2",
            ]
            assert complete("wakeproxy", "wake", "-c", str(config), "t") == ["tools@1", "tools@2"]
    finally:
        stop_proxy(proxy)
    result = cli("completion", "zsh")
    assert result.returncode == 0 and result.stdout.startswith("#compdef wakeproxy\n")
    if shutil.which("zsh") is None:
        if in_ci():
            pytest.fail("zsh is missing (./dev test installs it)")
        pytest.skip("zsh is not installed")
    script = tmp_path / "_wakeproxy"
    script.write_text(result.stdout)
    assert subprocess.run(["zsh", "-n", str(script)], timeout=30).returncode == 0
    # Sourced after compinit, it registers itself for the command.
    shell = f"autoload -U compinit; compinit -u -D; source {script}; print $_comps[wakeproxy]"
    done = subprocess.run(["zsh", "-f", "-c", shell], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "_wakeproxy", done.stderr


# ---- relative paths in a config (issue 28)


def test_relative_paths_are_the_config_files_whoever_starts_it_from_where(tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("hello from www\n")
    (tmp_path / "token").write_text("t0k\n")
    port, backend, admin_port = free_port(), free_port(), free_port()
    server = [sys.executable, "-m", "http.server", str(backend), "--bind", "127.0.0.1"]
    text = f"""\
        admin: {{listen: 127.0.0.1:{admin_port}, token_file: token}}
        mcp: {{state_file: null}}
        prediction: {{state_file: null}}
        services:
          web:
            listen: 127.0.0.1:{port}
            backend: 127.0.0.1:{backend}
            command: {json.dumps(server)}
            cwd: www
        """
    config = write(tmp_path, text)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        # Started from /, as systemd starts it.
        proxy = subprocess.Popen([*WAKEPROXY, "run", "-c", str(config)], stderr=out, cwd="/")
    try:
        deadline = time.monotonic() + 15
        while not port_answers(admin_port):
            assert proxy.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            answer = b""
            while data := sock.recv(65536):
                answer += data
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"hello from www\n")
        # The proxy read its token from the config's folder.
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/services/web/sleep",
            method="POST",
            headers={"Authorization": "Bearer t0k"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["state"] == "paused"
    finally:
        stop_proxy(proxy)
    # A path that cannot be read is named as the proxy tried it: absolute.
    config.write_text(config.read_text().replace("token_file: token", "token_file: gone"))
    result = subprocess.run(
        [*WAKEPROXY, "run", "-c", str(config)], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert result.returncode == 2
    assert f"admin.token_file: cannot read {tmp_path}/gone: No such file or directory" in (
        result.stderr
    )


# ---- the same words everywhere (issue 28)


def wait_for(predicate, what: str, within: float = 30.0):
    deadline = time.monotonic() + within
    while not (found := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def test_check_and_run_count_services_the_same_way(tmp_path):
    admin_port, web, backend, first = free_port(), free_port(), free_port(), consecutive_ports(2)
    config = client_config(tmp_path, admin_port, web=web, backend=backend, first=first)
    result = cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok, 2 service(s) (tools: 2 replicas)\n"
    log = tmp_path / "proxy.log"
    proxy = run_proxy(config, admin_port, log)
    try:
        wait_for(lambda: "running 2 service(s) (tools: 2 replicas)" in log.read_text(), "run")
    finally:
        stop_proxy(proxy)


def test_after_a_failed_wake_status_the_api_and_metrics_say_the_same_state(tmp_path):
    port, backend, admin_port = free_port(), free_port(), free_port()
    exits = [sys.executable, "-c", "raise SystemExit(1)"]
    config = write(tmp_path, service_yaml(port, backend, command=exits))
    config.write_text(
        re.sub(
            r"listen: 127.0.0.1:\d+", f"listen: 127.0.0.1:{admin_port}", config.read_text(), count=1
        )
    )
    log = tmp_path / "proxy.log"
    proxy = run_proxy(config, admin_port, log)
    admin = ("--admin", f"http://127.0.0.1:{admin_port}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert sock.recv(1) == b""  # held, then closed: the command exited while starting
        wait_for(lambda: "web: failed -> stopped (state re-read)" in log.read_text(), "re-read")
        assert "web: waking -> failed (the backend stopped while starting" in log.read_text()
        # Once settled (nothing changes it until the next connection), every view agrees.
        [entry] = json.loads(cli("status", "web", "-o", "json", *admin).stdout)["services"]
        row = cli("status", *admin).stdout.splitlines()[1]
        metrics = cli("metrics", *admin).stdout
        assert entry["state"] == "stopped" and row.split()[1] == "stopped"
        assert 'wakeproxy_service_state{service="web",state="stopped"} 1.0' in metrics
        assert 'wakeproxy_service_state{service="web",state="failed"} 0.0' in metrics
        assert 'wakeproxy_wakes_total{result="failed",service="web"} 1.0' in metrics
        # Why it is stopped stays in sight.
        assert entry["last_error"]["reason"].startswith("the backend stopped while starting")
        assert "last error: the backend stopped while starting (exited with status 1)" in row
    finally:
        stop_proxy(proxy)


# ---- a command's output in the proxy's log (issue 28)

# Prints a line to each stream, one line longer than the log keeps, then serves.
CHATTY = (
    "import os, sys\n"
    "print('hello from stdout')\n"
    "print('hello from stderr', file=sys.stderr)\n"
    "print('x' * 100000)\n"
    "sys.stdout.flush(); sys.stderr.flush()\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def chatty_config(tmp_path: Path, port: int, backend: int, admin_port: int, command=None) -> Path:
    command = command or [sys.executable, "-c", CHATTY, *backend_command(backend, "http")[1:]]
    text = service_yaml(port, backend, command=command)
    return write(tmp_path, re.sub(r"127.0.0.1:\d+", f"127.0.0.1:{admin_port}", text, count=1))


def get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return sock.recv(4096)


def test_json_logs_are_one_object_a_line_the_commands_output_included(tmp_path):
    port, backend, admin_port = free_port(), free_port(), free_port()
    config = chatty_config(tmp_path, port, backend, admin_port)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            [*WAKEPROXY, "run", "-c", str(config), "--log-format", "json"], stderr=out
        )
    try:
        wait_for(lambda: port_answers(admin_port), "the admin API")
        assert get(port).startswith(b"HTTP/1.1 200")  # starts the command

        def printed() -> bool:
            text = log.read_text()
            return all(f"hello from {s}" in text for s in ("stdout", "stderr")) and "cut" in text

        wait_for(printed, "the command's lines")
    finally:
        stop_proxy(proxy)
    entries = [json.loads(line) for line in log.read_text().splitlines()]  # each one JSON
    assert all(ISO_MS.fullmatch(e["ts"]) for e in entries), entries[0]
    backend_lines = {(e["stream"], e["msg"]) for e in entries if e["logger"] == "wakeproxy.backend"}
    assert ("stdout", "hello from stdout") in backend_lines
    assert ("stderr", "hello from stderr") in backend_lines
    assert {e["service"] for e in entries if e["logger"] == "wakeproxy.backend"} == {"web"}
    # A line longer than the log keeps is cut, and says so.
    [long] = [e for e in entries if e["msg"].startswith("xxx")]
    assert long["cut_at"] == 16384 and long["msg"] == "x" * 16384 + " [cut at 16384 bytes]"


def test_text_logs_prefix_the_commands_lines_with_its_service(tmp_path):
    port, backend, admin_port = free_port(), free_port(), free_port()
    config = chatty_config(tmp_path, port, backend, admin_port)
    log = tmp_path / "proxy.log"
    proxy = run_proxy(config, admin_port, log)
    try:
        assert get(port).startswith(b"HTTP/1.1 200")
        wait_for(lambda: "[web] hello from stdout" in log.read_text(), "the stdout line")
    finally:
        stop_proxy(proxy)
    lines = log.read_text().splitlines()
    [line] = [line for line in lines if line.endswith("[web] hello from stdout")]
    assert ISO_MS.match(line) and " INFO    [web] " in line


def test_a_command_flooding_its_output_neither_blocks_the_proxy_nor_fills_its_memory(tmp_path):
    port, backend, admin_port = free_port(), free_port(), free_port()
    server = " ".join(backend_command(backend, "http"))
    # `yes` writes "y" lines as fast as it can, for as long as the command runs.
    config = chatty_config(
        tmp_path, port, backend, admin_port, command=["sh", "-c", f"yes & exec {server}"]
    )
    log = tmp_path / "proxy.log"
    proxy = run_proxy(config, admin_port, log)
    try:
        assert get(port).startswith(b"HTTP/1.1 200")
        wait_for(lambda: "line(s) of stdout dropped" in log.read_text(), "a drop count")
        # Still serving, its own API too, with the flood going on.
        for _ in range(20):
            assert get(port).startswith(b"HTTP/1.1 200")
        assert cli("status", "--admin", f"http://127.0.0.1:{admin_port}").returncode == 0
        assert peak_rss_mib(proxy.pid) < 100
        assert pids_with("yes") != []
    finally:
        stop_proxy(proxy)
    logged = [line for line in log.read_text().splitlines() if line.endswith("[web] y")]
    dropped = [line for line in log.read_text().splitlines() if "line(s) of stdout dropped" in line]
    assert logged and dropped
