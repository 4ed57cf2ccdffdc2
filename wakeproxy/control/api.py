"""The management API's routes: a request in, a response out, no sockets.

``admin.py`` does the HTTP; this module decides. Only configured services can be
controlled: every route names a service from the config, never a container.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .. import __version__
from ..config import update_policy, update_service
from ..core.states import Outcome, SleepAction, SleepReason, State, WakeResult
from ..errors import ConfigError, NeedsReload, RuntimeFailure, ServiceBusy, WakeTimeout
from ..serve.status import BackendStatus, PoolStatus, backend_status, pool_status
from . import metrics, statuspage, views

if TYPE_CHECKING:
    from ..serve.backend import Backend
    from .running import Running

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_response(status: int, payload: Any) -> Response:
    return Response(status, orjson.dumps(payload))


def error(status: int, message: str, **extra: Any) -> Response:
    return json_response(status, {"error": message, **extra})


_ACTION = re.compile(r"^/services/([^/]+)/(start|stop|sleep|wake|hibernate)$")
_ALL = re.compile(r"^/services/(sleep-all|wake-all)$")
_SCALE = re.compile(r"^/services/([^/]+)/scale$")
_REPLICAS = re.compile(r"^/services/([^/]+)/replicas$")
_PREDICTION = re.compile(r"^/services/([^/]+)/prediction$")
_SERVICE_CONFIG = re.compile(r"^/services/([^/]+)/config$")
_POLICY = re.compile(r"^/policies/([^/]+)$")
# How long an answer waits for an operation in flight to end before reporting it as is.
SETTLE_WITHIN = 30.0
_READS = {
    "/",  # the status page: the same data as /services, for people
    "/health",
    "/services",
    "/services/status",
    "/services/health",
    "/metrics",
    "/policies",
    *views.VIEWS,
}


class Api:
    def __init__(self, proxy: Running, *, token: str | None, protect_reads: bool) -> None:
        self.proxy = proxy
        self.token = token
        self.protect_reads = protect_reads

    async def handle(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes = b"",
    ) -> Response:
        if path in _READS or _REPLICAS.match(path) or _PREDICTION.match(path):
            allowed = "GET"
        elif _ACTION.match(path) or _ALL.match(path) or _SCALE.match(path) or path == "/reload":
            allowed = "POST"
        elif _SERVICE_CONFIG.match(path) or _POLICY.match(path):
            allowed = "PUT"
        else:
            return error(404, f"no such endpoint: {path}")
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            return Response(
                405,
                orjson.dumps({"error": f"{method} is not allowed on {path}; use {allowed}"}),
                headers=(("Allow", allowed),),
            )
        needs_token = allowed != "GET" or self.protect_reads
        if needs_token and self.token is not None and not self._authorized(headers):
            return Response(
                401,
                orjson.dumps({"error": "missing or wrong bearer token"}),
                headers=(("WWW-Authenticate", 'Bearer realm="wakeproxy"'),),
            )
        if allowed == "PUT":
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return error(400, f"the body is not valid JSON: {exc}")
            if match := _SERVICE_CONFIG.match(path):
                return self._put_service(match.group(1), payload)
            if match := _POLICY.match(path):
                return self._put_policy(match.group(1), payload)
        if path == "/reload":
            return await self._reload()
        if match := _SCALE.match(path):
            return await self._scale(match.group(1), body)
        if match := _REPLICAS.match(path):
            return self._replicas(match.group(1))
        if match := _PREDICTION.match(path):
            return self._prediction(match.group(1))
        force = query.get("force", "false").lower() in ("1", "true", "yes")
        if match := _ACTION.match(path):
            return await self._act(match.group(1), match.group(2), force)
        if match := _ALL.match(path):
            return await self._act_all(match.group(1), force)
        return await self._read(path)

    async def _reload(self) -> Response:
        try:
            result = await self.proxy.reload()
        except ConfigError as exc:
            return error(
                400, "the config file is invalid; the running config is kept", problems=exc.problems
            )
        return json_response(200, dataclasses.asdict(result))

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # Constant time: the comparison leaks nothing about how much of the token matched.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    async def _read(self, path: str) -> Response:
        if path == "/health":
            return json_response(200, {"status": "ok"})
        if path == "/metrics":
            return Response(200, metrics.render(self.proxy), metrics.CONTENT_TYPE)
        if path in views.VIEWS:
            return json_response(200, views.VIEWS[path](self.proxy))
        if path == "/policies":
            return json_response(200, {"policies": self._policies()})
        # Labelled containers refused by discovery are listed too: users look here first.
        rejected = self.proxy.rejected
        refused = [
            {"name": name, "state": State.FAILED.value, "source": "labels", "reason": why}
            for name, why in sorted(rejected.items())
        ]
        if path == "/services/health":
            services = self.proxy.services.values()
            checks = await asyncio.gather(*(backend_health(backend_status(s)) for s in services))
            refused = [
                {"name": r["name"], "state": r["state"], "health": "failed", "why": r["reason"]}
                for r in refused
            ]
            return json_response(200, {"services": [*checks, *refused]})
        statuses = [backend_status(s) for s in self.proxy.services.values()]
        payload = {"services": [*map(service_status, statuses), *refused]}
        if path == "/":
            return self._status_page(statuses, payload["services"])
        return json_response(200, payload)

    def _status_page(
        self, statuses: list[BackendStatus], services: list[dict[str, Any]]
    ) -> Response:
        pools = [
            replicas_view(pool_status(f)) for f in self.proxy.frontends.values() if f.replicated
        ]
        forwarded = {s.name: s.counts.connections[Outcome.FORWARDED] for s in statuses}
        body = statuspage.render(services, pools, forwarded, version=__version__, now=time.time())
        return Response(200, body, statuspage.CONTENT_TYPE, statuspage.HEADERS)

    def _policies(self) -> dict[str, Any]:
        return {
            name: {
                **policy.view(),
                "used_by": [s.name for s in self.proxy.services.values() if s.cfg.policy == name],
            }
            for name, policy in self.proxy.policies.items()
        }

    def _put_service(self, name: str, payload: Any) -> Response:
        service = self.proxy.services.get(name)
        if service is None:
            return self._no_service(name)
        try:
            cfg = update_service(service.cfg, payload, self.proxy.policies)
        except ConfigError as exc:
            return error(400, "invalid settings", problems=exc.problems)
        except NeedsReload as exc:
            return error(409, str(exc))
        service.reconfigure(cfg)
        return json_response(200, {"name": name, "config": live_settings(service)})

    def _put_policy(self, name: str, payload: Any) -> Response:
        policy = self.proxy.policies.get(name)
        if policy is None:
            return error(404, f"no such policy: {name}")
        followers = [s for s in self.proxy.services.values() if s.cfg.policy == name]
        try:
            updated, configs = update_policy(policy, name, payload, [s.cfg for s in followers])
        except ConfigError as exc:
            return error(400, "invalid settings", problems=exc.problems)
        self.proxy.policies[name] = updated
        for service, cfg in zip(followers, configs, strict=True):
            service.reconfigure(cfg)
        return json_response(200, {"policies": {name: self._policies()[name]}})

    def _no_service(self, name: str) -> Response:
        pool = self.proxy.replicated(name)
        if pool is None:
            return error(404, f"no such service: {name}")
        names = ", ".join(r.name for r in pool.backends)
        return error(
            404,
            f"{name} has replicas ({names}): name one, or POST /services/{name}/scale",
            replicas=[r.name for r in pool.backends],
        )

    def _prediction(self, name: str) -> Response:
        """One service's schedules, learned tables, lead time and accounting."""
        predictions = self.proxy.predictions
        table = predictions.table(name) if predictions is not None else {}
        if not table:
            if name in self.proxy.services:
                return error(404, f"{name}: a replica; replicas are not predicted")
            return self._no_service(name)
        return json_response(200, table)

    def _replicas(self, name: str) -> Response:
        pool = self.proxy.replicated(name)
        if pool is None:
            return error(404, f"no such service with replicas: {name}")
        return json_response(200, replicas_view(pool_status(pool)))

    async def _scale(self, name: str, body: bytes) -> Response:
        """Wake the first ``count`` replicas and put the others to sleep (unforced: one
        with connections open stays, and says why). Not sticky: the idle timers and the
        load go on deciding."""
        pool = self.proxy.replicated(name)
        if pool is None:
            return error(404, f"no such service with replicas: {name}")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error(400, f"the body is not valid JSON: {exc}")
        count = payload.get("count") if isinstance(payload, dict) else None
        total = len(pool.backends)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
            given = body[:100].decode("utf-8", "replace")
            return error(400, f'expected {{"count": N}} with N from 0 to {total}, got {given}')
        refused: dict[str, str] = {}

        async def one(service: Backend, awake: bool) -> None:
            try:
                if awake:
                    await service.wake("api: scale")
                else:
                    await _sleep(service, False)
            except (ServiceBusy, RuntimeFailure) as exc:
                refused[service.name] = str(exc)

        replicas = list(pool.backends)
        assert pool.scaling is not None
        minimum = pool.scaling.minimum
        await asyncio.gather(*(one(r, True) for r in replicas[:count]))
        for replica in reversed(replicas[count:]):
            if replica.cfg.replica <= minimum:
                refused[replica.name] = f"within replicas.min ({minimum}): never slept"
                continue
            # Newest first, one by one: an older one does not sleep while a newer is awake.
            await one(replica, False)
            await replica.settled(SETTLE_WITHIN)
        return json_response(200, {**replicas_view(pool_status(pool)), "refused": refused})

    async def _act(self, name: str, action: str, force: bool) -> Response:
        service = self.proxy.services.get(name)
        if service is None:
            return self._no_service(name)
        try:
            await _ACTIONS[action](service, force)
        except ServiceBusy as exc:
            why = f"{exc}; add ?force=true to {action} anyway" if exc.forceable else str(exc)
            # reason and forceable apart: a client (the CLI) words its own hint.
            return error(
                409,
                why,
                name=name,
                state=service.state.value,
                reason=str(exc),
                forceable=exc.forceable,
            )
        except WakeTimeout as exc:
            return error(504, str(exc), name=name, state=service.state.value)
        except RuntimeFailure as exc:
            return error(502, str(exc), name=name, state=service.state.value)
        # A state the action led to, not one passing by: an idle timer may already
        # have started the next pause (answered once it ended).
        state = await service.settled(SETTLE_WITHIN)
        body: dict[str, Any] = {"name": name, "state": state.value}
        if action == "hibernate":
            # Answered once the memory was given back (or why it was not).
            body["memory"] = backend_status(service).memory
        return json_response(200, body)

    async def _act_all(self, which: str, force: bool) -> Response:
        services = list(self.proxy.services.values())
        if which == "sleep-all":
            # Only services whose policy lets them sleep (not priority high, not disabled).
            services = [s for s in services if s.cfg.sleep_policy.sleeps]
        action = "sleep" if which == "sleep-all" else "wake"

        async def one(service: Backend) -> dict[str, Any]:
            result: dict[str, Any] = {"name": service.name}
            try:
                await _ACTIONS[action](service, force)
            except (ServiceBusy, RuntimeFailure) as exc:
                result["error"] = str(exc)
            result["state"] = (await service.settled(SETTLE_WITHIN)).value
            return result

        results = await asyncio.gather(*(one(s) for s in services))
        return json_response(200, {"services": results})


