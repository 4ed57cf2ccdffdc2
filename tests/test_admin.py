"""The management API over real HTTP on loopback, with the process runtime behind it."""

from __future__ import annotations

import asyncio
import socket
import struct

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    admin_call,
    admin_put,
    backend_command,
    build,
    config_from,
    config_text,
    free_port,
    http_get,
    running,
    service,
    service_yaml,
    wait_until,
)
from wakeproxy.config import load_config
from wakeproxy.control import admin
from wakeproxy.core.states import State
from wakeproxy.errors import ConfigError

pytestmark = pytest.mark.asyncio


def web(**settings):
    port, backend = free_port(), free_port()
    settings.setdefault("command", backend_command(backend, "http"))
    settings.setdefault("readiness", "{http: /}")
    settings.setdefault("sleep_policy", "{idle_timeout: 60}")
    return port, config_from(service_yaml(port, backend, **settings))


async def test_health_status_and_service_health():
    port, config = web()
    async with running(config) as proxy:
        status, headers, body = await admin_call(proxy, "GET", "/health")
        assert (status, headers["content-type"], body) == (
            200,
            "application/json",
            b'{"status":"ok"}',
        )
        status, _, body = await admin_call(proxy, "HEAD", "/health")
        assert status == 200 and body == b""
        _, _, body = await admin_call(proxy, "GET", "/services")
        (entry,) = orjson.loads(body)["services"]
        assert (
            entry["name"] == "web" and entry["state"] == "stopped" and entry["runtime"] == "process"
        )
        assert entry["wakes"] == 0 and entry["last_wake_ms"] is None and entry["held"] == 0
        again = orjson.loads((await admin_call(proxy, "GET", "/services/status"))[2])["services"][0]
        assert {**again, "last_activity": None} == {**entry, "last_activity": None}
        _, _, body = await admin_call(proxy, "GET", "/services/health")
        assert orjson.loads(body)["services"][0]["health"] == "asleep"

        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        _, _, body = await admin_call(proxy, "GET", "/services")
        entry = orjson.loads(body)["services"][0]
        assert entry["state"] == "running" and entry["wakes"] == 1 and entry["last_wake_ms"] > 0
        assert 0 < entry["sleeps_in_s"] <= 60
        _, _, body = await admin_call(proxy, "GET", "/services/health")
        assert orjson.loads(body)["services"][0]["health"] == "reachable"


async def test_actions_change_state_and_refuse_with_open_connections():
    port, config = web()
    async with running(config) as proxy:
        service = proxy.services["web"]
        status, _, body = await admin_call(proxy, "POST", "/services/web/wake")
        assert (status, orjson.loads(body)) == (200, {"name": "web", "state": "running"})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readuntil(b"backend\n")
        status, _, body = await admin_call(proxy, "POST", "/services/web/sleep")
        assert status == 409 and "1 connection(s) open" in orjson.loads(body)["error"]
        status, _, body = await admin_call(proxy, "POST", "/services/web/sleep?force=true")
        assert (status, orjson.loads(body)["state"]) == (200, "paused")
        # A FIN would leave the connection half-closed, waiting for the frozen backend's
        # reply (half-close passes through): reset it instead.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        await wait_until(lambda: service.attached == 0, within=5)
        status, _, body = await admin_call(proxy, "POST", "/services/web/stop")
        assert (status, orjson.loads(body)["state"]) == (200, "stopped")
        # Put to sleep by the API, it still wakes on its next connection.
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        status, _, body = await admin_call(proxy, "POST", "/services/sleep-all")
        assert orjson.loads(body) == {"services": [{"name": "web", "state": "paused"}]}
        status, _, body = await admin_call(proxy, "POST", "/services/wake-all")
        assert orjson.loads(body) == {"services": [{"name": "web", "state": "running"}]}
        assert (
            service.stats.sleeps[("pause", "api")] == 2
            and service.stats.sleeps[("stop", "api")] == 1
        )


async def test_wake_timeout_is_504():
    _, config = web(command='["sleep", "30"]', readiness="{tcp: true}", wake_timeout=0.5)
    async with running(config) as proxy:
        status, _, body = await admin_call(proxy, "POST", "/services/web/start")
        assert status == 504
        assert orjson.loads(body)["error"] == "not ready within wake_timeout (0.5s)"
        assert proxy.services["web"].state is State.FAILED


