"""The release pacing's decisions (core/pacing.py): pure, readings and times passed in."""

from __future__ import annotations

from typing import NamedTuple

from wakeproxy.core.pacing import FALLBACK_WINDOW, MAX_WINDOW, SYN_RETRIED, Pacing


class Queue(NamedTuple):
    room: int
    limit: int


def test_a_set_concurrency_is_the_window_whatever_the_queue_shows() -> None:
    pacing = Pacing(8)
    assert pacing.release(Queue(room=500, limit=4096), connecting=0, opening=0) == 8
    assert pacing.source == "connect_concurrency" and pacing.has_room()


def test_the_window_is_the_queues_room_plus_our_connects_in_it_within_its_limit() -> None:
    pacing = Pacing(None)
    assert pacing.release(Queue(room=5, limit=9), connecting=3, opening=1) == 8
    assert pacing.source == "accept_queue"
    assert pacing.room == 4  # the connect still opening is not in the kernel's count yet
    assert pacing.release(Queue(room=9, limit=9), connecting=3, opening=0) == 9  # the limit
    assert pacing.release(Queue(room=0, limit=0), connecting=0, opening=0) == 1  # never 0
    huge = Queue(room=100_000, limit=100_000)
    assert pacing.release(huge, connecting=0, opening=0) == MAX_WINDOW


def test_a_full_queue_is_read_again_until_it_has_room_or_patience_runs_out() -> None:
    pacing = Pacing(None)
    pacing.release(Queue(room=1, limit=9), connecting=0, opening=0)
    assert pacing.has_room()
    pacing.sent()
    assert pacing.has_room() is None  # read it again first
    assert not pacing.reread(Queue(room=0, limit=9), opening=0, now=10.0, patience=5.0)
    assert not pacing.reread(Queue(room=0, limit=9), opening=0, now=14.9, patience=5.0)
    assert pacing.reread(Queue(room=0, limit=9), opening=0, now=15.0, patience=5.0)
    # Room again: the patience clock starts afresh the next time it is full.
    assert pacing.reread(Queue(room=2, limit=9), opening=1, now=15.1, patience=5.0)
    assert pacing.room == 1
    assert not pacing.reread(Queue(room=0, limit=9), opening=0, now=16.0, patience=5.0)
    # No longer seen: the slots alone pace.
    assert pacing.reread(None, opening=0, now=16.1, patience=5.0) and pacing.room is None


def test_unseen_queues_learn_the_window_from_retried_syns_and_keep_it() -> None:
    pacing = Pacing(None)
    assert pacing.release(None, connecting=0, opening=0) == FALLBACK_WINDOW
    assert pacing.learning and pacing.source == "learned"
    pacing.connected(0.001, in_flight=20)  # no retry: nothing learned
    assert pacing.learned == FALLBACK_WINDOW
    pacing.connected(SYN_RETRIED, in_flight=12)  # a retried SYN: the queue took 12
    assert pacing.learned == pacing.window == 12
    pacing.connected(1.0, in_flight=30)  # never upwards
    assert pacing.learned == 12
    assert pacing.release(None, connecting=0, opening=0) == 12  # kept to the next release
    pacing.connected(1.0, in_flight=0)
    assert pacing.learned == 1  # at least one
    pacing.starting()  # a new process may listen with another backlog
    assert pacing.release(None, connecting=0, opening=0) == FALLBACK_WINDOW


def test_a_window_read_from_the_queue_is_not_changed_by_connect_times() -> None:
    pacing = Pacing(None)
    pacing.release(Queue(room=9, limit=9), connecting=0, opening=0)
    pacing.connected(1.0, in_flight=3)
    assert pacing.window == 9


def test_early_connects_take_the_queues_room_within_the_window_bounds() -> None:
    assert Pacing(None).early_room(Queue(room=7, limit=9)) == 7
    assert Pacing(4).early_room(Queue(room=7, limit=9)) == 4
    assert Pacing(None).early_room(Queue(room=10**6, limit=10**6)) == MAX_WINDOW
