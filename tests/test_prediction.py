"""Prediction with real processes: keep-awake windows, chains, the state file, the API.

The schedules read the proxy's wall clock; a test that needs a window's edge within
seconds moves that clock (``running(wall_clock=...)``) to just before a whole minute,
since windows are written to the minute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from datetime import UTC, datetime

import orjson
import pytest

from tests.helpers import (
    admin_put,
    backend_command,
    config_from,
    config_text,
    free_port,
    http_get,
    proxy_log,
    running,
    service,
    wait_until,
)
from wakeproxy.core.predict import Predictor, PredictSettings
from wakeproxy.core.states import SleepAction, SleepReason, State
from wakeproxy.serve import predictions

pytestmark = pytest.mark.asyncio


def shifted_clock(lead: float) -> tuple[float, object]:
    """A wall clock that reads ``lead`` seconds before the next whole minute now, and
    that minute (epoch seconds)."""
    real = time.time()
    edge = (real // 60 + 2) * 60  # at least a minute ahead: the window before it is whole
    offset = edge - lead - real
    return edge, lambda: time.time() + offset


def hhmm(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M")


def command_service(name: str, policy: dict[str, object], **more: object) -> dict[str, object]:
    port, backend = free_port(), free_port()
    return service(
        name, port, backend, command=backend_command(backend, "http"),
        readiness={"http": "/"}, wake_timeout=15, sleep_policy=policy, **more,
    )  # fmt: skip


async def test_a_window_keeps_a_process_awake_to_its_end_and_one_starting_wakes_another(tmp_path):
    edge, clock = shifted_clock(lead=8.0)
    before, after = hhmm(edge - 60), hhmm(edge + 60)
    config = config_from(
        config_text(
            command_service(
                "kept", {"idle_timeout": 0.5, "action": "stop",
                         "keep_awake": [f"{before}-{hhmm(edge)} UTC"]},
            ),
            command_service(
                "starts", {"idle_timeout": 0.5, "action": "stop",
                           "keep_awake": [f"{hhmm(edge)}-{after} UTC"]},
            ),
            command_service(
                "night", {"idle_timeout": 600, "action": "stop",
                          "asleep_windows": [f"{hhmm(edge)}-{after} UTC"]},
            ),
            prediction={"state_file": str(tmp_path / "prediction.json")},
        )
    )  # fmt: skip
    async with running(config, wall_clock=clock) as proxy:
        kept, starts = proxy.services["kept"], proxy.services["starts"]
        night = proxy.services["night"]
        # Inside its window from the start: woken with no connection, held past its
        # idle timeout (0.5 s) until the window ends 8 s later.
        await wait_until(lambda: kept.state is State.RUNNING, within=10)
        assert starts.state is State.STOPPED
        assert (await http_get(night.cfg.listen.port, within=15)).endswith(b"backend\n")
        await asyncio.sleep(max(0.0, edge - clock() - 1.5))
        assert kept.state is State.RUNNING and kept.attached == 0
        assert starts.state is State.STOPPED
        # The edge: one window ends (slept on its idle clock), the next begins (woken).
        await wait_until(lambda: kept.state is State.STOPPED, within=10)
        assert clock() >= edge - 0.05
        await wait_until(lambda: starts.state is State.RUNNING, within=10)
        assert clock() >= edge - 0.05
        assert kept.stats.sleeps[(SleepAction.STOP, SleepReason.IDLE)] == 1
        # Its asleep window began: slept at once, though its idle timeout is 10 minutes.
        await wait_until(lambda: night.state is State.STOPPED, within=10)
        assert night.stats.sleeps[(SleepAction.STOP, SleepReason.SCHEDULE)] == 1
        # A request inside it still wakes it; then its idle clock decides, not the window.
        assert (await http_get(night.cfg.listen.port, within=15)).endswith(b"backend\n")
        # Inside its window a request finds it awake: the predicted wake was used.
        assert (await http_get(starts.cfg.listen.port)).endswith(b"hello from the backend\n")
        table = proxy.predictions.table("starts")
        assert table["accounting"]["kinds"]["schedule"]["used"] == 1
        assert starts.stats.found_asleep == 0
        kept_books = proxy.predictions.table("kept")["accounting"]["kinds"]["schedule"]
        assert (kept_books["predicted"], kept_books["wasted"]) == (1, 1)
        assert kept_books["awake_seconds"] >= 2.0
        await asyncio.sleep(1.0)
        assert starts.state is State.RUNNING  # held to its window's end, a minute on
        assert night.state is State.RUNNING


async def test_a_follower_is_woken_when_its_leader_starts_an_episode_in_its_window(tmp_path):
    policy = {"idle_timeout": 0.3, "action": "pause"}
    config = config_from(
        config_text(
            # git's own chain_window plays no part (counted in it, git's requests here,
            # never 600 s apart, would make one episode ever).
            command_service("git", {**policy, "predict": {"chain_window": 600.0}}),
            # files follows git when its request comes within 5 s of git's, and an
            # episode of git in files' window is a request after 5 s of quiet from git.
            command_service(
                "files",
                {**policy, "predict": {"chains": True, "chain_window": 5.0, "min_samples": 2}},
            ),
            prediction={"state_file": str(tmp_path / "prediction.json")},
        )
    )
    # The wall clock prediction reads: git's quiet between rounds is a jump of it, not a
    # wait, and a follower's real delay (milliseconds) stays far inside its 5 s.
    offset = [0.0]

    def quiet() -> None:
        offset[0] += 6.0  # past files' window

    async with running(config, wall_clock=lambda: time.time() + offset[0]) as proxy:
        git, files = proxy.services["git"], proxy.services["files"]
        # Started once and paused: from here on a wake is an unpause (milliseconds).
        # git's first episode, not followed (files' start comes after the quiet).
        for warm in (git, files):
            await http_get(warm.cfg.listen.port, within=15)
            await wait_until(lambda w=warm: w.state is State.PAUSED, within=10)
            quiet()
        for _ in range(2):  # two more, followed: 2 of 3, p 0.67, n 3 >= min_samples 2
            await http_get(git.cfg.listen.port, within=15)
            await http_get(files.cfg.listen.port, within=15)
            quiet()
        await wait_until(lambda: files.state is State.PAUSED, within=10)
        table = proxy.predictions.table("files")
        assert table["accounting"]["predicted"] == 0
        [leader] = table["leaders"]
        assert (leader["service"], leader["window"], leader["p"]) == ("git", 5.0, 0.667)
        [episodes] = proxy.predictions.table("git")["episodes"]
        assert episodes["window"] == 5.0 and round(episodes["n"]) == 3
        found_before = files.stats.found_asleep
        await http_get(git.cfg.listen.port, within=15)
        # files is woken with no request of its own.
        await wait_until(lambda: files.state is State.RUNNING, within=10)
        books = proxy.predictions.table("files")["accounting"]["kinds"]["chain"]
        assert books["predicted"] == 1
        await http_get(files.cfg.listen.port, within=15)
        assert files.stats.found_asleep == found_before  # it was awake
        books = proxy.predictions.table("files")["accounting"]["kinds"]["chain"]
        assert books["used"] == 1
        metrics = (await http_get(proxy.config.admin.listen.port, "/metrics")).decode()
        assert 'wakeproxy_predicted_wakes_used_total{kind="chain",service="files"} 1.0' in metrics


async def test_a_fault_in_prediction_is_logged_and_never_reaches_the_connection_or_wake(
    monkeypatch,
):
    # README: a fault in prediction is logged and never reaches the connection or the
    # wake that called it. The predictor's hooks for a request and for a wake raise.
    config = config_from(
        config_text(
            command_service("web", {"idle_timeout": 600, "predict": {"arrivals": True}}),
            prediction={"state_file": None},
        )
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        assert proxy.predictions is not None and proxy.predictions.active

        def fault(*args: object) -> None:
            raise RuntimeError("injected prediction fault")

        core = type(proxy.predictions.core)
        monkeypatch.setattr(core, "arrived", fault)
        monkeypatch.setattr(core, "woke", fault)
        with proxy_log() as messages:
            reply = await http_get(web.cfg.listen.port, within=30)  # stopped: a start
            assert reply.endswith(b"backend\n")
            assert (await http_get(web.cfg.listen.port, within=30)).endswith(b"backend\n")
        assert web.stats.wakes["ok"] == 1 and web.stats.wakes["failed"] == 0
        assert web.state is State.RUNNING
        assert web.stats.connections["forwarded"] == 2
        failed = [m for m in messages if "prediction failed" in m]
        assert "web: prediction failed while reading a request; carrying on" in failed
        assert "web: prediction failed while reading a wake; carrying on" in failed


async def test_the_tables_are_saved_every_save_interval_when_they_changed(tmp_path):
    # README: saved to prediction.state_file every save_interval (5 minutes by default)
    # when they changed, not only at shutdown; unchanged tables are not written again.
    state = tmp_path / "prediction.json"
    config = config_from(
        config_text(
            command_service("web", {"idle_timeout": 600, "predict": {"arrivals": True}}),
            prediction={"state_file": str(state), "save_interval": 0.2},
        )
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        predictions = proxy.predictions
        assert predictions is not None
        await http_get(web.cfg.listen.port, within=30)
        # Written while the proxy runs (a file is replaced whole: a new inode per save).
        await wait_until(state.exists, within=30)
        saved = orjson.loads(state.read_bytes())
        assert saved["services"] == ["web"] and len(saved["arrivals"]["web"]) == 1
        # Nothing changes now: once the proxy has nothing unsaved, five intervals pass
        # with no write (the margin is the configured interval; the condition is its own).
        await wait_until(lambda: not predictions._dirty and predictions._writing.done(), within=30)
        written = state.stat().st_ino
        await asyncio.sleep(1.0)
        assert state.stat().st_ino == written, "unchanged tables written again"
        # A request changes them: saved again at the next interval.
        await http_get(web.cfg.listen.port, within=30)
        await wait_until(lambda: state.stat().st_ino != written, within=30)


async def test_learned_tables_survive_a_restart_and_a_corrupt_file_starts_empty(tmp_path, caplog):
    state = tmp_path / "state" / "prediction.json"
    config = config_from(
        config_text(
            command_service("web", {"idle_timeout": 0.3, "predict": {"arrivals": True}}),
            prediction={"state_file": str(state), "timezone": "Europe/Berlin"},
        )
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        await http_get(web.cfg.listen.port, within=15)
        await wait_until(lambda: web.stats.wakes["ok"] == 1, within=10)
    saved = orjson.loads(state.read_bytes())
    assert saved["version"] == 2 and saved["zone"] == "Europe/Berlin"
    assert len(saved["arrivals"]["web"]) == 1  # this slot of the week
    assert len(saved["wake_times"]["web"]) == 1

    async with running(config) as proxy:
        admin = proxy.config.admin.listen.port
        raw = await http_get(admin, "/services/web/prediction")
        table = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
        assert [s["p"] for s in table["slots"]] == [pytest.approx(0.3)]
        assert table["wake"]["samples"] == 1
        missing = await http_get(admin, "/services/nope/prediction")
        assert b" 404 " in missing.split(b"\r\n", 1)[0]

    state.write_bytes(b'{"version": 1, "zone": "Europe/Berlin", "arrivals": [')
    caplog.set_level(logging.INFO, logger="wakeproxy.prediction")
    caplog.clear()
    async with running(config) as proxy:
        web = proxy.services["web"]
        assert proxy.predictions.table("web")["slots"] == []
        await http_get(web.cfg.listen.port, within=15)  # serves as ever
    lines = [r for r in caplog.records if r.name == "wakeproxy.prediction"]
    assert [r.levelname for r in lines] == ["WARNING"], [r.getMessage() for r in lines]
    assert "not used" in lines[0].getMessage() and str(state) in lines[0].getMessage()
    assert orjson.loads(state.read_bytes())["version"] == 2  # rewritten whole


def learned_state(name: str) -> bytes:
    """A state file's bytes: ``name`` requested once in this slot of the week (UTC)."""
    predictor = Predictor("UTC")
    predictor.configure(name, PredictSettings(arrivals=True))
    predictor.arrived(name, time.time())
    return orjson.dumps(predictor.to_state())