async def test_errors_404_405():
    _, config = web()
    async with running(config) as proxy:
        status, _, body = await admin_call(proxy, "POST", "/services/nope/wake")
        assert (status, orjson.loads(body)) == (404, {"error": "no such service: nope"})
        status, _, body = await admin_call(proxy, "GET", "/nowhere")
        assert status == 404 and orjson.loads(body)["error"] == "no such endpoint: /nowhere"
        status, headers, _ = await admin_call(proxy, "GET", "/services/web/wake")
        assert status == 405 and headers["allow"] == "POST"
        status, headers, _ = await admin_call(proxy, "DELETE", "/health")
        assert status == 405 and headers["allow"] == "GET"


async def test_sleep_all_skips_the_services_whose_policy_never_sleeps():
    # README: sleep-all skips services whose policy never sleeps (priority high, or
    # sleeping disabled): they are neither put to sleep nor listed.
    ports = {name: (free_port(), free_port()) for name in ("web", "always", "off")}
    policies = {
        "web": {"idle_timeout": 600},
        "always": {"idle_timeout": 600, "priority": "high"},
        "off": {"idle_timeout": 600, "enabled": False},
    }
    entries = [
        service(
            name, port, backend, command=backend_command(backend, "http"),
            readiness={"http": "/"}, sleep_policy=policies[name],
        )
        for name, (port, backend) in ports.items()
    ]  # fmt: skip
    async with running(build(*entries)) as proxy:
        for port, _ in ports.values():
            assert (await http_get(port)).endswith(b"backend\n")
        services = proxy.services
        await wait_until(lambda: not any(s.attached for s in services.values()), within=10)
        status, _, body = await admin_call(proxy, "POST", "/services/sleep-all")
        assert status == 200
        assert orjson.loads(body) == {"services": [{"name": "web", "state": "paused"}]}
        assert services["always"].state is State.RUNNING and services["off"].state is State.RUNNING
        assert not services["always"].stats.sleeps and not services["off"].stats.sleeps


async def test_token_guards_writes_and_optionally_reads(monkeypatch):
    monkeypatch.setenv("WAKEPROXY_ADMIN_TOKEN", "  s3cret\n")
    _, config = web()
    async with running(config) as proxy:
        assert (await admin_call(proxy, "GET", "/services"))[0] == 200
        status, headers, _ = await admin_call(proxy, "POST", "/services/web/wake")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert (await admin_call(proxy, "POST", "/services/web/wake", token="wrong"))[0] == 401
        assert (await admin_call(proxy, "POST", "/services/web/wake", token="s3cret"))[0] == 200
    port, backend = free_port(), free_port()
    text = service_yaml(port, backend, command='["sleep", "30"]').replace(
        "admin:\n", "admin:\n  protect_reads: true\n"
    )
    async with running(config_from(text)) as proxy:
        assert (await admin_call(proxy, "GET", "/metrics"))[0] == 401
        assert (await admin_call(proxy, "GET", "/metrics", token="s3cret"))[0] == 200


