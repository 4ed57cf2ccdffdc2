"""Giving a paused backend's memory back, and reading its memory for the metrics.

The core decides when (``Reclaim`` once paused for ``hibernate_after``, ``CancelReclaim``
the moment a wake comes); this carries it out, off the event loop:

A worker thread (nice 19) writes the backend's memory cgroup's ``memory.force_empty``
(v1) / ``memory.reclaim`` (v2) and blocks in the kernel for 0.2-0.9 s; a wake interrupts
it with a signal to that thread (the kernel's reclaim loop returns EINTR). Only the
cgroup frees memory at once: paging the processes out with ``process_madvise`` left the
pages in RAM as swap cache (see host/memory.py), so that is not offered.

Without swap only file pages can go (said once at start-up). Without a writable cgroup
the backend stays plainly paused: the reason is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import ServiceConfig
from ..core.events import Event, Reclaimed, ReclaimFailed
from ..runtimes.base import Runtime
from ..serve.stats import ServiceStats
from .memory import (
    AdviceRefused,
    Cgroup,
    MemoryUse,
    advise,
    install_interrupt,
    rss_of,
    swap_total,
)

log = logging.getLogger("wakeproxy.hibernate")
MIB = 1024 * 1024
PREFETCH_DELAY = 0.25


class Unavailable(Exception):
    """No way to give this backend's memory back; ``kind`` is the counted reason."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


_WORKERS: ThreadPoolExecutor | None = None


def _lowest_priority() -> None:
    # The kernel's reclaim runs in the writer's context: at nice 19 (Linux sets it per
    # thread) it yields the CPU to the proxy's loop and the backends.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _workers() -> ThreadPoolExecutor:
    """The reclaim and prefetch threads. Threads, not helper processes: spawning one per
    reclaim blocked the loop ~3 ms each (uvloop forks the proxy), 150 ms for 50 at once."""
    global _WORKERS
    if _WORKERS is None:
        install_interrupt()
        _WORKERS = ThreadPoolExecutor(
            # One per core here; 1 and 4 gave keep-alive p99 no better under 50 at once.
            max_workers=2,
            thread_name_prefix="wakeproxy-reclaim",
            initializer=_lowest_priority,
        )
    return _WORKERS


