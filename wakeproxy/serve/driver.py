"""Runs the runtime operations the core asks for, and reports each result as an event.

A wake is unbounded here: the core's wake timer cancels it at ``wake_timeout`` (a
cancelled wake reports nothing). A pause or stop is bounded here, since nothing waits
on it but the API. After a start the backend must pass readiness before the wake
counts as done; the backend's address, when the config leaves it to the runtime (the
seed's form), is read again after every start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Address, ServiceConfig, is_loopback
from ..core.actions import WakeOp
from ..core.events import (
    Event,
    Observed,
    SleepDone,
    SleepFailed,
    WakeDone,
    WakeFailed,
)
from ..core.states import SleepAction, State
from ..errors import OperationFailed, RuntimeFailure
from ..net.readiness import probe, wait_ready
from ..runtimes.base import Runtime

log = logging.getLogger("wakeproxy.service")

# Bound on a pause call; a stop gets stop_timeout on top.
SLEEP_OP_TIMEOUT = 30.0


def internal_error(name: str, what: str, exc: Exception) -> str:
    """Log a bug with its traceback; the operation then ends as failed, not stuck."""
    log.error("%s: unexpected error during %s", name, what, exc_info=exc)
    return f"internal error during {what}: {exc!r}"


class RuntimeDriver:
    """One service's runtime operations, one wake at a time."""

    def __init__(
        self,
        cfg: ServiceConfig,
        runtime: Runtime,
        *,
        report: Callable[[Event], object],
        sleep_finished: Callable[[str | None], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None],
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.runtime = runtime
        self._report = report
        self._sleep_finished = sleep_finished
        self._spawn = spawn
        self._wake_task: asyncio.Task[None] | None = None
        self._refreshing = False
        self._verify_next = False
        # Keepalive probes on upstream sockets only for a backend across a network: on
        # loopback a vanished peer is a reset at once, and setting the options costs a
        # Python socket object per connection (paid by every connection under churn).
        self.upstream_keepalive = False
        self.backend = cfg.backend

    @property
    def backend(self) -> Address | None:
        return self._backend

    @backend.setter
    def backend(self, address: Address | None) -> None:
        self._backend = address
        self.upstream_keepalive = address is not None and not is_loopback(address.host)

    async def find_backend(self) -> None:
        """At start-up, for a backend the runtime places (seed form): its address now."""
        host = self.runtime.known_backend_host() or await self.runtime.backend_host()
        self.backend = Address(host or "", self.cfg.backend_port)

    # ---- wake

    def wake(self, op: WakeOp) -> None:
        self._wake_task = self._spawn(self._wake(op))

    def cancel_wake(self) -> None:
        if self._wake_task is not None:
            self._wake_task.cancel()
            self._wake_task = None

    async def _wake(self, op: WakeOp) -> None:
        event: Event
        try:
            await self._run_wake(op)
        except RuntimeFailure as exc:
            event = WakeFailed(str(exc))
        except Exception as exc:
            # A bug, not a backend fault: the wake still ends (held connections are
            # refused, the back-off applies) instead of leaving it waking for ever.
            event = WakeFailed(internal_error(self.name, "wake", exc))
        else:
            event = WakeDone()
        self._wake_task = None
        self._report(event)

    async def _run_wake(self, op: WakeOp) -> None:
        if op is WakeOp.RECOVER:
            found = await self.runtime.inspect()
            if found is State.RUNNING:
                # Alive is not ready: a start that outlasted wake_timeout may still be
                # booting, or never listen at all.
                await self._after_start()
                return
            op = {State.PAUSED: WakeOp.UNPAUSE, State.STOPPED: WakeOp.START}.get(found, op)
        if op is WakeOp.UNPAUSE:
            await self.runtime.unpause()
        elif op is WakeOp.START:
            if self.backend is not None:
                self.runtime.note_listeners(self.backend.port)
            await self.runtime.start()
            await self._after_start()
            return
        if self.backend is None:
            await self._resolve_backend()

    async def _resolve_backend(self) -> None:
        host = await self.runtime.backend_host()
        if not host:
            raise OperationFailed("the runtime reports no backend address")
        self.backend = Address(host, self.cfg.backend_port)

    async def _after_start(self) -> None:
        if self.cfg.backend is None:
            # Seed form: a started container may have a new address.
            await self._resolve_backend()
        readiness = self.cfg.readiness
        if not readiness.tcp and readiness.http is None:
            return
        assert self.backend is not None
        await wait_ready(
            self.backend,
            readiness,
            connect_timeout=self.cfg.connect_timeout,
            still_starting=self._still_starting,
            foreign=self.runtime.foreign_listener,
        )

    async def _ready_now(self) -> bool:
        readiness = self.cfg.readiness
        if self.backend is None or (not readiness.tcp and readiness.http is None):
            return True
        if not await probe(self.backend, readiness, self.cfg.connect_timeout):
            return False
        return await self.runtime.foreign_listener(self.backend.port) is None

    async def _still_starting(self) -> str | None:
        """None while the backend runs, else why it stopped while starting."""
        if await self.runtime.inspect() is State.RUNNING:
            return None
        how = self.runtime.exit_reason
        return "the backend stopped while starting" + (f" ({how})" if how else "")

    # ---- sleep

    def sleep(self, action: SleepAction) -> None:
        self._spawn(self._sleep(action))

    async def _sleep(self, action: SleepAction) -> None:
        limit = SLEEP_OP_TIMEOUT + (self.cfg.stop_timeout if action is SleepAction.STOP else 0.0)
        error: str | None = None
        try:
            async with asyncio.timeout(limit):
                if action is SleepAction.PAUSE:
                    await self.runtime.pause()
                else:
                    await self.runtime.stop()
        except TimeoutError:
            error = f"{action.value} did not finish within {limit:g}s"
        except RuntimeFailure as exc:
            error = str(exc)
        except Exception as exc:
            error = internal_error(self.name, action.value, exc)
        if error is not None:
            log.warning(
                "%s: %s failed: %s", self.name, action.value, error, extra={"service": self.name}
            )
        self._sleep_finished(error)
        self._report(SleepDone() if error is None else SleepFailed(error))

    # ---- state

    def refresh(self, *, verify: bool = False) -> None:
        """Re-read the backend's state; reported as Observed. ``verify``: running
        counts only once one readiness probe passes."""
        if self._refreshing:
            # One re-read at a time; a verify asked meanwhile runs right after it.
            self._verify_next |= verify
            return
        self._refreshing = True
        self._spawn(self._refresh(verify))

    async def _refresh(self, verify: bool) -> None:
        starting = False
        try:
            state = await self.runtime.inspect()
            reason = "state re-read"
            if state is not State.FAILED and self.cfg.backend is None:
                await self._resolve_backend()
            if state is State.RUNNING and verify and not await self._ready_now():
                state, reason = State.FAILED, "running, but not ready (its readiness check fails)"
                starting = True  # alive: maybe still starting
        except RuntimeFailure as exc:
            state, reason = State.FAILED, str(exc)
        except Exception as exc:
            state, reason = State.FAILED, internal_error(self.name, "state re-read", exc)
        finally:
            self._refreshing = False
        self._report(Observed(state, reason, starting))
        if self._verify_next:
            self._verify_next = False
            self.refresh(verify=True)
