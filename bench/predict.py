"""Row 11: prediction replayed. Weeks of one developer's traffic to seven MCP servers
(``bench/predict-trace.csv``, from ``bench.predict_trace``) against backends whose wake
is a 2 s start from stopped, with prediction off and on; simulated time, so the weeks
run in seconds.

    .venv/bin/python -m bench.predict [--idle-timeout 300] [--wake 2] [--threshold 0.5]

Nothing here decides: the replay runs the proxy's own code on a simulated clock.

* **Sleep and wake.** The real decision core (``core.orchestrator``, strict: a
  transition it has no rule for stops the replay) with each service's real ``Policy``
  (``coordinator.policy_of`` of a config parsed by ``parse_yaml``: ``action: stop``,
  ``idle_timeout``). Its actions are carried out as the glue would: a start takes
  ``--wake`` seconds, a stop none, a timer fires at its time.
* **Prediction.** The real glue, ``wakeproxy.serve.predictions.Predictions``, carrying out
  the real ``core.predict_plan.Plan`` over the real ``Predictor``: its timers, wakes and
  holds are the proxy's, not a copy. It is handed the replay's clock as its loop
  (``time``, ``call_at``: all it uses of one: ``predictions.Timers``) and each simulated
  service as its service
  (``predictions.Predicted``: ``name``, ``cfg``, ``state``, ``attached``, ``feed``,
  ``wake_in_background``, ``sleep_in_background``).
  The services call it where ``serve/backend.py`` does: ``arrived`` before a new
  connection's ``Arrive``, ``state_changed`` on each transition, ``woke`` with each
  wake's seconds. Off: no glue at all. On: ``predict: {arrivals: true, chains: true,
  threshold}`` for every service, slots in Europe/Berlin, no state file.
* **Requests.** Each line of the trace is one connection: ``Arrive`` (activity) at its
  time, forwarded at once or held until the wake's ``Release``, then ``Leave``
  (activity) at once: the request takes no time of its own.
* **Learning, then measuring.** Both runs replay the whole trace; every figure is of
  its last week (Monday 00:00 to Monday 00:00, Berlin) only: the weeks before are the
  learning period (the predictor needs two weeks of a slot to pass 0.5, see
  ``core.arrivals``), and it goes on learning in the measured week, as in production.
* **Figures.** A request is *cold* when it was held: it found its backend asleep (its
  wake) or waking (behind a wake under way, a predicted one too): the proxy's
  ``wakeproxy_requests_found_asleep``. Added latency: the seconds held, over all
  requests. Awake: the seconds each backend spent not stopped (starting, running,
  stopping), clipped to the week. Predicted wakes: the predictor's own accounting
  (used: a request came while it held; wasted: it slept first), the week's change.
"""

from __future__ import annotations

import argparse
import shlex
from datetime import datetime, timedelta
from pathlib import Path

from bench import predict_trace
from bench.predict_results import (
    Figures,
    PredictResult,
    Run,
    cause_table,
    markdown,
    service_table,
    table,
)
from bench.simclock import Handle, Loop
from wakeproxy.config import Config, parse_yaml
from wakeproxy.config.model import PredictionConfig, ServiceConfig
from wakeproxy.core.actions import (
    Action,
    ArmTimer,
    CancelWake,
    Connect,
    Hold,
    Reject,
    Release,
    RunSleep,
    RunWake,
    Transition,
    WakeEnded,
)
from wakeproxy.core.events import (
    Arrive,
    Event,
    Leave,
    SleepDone,
    SleepRequested,
    Timer,
    TimerFired,
    WakeDone,
    WakeRequested,
)
from wakeproxy.core.orchestrator import Orchestrator
from wakeproxy.core.predict import KINDS
from wakeproxy.core.states import ASLEEP, SleepAction, SleepReason, State, WakeResult
from wakeproxy.serve.coordinator import policy_of
from wakeproxy.serve.predictions import Predictions, uses_prediction

