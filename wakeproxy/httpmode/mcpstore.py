"""What every service's MCP server answered to set-up, kept across restarts in one small
state file: read once when a listener first needs it, saved a moment after a change (a
burst of handshakes: one write), both in a thread, never on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson

from ..host.statefile import read_bounded, write_atomically
from .mcp import Learned

if TYPE_CHECKING:
    from ..config.model import McpConfig

log = logging.getLogger("wakeproxy.mcp")

STATE_VERSION = 1
# A near-full state (4,096 services, a few versions each) is well under this.
MAX_STATE = 16 * 1024 * 1024
MAX_SERVICES = 4096
# Changes are saved this long after the first one.
SAVE_DELAY = 2.0


class McpStore:
    """Every service's learned set-up answers (``Learned``, one per service name)."""

    def __init__(self, cfg: McpConfig) -> None:
        self.cfg = cfg
        self.learned: dict[str, Learned] = {}
        self._loading: asyncio.Task[None] | None = None
        self._save: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._error: str | None = None

    def of(self, name: str) -> Learned:
        """The service's table (the same object for the life of the store: a load
        fills it in place)."""
        self._load_once()
        learned = self.learned.get(name)
        if learned is None:
            learned = self.learned[name] = Learned()
        return learned

    def _load_once(self) -> None:
        if self._loading is None and self.cfg.state_file is not None:
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def loaded(self) -> None:
        """Wait for the state file to be read (at start: before any listener opens)."""
        self._load_once()
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def _load(self) -> None:
        path = self.cfg.state_file
        assert path is not None
        try:
            data = await asyncio.to_thread(read_bounded, path, MAX_STATE)
            found = _from_state(orjson.loads(data))
        except FileNotFoundError:
            log.info("mcp: no state at %s yet; learning from the servers' answers", path)
            return
        except (OSError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
            log.warning("mcp: state %s not used (%s); learning anew", path, exc)
            return
        for name, entry in found.items():
            mine = self.learned.setdefault(name, entry)
            if mine is not entry and not mine.known:
                # Made before the read ended (a listener was quicker): filled in place.
                for attribute in ("endpoint", "initialize", "discover", "open", "auth"):
                    setattr(mine, attribute, getattr(entry, attribute))
        log.info("mcp: state %s read (%d service(s))", path, len(found))

    def changed(self) -> None:
        if self.cfg.state_file is None or self._save is not None:
            return
        self._save = asyncio.get_running_loop().call_later(SAVE_DELAY, self._start_save)

    def _start_save(self) -> None:
        self._save = None
        if self._writing is not None:  # one write at a time; this change comes next
            self.changed()
            return
        self._writing = asyncio.get_running_loop().create_task(self._write())
        self._writing.add_done_callback(lambda _: setattr(self, "_writing", None))

    async def _write(self) -> None:
        path = self.cfg.state_file
        assert path is not None
        if self._loading is not None:
            # Never over a file not read yet: what it held would be lost.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._loading)
        data = orjson.dumps(_to_state(self.learned))
        try:
            await asyncio.to_thread(write_atomically, path, data)
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._error:
                log.warning("mcp: cannot write %s (%s); kept in memory", path, why)
            self._error = why
        else:
            self._error = None

    async def close(self) -> None:
        """At shutdown: a pending change is written now."""
        pending = self._save is not None
        if self._save is not None:
            self._save.cancel()
            self._save = None
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        if pending:
            await self._write()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()


def _to_state(learned: dict[str, Learned]) -> dict[str, Any]:
    known = {name: entry for name, entry in learned.items() if entry.known}
    names = sorted(known)[:MAX_SERVICES]
    return {"version": STATE_VERSION, "services": {n: known[n].to_state() for n in names}}


def _from_state(data: object) -> dict[str, Learned]:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} state")
    services = data.get("services")
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise ValueError(f"services: expected a mapping of at most {MAX_SERVICES}")
    return {
        str(name): Learned.from_state(entry, f"services.{name}") for name, entry in services.items()
    }
