"""The asyncio side of prediction: one timer per service, the holds, the state file.

Decisions are the pure ``core.predict.Predictor``'s; this glue feeds it what the
services saw (a new connection, a finished wake, a sleep) with the wall-clock time and
carries out what it answers:

* **Timed wakes.** Each service with a schedule or learned arrivals has one timer, at
  its next keep-awake start, asleep-window start or predicted arrival (whichever comes
  first; never further than an hour, so a clock step or a DST change is caught). When it
  fires for a wake: a service asleep inside a keep-awake window or ahead of a likely slot
  is woken and held awake; when it fires for an asleep window's start: a service with no
  connection open is put to sleep (reason ``schedule``; otherwise its idle timer sleeps
  it later; one waking or going to sleep right then is decided once it settles). A
  timer may fire a little early or late: each fire reads the clock once, allows
  ``_EARLY``, and a start come due is never re-armed past. A timed wake is carried
  out once: a service put to sleep inside a window it was awake in (the API, someone
  outside) stays asleep until the next start.
* **Chains.** A request that starts an episode of A wakes, in the background, each B
  that usually follows A, held for B's ``chain_window``.
* **Holds.** One per service (the core's ``HoldAwake``), replaced each time: the later of
  the keep-awake window's end (while inside one) and an open prediction's end. A
  prediction's hold ends with its first request (used: from then on the request's own
  idle clock counts, so the books' awake seconds are all the awake time the prediction
  added), its sleep or a failed wake (wasted); a window shortened through the API lets
  go at once.
* **State.** The learned tables are read from ``prediction.state_file`` once a service
  uses prediction, in a thread and only from a regular file within ``MAX_STATE_BYTES``
  (a missing, unreadable or refused file: one log line, empty tables, never a failed
  start) and written atomically (a temporary file renamed over it, off the event
  loop) every ``save_interval`` when they changed, and at shutdown. A service gone for an
  hour is forgotten (a reload or a discovery replaces a service by closing it and adding
  it again; an engine down at start-up lists its services late).
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
from ..core.events import Event, HoldAwake
from ..core.predict import Prediction, Predictor, Snapshot
from ..core.states import ASLEEP, IN_FLIGHT, SleepReason, State
from ..host import statefile

log = logging.getLogger("wakeproxy.prediction")
# A timer never sleeps longer than this: wall-clock steps and DST changes are re-read.
_LONGEST = 3600.0
# A timer that fires this early still counts as due (loop and wall clocks differ).
_EARLY = 0.01
# A service absent this long is forgotten, with what it learned.
_FORGET_AFTER = 3600.0
_SETTLED = ASLEEP | {State.FAILED}
# What a timed or chained prediction wakes (failed: its retry, below).
_WAKEABLE = _SETTLED
# A timed wake that failed is tried again this long after (its window or slot still on).
_RETRY = 30.0
# A state file past this is refused unread. At the bounds (4,096 services, 10,000 pairs,
# 65,536 slots) a state is 2.0 MB with short names and about 10 MB with every name at its
# 256 characters; a bigger file is no state the proxy wrote (a 100 MB one took 3.7 s and
# 1.26 GB to refuse when it was read whole).
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
        self.core = Predictor(cfg.timezone)
        self.services: dict[str, Predicted] = {}
        # True while any service uses prediction: the hooks do nothing otherwise.
        self.active = False
        self.closed = False
        self._using: set[str] = set()
        self._timers: dict[str, Handle] = {}
        # Per service: why its timer is armed ("wake" or "asleep"); the ``until`` of
        # the last timed wake carried out (not twice); the open prediction's end (its
        # hold) and the hold last fed.
        self._armed_for: dict[str, str] = {}
        self._armed_at: dict[str, float] = {}  # when it is armed for (wall clock)
        self._handled: dict[str, float] = {}
        self._predicted: dict[str, float] = {}
        self._fed: dict[str, float] = {}
        self._absent: dict[str, float] = {}  # name -> since when no service has it
        self._asleep_pending: set[str] = set()  # an asleep window began mid-operation
        self._retry_at: dict[str, float] = {}  # a failed timed wake: not before
        self._dirty = False
        self._loaded = False
        self._loading: asyncio.Future[None] | None = None  # a read begun after the start
        self._saver: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None  # a save in its thread
        self._save_error: str | None = None

    @property
    def using(self) -> frozenset[str]:
        """The services with a schedule or a predict setting on."""
        return frozenset(self._using)

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
        self.core = loaded
        for service in self.services.values():  # the loaded predictor knows none yet
            p = service.cfg.sleep_policy
            self.core.configure(service.name, p.predict, p.keep_awake, p.asleep_windows)
        for service in list(self.services.values()):
            self.rearm(service)

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
        """Forget the services (and what a state file knew of others) absent for an hour."""
        now = self.clock()
        known = set(self.core.learned()) | set(self.core.configured())
        for name in known - self.services.keys():
            since = self._absent.setdefault(name, now)
            if now - since >= _FORGET_AFTER:
                self.core.forget(name)
                del self._absent[name]
                self._dirty = True
        for name in [n for n in self._absent if n in self.services or n not in known]:
            del self._absent[name]

    async def _save_every(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.save_interval)
            with _guarded("saving its state", "prediction"):
                self.tidy()
                snapshot = self._snapshot()
                if snapshot is not None:
                    # Only the copy on the loop (13-34 ms near the bounds); its JSON form
                    # (31-77 ms there), the write and the fsync in a thread. Shielded: a shutdown
                    # waits for it rather than racing it with its own save.
                    self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, snapshot))
                    await asyncio.shield(self._writing)

    def start(self) -> None:
        if self._saver is None:
            self._saver = asyncio.create_task(self._save_every(), name="prediction-state")

    def stop(self) -> None:
        """Shutting down: no timer fires, no hook acts any more."""
        self.closed = True
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
        with _guarded("taking its settings", service.name):
            self._attach(service)

    def _attach(self, service: Predicted) -> None:
        name = service.name
        self.services[name] = service
        policy = service.cfg.sleep_policy
        self.core.configure(name, policy.predict, policy.keep_awake, policy.asleep_windows)
        if uses_prediction(service.cfg):
            self._using.add(name)
        else:
            self._using.discard(name)
        self.active = bool(self._using)
        if self.active and not self._loaded:
            # Read once the first service uses prediction (no file touched before).
            self._load_later()
        self.rearm(service)

    def detach(self, service: Predicted) -> None:
        """A service closes; what it learned stays (a reload may bring it back)."""
        name = service.name
        if self.services.get(name) is not service:
            return
        del self.services[name]
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()
        for table in (self._armed_for, self._armed_at, self._handled, self._predicted, self._fed):
            table.pop(name, None)
        self._asleep_pending.discard(name)
        self._using.discard(name)
        self.active = bool(self._using)

    # ---- what services report

    def arrived(self, service: Predicted) -> None:
        """A new connection needs ``service``'s backend."""
        if self.closed:
            return
        with _guarded("reading a request", service.name):
            for prediction in self.core.arrived(service.name, self.clock()):
                self._carry_out(prediction, timed=False)
            self._settled()
            self._dirty = True

    def woke(self, service: Predicted, seconds: float) -> None:
        with _guarded("reading a wake", service.name):
            self.core.woke(service.name, self.clock(), seconds)
            self._dirty = True

    def state_changed(self, service: Predicted, before: State, after: State) -> None:
        if self.closed or self.services.get(service.name) is not service:
            return
        with _guarded("following a state change", service.name):
            name = service.name
            now = self.clock()
            if after not in IN_FLIGHT and name in self._asleep_pending:
                # An asleep window began while this was in flight: now it has settled.
                self._asleep_pending.discard(name)
                if self.core.sleep_now(name, now + _EARLY):
                    self._asleep_window_began(service)
            if after in _SETTLED and before not in _SETTLED:
                if before is State.WAKING and after is State.FAILED and name in self._handled:
                    # A timed wake failed: tried again in a while, its window or slot still on.
                    del self._handled[name]
                    self._retry_at[name] = now + _RETRY
                elif before is not State.WAKING and self.core.hold_until(name, now) > now:
                    # Put to sleep inside a keep-awake window (the API, someone outside):
                    # that occurrence is done with; the next start wakes it again.
                    wake = self.core.next_wake(name, now)
                    if wake is not None and wake.kind == "schedule":
                        self._handled[name] = wake.until
                self.core.slept(name, now)  # an open prediction: wasted
                self._settled()
                self.rearm(service)
            elif after is State.RUNNING:
                self.rearm(service)  # inside a keep-awake window: held from now

    # ---- timers

    def rearm(
        self, service: Predicted, now: float | None = None, *, asleep_began: bool = False
    ) -> None:
        """Feed the service's hold and arm its one timer for its next timed event
        (``asleep_began``: the timer just handled an asleep window's start)."""
        if self.services.get(service.name) is not service:
            return
        with _guarded("arming its timer", service.name):
            self._rearm(service, self.clock() if now is None else now, asleep_began)

    def _rearm(self, service: Predicted, now: float, asleep_began: bool) -> None:
        name = service.name
        handle = self._timers.pop(name, None)
        # An asleep start come due whose timer has not run yet (the loop is late): still
        # due, or this rearm would arm the next one and the start would be lost.
        start_due = (
            handle is not None
            and self._armed_for.get(name) == "asleep"
            and self._armed_at.get(name, now + _LONGEST) <= now + _EARLY
        )
        if handle is not None:
            handle.cancel()
        if self.closed or name not in self._using:
            if name not in self._using:  # prediction turned off: a hold it had goes
                self._predicted.pop(name, None)
                self._hold(service)
            return
        self._hold(service)
        hold = self.core.hold_until(name, now)
        # Awake inside a keep-awake window: nothing to wake before it ends.
        after = hold if hold > now and service.state in (State.RUNNING, State.WAKING) else now
        due: list[tuple[float, str]] = [(now + _LONGEST, "check")]
        wake = self.core.next_wake(name, after)
        if wake is not None and wake.at <= now:
            if service.state in _WAKEABLE and self._handled.get(name) != wake.until:
                pass  # due now
            else:
                if service.state in (State.RUNNING, State.WAKING):
                    # Awake: nothing to wake, and an idle sleep inside this occurrence is
                    # final for it (no stop and start again within one slot). Going to
                    # sleep (pausing, stopping): rearmed once asleep, and woken then.
                    self._handled[name] = wake.until
                # Carried out already (the wake is on its way, or it was put to sleep
                # since): the one after it.
                wake = self.core.next_wake(name, wake.until)
        if wake is not None:
            at = wake.at
            if service.state is State.FAILED:
                at = max(at, self._retry_at.get(name, 0.0))
            due.append((at, "wake"))
        # A start just handled is not armed again (fired early, it is still ahead).
        after_start = now + _EARLY if asleep_began else now
        asleep = now if start_due else self.core.asleep_start(name, after_start)
        if asleep is not None:
            due.append((asleep, "asleep"))
        at, why = min(due)
        self._armed_for[name] = why
        self._armed_at[name] = at
        self._timers[name] = self.loop.call_at(
            self.loop.time() + (max(at, now) - now), self._fire, service
        )

    def _fire(self, service: Predicted) -> None:
        name = service.name
        self._timers.pop(name, None)
        why = self._armed_for.pop(name, "check")
        # One instant for the decision and the rearm: read twice, a timer fired a moment
        # before an asleep window's start found it "not yet", then "already begun", and
        # armed the next day's.
        now = self.clock()
        asleep_began = False
        with _guarded("acting on its timer", name):
            if why == "asleep":
                # Timers may fire a millisecond early (uvloop counts whole ms).
                asleep_began = self.core.sleep_now(name, now + _EARLY)
                if asleep_began:
                    self._asleep_window_began(service)
            else:
                wake = self.core.next_wake(name, now)
                if (
                    wake is not None
                    and wake.at <= now + _EARLY
                    and self._handled.get(name) != wake.until
                ):
                    self._carry_out(wake, timed=True)
        self.rearm(service, now, asleep_began=asleep_began)

    def _asleep_window_began(self, service: Predicted) -> None:
        name = service.name
        if service.state in IN_FLIGHT:
            # Waking, pausing or stopping at the start: decided once it settles.
            self._asleep_pending.add(name)
        elif service.state is State.RUNNING and service.attached == 0:
            service.sleep_in_background(SleepReason.SCHEDULE)
        elif service.state is State.RUNNING:
            # Said, since it then stays awake to its idle timeout.
            log.info(
                "%s: its asleep window began with %d connection(s) open: not slept",
                name, service.attached, extra={"service": name},
            )  # fmt: skip

    def _carry_out(self, prediction: Prediction, *, timed: bool) -> None:
        """Wake the prediction's service if it sleeps (counted) and hold it awake until
        the prediction's end."""
        service = self.services.get(prediction.service)
        if service is None:
            return
        name = service.name
        if service.state in (State.PAUSING, State.STOPPING):
            return  # going to sleep: its rearm once asleep wakes it (timed) or not (chain)
        if timed:
            self._handled[name] = prediction.until
        if service.state is State.FAILED and not timed:
            return  # a failed backend is retried by its timed wakes (spaced by _RETRY)
        if service.state not in _WAKEABLE:
            if prediction.kind == "chain":
                # Awake: kept so for the chain's window (no wake to count, and it expires
                # by itself); not for a likely slot, which its requests decide.
                self._predicted[name] = max(self._predicted.get(name, 0.0), prediction.until)
                self._hold(service)
            return
        if self.core.predicted(name, self.clock(), prediction):
            if prediction.kind != "schedule":  # a window's hold follows the window (live)
                self._predicted[name] = prediction.until
            log.info(
                "%s: waking ahead: %s",
                name,
                prediction.reason,
                extra={"service": name, "reason": prediction.reason},
            )
        self._hold(service)
        service.wake_in_background(f"predicted: {prediction.reason}")

    def _settled(self) -> None:
        """Predicted wakes that were used or wasted: their holds end."""
        for outcome in self.core.drain_outcomes():
            self._predicted.pop(outcome.service, None)
            service = self.services.get(outcome.service)
            if service is not None:
                self._hold(service)

    def _hold(self, service: Predicted) -> None:
        """Feed the service's hold if it changed: the later of its keep-awake window's
        end and its open prediction's (0: none)."""
        now = self.clock()
        name = service.name
        until = max(self.core.hold_until(name, now), self._predicted.get(name, 0.0))
        if until <= now:
            until = 0.0
        if self._fed.get(name, 0.0) != until:
            self._fed[name] = until
            service.feed(HoldAwake(self.loop.time() + (until - now) if until else 0.0))

    # ---- views

    def table(self, name: str) -> dict[str, object]:
        return self.core.table(name, self.clock())
