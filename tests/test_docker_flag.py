"""The rules for a Docker paused flag that lags the kernel's freezer, on scripted
answers: set_paused's retries and the confirmation of unpause engine events. The
real engine's side (the race itself) is in tests/test_docker.py; these pin the decisions
that the race only reaches now and then. Also the freezer lookup on v1, v2 and hybrid
mount tables (a fake /proc and /sys tree)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiodocker
import pytest
import pytest_asyncio

from wakeproxy.core.states import State
from wakeproxy.errors import OperationFailed
from wakeproxy.host import memory
from wakeproxy.runtimes import docker
from wakeproxy.runtimes.docker import DockerRuntime, set_paused
from wakeproxy.runtimes.engine import DockerEngine

pytestmark = pytest.mark.asyncio
CID = "c0ffee" * 10


class ScriptedContainer:
    """A container whose pause/unpause answers and inspect states are scripted: each
    call takes the next (None: success; text: a DockerError with that message)."""

    def __init__(self, answers: list[str | None], statuses: list[str]) -> None:
        self.answers = answers
        self.statuses = statuses
        self.calls: list[str] = []

    async def _answer(self, op: str) -> None:
        self.calls.append(op)
        text = self.answers.pop(0)
        if text is not None:
            raise aiodocker.DockerError(409 if "already" in text else 500, text)

    async def pause(self) -> None:
        await self._answer("pause")

    async def unpause(self) -> None:
        await self._answer("unpause")

    async def show(self) -> dict[str, Any]:
        self.calls.append("show")
        return {"Id": CID, "State": {"Status": self.statuses.pop(0), "Pid": 4242}}


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> list[bool | None]:
    """The freezer's answers, one per read (for the pid the scripted inspect gives)."""
    answers: list[bool | None] = []

    def read(pid: int | str, owner: str) -> bool | None:
        assert (pid, owner) == (4242, CID)
        return answers.pop(0)

    monkeypatch.setattr(docker, "frozen", read)
    monkeypatch.setattr(docker, "_FLAG_LAG_DELAYS", (0.0, 0.0, 0.0))
    return answers


async def run(container: ScriptedContainer, freeze: bool, *, local: bool = True) -> None:
    await set_paused(container, freeze, "container web", local=local)  # type: ignore[arg-type]


NOT_PAUSED = f"Container {CID} is not paused"
ALREADY = f"Container {CID} is already paused"


async def test_an_unpause_refused_while_the_cgroup_is_frozen_is_made_again(kernel):
    container = ScriptedContainer([NOT_PAUSED, None], ["running"])
    kernel.append(True)
    await run(container, False)
    assert container.calls == ["unpause", "show", "unpause"]


async def test_a_refusal_with_the_kernel_already_as_wanted_is_success_not_a_retry(kernel):
    # The flag flipped the other way since the refusal: a retry would reach containerd
    # and be refused there. The kernel is as wanted: done.
    container = ScriptedContainer([NOT_PAUSED], ["paused"])
    kernel.append(False)
    await run(container, False)
    assert container.calls == ["unpause", "show"]
    container = ScriptedContainer([ALREADY], ["running"])
    kernel.append(True)
    await run(container, True)
    assert container.calls == ["pause", "show"]


async def test_containerds_refusal_is_checked_like_dockerds(kernel):
    container = ScriptedContainer(["cannot resume a running process"], ["paused"])
    kernel.append(False)
    await run(container, False)
    assert container.calls == ["unpause", "show"]


async def test_a_pause_refused_already_paused_while_it_runs_is_made_again(kernel):
    container = ScriptedContainer([ALREADY, ALREADY, None], ["paused", "paused"])
    kernel.extend([False, False])
    await run(container, True)
    assert container.calls == ["pause", "show", "pause", "show", "pause"]


async def test_without_a_readable_freezer_the_engines_flag_is_taken(kernel):
    container = ScriptedContainer([NOT_PAUSED], ["running"])
    kernel.append(None)
    await run(container, False)
    assert container.calls == ["unpause", "show"]
    # Remote engine: the freezer is never read (its pids are another host's).
    container = ScriptedContainer([NOT_PAUSED], ["running"])
    await run(container, False, local=False)
    assert container.calls == ["unpause", "show"]
    assert kernel == []


async def test_a_flag_that_never_settles_fails_naming_both_sides(kernel):
    container = ScriptedContainer([NOT_PAUSED] * 4, ["running"] * 4)
    kernel.extend([True] * 4)
    with pytest.raises(OperationFailed) as raised:
        await run(container, False)
    assert container.calls.count("unpause") == 4
    assert "did not settle" in str(raised.value)
    assert "it says running, the kernel frozen" in str(raised.value)


async def test_other_refusals_stand_without_a_retry(kernel):
    container = ScriptedContainer([f"Container {CID} is restarting, wait"], [])
    with pytest.raises(OperationFailed, match="is restarting"):
        await run(container, True)
    assert container.calls == ["pause"]
    # A flag refusal, but the container exited meanwhile: the refusal stands.
    container = ScriptedContainer([NOT_PAUSED], ["exited"])
    kernel.append(None)
    with pytest.raises(OperationFailed, match="is not paused"):
        await run(container, False)


# ---- engine events confirmed against the kernel


@pytest_asyncio.fixture
async def runtime(monkeypatch: pytest.MonkeyPatch):
    """A docker runtime whose engine is never asked: its inspect is scripted."""
    engine = DockerEngine()
    container = ScriptedContainer([], [])
    rt = DockerRuntime(engine, "web")
    monkeypatch.setattr(rt, "_container", lambda: container)
    seen: list[tuple[State, str]] = []
    rt.on_change = lambda state, reason: seen.append((state, reason))
    yield rt, container, seen
    await rt.close()
    await engine.close()


