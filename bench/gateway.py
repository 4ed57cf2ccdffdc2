"""The real mcp-context-forge gateway in front of wakeproxy: its health checks must not
wake a sleeping MCP server, and tool calls through it must work and wake the server once.

    .venv/bin/python -m bench.gateway --gateway-python /tmp/gw312/bin/python

The gateway (``pip install mcp-contextforge-gateway`` into a Python 3.12 venv; its Python
is ``--gateway-python``) runs on 127.0.0.1 with a sqlite database in a temporary folder and
``HEALTH_CHECK_INTERVAL`` seconds between checks. wakeproxy runs two ``mode: http`` services
under the process runtime: the SDK 1.x FastMCP server (tests/backends/mcp_server.py) and
the SDK 2.x ``MCPServer`` (tests/backends/mcp2_server.py), ``idle_timeout`` 5 s, once with
``action: stop`` and once with ``action: pause``. Between gateway and wakeproxy sits a small
relay that counts what the gateway sends (and with ``--keep`` writes every byte to
relay.log). Per action: both servers registered with the gateway (streamable HTTP), left
to sleep, watched for ``--observe`` seconds, a tool call through the gateway asleep and
awake, watched again once they slept again, called again. Prints a table; kills every
process it started and removes its folder (``--keep`` keeps the folder and its logs).
All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from bench.gateway_relay import Relay
from bench.gateway_report import ASLEEP, IDLE_TIMEOUT, Result, Window, judge, table
from bench.peers import free_port

ROOT = Path(__file__).parent.parent
BACKENDS = ROOT / "tests" / "backends"
ADMIN_EMAIL = "admin@example.com"

# What the gateway needs to start on loopback with a database of its own (1.1.0's
# settings, mcpgateway/config.py): strong secrets (placeholders are refused), passwords of
# 12+ characters, loopback targets allowed (SSRF protection refuses them by default).
GATEWAY_ENV = {
    "JWT_SECRET_KEY": "bench-gateway-jwt-0123456789abcdef0123456789abcdef",
    "AUTH_ENCRYPTION_SECRET": "bench-gateway-enc-0123456789abcdef0123456789abcdef",
    "PLATFORM_ADMIN_EMAIL": ADMIN_EMAIL,
    "PLATFORM_ADMIN_PASSWORD": "Bench-Admin-Passw0rd-2026!xyz",
    "DEFAULT_USER_PASSWORD": "Bench-User-Passw0rd-2026!",
    "BASIC_AUTH_PASSWORD": "Bench-Basic-Passw0rd-2026!",
    "SSRF_ALLOW_LOCALHOST": "true",
    "MCPGATEWAY_UI_ENABLED": "false",
    "MCPGATEWAY_ADMIN_API_ENABLED": "true",
    "CACHE_TYPE": "memory",
    "PLUGINS_ENABLED": "false",
    "LOG_LEVEL": "INFO",
}


class Proc:
    """A process of ours in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # what it spawned in its group (the gateway's helpers): gone with it, or now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._out.close()


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.trace: IO[str] | None = (workdir / "relay.log").open("w") if args.keep else None
        self.relay = Relay(self.trace)
        self.http = httpx.AsyncClient(timeout=90)
        self.gateway_url = ""
        self.headers: dict[str, str] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.workdir / f"{name}.log", env or {}, self.workdir)
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()  # blocking, so that no second signal can cut it short
        await self.relay.close()
        await self.http.aclose()
        if self.trace is not None:
            self.trace.close()

    async def until(
        self,
        what: str,
        within: float,
        check: Callable[[], Awaitable[bool]],
        proc: Proc | None = None,
    ) -> None:
        """Polls ``check()`` (async, truthy when done) every 0.25 s up to ``within`` s."""
        deadline = time.monotonic() + within
        for _ in range(int(within / 0.25) + 2):
            with contextlib.suppress(httpx.HTTPError):
                if await check():
                    return
            if proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}); see {proc.log}")
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{what}: not within {within} s")

    # the gateway

    async def start_gateway(self) -> None:
        port = free_port()
        env = {
            **GATEWAY_ENV,
            "DATABASE_URL": f"sqlite:///{self.workdir}/gateway.db",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "HEALTH_CHECK_INTERVAL": str(self.args.interval),
            "MCP_CLIENT_CONNECT_MODE": self.args.connect_mode,
            "TMPDIR": str(self.workdir),  # its lock files
        }
        python = self.args.gateway_python
        gateway = self.start(
            "gateway",
            [python, "-m", "mcpgateway.cli", "--host", "127.0.0.1", "--port", str(port)],
            env,
        )
        self.gateway_url = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            return (await self.http.get(f"{self.gateway_url}/health")).status_code == 200

        await self.until("the gateway's /health", 120, up, gateway)
        minted = await asyncio.to_thread(
            subprocess.run,
            [
                python,
                "-m",
                "mcpgateway.utils.create_jwt_token",
                "-u",
                ADMIN_EMAIL,
                "--admin",
                "-e",
                "120",
            ],
            env={**os.environ, **env},
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        token = minted.stdout.strip().splitlines()[-1]
        self.headers = {"Authorization": f"Bearer {token}"}

    async def gateway_json(self, method: str, path: str, body: Any = None) -> Any:
        answer = await self.http.request(
            method, self.gateway_url + path, json=body, headers=self.headers
        )
        answer.raise_for_status()
        return answer.json() if answer.content else None

    async def gateways(self) -> dict[str, dict[str, Any]]:
        listed = await self.gateway_json("GET", "/gateways")
        items = listed if isinstance(listed, list) else listed.get("items", [])
        return {str(g["name"]): g for g in items}

    async def call(self, tool: str) -> tuple[float, str]:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": {"text": "hi"}},
        }
        started = time.perf_counter()
        answer = await self.gateway_json("POST", "/rpc", body)
        elapsed = time.perf_counter() - started
        try:
            text = str(answer["result"]["content"][0]["text"])
        except (KeyError, IndexError, TypeError):
            text = f"no result: {str(answer)[:300]}"
        return elapsed, text

    # wakeproxy

    async def services(self, admin: int) -> dict[str, dict[str, Any]]:
        answer = await self.http.get(f"http://127.0.0.1:{admin}/services")
        return {str(s["name"]): s for s in answer.json()["services"]}

    async def run(self, action: str) -> list[Result]:
        admin = free_port()
        servers = {
            "fastmcp1": [
                sys.executable,
                str(BACKENDS / "mcp_server.py"),
                "--transport",
                "streamable-http",
            ],
            "mcp2": [self.args.mcp2_python, str(BACKENDS / "mcp2_server.py")],
        }
        lines = [
            f"admin: {{listen: 127.0.0.1:{admin}}}",
            f"mcp: {{state_file: {self.workdir / f'mcp-{action}.json'}}}",
            "services:",
        ]
        ports: dict[str, int] = {}
        for name, argv in servers.items():
            ports[name], backend = free_port(), free_port()
            command = ", ".join(f'"{a}"' for a in [*argv, "--port", str(backend)])
            lines += [
                f"  {name}:",
                f"    listen: 127.0.0.1:{ports[name]}",
                f"    backend: 127.0.0.1:{backend}",
                f"    command: [{command}]",
                "    mode: http",
                "    wake_timeout: 20",
                f"    sleep_policy: {{idle_timeout: {IDLE_TIMEOUT}, action: {action}}}",
            ]
        config = self.workdir / f"wakeproxy-{action}.yaml"
        config.write_text("\n".join(lines) + "\n")
        argv = [sys.executable, "-m", "wakeproxy", "run", "-c", str(config), "--log-level", "debug"]
        proxy = self.start(f"wakeproxy-{action}", argv)

        async def proxy_up() -> bool:
            return len(await self.services(admin)) == len(servers)

        await self.until("wakeproxy's admin API", 30, proxy_up, proxy)
        results = {name: Result(action, name) for name in servers}
        names = {name: f"{name}-{action}" for name in servers}
        try:
            # register both; each registration is a real session (it teaches wakeproxy)
            for name in servers:
                port = ports[name]
                if not self.args.no_relay:
                    port = await self.relay.add(f"{name}-{action}", ports[name])
                started = time.perf_counter()
                await self.gateway_json(
                    "POST",
                    "/gateways",
                    {
                        "name": names[name],
                        "url": f"http://127.0.0.1:{port}/mcp",
                        "transport": "STREAMABLEHTTP",
                    },
                )
                results[name].register_s = time.perf_counter() - started
            tools = await self.gateway_json("GET", "/tools")
            tools = tools if isinstance(tools, list) else tools.get("items", [])
            shout = {
                name: next(
                    str(t["name"])
                    for t in tools
                    if t.get("originalName") == "shout" and t.get("gatewaySlug") == names[name]
                )
                for name in servers
            }
            for result in results.values():
                result.wakes_first = (await self.services(admin))[result.service]["wakes"]
            for round_ in (1, 2):
                await self.wait_asleep(admin, results, since=None)
                await self.observe(admin, results, names)
                for name, result in results.items():
                    for when in ("asleep", "awake"):
                        before = (await self.services(admin))[name]["wakes"]
                        elapsed, text = await self.call(shout[name])
                        after = (await self.services(admin))[name]["wakes"]
                        result.calls.append((f"{when} {round_}", elapsed, after - before, text))
                await self.wait_asleep(admin, results, since=time.monotonic())
            await self.observe(admin, results, names)
            for name, result in results.items():
                result.wakes_last = (await self.services(admin))[name]["wakes"]
        finally:
            with contextlib.suppress(httpx.HTTPError):
                known = await self.gateways()
                for name in names.values():
                    if name in known:
                        await self.gateway_json("DELETE", f"/gateways/{known[name]['id']}")
            proxy.stop()  # blocking, so that no second signal can cut it short
        for result in results.values():
            judge(result)
        return list(results.values())

    async def wait_asleep(
        self, admin: int, results: dict[str, Result], since: float | None
    ) -> None:
        """Until every service sleeps (their idle timeout and the stop, checks going on)."""

        async def asleep() -> bool:
            states = await self.services(admin)
            return all(states[name]["state"] in ASLEEP for name in results)

        await self.until("both servers asleep", IDLE_TIMEOUT + 25, asleep)
        if since is not None:
            for result in results.values():
                result.asleep_again_s.append(time.monotonic() - since)

    async def observe(self, admin: int, results: dict[str, Result], names: dict[str, str]) -> None:
        """Watches for ``--observe`` seconds, sampling wakeproxy and the gateway each second."""
        windows = {name: Window() for name in results}
        first = await self.services(admin)
        sent = {name: Counter(self.relay.counts.get(names[name], Counter())) for name in results}
        deadline = time.monotonic() + self.args.observe
        for _ in range(int(self.args.observe) + 2):
            now = datetime.now(UTC)
            states = await self.services(admin)
            gateways = await self.gateways()
            for name, window in windows.items():
                window.samples += 1
                window.states.add(states[name]["state"])
                gateway = gateways.get(names[name], {})
                window.gateway_status.add(str(gateway.get("status")))
                if not gateway.get("reachable") or not gateway.get("enabled"):
                    window.unreachable += 1
                if gateway.get("lastSeen"):
                    seen = datetime.fromisoformat(str(gateway["lastSeen"]))
                    seen = seen if seen.tzinfo else seen.replace(tzinfo=UTC)
                    age = (now - seen).total_seconds()
                    window.last_seen_age = max(window.last_seen_age, age)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        last = await self.services(admin)
        for name, window in windows.items():
            window.wakes = (first[name]["wakes"], last[name]["wakes"])
            window.answered = Counter(last[name]["mcp"]["answered"])
            window.answered.subtract(first[name]["mcp"]["answered"])
            window.sent = Counter(self.relay.counts.get(names[name], Counter()))
            window.sent.subtract(sent[name])
            results[name].windows.append(window)


