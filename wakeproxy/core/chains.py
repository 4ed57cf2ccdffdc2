"""Chains: how often a request to one service follows a request to another within seconds.

Pure: the predictor feeds each request; the table answers P(B | A). The rules:

* **The follower's window.** B's ``chain_window`` (w) is both how soon after A a request
  to B must come to follow A and how long A must be quiet for its next request to start
  a new episode: the user sets it on B, the service that would be woken, so A's episodes
  are counted in each window in use (``windows``: the followers' the predictor names in
  ``want``, and those of the pairs kept).
* **Episodes.** A request to A starts an episode of A in window w when A's previous
  request was more than w ago (or A's episode is not open in w): a burst is one episode.
  ``n_w(A)`` counts them.
* **Following.** A request to B counts as following A when it comes within B's window w
  after A's latest request, at most once per w-episode of A: ``n(A, B)``, kept with w.
  The predictor calls ``follow`` only for services with ``chains`` on: a pair is learned
  for the service it would wake. ``P(B | A) = n(A, B) / n_w(A)``. A follower whose window
  changes starts its pairs afresh (``refollow``): their counts were of other episodes.
* **Decay.** Every count halves every ``half_life`` (7 days), lazily: each is stored as
  (value, when) and read as ``value * 2 ** -(age / half_life)``. A pair is counted with
  its episode's weight (as if at the episode's start), so ``n(A, B) <= n_w(A)`` always
  and the ratio compares like with like, at any time.
* **Figures** (half-life 7 days). While A keeps its pace and B stops following, P(B | A)
  about halves every half-life: from near 1 below 0.5 within 7 days (hourly for two
  weeks, then A alone: 5.6 days). When A goes quiet its P stays, but ``n_w(A)`` falls
  below ``min_samples`` (3, rounded: below 2.5) after ``7 * log2(n / 2.5)`` days (5
  episodes: 7 days, 20 episodes: 21 days) and the pair is no longer trusted. A count is
  dropped when read below 0.01 (one episode: after 47 days).
* **Stored numbers** are rounded (counts to 1e-6, times to 1 ms): no estimate needs
  more, and the saved state stays small.
* **Bounded.** At most ``max_pairs`` pairs and ``max_episodes`` episode counts: past
  either, the tenth with the lowest decayed count go at once (the rarest or longest
  unseen; an episode count with the pairs counted against it). At most ``max_open`` open
  episodes (the least recent go). A window no follower wants and no pair keeps stops
  being counted at the next ``tidy``. No per-request history beyond open episodes.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

HALF_LIFE = 7 * 86400.0
MAX_PAIRS = 10_000
# Two windows a service at the predictor's 4,096 services: a config has one or two.
MAX_EPISODES = 8192
MAX_OPEN = 256
FLOOR = 0.01
WINDOW = 30.0  # a follower's chain_window unless it sets one

EpisodeRow = tuple[str, float, float, float]  # leader, window, n, when
PairRow = tuple[str, str, float, float, float]  # leader, follower, window, n, when


class Count:
    """A decayed count: ``value`` as of ``when``; a pair's also in its ``window``."""

    __slots__ = ("episode", "value", "when", "window")

    def __init__(self, value: float, when: float, window: float = 0.0) -> None:
        self.value = value
        self.when = when
        self.window = window
        # A pair's: the start of the leader's episode that last counted it (once each).
        self.episode: float | None = None


class _Open:
    """A leader's open episodes: its latest request, and each window's episode start."""

    __slots__ = ("last", "starts")

    def __init__(self, now: float) -> None:
        self.last = now
        self.starts: dict[float, float] = {}


def _likeliest(item: tuple[str, float, float, float]) -> tuple[float, str]:
    # By P as shown (3 places: counts carry rounding noise), then by name.
    return -round(item[1], 3), item[0]


