"""What the core needs to know of a service's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from .states import SleepAction


@dataclass(frozen=True, slots=True)
class Policy:
    # False for priority high or a disabled policy: the idle timer never puts it to sleep.
    sleeps: bool = True
    # Seconds from the last activity to the idle deadline: max(idle_timeout, min_sleep_time).
    idle_delay: float = 300.0
    action: SleepAction = SleepAction.PAUSE
    # Paused this long -> stopped (None: never).
    stop_after: float | None = None
    # Paused this long -> its memory given back (None: never; 0 with action hibernate).
    hibernate_after: float | None = None
    max_held: int = 1024
    wake_timeout: float = 30.0