TRACE = Path(__file__).parent / "predict-trace.csv"
ZONE = predict_trace.ZONE
IDLE_TIMEOUT = 300.0
WAKE = 2.0
THRESHOLD = 0.5
# A stopped MCP server's process exits at SIGTERM: its stop is not what is measured.
STOP = 0.0
_BOOKS = ("predicted", "used", "wasted", "awake_seconds")  # Predictor.stats, per kind


class Backend:
    """One simulated service: the part of ``service.Service`` the core and the glue talk
    to, over a backend whose start takes ``wake`` seconds."""

    def __init__(self, replay: Replay, cfg: ServiceConfig) -> None:
        self.replay = replay
        self.loop = replay.loop
        self.name = cfg.name
        self.cfg = cfg
        self.figures = Figures()
        self._held: list[float] = []  # arrival times of the held requests
        self._arriving: tuple[float, State, str] | None = None
        self._timers: dict[Timer, Handle] = {}
        self._wake: Handle | None = None
        self._wake_started = 0.0
        self._awake_since: float | None = None

    # -- what the glue reads and calls (predictions.py)

    @property
    def state(self) -> State:
        return self.replay.core.nodes[self.name].state

    @property
    def attached(self) -> int:
        return self.replay.core.nodes[self.name].attached

    def feed(self, event: Event) -> None:
        self.replay.feed(self, event)

    def wake_in_background(self, reason: str) -> None:
        self.loop.soon(self._wake_quietly, reason)

    def _wake_quietly(self, reason: str) -> None:
        if self.state is not State.RUNNING:  # Service.wake: running is done already
            self.feed(WakeRequested(reason))

    def sleep_in_background(self, reason: SleepReason) -> None:
        # Refused while a connection is open, as Service.sleep would be: nothing to do.
        self.loop.soon(self.feed, SleepRequested(SleepAction(self.cfg.sleep_policy.action), reason))

    # -- the trace

    def request(self, cause: str) -> None:
        """A new connection (Service.needs_backend): the glue hears of it first."""
        glue = self.replay.glue
        if glue is not None and glue.active:
            glue.arrived(self)
        self._arriving = (self.loop.time(), self.state, cause)
        self.feed(Arrive(activity=True))
        self._arriving = None

    def _served(self, arrived: float) -> None:
        now = self.loop.time()
        if self.replay.measuring(arrived):
            self.figures.held_seconds += now - arrived
        self.loop.soon(self.feed, Leave(held=False, activity=True))

    # -- the core's actions (Service.carry_out)

    def carry_out(self, action: Action) -> None:
        now = self.loop.time()
        match action:
            case Connect():
                assert self._arriving is not None
                self._count(self._arriving, held=False)
                self._served(self._arriving[0])
            case Hold():
                assert self._arriving is not None
                self._count(self._arriving, held=True)
                self._held.append(self._arriving[0])
            case Release():
                held, self._held = self._held, []
                for arrived in held:
                    self._served(arrived)
            case Reject(_, _, held):
                rejected = list(self._held) if held else []
                if not held:
                    assert self._arriving is not None
                    rejected.append(self._arriving[0])
                else:
                    self._held = []
                for arrived in rejected:
                    if self.replay.measuring(arrived):
                        self.figures.failed += 1
                    self.loop.soon(self.feed, Leave(held=False, activity=False))
            case RunWake():
                self._wake = self.loop.call_at(now + self.replay.wake, self.feed, WakeDone())
            case CancelWake():
                if self._wake is not None:
                    self._wake.cancel()
            case RunSleep():
                self.loop.call_at(now + STOP, self.feed, SleepDone())
            case ArmTimer(timer, at):
                old = self._timers.get(timer)
                if old is not None:
                    old.cancel()
                self._timers[timer] = self.loop.call_at(at, self._fire, timer)
            case Transition(before, after):
                self._transitioned(before, after, now)
            case WakeEnded(result) if result is WakeResult.OK:
                glue = self.replay.glue
                if glue is not None and glue.active:
                    glue.woke(self, now - self._wake_started)
            case _:
                pass  # notifications (Slept, Refused): nothing to operate

    def _count(self, arriving: tuple[float, State, str], *, held: bool) -> None:
        arrived, state, cause = arriving
        if not self.replay.measuring(arrived):
            return
        self.figures.requests += 1
        self.figures.requests_by_cause[cause] += 1
        if held:
            self.figures.cold_by_cause[cause] += 1
            if state in ASLEEP or state is State.STOPPING:
                self.figures.found_asleep += 1
            else:
                self.figures.found_waking += 1

    def _fire(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self.feed(TimerFired(timer))

    def _transitioned(self, before: State, after: State, now: float) -> None:
        if after is State.WAKING:
            self._wake_started = now
            if self.replay.measuring(now):
                self.figures.wakes += 1
        if before is State.STOPPED:
            self._awake_since = now
        elif after is State.STOPPED:
            self.close_awake(now)
        glue = self.replay.glue
        if glue is not None and glue.active:
            glue.state_changed(self, before, after)

    def close_awake(self, now: float) -> None:
        """Count the awake time since the backend left stopped, clipped to the week."""
        if self._awake_since is not None:
            start = max(self._awake_since, self.replay.measured_from)
            end = min(now, self.replay.measured_to)
            self.figures.awake_seconds += max(0.0, end - start)
            self._awake_since = None


class Replay:
    """One run: the real core and (on) the real glue on a simulated clock."""

    def __init__(
        self, cfg: Config, wake: float, start: float, measured: tuple[float, float]
    ) -> None:
        self.loop = Loop(start)
        self.wake = wake
        self.measured_from, self.measured_to = measured
        self.core = Orchestrator(strict=True)
        predicting = any(uses_prediction(s) for s in cfg.services.values())
        self.glue = _glue(cfg.prediction, self.loop) if predicting else None
        self.backends = {name: Backend(self, s) for name, s in cfg.services.items()}
        for name, backend in self.backends.items():
            policy = policy_of(backend.cfg)
            for target, action in self.core.add(name, policy, State.STOPPED, "bench", start):
                self.backends[target].carry_out(action)
        if self.glue is not None:
            for backend in self.backends.values():
                self.glue.attach(backend)
        self._books: dict[str, list[float]] = {}

    def measuring(self, when: float) -> bool:
        return self.measured_from <= when < self.measured_to

    def feed(self, backend: Backend, event: Event) -> None:
        """Coordinator.feed: decide, then hand each action to the service it names."""
        for name, action in self.core.handle(backend.name, event, self.loop.time()):
            self.backends[name].carry_out(action)

    def books(self) -> dict[str, list[float]]:
        """The predictor's accounting summed over services: kind -> the four counts."""
        out: dict[str, list[float]] = {kind: [0.0, 0.0, 0.0, 0.0] for kind in KINDS}
        if self.glue is not None:
            for name in self.backends:
                kinds = self.glue.core.stats(name)["kinds"]
                for kind in KINDS:
                    for i, key in enumerate(_BOOKS):
                        out[kind][i] += kinds[kind][key]
        return out

    def run(self, trace: list[predict_trace.Request]) -> Run:
        for when, name, cause in trace:
            self.loop.call_at(when, self.backends[name].request, cause)
        self.loop.call_at(self.measured_from, self._start_books)
        self.loop.run_until(self.measured_to)
        for backend in self.backends.values():
            backend.close_awake(self.measured_to)
        run = Run({name: b.figures for name, b in self.backends.items()})
        if self.glue is not None:
            end = self.books()
            run.predicted = {
                kind: [e - s for e, s in zip(end[kind], self._books[kind], strict=True)]
                for kind in KINDS
            }
        return run

    def _start_books(self) -> None:
        self._books = self.books()


def _glue(cfg: PredictionConfig, loop: Loop) -> Predictions:
    """The proxy's glue on the replay's clock (``start``, which spawns the state saver,
    is not called: no state file)."""
    return Predictions(cfg, loop.time, loop)


def config(services: list[str], idle_timeout: float, threshold: float | None) -> Config:
    """Every service a stopped command with the same policy; ``threshold`` None: no
    prediction."""
    predict = (
        ""
        if threshold is None
        else f", predict: {{arrivals: true, chains: true, threshold: {threshold!r}}}"
    )
    lines = ["prediction: {state_file: null, timezone: Europe/Berlin}", "services:"]
    for i, name in enumerate(services):
        lines += [
            f"  {name}:",
            f"    listen: 127.0.0.1:{20000 + i}",
            f"    backend: 127.0.0.1:{21000 + i}",
            '    command: ["true"]',
            f"    sleep_policy: {{idle_timeout: {idle_timeout!r}, action: stop{predict}}}",
        ]
    return parse_yaml("\n".join(lines) + "\n", "bench.predict")


def weeks(trace: list[predict_trace.Request]) -> tuple[float, float, float]:
    """(the first week's Monday 00:00, the last week's, the Monday after), Berlin."""

    def monday(when: float) -> datetime:
        local = datetime.fromtimestamp(when, ZONE)
        day = local.date() - timedelta(days=local.weekday())
        return datetime.combine(day, datetime.min.time(), ZONE)

    first, last = monday(trace[0][0]), monday(trace[-1][0])
    after = datetime.combine(last.date() + timedelta(days=7), datetime.min.time(), ZONE)
    return first.timestamp(), last.timestamp(), after.timestamp()


def run(
    trace: Path | list[predict_trace.Request] = TRACE,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    wake: float = WAKE,
    threshold: float = THRESHOLD,
) -> PredictResult:
    """Replay ``trace`` with prediction off, then on; figures of its last week."""
    requests = predict_trace.read(trace) if isinstance(trace, Path) else sorted(trace)
    if not requests:
        raise ValueError("an empty trace")
    start, measured_from, measured_to = weeks(requests)
    if measured_from <= start:
        raise ValueError("the trace spans one week: nothing to learn from before the last")
    services = sorted({name for _, name, _ in requests})
    measured = (measured_from, measured_to)
    off = Replay(config(services, idle_timeout, None), wake, start, measured).run(requests)
    on = Replay(config(services, idle_timeout, threshold), wake, start, measured).run(requests)
    return PredictResult(
        trace=str(trace) if isinstance(trace, Path) else "(in memory)",
        requests=len(requests),
        learned_from=start,
        measured_from=measured_from,
        measured_to=measured_to,
        idle_timeout=idle_timeout,
        wake=wake,
        threshold=threshold,
        off=off,
        on=on,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    parser.add_argument("--wake", type=float, default=WAKE, help="seconds a start takes")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    args = parser.parse_args()
    command = [".venv/bin/python", "-m", "bench.predict"]
    if args.trace != TRACE:
        command += ["--trace", str(args.trace)]
    command += ["--idle-timeout", f"{args.idle_timeout:g}", "--wake", f"{args.wake:g}"]
    command += ["--threshold", f"{args.threshold:g}"]
    print(shlex.join(command))
    result = run(
        args.trace, idle_timeout=args.idle_timeout, wake=args.wake, threshold=args.threshold
    )
    print(
        f"{result.requests} requests in {result.weeks} weeks of trace; measured: the week"
        f" from {result.measured_week}, the weeks before it learned from\n"
    )
    print(markdown(table(result)))
    print()
    print(markdown(service_table(result)))
    print()
    print(markdown(cause_table(result)))
    met = result.cold_removed >= 0.5 and result.extra_awake <= 0.2
    print(f"\ntarget (cold >= 50% fewer, awake <= +20%): {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