async def main_async(args: argparse.Namespace, workdir: Path) -> list[Result]:
    # Ctrl-C or SIGTERM: the run is cancelled and the finally below stops what it started
    # (a second signal does the same again; a process of ours never outlives the bench).
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    bench = Bench(args, workdir)
    results: list[Result] = []
    try:
        await bench.start_gateway()
        for action in args.actions.split(","):
            results += await bench.run(action)
    finally:
        await bench.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway-python", default="/tmp/gw312/bin/python")
    parser.add_argument("--mcp2-python", default=str(ROOT / ".venv-mcp2" / "bin" / "python"))
    parser.add_argument("--interval", type=int, default=3, help="HEALTH_CHECK_INTERVAL (s)")
    parser.add_argument("--observe", type=float, default=33.0, help="seconds per window")
    parser.add_argument("--actions", default="stop,pause")
    parser.add_argument("--connect-mode", choices=["auto", "legacy"], default="auto")
    parser.add_argument("--no-relay", action="store_true", help="the gateway straight to wakeproxy")
    parser.add_argument("--keep", action="store_true", help="keep the folder: logs, relay.log")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wp-gateway-"))
    results: list[Result] = []
    try:
        results = asyncio.run(main_async(args, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
    finally:
        if args.keep:
            print(f"bench: logs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if results:
        print(table(results, args))
        if any(r.problems for r in results):
            sys.exit(1)


if __name__ == "__main__":
    main()