class Chains:
    """Episode and pair counts of every service."""

    def __init__(
        self,
        half_life: float = HALF_LIFE,
        max_pairs: int = MAX_PAIRS,
        max_open: int = MAX_OPEN,
        max_episodes: int = MAX_EPISODES,
    ) -> None:
        self.half_life = half_life
        self.max_pairs = max_pairs
        self.max_open = max_open
        self.max_episodes = max_episodes
        self._episodes: dict[float, dict[str, Count]] = {}  # w -> A -> n_w(A)
        self._pairs: dict[str, dict[str, Count]] = {}  # A -> B -> n(A, B)
        self._leaders: dict[str, set[str]] = {}  # B -> the A with a pair (A, B)
        self._open: OrderedDict[str, _Open] = OrderedDict()  # least recent first
        self._wanted: frozenset[float] = frozenset()
        self._kept: Counter[float] = Counter()  # window -> pairs in it
        self.windows: tuple[float, ...] = ()  # counted, in this order
        self.keep_open = 0.0  # an episode stays open for the longest window
        self.pairs = 0
        self.counts_held = 0  # episode counts, all windows

    # -- windows --------------------------------------------------------------------

    def want(self, windows: Iterable[float]) -> None:
        """The windows of the followers with chains on (counted from now on)."""
        self._wanted = frozenset(windows)
        self._recount()

    def _recount(self) -> None:
        counted = self._wanted | set(self._kept) | set(self._episodes)
        self.windows = tuple(sorted(counted))
        self.keep_open = max(counted, default=0.0)

    def tidy(self) -> None:
        """Stop counting the windows no follower wants and no pair keeps (a follower's
        window changed, a state read with windows no longer configured)."""
        for window in set(self._episodes) - self._wanted - set(self._kept):
            self.counts_held -= len(self._episodes.pop(window))
            for episode in self._open.values():
                episode.starts.pop(window, None)
        self._recount()

    # -- requests -------------------------------------------------------------------

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
        """A request to ``name`` (chains on, its window ``window``): it follows each open
        episode of another service whose latest request is at most ``window`` ago."""
        self._close(now)
        for leader, episode in self._open.items():
            start = episode.starts.get(window)
            if leader != name and start is not None and now - episode.last <= window:
                self._follow(leader, name, window, start, now)

    def starts(self, name: str, now: float) -> list[float]:
        """The windows in which a request to ``name`` now starts an episode (the
        followers counted in those are due)."""
        episode = self._open.get(name)
        if episode is None:
            return list(self.windows)
        return [w for w in self.windows if w not in episode.starts or now - episode.last > w]

    def request(self, name: str, now: float) -> None:
        """A request to ``name``: in each window its episode goes on, or a new one starts
        (counted)."""
        self._close(now)
        episode = self._open.get(name)
        if episode is None:
            episode = self._open[name] = _Open(now)
        for window in self.starts(name, now):
            counts = self._episodes.setdefault(window, {})
            count = counts.get(name)
            if count is None:
                count = counts[name] = Count(0.0, now)
                self.counts_held += 1
            self._add(count, 1.0, now)
            episode.starts[window] = now
        episode.last = now
        self._open.move_to_end(name)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        if self.counts_held > self.max_episodes:
            self._evict_episodes()

    def _follow(self, leader: str, name: str, window: float, start: float, now: float) -> None:
        count = self._pairs.get(leader, {}).get(name)
        if count is not None and count.window != window:
            self._unpair(leader, name)  # counted in another window: afresh
            count = None
        if count is None:
            count = self._pairs.setdefault(leader, {})[name] = Count(0.0, now, window)
            self._leaders.setdefault(name, set()).add(leader)
            self._kept[window] += 1
            self.pairs += 1
        elif count.episode == start:
            return
        count.episode = start
        # The episode's weight now, as if counted at its start: n(A, B) <= n_w(A).
        self._add(count, self.read(Count(1.0, start), now), now)
        if self.pairs > self.max_pairs:
            self._evict_pairs()

    def refollow(self, name: str, window: float) -> None:
        """``name`` follows in ``window`` now: its pairs counted in another go."""
        for leader in sorted(self._leaders.get(name, ())):
            if self._pairs[leader][name].window != window:
                self._unpair(leader, name)

    # -- reading --------------------------------------------------------------------

    def episodes(self, name: str, now: float, window: float) -> float:
        """``n_w(name)`` for ``window``, decayed to now."""
        count = self._episodes.get(window, {}).get(name)
        return 0.0 if count is None else self.read(count, now)

    def episode_counts(self, name: str, now: float) -> list[tuple[float, float]]:
        """(window, n_w(name)) for every window ``name`` has a count in."""
        return [
            (window, self.read(counts[name], now))
            for window, counts in sorted(self._episodes.items())
            if name in counts
        ]

    def followers(self, name: str, now: float) -> list[tuple[str, float, float, float]]:
        """(B, P(B | name), n(name, B), window) of every follower, likeliest first; drops
        the pairs and episode counts decayed below the floor."""
        out = []
        for follower, count in list(self._pairs.get(name, {}).items()):
            value = self.read(count, now)
            if value < FLOOR:
                self._unpair(name, follower)
                continue
            n = self.episodes(name, now, count.window)
            out.append((follower, min(1.0, value / n) if n > 0 else 0.0, value, count.window))
        if name not in self._open:
            kept = {c.window for c in self._pairs.get(name, {}).values()}
            for window, counts in self._episodes.items():
                own = counts.get(name)
                if own is not None and window not in kept and self.read(own, now) < FLOOR:
                    del counts[name]
                    self.counts_held -= 1
        out.sort(key=_likeliest)
        return out

    def leaders(self, name: str, now: float) -> list[tuple[str, float, float, float]]:
        """(A, P(name | A), n(A, name), window) of every leader ``name`` follows."""
        out = []
        for leader in sorted(self._leaders.get(name, ())):
            count = self._pairs[leader][name]
            value = self.read(count, now)
            n = self.episodes(leader, now, count.window)
            out.append((leader, min(1.0, value / n) if n > 0 else 0.0, value, count.window))
        out.sort(key=_likeliest)
        return out

    def view(
        self, name: str, now: float, trusted: Callable[[float, str], bool]
    ) -> dict[str, list[dict[str, Any]]]:
        """``name``'s rows as the API shows them (rounded to 3 places): its episode counts
        per window, its followers (``trusted(n_w(name), B)``: enough episodes for B to be
        woken) and its leaders."""
        return {
            "episodes": [
                {"window": w, "n": round(n, 3)} for w, n in self.episode_counts(name, now)
            ],
            "followers": [
                {"service": b, "window": w, "p": round(p, 3), "n": round(v, 3)}
                | {"trusted": trusted(self.episodes(name, now, w), b)}
                for b, p, v, w in self.followers(name, now)
            ],
            "leaders": [
                {"service": a, "window": w, "p": round(p, 3), "n": round(v, 3)}
                for a, p, v, w in self.leaders(name, now)
            ],
        }

    # -- bounds ---------------------------------------------------------------------

    def _unpair(self, leader: str, follower: str) -> None:
        followers = self._pairs[leader]
        count = followers.pop(follower)
        if not followers:
            del self._pairs[leader]
        leaders = self._leaders[follower]
        leaders.discard(leader)
        if not leaders:
            del self._leaders[follower]
        self._kept[count.window] -= 1
        if not self._kept[count.window]:
            del self._kept[count.window]
        self.pairs -= 1

    def _rank(self, count: Count) -> float:
        # Decayed to any later time, a count ranks as log2(value) + when / half_life: the
        # same order whatever that time.
        return math.log2(max(count.value, 1e-300)) + count.when / self.half_life

    def _evict_pairs(self) -> None:
        everything = ((a, b, c) for a, bs in self._pairs.items() for b, c in bs.items())
        rarest = heapq.nsmallest(self.max_pairs // 10 + 1, everything, lambda x: self._rank(x[2]))
        for leader, follower, _ in rarest:
            self._unpair(leader, follower)

    def _evict_episodes(self) -> None:
        everything = ((w, a, c) for w, counts in self._episodes.items() for a, c in counts.items())
        for window, leader, _ in heapq.nsmallest(
            self.max_episodes // 10 + 1, everything, lambda x: self._rank(x[2])
        ):
            del self._episodes[window][leader]
            self.counts_held -= 1
            for follower, count in list(self._pairs.get(leader, {}).items()):
                if count.window == window:
                    self._unpair(leader, follower)
            episode = self._open.get(leader)
            if episode is not None:  # its next request starts a counted one
                episode.starts.pop(window, None)

    def drop(self, name: str) -> None:
        """Everything about ``name``: its counts, its pairs either way, its episode."""
        for counts in self._episodes.values():
            if counts.pop(name, None) is not None:
                self.counts_held -= 1
        self._open.pop(name, None)
        for follower in list(self._pairs.get(name, {})):
            self._unpair(name, follower)
        for leader in list(self._leaders.get(name, ())):
            self._unpair(leader, name)

    # -- state ----------------------------------------------------------------------

    def counts(self) -> tuple[list[EpisodeRow], list[PairRow]]:
        """A copy of the counts: (A, w, value, when) per n_w(A), (A, B, w, value, when)
        per pair."""
        episodes = [
            (a, w, c.value, c.when)
            for w, counts in self._episodes.items()
            for a, c in counts.items()
        ]
        pairs = [
            (a, b, c.window, c.value, c.when)
            for a, bs in self._pairs.items()
            for b, c in bs.items()
        ]
        return episodes, pairs

    def load(self, episodes: Iterable[EpisodeRow], pairs: Iterable[PairRow]) -> None:
        """Counts read from a state (validated by the caller)."""
        # Rounded as when counted, whoever wrote them.
        for name, window, value, when in episodes:
            self._episodes.setdefault(window, {})[name] = Count(round(value, 6), round(when, 3))
            self.counts_held += 1
        for leader, follower, window, value, when in pairs:
            count = Count(round(value, 6), round(when, 3), window)
            self._pairs.setdefault(leader, {})[follower] = count
            self._leaders.setdefault(follower, set()).add(leader)
            self._kept[window] += 1
            self.pairs += 1
        self._recount()