class FifoWatch:
    """Whether anyone opened a FIFO for reading: a writer's non-blocking open succeeds
    only then (ENXIO otherwise). It then closes at once, so the reader gets EOF and a
    proxy that waited on it goes on (the unfixed one hung for ever there)."""

    def __init__(self, path) -> None:
        self.path, self.opened, self.done = path, False, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 120
        while not self.done.wait(0.01) and time.monotonic() < deadline:
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                continue
            self.opened = True

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "oversized"])
async def test_a_state_file_that_is_no_regular_file_or_too_big_is_refused_unread(
    tmp_path, caplog, monkeypatch, kind
):
    # The state file was read whole on the event loop: a FIFO hung the proxy's start for
    # ever, a symlink to /dev/zero read until memory ran out, a 100 MB file took 3.7 s
    # and 1.26 GB. Now: a regular file of at most 16 MiB, read in a thread.
    state = tmp_path / "prediction.json"
    watch = None
    if kind == "fifo":
        os.mkfifo(state)
        watch = FifoWatch(state)
    elif kind == "symlink":  # saves rename over the link: it is never what they write
        (tmp_path / "elsewhere.json").write_bytes(learned_state("web"))
        state.symlink_to(tmp_path / "elsewhere.json")
    else:  # sparse: no disk used
        state.touch()
        os.truncate(state, predictions.MAX_STATE_BYTES + 1)
    readers: list[int] = []
    real_read = predictions.read_state

    def read_state(path):
        readers.append(threading.get_ident())
        return real_read(path)

    monkeypatch.setattr(predictions, "read_state", read_state)
    config = config_from(
        config_text(
            command_service("web", {"idle_timeout": 60, "predict": {"arrivals": True}}),
            prediction={"state_file": str(state)},
        )
    )
    caplog.set_level(logging.INFO, logger="wakeproxy.prediction")
    try:
        async with running(config) as proxy:
            assert proxy.predictions.table("web")["slots"] == []  # starts empty
            web = proxy.services["web"]
            assert (await http_get(web.cfg.listen.port, within=15)).endswith(b"backend\n")
            if watch is not None:
                # Before the shutdown's save renames a regular file over the FIFO: the
                # watch's open would succeed on that one.
                watch.stop()
    finally:
        if watch is not None:
            watch.stop()
    lines = [r for r in caplog.records if r.name == "wakeproxy.prediction"]
    assert [r.levelname for r in lines] == ["WARNING"], [r.getMessage() for r in lines]
    why = {
        "fifo": "a FIFO, not a regular file",
        "symlink": "a symbolic link, not a regular file",
        "oversized": f"{predictions.MAX_STATE_BYTES + 1} bytes (at most",
    }[kind]
    assert str(state) in lines[0].getMessage() and why in lines[0].getMessage()
    assert readers and threading.get_ident() not in readers  # read in a thread
    if watch is not None:
        assert not watch.opened, "the FIFO was opened for reading"
    assert orjson.loads(state.read_bytes())["version"] == 2  # rewritten whole at shutdown