async def _wake(service: Backend, force: bool) -> None:
    await service.wake("api")


async def _sleep(service: Backend, force: bool) -> None:
    await service.sleep(service.cfg.sleep_policy.action, SleepReason.API, force=force)


async def _stop(service: Backend, force: bool) -> None:
    await service.sleep(SleepAction.STOP, SleepReason.API, force=force)


async def _hibernate(service: Backend, force: bool) -> None:
    await service.sleep(SleepAction.HIBERNATE, SleepReason.API, force=force)
    await service.hibernator.settled()


_ACTIONS: dict[str, Callable[[Backend, bool], Awaitable[None]]] = {
    "hibernate": _hibernate,
    "wake": _wake,
    "start": _wake,
    "sleep": _sleep,
    "stop": _stop,
}


def live_settings(service: Backend) -> dict[str, Any]:
    cfg = service.cfg
    return {
        "sleep_policy": {**cfg.sleep_policy.view(), "use": cfg.policy},
        "wake_timeout": cfg.wake_timeout,
        "max_held_connections": cfg.max_held_connections,
        "idle_connection_timeout": cfg.idle_connection_timeout,
    }


def service_status(status: BackendStatus) -> dict[str, Any]:
    """One entry of ``GET /services``."""
    sleeps_in, last_wake = status.sleeps_in, status.counts.last_wake_s
    return {
        "name": status.name,
        "state": status.state.value,
        "reason": status.reason,
        "runtime": status.runtime,
        "source": status.cfg.source,
        "backend": str(status.backend) if status.backend is not None else None,
        "listen": str(status.cfg.listen),
        "open": status.forwarding,
        "held": status.held,
        "last_activity": round(status.last_activity, 3),
        "sleeps_in_s": round(sleeps_in, 3) if sleeps_in is not None else None,
        "wakes": status.counts.wakes[WakeResult.OK],
        "last_wake_ms": round(last_wake * 1000, 3) if last_wake is not None else None,
        "memory": status.memory,
        "release": status.release,
        "last_error": _last_error(status),
        "replica_of": status.cfg.replica_of,
        "mcp": status.mcp,
        "fast_path": status.fast_path.describe(),
    }