async def test_a_put_needs_the_token_like_every_post(monkeypatch):
    # README: every POST and PUT needs the bearer token when one is configured. A PUT
    # without it (or with a wrong one) is refused 401 and changes nothing.
    monkeypatch.setenv("WAKEPROXY_ADMIN_TOKEN", "s3cret")
    port_a, backend_a = free_port(), free_port()
    config = config_from(
        f"""
        policies:
          shared: {{idle_timeout: 600}}
        services:
          web:
            listen: 127.0.0.1:{port_a}
            backend: 127.0.0.1:{backend_a}
            command: {backend_command(backend_a, "http")}
            sleep_policy: {{use: shared}}
        """
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        change = b'{"sleep_policy": {"idle_timeout": 5}}'
        for token in (None, "wrong"):
            status, body = await admin_put(proxy, "/services/web/config", change, token=token)
            assert (status, body) == (401, {"error": "missing or wrong bearer token"})
            status, body = await admin_put(proxy, "/policies/shared", b'{"idle_timeout": 7}', token)
            assert (status, body) == (401, {"error": "missing or wrong bearer token"})
        assert web.cfg.sleep_policy.idle_timeout == 600, "a refused PUT changed nothing"
        assert proxy.config.policies["shared"].idle_timeout == 600
        status, body = await admin_put(proxy, "/services/web/config", change, token="s3cret")
        assert status == 200 and web.cfg.sleep_policy.idle_timeout == 5
        status, body = await admin_put(proxy, "/policies/shared", b'{"idle_timeout": 7}', "s3cret")
        assert status == 200 and body["policies"]["shared"]["idle_timeout"] == 7


async def test_public_admin_address_without_token_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("WAKEPROXY_ADMIN_TOKEN", raising=False)
    port, backend = free_port(), free_port()
    text = service_yaml(port, backend, command='["sleep", "30"]')
    public = text.replace("  listen: 127.0.0.1:", "  listen: 0.0.0.0:", 1)
    with pytest.raises(ConfigError) as info:
        async with running(config_from(public)):
            pass
    assert "is not a loopback address and no admin token is set" in str(info.value)
    # The same with a token file starts (and never binds until then).
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    with_file = text.replace("admin:\n", f"admin:\n  token_file: {token}\n")
    async with running(config_from(with_file)) as proxy:
        status, _, body = await admin_call(proxy, "POST", "/services/web/sleep", token="t0ken")
        assert (status, orjson.loads(body)["state"]) == (200, "stopped")
        assert (await admin_call(proxy, "POST", "/services/web/sleep", token="nope"))[0] == 401


def series(scrape: bytes, service: str) -> list[str]:
    """The sample names and labels that belong to one service."""
    return [
        f"{sample.name}{sorted(sample.labels.items())}"
        for family in text_string_to_metric_families(scrape.split(b"\r\n\r\n", 1)[1].decode())
        for sample in family.samples
        if sample.labels.get("service") == service
    ]


async def test_stop_after_is_its_own_sleep_reason_and_a_removed_service_leaves_no_series(
    tmp_path,
):
    admin_port, a, a_backend, b, b_backend = (free_port() for _ in range(5))
    text = config_text(
        service(
            "a", a, a_backend, command=backend_command(a_backend, "http"),
            sleep_policy={"idle_timeout": 0.2, "stop_after": 0.3},
        ),
        service("b", b, b_backend, command=backend_command(b_backend, "http")),
        admin=admin_port,
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(text)
    async with running(load_config(path)) as proxy:
        assert (await http_get(a)).startswith(b"HTTP/1.1 200")
        await wait_until(lambda: proxy.services["a"].state is State.STOPPED, within=10)
        scrape = await http_get(admin_port, "/metrics")
        for action, reason in (("pause", "idle"), ("stop", "stop_after")):
            sample = (
                f'wakeproxy_sleeps_total{{action="{action}",reason="{reason}",service="a"}} 1.0'
            )
            assert sample.encode() in scrape, (sample, scrape.decode()[:2000])
        assert series(scrape, "b"), "b has series while it is configured"
        path.write_text(text.split("  b:")[0])  # the same file without b
        await proxy.reload()
        scrape = await http_get(admin_port, "/metrics")
        assert series(scrape, "b") == [], "a removed service's series go away"
        assert series(scrape, "a")


async def test_hostile_clients_get_4xx_and_the_proxy_serves_on(monkeypatch):
    monkeypatch.setattr(admin, "HEAD_TIMEOUT", 0.3)
    port, config = web()
    async with running(config) as proxy:
        status, _, body = await admin_call(proxy, "GET", "", raw=b"NOT HTTP AT ALL\r\n\r\n")
        assert status == 400 and b"malformed request" in body
        flood = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        status, _, body = await admin_call(proxy, "GET", "", raw=flood)
        assert status == 431 and b"16 KiB" in body
        status, _, body = await admin_call(proxy, "GET", "", raw=b"GET /health HTTP/1.1\r\nHo")
        assert status == 408 and b"request head" in body
        slow_body = b"PUT /services/web/config HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n{"
        status, _, body = await admin_call(proxy, "PUT", "", raw=slow_body)
        assert status == 408 and b"request body" in body
        big = b"{" + b" " * (1024 * 1024) + b"}"
        huge_body = (
            b"PUT /services/web/config HTTP/1.1\r\nHost: a\r\n"
            + f"Content-Length: {len(big)}\r\n\r\n".encode()
            + big
        )
        status, _, body = await admin_call(proxy, "PUT", "", raw=huge_body)
        assert status == 413 and b"over 1 MiB" in body
        assert (await admin_call(proxy, "GET", "/health"))[0] == 200
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")


async def test_metrics_match_what_happened():
    port, config = web()
    async with running(config) as proxy:
        await asyncio.sleep(0.05)  # stopped for a measurable time first
        assert (await http_get(port)).endswith(b"backend\n")  # one cold request: one wake
        await wait_until(lambda: proxy.services["web"].attached == 0, within=5)
        status, headers, body = await admin_call(proxy, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"service": "web", **labels}.items())))]

    assert value("wakeproxy_wakes_total", result="ok") == 1
    assert value("wakeproxy_wakes_total", result="timeout") == 0
    assert value("wakeproxy_wake_seconds_count") == 1
    assert 0 < value("wakeproxy_wake_seconds_sum") < 30  # a wake that succeeded: < wake_timeout
    assert value("wakeproxy_wake_seconds_bucket", le="+Inf") == 1
    assert value("wakeproxy_service_state", state="running") == 1
    assert value("wakeproxy_service_state", state="paused") == 0
    assert value("wakeproxy_connections_total", outcome="forwarded") == 1
    assert value("wakeproxy_connections_total", outcome="rejected_overflow") == 0
    assert value("wakeproxy_connections_active") == 0 and value("wakeproxy_connections_held") == 0
    assert value("wakeproxy_bytes_total", direction="client_to_backend") > 30
    assert value("wakeproxy_bytes_total", direction="backend_to_client") > 30
    assert value("wakeproxy_asleep_seconds_total") > 0  # stopped until the request
    build = [k for k in samples if k[0] == "wakeproxy_build_info"]
    assert len(build) == 1 and ("version", "0.1.0") in build[0][1]
    assert not any(k[0] == "wakeproxy_engine_up" for k in samples)  # no docker service


