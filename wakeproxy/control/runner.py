"""``wakeproxy run`` and ``wakeproxy check``: the proxy process itself (config, logs,
signals, start, drain, shutdown) and the config's check.

Apart from ``cli.py`` so that the client verbs never import the proxy: this module is
imported only to run or check a config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import uvloop

from .. import __version__
from ..app import Proxy
from ..config import Config, ServiceConfig, load_config
from ..config.checks import Bad
from ..config.checks import address as check_address
from ..config.crosscheck import overlaps
from ..errors import ConfigError, ListenError
from ..logs import setup_logging
from .assembly import ProxyProcess
from .preflight import preflight

log = logging.getLogger("wakeproxy")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def with_admin_listen(config: Config, text: str) -> Config:
    """``config`` with the admin API on ``text``, held to admin.listen's rules."""
    try:
        listen = check_address(text)
    except Bad as exc:
        raise ConfigError([f"--admin-listen: {exc}"]) from None
    for service in config.services.values():
        if overlaps(listen, service.listen):
            raise ConfigError(
                [f"--admin-listen: {listen} is already used by services.{service.name}.listen"]
            )
    return dataclasses.replace(config, admin=dataclasses.replace(config.admin, listen=listen))


def count_services(
    configs: Iterable[ServiceConfig], replicas: Mapping[str, int] | None = None
) -> str:
    """``3 service(s) (tools: 4 replicas)``: services as the config lists them, a
    service with replicas counted once with its replicas said beside it. ``check`` and
    ``run`` both say it this way (``replicas``: how many each pool runs, for ``run``;
    a compose service's containers are known only once the engine answered)."""
    configs = list(configs)
    notes = []
    for cfg in configs:
        spec = cfg.replicas
        if spec is None:
            continue
        if replicas is not None and cfg.name in replicas:
            notes.append(f"{cfg.name}: {_replicas(replicas[cfg.name])}")
        elif spec.discovered:
            notes.append(f"{cfg.name}: the containers of compose service {spec.compose_service}")
        else:
            notes.append(f"{cfg.name}: {_replicas(spec.count)}")
    return f"{len(configs)} service(s)" + (f" ({'; '.join(notes)})" if notes else "")


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A failure in one connection's callback is logged and contained: the loop, the
    # listeners and every other connection carry on.
    exc = context.get("exception")
    log.error(
        "unexpected error: %s",
        context.get("message", "unhandled exception"),
        exc_info=(type(exc), exc, exc.__traceback__) if isinstance(exc, BaseException) else None,
    )


async def _reload(proxy: Proxy) -> None:
    # A refused reload is logged by the proxy itself, whoever asked for it.
    with contextlib.suppress(ConfigError):
        await proxy.reload()


def _running(proxy: Proxy) -> str:
    """What ``run`` says it runs, counted as ``check`` counts (labelled services too)."""
    labelled = [s.cfg for s in proxy.services.values() if s.cfg.source == "labels"]
    replicas = {name: len(f.backends) for name, f in proxy.frontends.items() if f.replicated}
    return count_services([*proxy.config.services.values(), *labelled], replicas)


def _config_refused(exc: ConfigError) -> int:
    for problem in exc.problems:
        log.error("%s", problem)
    return EXIT_CONFIG


async def _serve(config: Config) -> int:
    try:
        process = ProxyProcess(config)
    except ConfigError as exc:  # the admin API's token
        return _config_refused(exc)
    proxy = process.proxy
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second SIGTERM/SIGINT: skip the grace period
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_log_loop_error)
    reloads: set[asyncio.Task[None]] = set()

    def on_stop() -> None:
        (hurry if stop.is_set() else stop).set()

    started = False
    reload_asked = False

    def on_reload() -> None:
        nonlocal reload_asked
        if not started:
            reload_asked = True  # during start-up: once everything is up
            return
        task = loop.create_task(_reload(proxy))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    # Registered now: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        await process.start()
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except ConfigError as exc:
        return _config_refused(exc)
    started = True
    if reload_asked:
        on_reload()
    log.info("wakeproxy %s running %s", __version__, _running(proxy))
    try:
        await stop.wait()
        shutdown = proxy.config.shutdown  # as the last reload left it
        log.info("shutting down: no new connections; open ones get %gs", shutdown.grace)
        await process.drain(shutdown.grace, hurry)
        if shutdown.backends == "wake":
            await proxy.wake_all("shutdown")
    finally:
        await process.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """``run`` or ``check`` with the parsed command line."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if getattr(args, "admin_listen", None):
        try:
            config = with_admin_listen(config, args.admin_listen)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return EXIT_CONFIG
    if args.command == "check":
        errors, warnings = preflight(config)
        for problem in errors:
            print(f"{args.config}: {problem}", file=sys.stderr)
        for warning in warnings:
            print(f"{args.config}: warning: {warning}", file=sys.stderr)
        if errors:
            return EXIT_CONFIG
        print(f"{args.config}: ok, {count_services(config.services.values())}")
        return 0
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(config))
