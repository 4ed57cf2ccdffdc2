"""The predictor's saved state: its form, written (``Snapshot``) and checked on the way in.

``Predictor.to_state`` writes version 2 (JSON-able)::

    {"version": 2, "zone": "Europe/Berlin",
     "services": [name, ...],                       # least recently used first
     "arrivals": {name: [[slot, p, week], ...]},    # slot 0..671, 0 < p <= 1
     "chains": {"episodes": [[leader, window, n, when], ...],   # n_w(A) as of when
                "pairs": [[leader, follower, window, n, when], ...]},
     "wake_times": {name: [seconds, ...]}}          # the last 16 wakes

A pair's ``window`` is its follower's ``chain_window`` when it was counted, and the window
its leader's episodes are counted in for it. Version 1 kept no window (an episode of A
was then counted in A's own ``chain_window``): its ``"episodes": {name: [n, when]}`` and
``"pairs": [[leader, follower, n, when], ...]`` are read as counted in the default window
(30 s, ``V1_WINDOW``), the one most services had; a follower configured with another
window starts its pairs afresh when it is configured (``Chains.refollow``).

``check`` refuses anything else with a ValueError naming where and what (a wrong version,
a wrong type, a slot out of range, NaN, more than the bounds allow, a name the services
list lacks): the glue logs that one line and starts empty. Nothing past the bounds is
iterated, so a huge input costs no more than a small one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .arrivals import SLOTS
from .chains import MAX_EPISODES, WINDOW, EpisodeRow, PairRow
from .schedule import load_zone

VERSION = 2
V1_WINDOW = WINDOW
WAKE_SAMPLES = 16
MAX_NAME = 256
_LAST_WEEK = 600_000  # past datetime's year 9999
_MAX_COUNT = 1e12
_MAX_TIME = 1e11  # epoch seconds: year 5138


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a predictor learned, copied (``Predictor.snapshot``)."""

    zone: str
    services: list[str]
    arrivals: dict[str, dict[int, tuple[float, int]]]  # name -> slot -> (p, last week)
    chains: tuple[list[EpisodeRow], list[PairRow]]
    wake_times: dict[str, list[float]]

    def state(self) -> dict[str, Any]:
        """The JSON-able form ``check`` reads."""
        episodes, pairs = self.chains
        return {
            "version": VERSION,
            "zone": self.zone,
            "services": self.services,
            "arrivals": {
                name: [[slot, p, last] for slot, (p, last) in table.items()]
                for name, table in self.arrivals.items()
                if table
            },
            "chains": {
                "episodes": [list(row) for row in episodes],
                "pairs": [list(row) for row in pairs],
            },
            "wake_times": self.wake_times,
        }


@dataclass(frozen=True, slots=True)
class State:
    zone: str
    services: list[str]
    arrivals: dict[str, list[tuple[int, float, int]]]
    episodes: list[EpisodeRow]
    pairs: list[PairRow]
    wake_times: dict[str, list[float]]


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"state: {where}: {problem}")


