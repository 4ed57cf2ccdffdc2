"""The asyncio side of prediction: one timer per service, the state file, the books.

Decisions are the pure ``core.predict.Predictor``'s; this glue feeds it what the
services saw (a new connection, a finished wake, a sleep) with the wall-clock time and
carries out what it answers:

* **Timed wakes.** Each service with a schedule or learned arrivals has one timer, at
  its next keep-awake start, asleep-window start or predicted arrival (whichever comes
  first; never further than an hour, so a clock step or a DST change is caught). When it
  fires: a service asleep inside a keep-awake window or ahead of a likely slot is woken
  and held awake (the core's ``busy_until``: its idle timer does not sleep it before the
  window's or slot's end); one awake inside a keep-awake window is only held; one inside
  an asleep window with no connection open is put to sleep (reason ``schedule``).
* **Chains.** A request that starts an episode of A wakes, in the background, each B
  that usually follows A, held for B's ``chain_window``.
* **Accounting.** A predicted wake carried out is opened in the core; the service's next
  request makes it used, its sleep before one wasted (``wakeproxy_predicted_*``).
* **State.** The learned tables are read from ``prediction.state_file`` at the start (a
  missing or unreadable file: one log line, empty tables, never a failed start) and
  written atomically (a temporary file renamed over it) every ``save_interval`` when they
  changed, and at shutdown.

Nothing runs while no service uses prediction: the per-connection hook is one flag test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from .config.model import PredictionConfig, ServiceConfig
from .core.events import ResultDue
from .core.predict import Prediction, Predictor
from .core.states import ASLEEP, SleepReason, State

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("wakeproxy.prediction")
# A timer never sleeps longer than this: wall-clock steps and DST changes are re-read.
_LONGEST = 3600.0
# A timer that fires this early still counts as due (loop and wall clocks differ).
_EARLY = 0.01


def uses_prediction(cfg: ServiceConfig) -> bool:
    policy = cfg.sleep_policy
    predict = policy.predict
    return bool(policy.keep_awake or policy.asleep_windows or predict.arrivals or predict.chains)


class Predictions:
    def __init__(self, cfg: PredictionConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        # Wall-clock seconds: windows and slots are wall-clock times (tests shift it).
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self.core = Predictor(cfg.timezone)
        self.services: dict[str, Service] = {}
        # True while any service uses prediction: the hooks do nothing otherwise.
        self.active = False
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Per service, the ``until`` of the last prediction carried out: not twice.
        self._handled: dict[str, float] = {}
        self._dirty = False
        self._loaded = False
        self._configured: set[str] = set()  # names configured in the core
        self._saver: asyncio.Task[None] | None = None
        self._save_error: str | None = None

    # ---- the state file

    def load(self) -> None:
        """Read the learned tables; anything wrong is one log line and empty tables."""
        path = self.cfg.state_file
        if path is None:
            return
        try:
            data = orjson.loads(Path(path).read_bytes())
            self.core = Predictor.from_state(data, self.cfg.timezone)
        except FileNotFoundError:
            log.info("prediction: no state at %s yet; learning from scratch", path)
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            log.warning("prediction: state %s not used (%s); learning from scratch", path, exc)
        else:
            services, pairs, slots = self.core.tracked()
            log.info(
                "prediction: state %s read (%d services, %d pairs, %d slots)",
                path,
                services,
                pairs,
                slots,
            )

    def save(self) -> None:
        """Write the tables atomically: a reader (or a crash) sees the old or the new file."""
        path = self.cfg.state_file
        if path is None or not self._dirty:
            return
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(orjson.dumps(self.core.to_state()))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._save_error:  # once per distinct failure, not every interval
                log.warning("prediction: cannot write %s (%s); tables kept in memory", path, why)
            self._save_error = why
            return
        self._dirty = False
        self._save_error = None

    def tidy(self) -> None:
        """Forget services that left and did not come back (a reload or a discovery
        replaces a service by closing it and adding it again: both keep what it learned)."""
        for name in self._configured - self.services.keys():
            self.core.forget(name)
        self._configured &= self.services.keys()
        self.core.retain(self.services)  # and what a state file knew of services now gone

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.save_interval)
            self.tidy()
            self.save()

    def start(self) -> None:
        if self._saver is None:
            self._saver = self.loop.create_task(self._save_every(), name="prediction-state")

    async def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            self._saver = None
        self.save()

    # ---- services

    def attach(self, service: Service) -> None:
        """A service starts (or took new settings): configure it and arm its timer."""
        if service.cfg.replica_of is not None:
            return  # replicas follow the load (their pool), not predictions
        self.services[service.name] = service
        self._configured.add(service.name)
        policy = service.cfg.sleep_policy
        self.core.configure(service.name, policy.predict, policy.keep_awake, policy.asleep_windows)
        self.active = any(uses_prediction(s.cfg) for s in self.services.values())
        if self.active and not self._loaded:
            # Read once the first service uses prediction (no file touched before).
            self._loaded = True
            self.load()
            for other in self.services.values():  # the loaded predictor knows none yet
                p = other.cfg.sleep_policy
                self.core.configure(other.name, p.predict, p.keep_awake, p.asleep_windows)
        self.rearm(service)

    def detach(self, service: Service) -> None:
        """A service closes; what it learned stays until the next save (a reload may
        bring it back under the same name)."""
        if self.services.get(service.name) is service:
            del self.services[service.name]
            handle = self._timers.pop(service.name, None)
            if handle is not None:
                handle.cancel()
            self._handled.pop(service.name, None)
            self.active = any(uses_prediction(s.cfg) for s in self.services.values())

    # ---- what services report

    def arrived(self, service: Service) -> None:
        """A new connection needs ``service``'s backend."""
        for prediction in self.core.arrived(service.name, self.clock()):
            self._carry_out(prediction)
        self._dirty = True

    def woke(self, service: Service, seconds: float) -> None:
        self.core.woke(service.name, self.clock(), seconds)
        self._dirty = True

    def state_changed(self, service: Service, before: State, after: State) -> None:
        if after in ASLEEP and before not in ASLEEP:
            self.core.slept(service.name, self.clock())
            self.rearm(service)
        elif after is State.RUNNING:
            self.rearm(service)  # inside a keep-awake window: held from now

    # ---- timers

    def rearm(self, service: Service) -> None:
        """Arm ``service``'s one timer for its next timed event (and hold it awake now
        when it is inside a keep-awake window)."""
        name = service.name
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()
        if self.services.get(name) is not service or not uses_prediction(service.cfg):
            return
        now = self.clock()
        hold = self.core.hold_until(name, now)
        if hold > now and service.state in (State.RUNNING, State.WAKING):
            self._hold(service, hold)
            after = hold  # nothing to wake before the window ends
        else:
            after = now
        due = [now + _LONGEST]
        wake = self.core.next_wake(name, after)
        if (
            wake is not None
            and wake.at <= now
            and (service.state not in ASLEEP or self._handled.get(name) == wake.until)
        ):
            # Due, but carried out already (the wake is on its way) or nothing to wake
            # (awake, or failed: its back-off decides): the one after it.
            wake = self.core.next_wake(name, wake.until)
        if wake is not None:
            due.append(wake.at)
        asleep = self.core.asleep_start(name, now)
        if asleep is not None:
            due.append(asleep)
        at = max(min(due), now)
        self._timers[name] = self.loop.call_at(self.loop.time() + (at - now), self._fire, service)

    def _fire(self, service: Service) -> None:
        self._timers.pop(service.name, None)
        now = self.clock()
        name = service.name
        if (
            self.core.sleep_now(name, now)
            and service.state is State.RUNNING
            and service.attached == 0
        ):
            service.sleep_in_background(SleepReason.SCHEDULE)
        else:
            wake = self.core.next_wake(name, now)
            if wake is not None and wake.at <= now + _EARLY:
                self._carry_out(wake)
        self.rearm(service)

    def _carry_out(self, prediction: Prediction) -> None:
        """Wake the prediction's service if it sleeps (counted), and hold it awake until
        the prediction's end either way."""
        service = self.services.get(prediction.service)
        if service is None:
            return
        self._handled[service.name] = prediction.until
        state = service.state
        if state in ASLEEP:
            if self.core.predicted(service.name, self.clock(), prediction):
                log.info(
                    "%s: waking ahead: %s",
                    service.name,
                    prediction.reason,
                    extra={"service": service.name, "reason": prediction.reason},
                )
            self._hold(service, prediction.until)
            service.wake_in_background(f"predicted: {prediction.reason}")
        elif state in (State.RUNNING, State.WAKING) and prediction.kind != "arrivals":
            # Kept awake through the window, or through the chain's: an awake service is
            # not held for a likely slot (that would be awake time no wake accounts for).
            self._hold(service, prediction.until)

    def _hold(self, service: Service, until: float) -> None:
        """No idle sleep before wall-clock ``until``."""
        service.feed(ResultDue(self.loop.time() + (until - self.clock())))

    # ---- views

    def table(self, name: str) -> dict[str, object]:
        return self.core.table(name, self.clock())
