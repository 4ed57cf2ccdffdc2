"""The words every layer shares: backend states, connection outcomes, sleep reasons.

Their values are what the API, the logs and the metric labels show, so each word is
spelled once, here.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """A backend's state as the proxy knows it.

    running   up; connections are forwarded at once
    paused    frozen (docker pause / SIGSTOP); a wake is an unpause, ~10 ms
    stopped   not running; a wake is a start plus a readiness probe
    waking    one unpause/start is in flight; arriving connections are held
    pausing   a pause is in flight; arrivals are held and wake it right after
    stopping  a stop is in flight; likewise
    failed    the last operation failed or the backend is missing; retried with back-off
    """

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    WAKING = "waking"
    PAUSING = "pausing"
    STOPPING = "stopping"
    FAILED = "failed"


# Asleep: a connection needs a wake first; probes are answered by the proxy.
ASLEEP = frozenset({State.PAUSED, State.STOPPED})
# Asleep or going to sleep: probes are answered by the proxy (forwarding one would wake
# the backend right after its pause or stop).
NOT_SERVING = frozenset({*ASLEEP, State.PAUSING, State.STOPPING})
# One of our own operations runs; its result, not what the runtime reports, decides.
IN_FLIGHT = frozenset({State.WAKING, State.PAUSING, State.STOPPING})
# A service in one of these keeps what it depends on awake.
AWAKE = frozenset({State.RUNNING, *IN_FLIGHT})


class Outcome(enum.StrEnum):
    """What became of a connection: the ``outcome`` label of wakeproxy_connections_total."""

    FORWARDED = "forwarded"
    REJECTED_OVERFLOW = "rejected_overflow"  # the hold queue was full
    REJECTED_LIMIT = "rejected_limit"  # max_connections reached
    WAKE_TIMEOUT = "wake_timeout"
    BACKEND_ERROR = "backend_error"  # a failed wake, or the backend refused the connect
    IDLE_TIMEOUT = "idle_timeout"  # no byte either way for idle_connection_timeout
    # mode http: answers the proxy gave itself
    PROBE_ANSWERED = "probe_answered"
    BAD_REQUEST = "bad_request"
    HEADER_TOO_LARGE = "header_too_large"
    HEADER_TIMEOUT = "header_timeout"
    WAITING_PAGE = "waiting_page"
    # replicas: a request of an MCP session whose replica is gone or was restarted
    SESSION_GONE = "session_gone"
    # MCP session set-up the proxy answered itself (the server slept)
    MCP_ANSWERED = "mcp_answered"


class SleepAction(enum.StrEnum):
    PAUSE = "pause"
    STOP = "stop"
    # A pause, then the backend's memory given back (reclaimed at its cgroup); woken
    # like a pause, its pages come back from swap on demand.
    HIBERNATE = "hibernate"


class SleepReason(enum.StrEnum):
    """Why a backend went to sleep: the ``reason`` label of wakeproxy_sleeps_total."""

    IDLE = "idle"
    API = "api"
    STOP_AFTER = "stop_after"  # paused for sleep_policy.stop_after, then stopped
    EXTERNAL = "external"  # put to sleep by someone else (docker pause, a crash)
    SCHEDULE = "schedule"  # an asleep window began (sleep_policy.asleep_windows)


class WakeResult(enum.StrEnum):
    """How a wake ended: the ``result`` label of wakeproxy_wakes_total."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