async def test_the_state_is_read_in_the_background_when_prediction_is_first_used_live(tmp_path):
    # No service predicts at the start: the file is read once an API edit turns it on.
    state = tmp_path / "prediction.json"
    state.write_bytes(learned_state("web"))
    config = config_from(
        config_text(
            command_service("web", {"idle_timeout": 60}),
            prediction={"state_file": str(state)},
        )
    )
    async with running(config) as proxy:
        assert proxy.predictions.table("web")["slots"] == []
        body = b'{"sleep_policy": {"predict": {"arrivals": true}}}'
        status, _ = await admin_put(proxy, "/services/web/config", body)
        assert status == 200
        await wait_until(lambda: proxy.predictions.table("web")["slots"] != [], within=10)
        [slot] = proxy.predictions.table("web")["slots"]
        assert slot["p"] == pytest.approx(0.3)


async def test_a_policys_windows_change_live_through_the_api(tmp_path):
    now = time.time() // 60 * 60
    later = f"{hhmm(now + 3 * 3600)}-{hhmm(now + 4 * 3600)} UTC"
    config = config_from(
        config_text(
            command_service("web", {"use": "office"}),
            policies={"office": {"idle_timeout": 0.5, "action": "stop", "keep_awake": [later]}},
            prediction={"state_file": str(tmp_path / "prediction.json")},
        )
    )
    async with running(config) as proxy:
        web = proxy.services["web"]
        await asyncio.sleep(0.3)
        assert web.state is State.STOPPED
        status, body = await admin_put(
            proxy, "/policies/office", b'{"keep_awake": ["mon-fry 8:00"]}'
        )
        assert status == 400 and "unknown day 'fry'" in body["problems"][0]
        now_on = f"{hhmm(now)}-{hhmm(now + 120)} UTC"  # holds the whole test
        payload = orjson.dumps({"keep_awake": [now_on]})
        status, body = await admin_put(proxy, "/policies/office", payload)
        assert status == 200 and body["policies"]["office"]["keep_awake"] == [now_on]
        # The new window holds now: woken with no request, and kept past its idle timeout.
        await wait_until(lambda: web.state is State.RUNNING, within=10)
        assert proxy.predictions.table("web")["keep_awake"] == [now_on]
        await asyncio.sleep(1.0)
        assert web.state is State.RUNNING
        # The window removed: the hold goes with it, and the idle timeout (0.5 s) applies.
        status, body = await admin_put(proxy, "/policies/office", b'{"keep_awake": []}')
        assert status == 200
        await wait_until(lambda: web.state is State.STOPPED, within=10)
