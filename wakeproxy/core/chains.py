"""Chains: how often a request to one service follows a request to another within seconds.

Pure: the predictor feeds each request with the requested service's window; the table
answers P(B | A). The rules:

* **Episodes.** A request to A starts an episode of A when A's previous request was more
  than A's window ago: a burst is one episode. ``n(A)`` counts A's episodes.
* **Following.** A request to B counts as following A when it comes within B's window
  after a request of A's open episode (A's latest), at most once per episode:
  ``n(A, B)``. The predictor calls ``follow`` only for services with ``chains`` on: a
  pair is learned for the service it would wake. ``P(B | A) = n(A, B) / n(A)``.
* **Decay.** Both counts halve every ``half_life`` (7 days), lazily: each is stored as
  (value, when) and read as ``value * 2 ** -(age / half_life)``. A pair is counted with
  its episode's weight (as if at the episode's start), so ``n(A, B) <= n(A)`` always and
  the ratio compares like with like, at any time.
* **Figures** (half-life 7 days). While A keeps its pace and B stops following, P(B | A)
  about halves every half-life: from near 1 below 0.5 within 7 days (hourly for two
  weeks, then A alone: 5.6 days). When A goes quiet its P stays, but ``n(A)`` falls
  below ``min_samples`` (3, rounded: below 2.5) after ``7 * log2(n / 2.5)`` days (5
  episodes: 7 days, 20 episodes: 21 days) and the pair is no longer trusted. A count is
  dropped when read below 0.01 (one episode: after 47 days).
* **Stored numbers** are rounded (counts to 1e-6, times to 1 ms): no estimate needs
  more, and the saved state stays small.
* **Bounded.** At most ``max_pairs`` pairs: past it, the tenth with the lowest decayed
  ``n(A, B)`` go at once (the rarest or longest unseen). At most ``max_open`` open
  episodes (the least recent go). No per-request history beyond open episodes.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable

HALF_LIFE = 7 * 86400.0
MAX_PAIRS = 10_000
MAX_OPEN = 256
FLOOR = 0.01


class Count:
    """A decayed count: ``value`` as of ``when``."""

    __slots__ = ("episode", "value", "when")

    def __init__(self, value: float, when: float, episode: float | None = None) -> None:
        self.value = value
        self.when = when
        # A pair's: the start of the leader's episode that last counted it (once each).
        self.episode = episode


class _Episode:
    __slots__ = ("last", "start")

    def __init__(self, now: float) -> None:
        self.start = now
        self.last = now


def _likeliest(item: tuple[str, float, float]) -> tuple[float, str]:
    # By P as shown (3 places: counts carry rounding noise), then by name.
    return -round(item[1], 3), item[0]


class Chains:
    """Episode and pair counts of every service."""

    def __init__(
        self, half_life: float = HALF_LIFE, max_pairs: int = MAX_PAIRS, max_open: int = MAX_OPEN
    ) -> None:
        self.half_life = half_life
        self.max_pairs = max_pairs
        self.max_open = max_open
        # How long an episode stays open for followers: the longest window configured.
        self.keep_open = 30.0
        self._episodes: dict[str, Count] = {}  # n(A)
        self._pairs: dict[str, dict[str, Count]] = {}  # A -> B -> n(A, B)
        self._leaders: dict[str, set[str]] = {}  # B -> the A with a pair (A, B)
        self._open: OrderedDict[str, _Episode] = OrderedDict()  # least recent first
        self.pairs = 0

    def names(self) -> set[str]:
        return set(self._episodes) | set(self._leaders)

    def read(self, count: Count, now: float) -> float:
        # A clock set back does not grow a count.
        return float(count.value * 2.0 ** (-max(0.0, now - count.when) / self.half_life))

    def _add(self, count: Count, amount: float, now: float) -> None:
        count.value = round(self.read(count, now) + amount, 6)
        count.when = max(count.when, round(now, 3))

    def _close(self, now: float) -> None:
        while self._open:
            oldest = next(iter(self._open.values()))
            if now - oldest.last <= self.keep_open:
                break
            self._open.popitem(last=False)

    def follow(self, name: str, now: float, window: float) -> None:
        """A request to ``name`` (chains on): it follows each open episode of another
        service whose latest request is at most ``window`` ago."""
        self._close(now)
        for leader, episode in self._open.items():
            if leader != name and now - episode.last <= window:
                self._follow(leader, name, episode, now)

    def opens(self, name: str, now: float, window: float) -> bool:
        """Whether a request to ``name`` now starts an episode (its followers are due)."""
        episode = self._open.get(name)
        return episode is None or now - episode.last > window

    def request(self, name: str, now: float, window: float) -> None:
        """A request to ``name``: its episode goes on, or a new one starts (counted)."""
        self._close(now)
        episode = self._open.get(name)
        if episode is not None and now - episode.last <= window:
            episode.last = now
        else:
            count = self._episodes.setdefault(name, Count(0.0, now))
            self._add(count, 1.0, now)
            self._open[name] = _Episode(now)
        self._open.move_to_end(name)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)

    def _follow(self, leader: str, name: str, episode: _Episode, now: float) -> None:
        followers = self._pairs.setdefault(leader, {})
        count = followers.get(name)
        if count is None:
            count = followers[name] = Count(0.0, now)
            self._leaders.setdefault(name, set()).add(leader)
            self.pairs += 1
        elif count.episode == episode.start:
            return
        count.episode = episode.start
        # The episode's weight now, as if counted at its start: n(A, B) <= n(A).
        self._add(count, self.read(Count(1.0, episode.start), now), now)
        if self.pairs > self.max_pairs:
            self._evict(now)

    def episodes(self, name: str, now: float) -> float:
        """``n(name)``, decayed to now."""
        count = self._episodes.get(name)
        return 0.0 if count is None else self.read(count, now)

    def followers(self, name: str, now: float) -> list[tuple[str, float, float]]:
        """(B, P(B | name), n(name, B)) of every follower, likeliest first; drops the
        pairs decayed below the floor."""
        n = self.episodes(name, now)
        out = []
        for follower, count in list(self._pairs.get(name, {}).items()):
            value = self.read(count, now)
            if value < FLOOR:
                self._unpair(name, follower)
                continue
            out.append((follower, min(1.0, value / n) if n > 0 else 0.0, value))
        if n < FLOOR and name not in self._pairs and name not in self._open:
            self._episodes.pop(name, None)
        out.sort(key=_likeliest)
        return out

    def leaders(self, name: str, now: float) -> list[tuple[str, float, float]]:
        """(A, P(name | A), n(A, name)) of every leader ``name`` follows."""
        out = []
        for leader in sorted(self._leaders.get(name, ())):
            value = self.read(self._pairs[leader][name], now)
            n = self.episodes(leader, now)
            out.append((leader, min(1.0, value / n) if n > 0 else 0.0, value))
        out.sort(key=_likeliest)
        return out

    def _unpair(self, leader: str, follower: str) -> None:
        followers = self._pairs[leader]
        del followers[follower]
        if not followers:
            del self._pairs[leader]
        leaders = self._leaders[follower]
        leaders.discard(leader)
        if not leaders:
            del self._leaders[follower]
        self.pairs -= 1

    def _evict(self, now: float) -> None:
        # Decayed to any later time, a count ranks as log2(value) + when / half_life: the
        # same order whatever that time.
        def rank(item: tuple[str, str, Count]) -> float:
            return math.log2(max(item[2].value, 1e-300)) + item[2].when / self.half_life

        everything = ((a, b, c) for a, bs in self._pairs.items() for b, c in bs.items())
        for leader, follower, _ in heapq.nsmallest(self.max_pairs // 10 + 1, everything, rank):
            self._unpair(leader, follower)

    def drop(self, name: str) -> None:
        """Everything about ``name``: its count, its pairs either way, its episode."""
        self._episodes.pop(name, None)
        self._open.pop(name, None)
        for follower in list(self._pairs.get(name, {})):
            self._unpair(name, follower)
        for leader in list(self._leaders.get(name, ())):
            self._unpair(leader, name)

    def counts(
        self,
    ) -> tuple[dict[str, tuple[float, float]], list[tuple[str, str, float, float]]]:
        """A copy of the counts: n(A) as (value, when), and (A, B, value, when) per pair."""
        episodes = {a: (c.value, c.when) for a, c in self._episodes.items()}
        pairs = [(a, b, c.value, c.when) for a, bs in self._pairs.items() for b, c in bs.items()]
        return episodes, pairs

    def load(
        self,
        episodes: Iterable[tuple[str, float, float]],
        pairs: Iterable[tuple[str, str, float, float]],
    ) -> None:
        """Counts read from a state (validated by the caller)."""
        # Rounded as when counted, whoever wrote them.
        for name, value, when in episodes:
            self._episodes[name] = Count(round(value, 6), round(when, 3))
        for leader, follower, value, when in pairs:
            count = Count(round(value, 6), round(when, 3))
            self._pairs.setdefault(leader, {})[follower] = count
            self._leaders.setdefault(follower, set()).add(leader)
            self.pairs += 1
