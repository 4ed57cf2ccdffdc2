"""The asyncio side of prediction: one timer per service, the holds, the state file.

Every decision is the pure ``core.predict_plan.Plan``'s (with the ``Predictor`` it
asks): this glue feeds it what the services saw (attached with their settings, a new
connection, a finished wake, a state change, a timer that fired) with the wall-clock
time, read once per event, and carries out what it answers: it arms the one timer per
service at the wall-clock time the plan names (on the loop's clock: ``call_at`` at the
loop's time plus the seconds left), feeds each hold as the core's ``HoldAwake``, wakes
and sleeps services in the background and logs what the plan says to.

* **State.** The learned tables are read from ``prediction.state_file`` once a service
  uses prediction, in a thread and only from a regular file within ``MAX_STATE_BYTES``
  (a missing, unreadable or refused file: one log line, empty tables, never a failed
  start) and written atomically (a temporary file renamed over it, off the event
  loop) every ``save_interval`` when they changed, and at shutdown; each interval also
  tidies (the plan forgets the services gone for an hour).
* **Never in the way.** A fault in prediction is logged and the connection, the wake or
  the state change that called it goes on. Nothing runs while no service uses prediction:
  the per-connection hook is one flag test. A proxy shutting down wakes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import orjson

from ..config.model import PredictionConfig, ServiceConfig
from ..config.policies import predicts
from ..core import predict_plan as plan
from ..core.events import Event, HoldAwake
from ..core.predict import Predictor
from ..core.predict_state import Snapshot
from ..core.states import SleepReason, State
from ..host import statefile

log = logging.getLogger("wakeproxy.prediction")
# A state file past this is refused unread: a full state with every name at its longest
# stays well under it (its sizes: docs/prediction.md), so a bigger file is no state the
# proxy wrote, and reading it whole would cost seconds and gigabytes.
MAX_STATE_BYTES = 16 * 1024 * 1024


Refused = statefile.Refused


def read_state(path: str) -> bytes:
    """The bytes of the state file: a regular file of at most ``MAX_STATE_BYTES``
    (``statefile.read_bounded``: anything else is ``Refused`` saying why)."""
    return statefile.read_bounded(path, MAX_STATE_BYTES)


def _read_predictor(path: str, zone: str, now: float) -> Predictor:
    """The predictor saved at ``path`` (run in a thread: the read, the JSON parse and the
    checks of a near-full state take tens of milliseconds)."""
    return Predictor.from_state(orjson.loads(read_state(path)), zone, now=now)


class Handle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """What the glue uses of an event loop (bench/predict.py replays on a simulated one)."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Handle: ...


class Predicted(Protocol):
    """What the glue uses of a service (``Service``)."""

    @property
    def name(self) -> str: ...

    @property
    def cfg(self) -> ServiceConfig: ...

    @property
    def state(self) -> State: ...

    @property
    def attached(self) -> int: ...

    def feed(self, event: Event) -> object: ...

    def wake_in_background(self, reason: str) -> None: ...

    def sleep_in_background(self, reason: SleepReason) -> None: ...


def uses_prediction(cfg: ServiceConfig) -> bool:
    return predicts(cfg.sleep_policy)


@contextlib.contextmanager
def _guarded(what: str, name: str) -> Iterator[None]:
    """Prediction never breaks what called it (a connection, a wake, a timer)."""
    try:
        yield
    except Exception:
        log.exception("%s: prediction failed while %s; carrying on", name, what)


