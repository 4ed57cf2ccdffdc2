"""Prediction over time: one timer per service, the holds, timed and chain wakes, asleep starts.

Pure, like ``core.orchestrator``: the glue feeds what happened to a service (it was
attached or detached, a new connection came, a wake finished, its state changed, its
timer fired) with the wall-clock time, and carries out what the plan answers, each
command for one service: arm its one timer (``Arm``), feed its hold (``HoldUntil``),
wake it (``WakeAhead``), put it to sleep (``SleepScheduled``) or say why not
(``KeptAwake``). The ``Predictor`` says what is likely and when; the plan decides what to
do about it given each service's state. The rules:

* **One timer per service** with a schedule or a predict setting on, at its next
  keep-awake start, asleep-window start or predicted arrival (whichever comes first;
  never further than ``LONGEST``, so a wall-clock step or a DST change is read again).
  A timer may fire a little early or late (loop and wall clocks differ; uvloop counts
  whole milliseconds): each event is decided at one instant, ``EARLY`` counts as due,
  and an asleep start come due is never re-armed past.
* **Timed wakes.** When the timer fires for a wake: a service asleep inside a keep-awake
  window or ahead of a likely slot is woken and held awake. A timed wake is carried out
  once per occurrence: a service put to sleep inside a window it was awake in (the API,
  someone outside) stays asleep until the next start, and an awake one that idles to
  sleep inside a likely slot is not woken again for it. A timed wake that failed is
  tried again ``RETRY`` later, its window or slot still on. A service going to sleep
  (pausing, stopping) when a wake comes due is woken once asleep.
* **Asleep windows.** At a window's start a running service with no connection open is
  put to sleep (reason ``schedule``); with connections open its idle timer sleeps it
  later (``KeptAwake``, which the glue logs); one waking or going to sleep right then is
  decided once that settles.
* **Chains.** A request that starts an episode of A (in a follower's window) wakes each
  B the predictor names, held for B's ``chain_window``; an awake B is held for it with no
  wake counted; one going to sleep or failed is left alone (a failed one is retried by
  its timed wakes only).
* **Holds.** One per service, replaced each time: the later of the keep-awake window's
  end (while inside one) and an open prediction's end. A prediction's hold ends with its
  first request (used: from then on the request's own idle clock counts), its sleep or a
  failed wake (wasted); a window shortened through the API lets go at once.
* **Forgetting.** A service gone for ``FORGET_AFTER`` is forgotten with what it learned
  (``tidy``: a reload replaces a service by detaching it and attaching it again; an engine
  down at start-up lists its services late).
* **Closed** (the proxy shuts down): nothing is woken ahead any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .predict import Prediction, Predictor, PredictSettings
from .schedule import Window
from .states import ASLEEP, IN_FLIGHT, State

LONGEST = 3600.0
EARLY = 0.01
RETRY = 30.0
FORGET_AFTER = 3600.0
_SETTLED = ASLEEP | {State.FAILED}
_WAKEABLE = _SETTLED  # what a timed or chained prediction wakes (failed: its retry)
_AWAKE = (State.RUNNING, State.WAKING)


# ---- events: what happened to one service


@dataclass(frozen=True, slots=True)
class Attached:
    """A service starts, or took new settings (``uses``: a schedule or predict setting
    on; ``state``: its state now)."""

    settings: PredictSettings
    keep_awake: Sequence[Window]
    asleep: Sequence[Window]
    uses: bool
    state: State


@dataclass(frozen=True, slots=True)
class Detached:
    """The service closed; what it learned stays (a reload may bring it back)."""


@dataclass(frozen=True, slots=True)
class Requested:
    """A new connection needs the service's backend."""


@dataclass(frozen=True, slots=True)
class Measured:
    """A wake from sleep finished after ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Changed:
    """The service's state changed; ``attached``: its connections open now."""

    before: State
    after: State
    attached: int


@dataclass(frozen=True, slots=True)
class Fired:
    """The service's timer fired; ``attached``: its connections open now."""

    attached: int


Event = Attached | Detached | Requested | Measured | Changed | Fired


# ---- actions: what the glue does for one service


@dataclass(frozen=True, slots=True)
class Arm:
    """Fire ``Fired`` at wall-clock time ``at``, replacing the service's timer (None:
    no timer)."""

    at: float | None


@dataclass(frozen=True, slots=True)
class HoldUntil:
    """Feed the core's ``HoldAwake`` up to wall-clock time ``until`` (0: none)."""

    until: float


@dataclass(frozen=True, slots=True)
class WakeAhead:
    """Wake the service in the background; ``counted``: a predicted wake opened in the
    books (else it was one already, or a retry)."""

    reason: str
    counted: bool


@dataclass(frozen=True, slots=True)
class SleepScheduled:
    """Put the service to sleep: its asleep window began."""


@dataclass(frozen=True, slots=True)
class KeptAwake:
    """Its asleep window began with ``attached`` connections open: not slept (said,
    since it then stays awake to its idle timeout)."""

    attached: int