def _get(data: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    if key not in data:
        raise _fail(where or "top", f"no {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise _fail(f"{where}{key}", f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _sized(value: list[Any] | dict[str, Any], most: int, where: str) -> None:
    if len(value) > most:
        raise _fail(where, f"{len(value)} entries (expected at most {most})")


def _number(value: object, where: str, low: float, high: float) -> float:
    # bool is an int: refused, as True is no count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not low <= number <= high:  # NaN fails too
        raise _fail(where, f"{value!r} (expected {low:g} .. {high:g})")
    return number


def _integer(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(where, f"{value} (expected {low} .. {high})")
    return value


def _row(value: object, size: int, where: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != size:
        raise _fail(where, f"expected a list of {size}")
    return value


def _known(name: str, services: set[str], where: str) -> str:
    if name not in services:
        raise _fail(where, f"service {name!r} is not in services")
    return name


def _service_list(name: str, value: object, services: set[str], where: str, most: int) -> list[Any]:
    """A per-service list: of a listed service, a list, at most ``most`` long."""
    _known(name, services, where)
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    _sized(value, most, where)
    return value


def check(
    data: object,
    max_services: int,
    max_pairs: int,
    max_slots: int,
    max_episodes: int = MAX_EPISODES,
) -> State:
    """The state in ``data`` (version 2, or 1), or ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise _fail("top", f"expected an object, got {type(data).__name__}")
    if "version" not in data:
        raise _fail("top", "no 'version'")
    version = data["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version not in (1, 2):
        raise _fail("version", f"{version!r} (expected 1 or {VERSION})")
    zone = _get(data, "zone", str)
    try:
        load_zone(zone)
    except ValueError as exc:
        raise _fail("zone", str(exc)) from None
    names = _get(data, "services", list)
    _sized(names, max_services, "services")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise _fail(f"services[{i}]", f"expected a name of 1 .. {MAX_NAME} characters")
    services = set(names)
    if len(services) != len(names):
        raise _fail("services", "a name twice")
    return State(
        zone,
        list(names),
        _arrivals(_get(data, "arrivals", dict), services, max_slots),
        *_chains(_get(data, "chains", dict), services, max_pairs, max_episodes, version),
        _wake_times(_get(data, "wake_times", dict), services),
    )


def _arrivals(
    data: dict[str, Any], services: set[str], max_slots: int
) -> dict[str, list[tuple[int, float, int]]]:
    _sized(data, len(services), "arrivals")
    out: dict[str, list[tuple[int, float, int]]] = {}
    total = 0
    for name, rows in data.items():
        where = f"arrivals[{name!r}]"
        rows = _service_list(name, rows, services, where, SLOTS)
        total += len(rows)
        if total > max_slots:
            raise _fail("arrivals", f"more than {max_slots} slots")
        table: dict[int, tuple[int, float, int]] = {}
        for i, row in enumerate(rows):
            slot, p, week = _row(row, 3, f"{where}[{i}]")
            slot = _integer(slot, f"{where}[{i}] slot", 0, SLOTS - 1)
            if slot in table:
                raise _fail(f"{where}[{i}]", f"slot {slot} twice")
            # Stored rounded to 1e-6: anything smaller would read back as 0.
            p = _number(p, f"{where}[{i}] p", 1e-6, 1.0)
            table[slot] = (slot, p, _integer(week, f"{where}[{i}] week", 0, _LAST_WEEK))
        out[name] = list(table.values())
    return out


def _chains(
    data: dict[str, Any], services: set[str], max_pairs: int, max_episodes: int, version: int
) -> tuple[list[EpisodeRow], list[PairRow]]:
    episodes = _episodes(data, services, max_episodes, version)
    counted = {(name, window) for name, window, _, _ in episodes}
    rows = _get(data, "pairs", list, "chains.")
    _sized(rows, max_pairs, "chains.pairs")
    pairs = []
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        where = f"chains.pairs[{i}]"
        if version == 1:
            leader, follower, value, when = _row(row, 4, where)
            window: object = V1_WINDOW
        else:
            leader, follower, window, value, when = _row(row, 5, where)
        if not isinstance(leader, str) or not isinstance(follower, str) or leader == follower:
            raise _fail(where, "expected two different service names first")
        _known(leader, services, where)
        _known(follower, services, where)
        window = _window(window, f"{where} window")
        if (leader, window) not in counted:
            raise _fail(
                where, f"leader {leader!r} has no chains.episodes count in window {window:g}"
            )
        if (leader, follower) in seen:
            raise _fail(where, f"pair {leader!r} -> {follower!r} twice")
        seen.add((leader, follower))
        value = _number(value, f"{where} n", 0.0, _MAX_COUNT)
        when = _number(when, f"{where} when", 0.0, _MAX_TIME)
        pairs.append((leader, follower, window, value, when))
    return episodes, pairs


def _episodes(
    data: dict[str, Any], services: set[str], most: int, version: int
) -> list[EpisodeRow]:
    """n_w(A) rows: version 2's list, or version 1's mapping (in ``V1_WINDOW``)."""
    rows: list[tuple[str, object, object, object, str]] = []  # name, window, n, when, where
    if version == 1:
        counts = _get(data, "episodes", dict, "chains.")
        _sized(counts, len(services), "chains.episodes")
        for name, row in counts.items():
            where = f"chains.episodes[{name!r}]"
            value, when = _row(row, 2, where)
            rows.append((name, V1_WINDOW, value, when, where))
    else:
        listed = _get(data, "episodes", list, "chains.")
        _sized(listed, most, "chains.episodes")
        for i, row in enumerate(listed):
            where = f"chains.episodes[{i}]"
            name, window, value, when = _row(row, 4, where)
            rows.append((name, window, value, when, where))
    out: list[EpisodeRow] = []
    seen: set[tuple[str, float]] = set()
    for name, window, value, when, where in rows:
        if not isinstance(name, str):
            raise _fail(where, "expected a service name first")
        _known(name, services, where)
        window = _window(window, f"{where} window")
        if (name, window) in seen:
            raise _fail(where, f"{name!r} in window {window:g} twice")
        seen.add((name, window))
        value = _number(value, f"{where} n", 0.0, _MAX_COUNT)
        out.append((name, window, value, _number(when, f"{where} when", 0.0, _MAX_TIME)))
    return out


def _window(value: object, where: str) -> float:
    window = _number(value, where, 0.0, _MAX_TIME)
    if window == 0.0:
        raise _fail(where, "0 (expected seconds above 0)")
    return window


def _wake_times(data: dict[str, Any], services: set[str]) -> dict[str, list[float]]:
    _sized(data, len(services), "wake_times")
    out = {}
    for name, wakes in data.items():
        where = f"wake_times[{name!r}]"
        wakes = _service_list(name, wakes, services, where, WAKE_SAMPLES)
        out[name] = [_number(w, f"{where}[{i}]", 0.0, 86400.0) for i, w in enumerate(wakes)]
    return out


def clamped(state: State, now: float, week: int) -> State:
    """``state`` with no time after ``now``: a count's ``when`` at most ``now``, a slot's
    last week at most ``week`` (now's, in the state's zone)."""
    return replace(
        state,
        arrivals={
            name: [(slot, p, min(last, week)) for slot, p, last in rows]
            for name, rows in state.arrivals.items()
        },
        episodes=[(name, w, value, min(when, now)) for name, w, value, when in state.episodes],
        pairs=[(a, b, w, value, min(when, now)) for a, b, w, value, when in state.pairs],
    )