class Hibernator:
    """One service's reclaims, prefetches and memory readings."""

    def __init__(
        self,
        name: str,
        runtime: Runtime,
        stats: ServiceStats,
        *,
        cfg: Callable[[], ServiceConfig],
        present: Callable[[], bool],
        report: Callable[[Event], object],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None],
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.stats = stats
        self._cfg = cfg
        self._present = present
        self._report = report
        self._spawn = spawn
        self._task: asyncio.Task[None] | None = None
        self._cgroup: Cgroup | None = None
        self._pids: list[int] = []
        self._locating = False
        # The backend's memory was given back and it has not woken since.
        self.hibernated = False
        self.method: str | None = None
        self.last_problem = ""
        self.note = ""

    # ---- start-up

    def check_setup(self) -> None:
        """Say once what will limit hibernation on this machine."""
        if self._cfg().sleep_policy.hibernates_after is None:
            return
        if swap_total() == 0:
            self.note = (
                "no swap on this host: only file pages can be given back (add a swap "
                "file or zram for the heap to go too)"
            )
            log.warning("%s: hibernate: %s", self.name, self.note, extra={"service": self.name})

    # ---- reclaim

    def reclaim(self) -> None:
        self._task = self._spawn(self._reclaim())

    async def settled(self) -> None:
        """Return once no reclaim runs (its end is not cancelled with the caller)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    def cancel(self) -> None:
        """A wake came: stop now, report nothing."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _reclaim(self) -> None:
        event: Event
        try:
            freed, method = await self._run(self._cfg().sleep_policy.reclaim)
        except Unavailable as exc:
            self.stats.hibernate_fallbacks[exc.kind] += 1
            self.last_problem = str(exc)
            log.warning(
                "%s: cannot hibernate, staying paused: %s",
                self.name,
                exc,
                extra={"service": self.name, "reason": exc.kind},
            )
            event = ReclaimFailed(str(exc))
        except Exception as exc:
            log.error("%s: unexpected error during hibernate", self.name, exc_info=exc)
            self.stats.hibernate_fallbacks["internal_error"] += 1
            event = ReclaimFailed(f"internal error during hibernate: {exc!r}")
        else:
            self.hibernated = True
            self.method = method
            self.last_problem = ""
            self.stats.hibernations[method] += 1
            self.stats.reclaimed_bytes += freed
            use = self.memory()
            log.info(
                "%s: hibernated (%s): %.1f MiB given back; now %s",
                self.name,
                method,
                freed / MIB,
                _describe(use),
                extra={"service": self.name, "reclaimed_bytes": freed, "method": method},
            )
            event = Reclaimed(freed)
        self._task = None
        self._report(event)

    async def _run(self, method: str) -> tuple[int, str]:
        # "auto" and "cgroup" are one method: the cgroup is the only way that frees memory.
        cgroup = await self._locate()
        if cgroup is None:
            why = self.runtime.cgroup_problem or "none found"
            raise Unavailable("no_cgroup", f"no memory cgroup for the backend ({why})")
        if not cgroup.writable():
            raise Unavailable("no_cgroup", f"{cgroup.reclaim_file} is not writable")
        return await self._reclaim_cgroup(cgroup), "cgroup"

    async def _reclaim_cgroup(self, cgroup: Cgroup) -> int:
        before = cgroup.usage()
        write = cgroup.reclaim_write()
        done = asyncio.get_running_loop().run_in_executor(_workers(), write.run)
        try:
            code = await asyncio.shield(done)
        except asyncio.CancelledError:
            # The wake wins: interrupt the kernel's reclaim loop now (and again until
            # the worker is out of it), so a running backend is not paged out.
            while not done.done():
                write.interrupt()
                await asyncio.wait({done}, timeout=0.005)
            raise
        after = cgroup.usage()
        freed = max(0, before.resident - after.resident) if before and after else 0
        # v2's memory.reclaim says EAGAIN when it freed less than asked: still progress.
        if code != 0 and freed == 0:
            raise Unavailable("cgroup_write_failed", f"{cgroup.reclaim_file}: {os.strerror(code)}")
        return freed

    # ---- after a wake

    def woke(self) -> None:
        """The backend runs again: its pages come back on demand, or prefetched."""
        was, self.hibernated = self.hibernated, False
        if was and self._cfg().sleep_policy.prefetch:
            self._spawn(self._prefetch())
        elif self._cgroup is None:
            self._spawn(self._locate_quietly())

    async def _prefetch(self) -> None:
        # After the held connections' first answers: read back in the same instant, the
        # prefetch's swap-ins delayed the first response (bench row 8; the run is in
        # bench/PROFILES.md).
        await asyncio.sleep(PREFETCH_DELAY)
        pids = await self.runtime.pids()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(_workers(), advise, pids, "willneed", threading.Event())
        except AdviceRefused as exc:
            log.info("%s: prefetch refused: %s", self.name, exc, extra={"service": self.name})

    # ---- memory, as the kernel counts it

    async def _locate(self) -> Cgroup | None:
        if self._cgroup is None or not self._cgroup.exists():
            self._cgroup = await self.runtime.memory_cgroup()
        if self._cgroup is None:
            self._pids = await self.runtime.pids()
        return self._cgroup

    async def _locate_quietly(self) -> None:
        try:
            await self._locate()
        except Exception as exc:  # a reading for the metrics: never an operation's fault
            log.debug("%s: cannot locate the backend's memory: %s", self.name, exc)
        finally:
            self._locating = False

    def _read(self, pids: list[int]) -> MemoryUse | None:
        cgroup = self._cgroup
        if cgroup is not None and cgroup.exists():
            return cgroup.usage()
        return rss_of(pids)

    def forget(self) -> None:
        """The backend stopped: its cgroup (process runtime) and pids are gone or reused."""
        self._cgroup = None
        self._pids = []
        self.hibernated = False

    def memory(self) -> MemoryUse | None:
        """What the backend holds now (a sysfs/procfs read: cheap enough for a scrape).

        Where it is not known yet (a container found running at start-up: no inspect
        per container then), the first read looks it up in the background, if the
        backend is there at all (running or paused)."""
        use = self._read(self._pids)
        if use is None and self._present() and not self._locating:
            self._locating = True
            self._spawn(self._locate_quietly())
        return use

    def describe(self) -> dict[str, Any]:
        use = self.memory()
        out: dict[str, Any] = {
            "resident_bytes": use.resident if use else None,
            "swapped_bytes": use.swapped if use else None,
            "measured_by": use.source if use else None,
            "hibernated": self.hibernated,
            "reclaimed_bytes_total": self.stats.reclaimed_bytes,
        }
        if self.method:
            out["hibernate_method"] = self.method
        if self.last_problem:
            out["hibernate_problem"] = self.last_problem
        if self.note:
            out["hibernate_note"] = self.note
        return out


def _describe(use: MemoryUse | None) -> str:
    if use is None:
        return "memory unknown"
    return (
        f"{use.resident / MIB:.1f} MiB in RAM, {use.swapped / MIB:.1f} MiB in swap "
        f"(by {use.source})"
    )