def replicas_view(pool: PoolStatus) -> dict[str, Any]:
    """A service with replicas: its settings, and each replica's state and load
    (``GET /services/NAME/replicas``)."""
    return {
        "name": pool.name,
        "listen": str(pool.cfg.listen),
        "state": pool.state.value,
        "min": pool.minimum,
        "max": pool.maximum,
        "target_inflight": pool.target_inflight,
        "awake": pool.awake,
        "scale_ups": pool.scale_ups,
        "moved": pool.moved,
        "sessions_lost": pool.sessions_lost,
        "mcp": pool.mcp,
        "replicas": [
            {
                "name": r.backend.name,
                "state": r.backend.state.value,
                "reason": r.backend.reason,
                "backend": str(r.backend.backend) if r.backend.backend is not None else None,
                "attached": r.backend.forwarding + r.backend.held,
                "held": r.backend.held,
                "forwarded": r.backend.counts.connections[Outcome.FORWARDED],
                "circuit": r.circuit,
                "sessions": r.sessions,
            }
            for r in pool.replicas
        ],
    }


def _last_error(status: BackendStatus) -> dict[str, Any] | None:
    """Why it last failed, kept until a wake succeeds (a retry's re-read replaces the
    reason, not this)."""
    error = status.counts.last_error
    if error is None:
        return None
    at, reason = error
    return {"reason": reason, "at": round(at, 3)}


async def backend_health(service: BackendStatus) -> dict[str, Any]:
    """Whether the backend is reachable, asleep and wakeable, or failed, and why."""
    state = service.state
    result: dict[str, Any] = {"name": service.name, "state": state.value}
    if state is State.FAILED:
        return {**result, "health": "failed", "why": service.reason}
    if state in (State.PAUSED, State.STOPPED):
        return {**result, "health": "asleep", "why": f"{state.value}; wakes on the next connection"}
    if state is not State.RUNNING or service.backend is None:
        return {**result, "health": "changing", "why": service.reason}
    backend = service.backend
    try:
        async with asyncio.timeout(min(service.cfg.connect_timeout, 2.0)):
            _, writer = await asyncio.open_connection(backend.host, backend.port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        why = "connect timed out" if isinstance(exc, TimeoutError) else str(exc)
        return {**result, "health": "unreachable", "why": f"{backend}: {why}"}
    return {**result, "health": "reachable", "why": f"{backend} accepts connections"}