async def settle(rt: DockerRuntime) -> None:
    await asyncio.gather(*rt._confirming)


async def test_an_unpause_event_for_a_frozen_cgroup_is_ignored(runtime, kernel):
    rt, container, seen = runtime
    container.statuses.append("running")
    kernel.append(True)
    rt.engine_event("unpause", State.RUNNING, "docker unpause seen")
    await settle(rt)
    assert seen == []
    container.statuses.append("running")
    kernel.append(False)
    rt.engine_event("unpause", State.RUNNING, "docker unpause seen")
    await settle(rt)
    assert seen == [(State.RUNNING, "docker unpause seen")]


async def test_a_pause_event_is_believed_at_once_in_its_place_among_the_others(runtime, kernel):
    # A replay after start-up (create, start, pause of a container paused before the
    # proxy started) must end paused before anything else runs, whatever the kernel.
    rt, container, seen = runtime
    rt.engine_event("start", State.RUNNING, "docker start seen")
    rt.engine_event("pause", State.PAUSED, "docker pause seen")
    assert seen == [(State.RUNNING, "docker start seen"), (State.PAUSED, "docker pause seen")]
    assert not rt._confirming and container.calls == []


async def test_a_newer_event_wins_over_a_confirmation_still_reading(runtime, kernel):
    rt, container, seen = runtime
    container.statuses.append("running")
    kernel.append(False)
    rt.engine_event("unpause", State.RUNNING, "docker unpause seen")
    rt.engine_event("die", State.STOPPED, "docker die seen")  # before the inspect answers
    await settle(rt)
    assert seen == [(State.STOPPED, "docker die seen")]


async def test_our_own_operation_supersedes_a_pending_confirmation(runtime, kernel):
    # Unreadable freezer: the event would be taken as the engine said, but our pause came
    # after it; reporting "running" then would leave a paused service believed running.
    rt, container, seen = runtime
    container.statuses.append("running")
    kernel.append(None)
    rt.engine_event("unpause", State.RUNNING, "docker unpause seen")
    container.answers.append(None)
    await rt.pause()
    await settle(rt)
    assert seen == []
    assert container.calls == ["pause", "show"]


async def test_a_state_read_takes_the_kernels_word_over_a_lagging_flag(runtime, kernel):
    rt, container, _ = runtime
    container.statuses.extend(["running", "paused", "exited", "running"])
    kernel.extend([True, False, None, None])
    assert await rt.inspect() is State.PAUSED
    assert await rt.inspect() is State.RUNNING
    assert await rt.inspect() is State.STOPPED
    assert await rt.inspect() is State.RUNNING


async def test_our_own_operations_echo_is_not_confirmed(runtime, kernel):
    rt, container, seen = runtime
    container.answers.append(None)
    await rt.unpause()
    rt.engine_event("unpause", State.RUNNING, "docker unpause seen")
    assert not rt._confirming and seen == []
    assert container.calls == ["unpause"]


async def test_an_engine_pid_that_is_not_the_containers_here_is_never_used(runtime, monkeypatch):
    # Another pid namespace (or host): that number is some other process here, which
    # hibernate would otherwise page out.
    rt, container, _ = runtime
    monkeypatch.setattr(docker, "runs_in", lambda pid, owner: False)
    container.statuses.extend(["running"] * 3)  # pids() reads twice
    assert await rt.pids() == []
    assert await rt.memory_cgroup() is None


# ---- the freezer lookup


def fake_host(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "4242").mkdir()
    (proc / "4242" / "cgroup").write_text(cgroup)
    return proc


async def test_the_freezer_on_v1_v2_and_a_hybrid_host(tmp_path, monkeypatch):
    sysfs = tmp_path / "sys"
    v1 = sysfs / "freezer" / "docker" / CID
    v1.mkdir(parents=True)
    (v1 / "freezer.state").write_text("FREEZING\n")
    v2 = sysfs / "unified" / "system.slice" / f"docker-{CID}.scope"
    v2.mkdir(parents=True)
    (v2 / "cgroup.freeze").write_text("0\n")
    (sysfs / "unified" / "cgroup.controllers").write_text("cpu io memory pids\n")
    freezer_v1 = f"30 25 0:26 / {sysfs}/freezer rw - cgroup cgroup rw,freezer\n"
    unified = f"31 25 0:27 / {sysfs}/unified rw - cgroup2 cgroup2 rw\n"
    cgroups = f"7:freezer:/docker/{CID}\n0::/system.slice/docker-{CID}.scope\n"

    monkeypatch.setattr(memory, "PROC", fake_host(tmp_path / "a", freezer_v1 + unified, cgroups))
    assert memory.frozen(4242, CID) is True  # v1 wins on a hybrid host; freezing counts
    assert memory.frozen(4242, "another-container") is None  # not its cgroup

    monkeypatch.setattr(memory, "PROC", fake_host(tmp_path / "b", unified, cgroups))
    assert memory.frozen(4242, CID) is False  # pure v2: cgroup.freeze
    (v2 / "cgroup.freeze").write_text("1\n")
    assert memory.frozen(4242, CID) is True

    # Hybrid, but the v1 freezer is not visible: v2's file is not the one runc writes.
    cpu_v1 = f"29 25 0:25 / {sysfs}/cpu rw - cgroup cgroup rw,cpu\n"
    monkeypatch.setattr(memory, "PROC", fake_host(tmp_path / "c", cpu_v1 + unified, cgroups))
    assert memory.frozen(4242, CID) is None