class Predictions:
    def __init__(
        self,
        cfg: PredictionConfig,
        clock: Callable[[], float] = time.time,
        loop: Timers | None = None,
    ) -> None:
        self.cfg = cfg
        # Wall-clock seconds: windows and slots are wall-clock times (tests shift it).
        self.clock = clock
        self.loop: Timers = loop if loop is not None else asyncio.get_running_loop()
        self.plan = plan.Plan(Predictor(cfg.timezone))
        self.services: dict[str, Predicted] = {}
        # True while any service uses prediction: the hooks do nothing otherwise.
        self.active = False
        self._timers: dict[str, Handle] = {}  # the one timer per service
        self._dirty = False
        self._loaded = False
        self._loading: asyncio.Future[None] | None = None  # a read begun after the start
        self._saver: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # a save in its thread
        self._save_error: str | None = None

    @property
    def core(self) -> Predictor:
        """The learned tables and what they predict (replaced when the state is read)."""
        return self.plan.predictor

    @property
    def closed(self) -> bool:
        return self.plan.closed

    @property
    def using(self) -> frozenset[str]:
        """The services with a schedule or a predict setting on."""
        return self.plan.using

    # ---- the state file

    async def load(self) -> None:
        """Read the learned tables, off the event loop; anything wrong is one log line
        and empty tables."""
        path = self.cfg.state_file
        self._loaded = True
        if path is None:
            return
        try:
            loaded = await asyncio.to_thread(_read_predictor, path, self.cfg.timezone, self.clock())
        except FileNotFoundError:
            log.info("prediction: no state at %s yet; learning from scratch", path)
            return
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            log.warning("prediction: state %s not used (%s); learning from scratch", path, exc)
            return
        services, pairs, slots = loaded.tracked()
        log.info(
            "prediction: state %s read (%d services, %d pairs, %d slots)",
            path,
            services,
            pairs,
            slots,
        )
        with _guarded("taking the state it read", "prediction"):
            now = self.clock()
            self._carry_out(self.plan.replace(loaded, now), now)

    async def preload(self, configs: Iterable[ServiceConfig]) -> None:
        """At start, before any service: the tables, if one of ``configs`` uses them."""
        if any(uses_prediction(c) and c.replica_of is None for c in configs):
            await self.load()

    def _load_later(self) -> None:
        """The first service using prediction came after the start (a reload, an API
        edit, a discovered container): the tables are read in the background and
        replace the ones begun meanwhile (what the services did during that read, tens
        of milliseconds, is not learned). No save runs until then, so the file is never
        overwritten with the empty tables."""
        self._loaded = True
        if self.cfg.state_file is None:
            return
        self._loading = asyncio.ensure_future(self._guarded_load())

    async def _guarded_load(self) -> None:
        with _guarded("reading its state", "prediction"):
            await self.load()

    def _snapshot(self) -> Snapshot | None:
        """A copy of the tables to write, or None when nothing changed (or no file)."""
        if self.cfg.state_file is None or not self._dirty:
            return None
        if self._loading is not None and not self._loading.done():
            return None  # the saved tables are still being read: they are not these
        self._dirty = False
        return self.core.snapshot()

    def _write(self, snapshot: Snapshot) -> None:
        """Atomically: a reader (or a crash) sees the old file or the new one."""
        assert self.cfg.state_file is not None
        data = orjson.dumps(snapshot.state())
        target = self.cfg.state_file
        try:
            statefile.write_atomically(target, data)
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._save_error:  # once per distinct failure, not every interval
                log.warning("prediction: cannot write %s (%s); tables kept in memory", target, why)
            self._save_error = why
            self._dirty = True  # tried again at the next interval
            return
        self._save_error = None

    def tidy(self) -> None:
        """Forget the services (and what a state file knew of others) absent for an hour;
        stop counting chain windows no follower uses."""
        if self.plan.tidy(self.clock()):
            self._dirty = True

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.save_interval)
            with _guarded("saving its state", "prediction"):
                self.tidy()
                snapshot = self._snapshot()
                if snapshot is not None:
                    # Only the copy on the loop; its JSON form, the write and the fsync, the
                    # dearer part (docs/prediction.md), in a thread. Shielded: a shutdown
                    # waits for it rather than racing it with its own save.
                    self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, snapshot))
                    await asyncio.shield(self._writing)

    def start(self) -> None:
        if self._saver is None:
            self._saver = asyncio.create_task(self._save_every(), name="prediction-state")

    def stop(self) -> None:
        """Shutting down: no timer fires, no hook acts any more."""
        self.plan.close()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def close(self) -> None:
        self.stop()
        if self._loading is not None:
            await asyncio.gather(self._loading, return_exceptions=True)
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
            self._saver = None
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        snapshot = self._snapshot()
        if snapshot is not None:
            self._write(snapshot)

    # ---- services

    def attach(self, service: Predicted) -> None:
        """A service starts (or took new settings): configure it and arm its timer."""
        if service.cfg.replica_of is not None or self.closed:
            return  # replicas follow the load (their pool), not predictions (check says so)
        self.services[service.name] = service
        policy = service.cfg.sleep_policy
        event = plan.Attached(
            policy.predict,
            policy.keep_awake,
            policy.asleep_windows,
            uses_prediction(service.cfg),
            service.state,
        )
        self._feed(service, event, "taking its settings")
        self.active = bool(self.plan.using)
        if self.active and not self._loaded:
            # Read once the first service uses prediction (no file touched before).
            self._load_later()

    def detach(self, service: Predicted) -> None:
        """A service closes; what it learned stays (a reload may bring it back)."""
        name = service.name
        if self.services.get(name) is not service:
            return
        self._feed(service, plan.Detached(), "letting it go")
        del self.services[name]
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()
        self.active = bool(self.plan.using)

    # ---- what services report

    def arrived(self, service: Predicted) -> None:
        """A new connection needs ``service``'s backend."""
        if not self.closed:
            self._feed(service, plan.Requested(), "reading a request")
            self._dirty = True

    def woke(self, service: Predicted, seconds: float) -> None:
        self._feed(service, plan.Measured(seconds), "reading a wake")
        self._dirty = True

    def state_changed(self, service: Predicted, before: State, after: State) -> None:
        if not self.closed and self.services.get(service.name) is service:
            event = plan.Changed(before, after, service.attached)
            self._feed(service, event, "following a state change")

    def _fire(self, service: Predicted) -> None:
        self._timers.pop(service.name, None)
        self._feed(service, plan.Fired(service.attached), "acting on its timer")

    # ---- carrying out

    def _feed(self, service: Predicted, event: plan.Event, what: str) -> None:
        """Hand ``event`` to the plan at one instant and carry out its answer."""
        with _guarded(what, service.name):
            now = self.clock()
            self._carry_out(self.plan.handle(service.name, event, now), now)

    def _carry_out(self, commands: list[plan.Command], now: float) -> None:
        """``now``: the wall-clock time the plan decided at (its times are wall clock;
        the loop's timers and the core's hold are on the loop's clock)."""
        for name, action in commands:
            service = self.services.get(name)
            if service is None:
                continue
            match action:
                case plan.Arm(at):
                    handle = self._timers.pop(name, None)
                    if handle is not None:
                        handle.cancel()
                    if at is not None:
                        when = self.loop.time() + max(0.0, at - now)
                        self._timers[name] = self.loop.call_at(when, self._fire, service)
                case plan.HoldUntil(until):
                    service.feed(HoldAwake(self.loop.time() + (until - now) if until else 0.0))
                case plan.WakeAhead(reason, counted):
                    if counted:
                        log.info(
                            "%s: waking ahead: %s", name, reason,
                            extra={"service": name, "reason": reason},
                        )  # fmt: skip
                    service.wake_in_background(f"predicted: {reason}")
                case plan.SleepScheduled():
                    service.sleep_in_background(SleepReason.SCHEDULE)
                case plan.KeptAwake(attached):
                    log.info(
                        "%s: its asleep window began with %d connection(s) open: not slept",
                        name, attached, extra={"service": name},
                    )  # fmt: skip

    # ---- views

    def table(self, name: str) -> dict[str, object]:
        return self.core.table(name, self.clock())