async def test_live_idle_timeout_change_takes_effect_at_once():
    port, config = web(sleep_policy="{idle_timeout: 600}")
    async with running(config) as proxy:
        service = proxy.services["web"]
        assert (await http_get(port)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.3)
        assert service.state is State.RUNNING and service.sleeps_in() > 500
        status, body = await admin_put(
            proxy, "/services/web/config", b'{"sleep_policy": {"idle_timeout": 0.5}}'
        )
        assert status == 200 and body["config"]["sleep_policy"]["idle_timeout"] == 0.5
        assert body["config"]["sleep_policy"]["action"] == "pause"  # the rest is kept
        # Idle for 0.3 s already: the new 0.5 s deadline is close, not 600 s away.
        await wait_until(lambda: service.state is State.PAUSED, within=30)  # not 600 s
        status, body = await admin_put(
            proxy, "/services/web/config", b'{"wake_timeout": 5, "max_held_connections": 2}'
        )
        assert status == 200 and service.cfg.wake_timeout == 5
        assert service.node.policy.max_held == 2


async def test_live_change_errors_read_like_the_yaml_ones():
    _, config = web()
    async with running(config) as proxy:
        status, body = await admin_put(
            proxy, "/services/web/config", b'{"sleep_policy": {"idle_timeout": "soon"}}'
        )
        assert status == 400
        assert body["problems"] == [
            "services.web.sleep_policy.idle_timeout: expected a duration in seconds "
            "(a number), got 'soon'"
        ]
        status, body = await admin_put(proxy, "/services/web/config", b'{"listen": "127.0.0.1:1"}')
        assert status == 409 and body["error"].startswith("listen needs a reload")
        status, body = await admin_put(proxy, "/services/web/config", b'{"idle_timout": 1}')
        assert status == 400 and "unknown key 'idle_timout'" in body["problems"][0]
        status, body = await admin_put(proxy, "/services/web/config", b"{nope")
        assert status == 400 and body["error"].startswith("the body is not valid JSON")
        status, body = await admin_put(proxy, "/services/ghost/config", b"{}")
        assert status == 404
        assert proxy.services["web"].cfg.sleep_policy.idle_timeout == 60  # unchanged