Action = Arm | HoldUntil | WakeAhead | SleepScheduled | KeptAwake
Command = tuple[str, Action]


@dataclass(slots=True)
class _Watch:
    """One attached service as the plan follows it."""

    config: Attached
    state: State
    armed: tuple[float, str] | None = None  # (when, why: "wake", "asleep" or "check")
    handled: float | None = None  # the ``until`` of the last timed wake carried out
    held: float = 0.0  # the open prediction's end (its hold)
    fed: float = 0.0  # the hold last fed
    pending: bool = False  # an asleep window began while an operation was in flight
    retry_at: float = 0.0  # a failed timed wake: not before


class Plan:
    """Every attached service's prediction timer and holds (the module's rules)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.closed = False
        self._watches: dict[str, _Watch] = {}
        self._absent: dict[str, float] = {}  # name -> since when no service has it

    @property
    def using(self) -> frozenset[str]:
        """The attached services with a schedule or a predict setting on."""
        return frozenset(name for name, w in self._watches.items() if w.config.uses)

    def armed(self, name: str) -> float | None:
        """When ``name``'s timer fires (wall clock), if armed."""
        watch = self._watches.get(name)
        return None if watch is None or watch.armed is None else watch.armed[0]

    def close(self) -> None:
        """Shutting down: nothing is decided any more but the wake times learned."""
        self.closed = True

    def handle(self, name: str, event: Event, now: float) -> list[Command]:
        """Decide on ``event`` for ``name`` at wall-clock time ``now``."""
        out: list[Command] = []
        if isinstance(event, Measured):
            self.predictor.woke(name, now, event.seconds)
        elif self.closed:
            pass
        elif isinstance(event, Attached):
            self._attach(name, event, now, out)
        elif isinstance(event, Detached):
            if self._watches.pop(name, None) is not None:
                out.append((name, Arm(None)))
        elif isinstance(event, Requested):
            for prediction in self.predictor.arrived(name, now):
                self._carry_out(prediction, now, out, timed=False)
            self._settled(now, out)
        elif (watch := self._watches.get(name)) is None:
            pass  # a late report of a service detached since
        elif isinstance(event, Changed):
            self._changed(name, watch, event, now, out)
        else:
            self._fired(name, watch, event.attached, now, out)
        return out

    def replace(self, predictor: Predictor, now: float) -> list[Command]:
        """The tables read from the state file replace those begun meanwhile: the
        attached services are configured on them and re-armed."""
        self.predictor = predictor
        for name, watch in self._watches.items():
            config = watch.config
            predictor.configure(name, config.settings, config.keep_awake, config.asleep)
        out: list[Command] = []
        if not self.closed:
            for name, watch in self._watches.items():
                self._rearm(name, watch, now, out)
        return out

    def tidy(self, now: float) -> bool:
        """Forget the services absent for ``FORGET_AFTER`` (and what a state file knew of
        others); stop counting chain windows no follower uses. True: something forgotten."""
        known = set(self.predictor.learned()) | set(self.predictor.configured())
        forgot = False
        for name in known - self._watches.keys():
            since = self._absent.setdefault(name, now)
            if now - since >= FORGET_AFTER:
                self.predictor.forget(name)
                del self._absent[name]
                forgot = True
        for name in [n for n in self._absent if n in self._watches or n not in known]:
            del self._absent[name]
        self.predictor.tidy()
        return forgot

    # ---- events

    def _attach(self, name: str, event: Attached, now: float, out: list[Command]) -> None:
        watch = self._watches.get(name)
        if watch is None:
            watch = self._watches[name] = _Watch(event, event.state)
        watch.config, watch.state = event, event.state
        self.predictor.configure(name, event.settings, event.keep_awake, event.asleep)
        self._rearm(name, watch, now, out)

    def _changed(
        self, name: str, watch: _Watch, event: Changed, now: float, out: list[Command]
    ) -> None:
        before, after = event.before, event.after
        watch.state = after
        if after not in IN_FLIGHT and watch.pending:
            # An asleep window began while this was in flight: now it has settled.
            watch.pending = False
            if self.predictor.sleep_now(name, now + EARLY):
                self._asleep_began(name, watch, event.attached, out)
        if after in _SETTLED and before not in _SETTLED:
            if before is State.WAKING and after is State.FAILED and watch.handled is not None:
                # A timed wake failed: tried again in a while, its window or slot still on.
                watch.handled = None
                watch.retry_at = now + RETRY
            elif before is not State.WAKING and self.predictor.hold_until(name, now) > now:
                # Put to sleep inside a keep-awake window (the API, someone outside):
                # that occurrence is done with; the next start wakes it again.
                wake = self.predictor.next_wake(name, now)
                if wake is not None and wake.kind == "schedule":
                    watch.handled = wake.until
            self.predictor.slept(name, now)  # an open prediction: wasted
            self._settled(now, out)
            self._rearm(name, watch, now, out)
        elif after is State.RUNNING:
            self._rearm(name, watch, now, out)  # inside a keep-awake window: held from now

    def _fired(
        self, name: str, watch: _Watch, attached: int, now: float, out: list[Command]
    ) -> None:
        why = "check" if watch.armed is None else watch.armed[1]
        watch.armed = None
        began = False
        if why == "asleep":
            began = self.predictor.sleep_now(name, now + EARLY)
            if began:
                self._asleep_began(name, watch, attached, out)
        else:
            wake = self.predictor.next_wake(name, now)
            if wake is not None and wake.at <= now + EARLY and watch.handled != wake.until:
                self._carry_out(wake, now, out, timed=True)
        self._rearm(name, watch, now, out, asleep_began=began)

    # ---- decisions

    def _rearm(
        self, name: str, watch: _Watch, now: float, out: list[Command], asleep_began: bool = False
    ) -> None:
        """Feed the hold and arm the timer for the next timed event (``asleep_began``:
        the timer just handled an asleep window's start, which is not armed again)."""
        armed, watch.armed = watch.armed, None
        # An asleep start come due whose timer has not fired yet (the loop is late):
        # still due, or this would arm the next one and the start would be lost.
        start_due = armed is not None and armed[1] == "asleep" and armed[0] <= now + EARLY
        if not watch.config.uses:  # prediction turned off: a hold it had goes
            watch.held = 0.0
            self._hold(name, watch, now, out)
            out.append((name, Arm(None)))
            return
        self._hold(name, watch, now, out)
        predictor = self.predictor
        hold = predictor.hold_until(name, now)
        awake = watch.state in _AWAKE
        # Awake inside a keep-awake window: nothing to wake before it ends.
        wake = predictor.next_wake(name, hold if hold > now and awake else now)
        if (
            wake is not None
            and wake.at <= now
            and not (watch.state in _WAKEABLE and watch.handled != wake.until)
        ):
            if awake:
                # Nothing to wake, and an idle sleep inside this occurrence is final for
                # it (no stop and start again within one slot). Going to sleep: re-armed
                # once asleep, and woken then.
                watch.handled = wake.until
            # Carried out already (the wake is on its way, or it was put to sleep since).
            wake = predictor.next_wake(name, wake.until)
        due: list[tuple[float, str]] = [(now + LONGEST, "check")]
        if wake is not None:
            at = wake.at
            if watch.state is State.FAILED:
                at = max(at, watch.retry_at)
            due.append((at, "wake"))
        asleep = (
            now if start_due else predictor.asleep_start(name, now + EARLY if asleep_began else now)
        )
        if asleep is not None:
            due.append((asleep, "asleep"))
        at, why = min(due)
        watch.armed = (at, why)
        out.append((name, Arm(max(at, now))))

    def _asleep_began(self, name: str, watch: _Watch, attached: int, out: list[Command]) -> None:
        if watch.state in IN_FLIGHT:
            watch.pending = True  # waking, pausing or stopping: decided once it settles
        elif watch.state is State.RUNNING and attached == 0:
            out.append((name, SleepScheduled()))
        elif watch.state is State.RUNNING:
            out.append((name, KeptAwake(attached)))

    def _carry_out(
        self, prediction: Prediction, now: float, out: list[Command], *, timed: bool
    ) -> None:
        """Wake the prediction's service if it sleeps (counted) and hold it awake until
        the prediction's end."""
        name = prediction.service
        watch = self._watches.get(name)
        if watch is None or watch.state in (State.PAUSING, State.STOPPING):
            return  # going to sleep: its rearm once asleep wakes it (timed) or not (chain)
        if timed:
            watch.handled = prediction.until
        if watch.state is State.FAILED and not timed:
            return  # a failed backend is retried by its timed wakes (spaced by RETRY)
        if watch.state not in _WAKEABLE:
            if prediction.kind == "chain":
                # Awake: kept so for the chain's window (no wake to count, and it expires
                # by itself); not for a likely slot, which its requests decide.
                watch.held = max(watch.held, prediction.until)
                self._hold(name, watch, now, out)
            return
        counted = self.predictor.predicted(name, now, prediction)
        if counted and prediction.kind != "schedule":  # a window's hold follows the window
            watch.held = prediction.until
        self._hold(name, watch, now, out)
        out.append((name, WakeAhead(prediction.reason, counted)))

    def _settled(self, now: float, out: list[Command]) -> None:
        """Predicted wakes that were used or wasted: their holds end."""
        for outcome in self.predictor.drain_outcomes():
            watch = self._watches.get(outcome.service)
            if watch is not None:
                watch.held = 0.0
                self._hold(outcome.service, watch, now, out)

    def _hold(self, name: str, watch: _Watch, now: float, out: list[Command]) -> None:
        """The hold, if it changed: the later of the keep-awake window's end and the open
        prediction's (0: none)."""
        until = max(self.predictor.hold_until(name, now), watch.held)
        if until <= now:
            until = 0.0
        if watch.fed != until:
            watch.fed = until
            out.append((name, HoldUntil(until)))
