"""How fast held connections go to a just-woken backend: the release window, the room the
backend's accept queue shows, and what the connects themselves teach where it shows none.

Pure: the glue (net/admission.py) reads the kernel and times the connects; this decides
from those readings and the time it is given. The rules:

* **Window.** At most this many upstream connects in flight at once during a release:
  ``connect_concurrency`` when set; else what the accept queue takes at the moment of the
  release (its room, plus the connects of ours already in it, never past its limit or
  ``MAX_WINDOW``); where the listener cannot be seen (another network namespace), the
  learned window.
* **Learned.** Linux retries a dropped SYN after one second, so a paced connect that took
  ``SYN_RETRIED`` or more was sent into a full accept queue, and the connects in flight
  when it was sent are what the queue took: the learned window drops to that count and
  stays there from one release to the next. A start (a new process may listen with
  another backlog) begins again from ``FALLBACK_WINDOW``. Never probed upwards: an
  overflowing accept queue costs more than a second.
* **Room.** Where the queue is read, a connect goes only into room it shows (less the
  connects sent and not yet completed, which the kernel does not count yet). While it
  shows none the glue reads it again every ``QUEUE_RECHECK``; after ``patience`` seconds
  of none (a backend that accepts nothing) the connects go anyway, to fail as they would.
"""

from __future__ import annotations

from typing import Literal, Protocol

# The release window where the backend's accept queue cannot be read, and the most it
# may be where it can (each connect in flight is a descriptor of the proxy's).
FALLBACK_WINDOW = 64
MAX_WINDOW = 4096
# A connect that took this long had its first SYN dropped (Linux's initial SYN
# retransmission timeout is 1 s; on loopback a handshake takes microseconds).
SYN_RETRIED = 0.9
# While the accept queue shows no room and connections wait: how often it is read again.
QUEUE_RECHECK = 0.01

Source = Literal["connect_concurrency", "accept_queue", "learned"]


class Queue(Protocol):
    """A listener's accept queue as the kernel shows it (net/backlog.py's reading)."""

    @property
    def room(self) -> int: ...

    @property
    def limit(self) -> int: ...


class Pacing:
    """One backend's release pacing (the module's rules)."""

    def __init__(self, concurrency: int | None) -> None:
        self.concurrency = concurrency  # None: the accept queue's, read at each release
        self.window = concurrency or FALLBACK_WINDOW
        self.source: Source = "connect_concurrency" if concurrency else "accept_queue"
        self.learned = FALLBACK_WINDOW
        # Where the queue is read: how many more it takes as last read (None: not paced
        # by its room), and since when it has shown none.
        self.room: int | None = None
        self._full_since: float | None = None

    @property
    def learning(self) -> bool:
        """This release's window is the learned one: its connects' times teach."""
        return self.source == "learned"

    def release(self, queue: Queue | None, connecting: int, opening: int) -> int:
        """A release starts: its window. ``queue``: the accept queue now (None: not
        seen); ``connecting``: connects of ours holding a slot; ``opening``: those sent
        and not yet completed (the kernel does not count them yet)."""
        self.room = None
        self._full_since = None
        if self.concurrency is not None:
            self.source, self.window = "connect_concurrency", self.concurrency
        elif queue is None:
            self.source, self.window = "learned", self.learned
        else:
            self.room = queue.room - opening
            # Connects still in flight (early ones waiting in the accept queue) are in the
            # queue's count and in ours: what is left is the room, on top of those. Early
            # ones the backend has accepted already, unanswered, are in ours only: the
            # window never passes the queue's limit, which all in flight may come to fill.
            window = min(queue.room + connecting, queue.limit, MAX_WINDOW)
            self.source, self.window = "accept_queue", max(1, window)
        return self.window

    def early_room(self, queue: Queue) -> int:
        """How many held connections to connect while an unpause is in flight: the
        frozen backend's kernel completes handshakes into its accept queue, up to its
        room (within the window's bounds)."""
        return min(queue.room, self.concurrency or MAX_WINDOW, MAX_WINDOW)

    def has_room(self) -> bool | None:
        """Whether one more connect fits as last read: True, or None when the queue must
        be read again first (``reread``)."""
        return True if self.room is None or self.room > 0 else None

    def sent(self) -> None:
        """A connect went: one less room."""
        if self.room is not None:
            self.room -= 1

    def reread(self, queue: Queue | None, opening: int, now: float, patience: float) -> bool:
        """The queue read again after it showed no room: whether a connect goes now
        (False: read it again after ``QUEUE_RECHECK``)."""
        if queue is None:
            self.room = None  # no longer seen: the slots alone pace
            return True
        self.room = queue.room - opening
        if self.room > 0:
            self._full_since = None
            return True
        if self._full_since is None:
            self._full_since = now
        elif now - self._full_since >= patience:
            return True  # it accepts nothing: connect anyway, to fail as it would
        return False

    def connected(self, seconds: float, in_flight: int) -> None:
        """A paced connect of a learning release completed in ``seconds``, sent with
        ``in_flight`` others in flight."""
        if seconds >= SYN_RETRIED:
            self.learned = max(1, min(self.learned, in_flight))
            if self.learning:
                self.window = self.learned

    def starting(self) -> None:
        """The backend is being started: what was learned of its backlog is forgotten."""
        self.learned = FALLBACK_WINDOW