async def test_live_changes_are_held_to_the_files_rules_across_keys():
    # allow-sleep with action stop is refused in the file; before the fix both live
    # routes answered 200 and the idle connections were then cut.
    port, backend = free_port(), free_port()
    config = config_from(
        f"""
        policies:
          shared: {{idle_timeout: 600}}
        services:
          web:
            listen: 127.0.0.1:{port}
            backend: 127.0.0.1:{backend}
            command: {backend_command(backend, "http")}
            mode: http
            http: {{idle_connections: allow-sleep}}
            sleep_policy: {{use: shared}}
        """
    )
    why = (
        "services.web.http.idle_connections: allow-sleep keeps connections open under a "
        "sleeping backend; sleep action 'stop' would cut them: use action 'pause'"
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        status, body = await admin_put(
            proxy, "/services/web/config", b'{"sleep_policy": {"action": "stop"}}'
        )
        assert (status, body["problems"]) == (400, [why])
        status, body = await admin_put(proxy, "/policies/shared", b'{"action": "stop"}')
        assert (status, body["problems"]) == (400, [why])
        assert proxy.policies["shared"].action == "pause", "a refused edit changes nothing"
        assert web.cfg.sleep_policy.action == "pause"
        status, _ = await admin_put(proxy, "/policies/shared", b'{"idle_timeout": 5}')
        assert status == 200 and web.cfg.sleep_policy.idle_timeout == 5


async def test_named_policy_change_updates_every_user_live():
    port_a, port_b, backend_a, backend_b = free_port(), free_port(), free_port(), free_port()
    config = config_from(
        f"""
        policies:
          mcp-default: {{idle_timeout: 600, stop_after: 900}}
        services:
          a:
            listen: 127.0.0.1:{port_a}
            backend: 127.0.0.1:{backend_a}
            command: {backend_command(backend_a, "http")}
            sleep_policy: {{use: mcp-default}}
          b:
            listen: 127.0.0.1:{port_b}
            backend: 127.0.0.1:{backend_b}
            command: {backend_command(backend_b, "http")}
            sleep_policy: {{use: mcp-default, stop_after: 1200}}
        """
    )
    async with running(config) as proxy:
        a, b = proxy.services["a"], proxy.services["b"]
        assert b.cfg.sleep_policy.stop_after == 1200 and b.cfg.sleep_policy.idle_timeout == 600
        _, _, body = await admin_call(proxy, "GET", "/policies")
        policies = orjson.loads(body)["policies"]
        assert policies["mcp-default"]["used_by"] == ["a", "b"]
        assert policies["mcp-default"]["idle_timeout"] == 600
        await http_get(port_a)
        await http_get(port_b)
        status, body = await admin_put(proxy, "/policies/mcp-default", b'{"idle_timeout": 0.3}')
        assert status == 200 and body["policies"]["mcp-default"]["idle_timeout"] == 0.3
        await wait_until(lambda: a.state is State.PAUSED and b.state is State.PAUSED, within=5)
        assert b.cfg.sleep_policy.stop_after == 1200  # its own override still wins
        status, body = await admin_put(proxy, "/policies/mcp-default", b'{"action": "stop"}')
        assert status == 400 and "stop_after turns a paused backend" in body["problems"][0]
        assert (await admin_put(proxy, "/policies/none", b"{}"))[0] == 404


async def test_a_service_on_a_named_policy_with_schedule_overrides_takes_live_edits():
    # Overrides were kept parsed (windows, predict settings) and validated again as raw
    # input on the next edit: every PUT to such a service answered 400, and a policy
    # edit could not be carried to it either.
    port, backend = free_port(), free_port()
    config = config_from(
        f"""
        policies:
          shared: {{idle_timeout: 600}}
        services:
          web:
            listen: 127.0.0.1:{port}
            backend: 127.0.0.1:{backend}
            command: {backend_command(backend, "http")}
            sleep_policy:
              use: shared
              keep_awake: ["sun 03:00-03:01"]
              asleep_windows: ["sat 03:00-03:01"]
              predict: {{chains: true, threshold: 0.7}}
        """
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        status, body = await admin_put(
            proxy, "/services/web/config", b'{"sleep_policy": {"idle_timeout": 30}}'
        )
        assert status == 200, body
        assert body["config"]["sleep_policy"]["use"] == "shared"
        policy = web.cfg.sleep_policy
        assert policy.idle_timeout == 30 and len(policy.keep_awake) == 1
        assert len(policy.asleep_windows) == 1 and policy.predict.threshold == 0.7
        status, body = await admin_put(proxy, "/services/web/config", b'{"wake_timeout": 9}')
        assert status == 200, body
        status, body = await admin_put(proxy, "/policies/shared", b'{"min_sleep_time": 2}')
        assert status == 200, body
        policy = web.cfg.sleep_policy
        assert (policy.min_sleep_time, policy.idle_timeout) == (2, 30)
        assert policy.predict.chains and len(policy.keep_awake) == 1


async def test_live_edits_hold_durations_to_the_files_minimum():
    # The API took wake_timeout 1e-9: every wake then failed at once.
    port, backend = free_port(), free_port()
    config = config_from(
        f"""
        policies:
          shared: {{idle_timeout: 60}}
        services:
          web:
            listen: 127.0.0.1:{port}
            backend: 127.0.0.1:{backend}
            command: {backend_command(backend, "http")}
        """
    )
    async with running(config) as proxy:
        status, body = await admin_put(proxy, "/services/web/config", b'{"wake_timeout": 1e-9}')
        assert (status, body["problems"]) == (
            400,
            ["services.web.wake_timeout: expected a duration of at least 0.01 seconds, got 1e-09"],
        )
        edit = b'{"sleep_policy": {"idle_timeout": 0.001}}'
        status, body = await admin_put(proxy, "/services/web/config", edit)
        why = "idle_timeout: expected a duration of at least 0.01 seconds, got 0.001"
        assert status == 400 and why in body["problems"][0]
        status, body = await admin_put(proxy, "/policies/shared", b'{"idle_timeout": 0.001}')
        assert status == 400 and body["problems"] == [
            "policies.shared.idle_timeout: expected a duration of at least 0.01 seconds, got 0.001"
        ]
        cfg = proxy.services["web"].cfg
        assert (cfg.wake_timeout, cfg.sleep_policy.idle_timeout) == (30, 300)  # unchanged


async def test_json_views_match_what_happened():
    port, config = web(resources="{cpu: 0.5, memory: 256MiB}", sleep_policy="{idle_timeout: 60}")
    async with running(config) as proxy:
        await asyncio.sleep(0.1)  # stopped first: asleep time to account for
        for _ in range(3):
            assert (await http_get(port)).endswith(b"backend\n")
        await wait_until(lambda: proxy.services["web"].attached == 0, within=5)
        status, _, body = await admin_call(proxy, "POST", "/services/web/sleep")
        assert status == 200
        await asyncio.sleep(0.1)
        views = {}
        for name in ("performance", "resources", "cost", "trends"):
            status, headers, body = await admin_call(proxy, "GET", f"/metrics/{name}")
            assert status == 200 and headers["content-type"] == "application/json"
            (views[name],) = orjson.loads(body)["services"]
            if name == "trends":
                hours = orjson.loads(body)["hours"]
            if name == "cost":
                assert "keeps its memory" in orjson.loads(body)["note"]
    perf = views["performance"]
    assert perf["wakes"] == {"ok": 1, "failed": 0, "timeout": 0}
    assert perf["wake_ms"]["count"] == 1 and perf["wake_ms"]["p50"] == perf["last_wake_ms"] > 0
    res = views["resources"]
    assert (
        res["connections"]["accepted"] == 3 and res["connections"]["by_outcome"]["forwarded"] == 3
    )
    assert res["bytes"]["backend_to_client"] > 3 * 23
    cost = views["cost"]
    assert cost["stopped_s"] >= 0.09 and cost["paused_s"] >= 0.09  # stopped, then paused by the API
    assert cost["asleep_s"] == pytest.approx(cost["paused_s"] + cost["stopped_s"], abs=0.002)
    assert cost["cpu_cores"] == 0.5
    assert cost["cpu_seconds_saved"] == pytest.approx(cost["asleep_s"] * 0.5, abs=0.002)
    # Only the stopped time saves memory: a paused backend keeps its memory.
    expected = cost["stopped_s"] * 256 / 1024 / 3600
    assert cost["memory_gib_hours_saved"] == pytest.approx(expected, rel=0.05)
    trend = views["trends"]
    assert len(hours) == 24 and len(trend["wakes"]) == 24
    # The last two hours: the test may straddle the turn of an hour.
    assert sum(trend["wakes"][-2:]) == 1 and sum(trend["connections"][-2:]) == 3
    assert sum(trend["wakes"]) == 1
