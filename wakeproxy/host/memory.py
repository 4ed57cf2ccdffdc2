"""A backend's memory as the kernel counts it, and giving it back while the backend sleeps.

Why the cgroup and not VmRSS: paging a frozen process out with
``process_madvise(MADV_PAGEOUT)`` took a 229 MiB Python backend's VmRSS to 0.3 MiB here,
yet the machine's MemAvailable did not move: the pages went to swap and stayed in RAM
as swap cache until memory pressure. Reclaim at the backend's memory cgroup (v1
``memory.force_empty``, v2 ``memory.reclaim``) frees them for real: cgroup usage
219 -> 0 MiB, MemAvailable +209-218 MiB (measured on this project's machines, kernel
6.18, cgroup v1, a 1 GiB swap file). So usage is read from the cgroup where there is
one; the processes' RSS is the fallback, said as such (``source``).

Everything here is a quick read of procfs/sysfs (no disk), except the cgroup reclaim and
the prefetch after a wake (``advise``), which block for a fraction of a second per backend
and run in a worker thread that a wake interrupts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class MemoryUse:
    resident: int  # bytes in RAM
    swapped: int  # bytes in swap
    source: str  # "cgroup": the backend's memory cgroup; "rss": its processes' RSS


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (0 when absent)."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def swap_total() -> int:
    return meminfo("SwapTotal")


class Cgroup:
    """One memory cgroup: v1 (a directory of the ``memory`` hierarchy) or v2."""

    __slots__ = ("path", "version")

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    def __repr__(self) -> str:
        return f"<Cgroup v{self.version} {self.path}>"

    @property
    def reclaim_file(self) -> Path:
        return self.path / ("memory.force_empty" if self.version == 1 else "memory.reclaim")

    def exists(self) -> bool:
        return self.path.is_dir()

    def writable(self) -> bool:
        return os.access(self.reclaim_file, os.W_OK)

    def usage(self) -> MemoryUse | None:
        if self.version == 1:
            resident = _read_int(self.path / "memory.usage_in_bytes")
            swapped = _stat_field(self.path / "memory.stat", "total_swap") or 0
        else:
            resident = _read_int(self.path / "memory.current")
            swapped = _read_int(self.path / "memory.swap.current") or 0
        if resident is None:
            return None
        return MemoryUse(resident, swapped, "cgroup")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def reclaim_write(self) -> CgroupWrite:
        """The write that reclaims the whole cgroup (it blocks in the kernel while it runs).

        v1: writing 0 to memory.force_empty reclaims everything it can; v2: asking
        memory.reclaim for the current usage does the same.
        """
        amount = b"0"
        if self.version == 2:
            use = self.usage()
            amount = str(max(use.resident if use else 0, 4096)).encode()
        return CgroupWrite(self.reclaim_file, amount)


# Sent to a thread blocked in a reclaim write to end it: the kernel's reclaim loop
# checks for a pending signal between rounds and returns EINTR (v1 force_empty and v2
# memory.reclaim alike). The handler does nothing; it only has to exist.
INTERRUPT = signal.SIGUSR2


def install_interrupt() -> bool:
    """Make INTERRUPT harmless to the process (main thread only); False where it cannot."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(INTERRUPT) in (signal.SIG_DFL, None):
        signal.signal(INTERRUPT, lambda signum, frame: None)
    return True


class CgroupWrite:
    """One blocking reclaim write, run in a worker thread, interruptible from another.

    libc's write through ctypes, not ``os.write``: Python retries a write interrupted by
    a signal (PEP 475), which would start the reclaim over.
    """

    __slots__ = ("_thread", "cancelled", "data", "path")

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.cancelled = False
        self._thread: int | None = None

    def run(self) -> int:
        """In the worker: 0 when done, else the errno (EINTR once interrupted)."""
        self._thread = threading.get_ident()
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if self.cancelled:  # interrupted before it began
                    return errno.EINTR
                written = _libc.write(fd, self.data, ctypes.c_size_t(len(self.data)))
                return 0 if written >= 0 else ctypes.get_errno()
            finally:
                os.close(fd)
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            self._thread = None

    def interrupt(self) -> None:
        """End the write now (or prevent it). Repeat until run() returned: a signal sent
        just before the thread entered write() would be missed."""
        self.cancelled = True
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread, INTERRUPT)


def _stat_field(path: Path, field: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, root, fs type, super options) of every cgroup mount we can see."""
    found = []
    try:
        lines = (PROC / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], fields[3], tail[0], tail[2]))
    return found


def _mount_of(controller: str) -> tuple[Path, str, int] | None:
    """Where a controller is mounted: (mount point, its root, version). v2's freezer is
    part of every cgroup, not a listed controller, but the one that freezes only on a
    host with no v1 hierarchy (on a hybrid one runc freezes through v1)."""
    mounts = _mounts()
    for point, root, fstype, options in mounts:
        if fstype == "cgroup" and controller in options.split(","):
            return Path(point), root, 1
    if controller == "freezer" and any(fstype == "cgroup" for _, _, fstype, _ in mounts):
        return None
    for point, root, fstype, _ in mounts:
        if fstype == "cgroup2":
            controllers = _read_text(Path(point) / "cgroup.controllers").split()
            if controller == "freezer" or controller in controllers:
                return Path(point), root, 2
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _cgroup_dir(pid: int | str, controller: str, owner: str = "") -> tuple[Path, int] | None:
    """The directory of a process's cgroup in a controller's hierarchy, and its
    version, where this process can see that hierarchy (and its path names ``owner``)."""
    mount = _mount_of(controller)
    if mount is None:
        return None
    point, root, version = mount
    wanted = None
    for line in _read_text(PROC / str(pid) / "cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if (version == 1 and controller in parts[1].split(",")) or (
            version == 2 and parts[0] == "0"
        ):
            wanted = parts[2]
    if wanted is None or owner not in wanted:
        return None
    # A mount of a sub-tree (inside a container) shows paths relative to its root.
    relative = wanted[len(root) :] if root != "/" and wanted.startswith(root) else wanted
    path = point / relative.lstrip("/")
    return (path, version) if path.is_dir() else None


def runs_in(pid: int, owner: str) -> bool:
    """Whether process ``pid`` here is in a cgroup whose path names ``owner`` (a
    container's id): a pid from an engine in another pid namespace, or on another host,
    names some other process here, if any."""
    return owner in _read_text(PROC / str(pid) / "cgroup")


def cgroup_of(pid: int | str) -> Cgroup | None:
    """The memory cgroup a process is in, where this process can see its hierarchy."""
    found = _cgroup_dir(pid, "memory")
    return Cgroup(*found) if found is not None else None


_FREEZER_V1 = {"FROZEN": True, "FREEZING": True, "THAWED": False}


def frozen(pid: int | str, owner: str) -> bool | None:
    """Whether the kernel holds a process's cgroup frozen or freezing (what ``docker
    pause`` does), or None where that cannot be read here: no freezer hierarchy
    visible, or the process's cgroup path does not name ``owner`` (a container's id:
    its engine's pid names another process where this one has its own pid namespace).
    The kernel's answer, where the engine's paused flag can lag it (runtimes/docker.py
    says when)."""
    found = _cgroup_dir(pid, "freezer", owner)
    if found is None:
        return None
    path, version = found
    if version == 1:
        return _FREEZER_V1.get(_read_text(path / "freezer.state").strip())
    # cgroup.freeze: what was asked (runc writes it), so freezing counts as in v1.
    value = _read_text(path / "cgroup.freeze").strip()
    return {"1": True, "0": False}.get(value)


def command_cgroups() -> list[Cgroup]:
    """The ``wakeproxy-*`` cgroups under this process's memory cgroup (v1): made for the
    commands of this proxy, of another one running beside it in the same cgroup, or of
    one killed before (SIGKILL skips the clean-up). Whose is whose: the caller's."""
    own = cgroup_of("self")
    if own is None or own.version != 1:
        return []
    try:
        return [Cgroup(entry, 1) for entry in own.path.glob("wakeproxy-*") if entry.is_dir()]
    except OSError:
        return []


def parent_pid(pid: int) -> int | None:
    """A process's parent (its ppid field), or None once it is gone."""
    # After the command name: state, ppid, ...
    fields = _read_text(PROC / str(pid) / "stat").rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def child_cgroup(name: str) -> tuple[Cgroup | None, str]:
    """A memory cgroup of its own for a command, under this process's; (None, why) when
    none can be made. v1 only: under v2 a cgroup that holds processes cannot have
    children with controllers (the no-internal-process rule)."""
    own = cgroup_of("self")
    if own is None:
        return None, "no memory cgroup hierarchy is visible"
    if own.version != 1:
        return None, "cgroup v2: a child cgroup under the proxy's own is not allowed"
    path = own.path / name
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {path}: {exc.strerror or exc}"
    return Cgroup(path, 1), ""


def remove_cgroup(cgroup: Cgroup) -> None:
    """rmdir an empty cgroup (its charges move to the parent)."""
    with contextlib.suppress(OSError):
        cgroup.path.rmdir()


def rss_of(pids: list[int]) -> MemoryUse | None:
    """The processes' RSS and swap (VmRSS hides swap cache: only a fallback)."""
    resident = swapped = 0
    seen = False
    for pid in pids:
        for line in _read_text(PROC / str(pid) / "status").splitlines():
            name, _, value = line.partition(":")
            if name == "VmRSS":
                resident += int(value.split()[0]) * 1024
                seen = True
            elif name == "VmSwap":
                swapped += int(value.split()[0]) * 1024
    return MemoryUse(resident, swapped, "rss") if seen else None


def group_pids(pgid: int) -> list[int]:
    """Every process in a process group (a command and what it spawned)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _read_text(entry / "stat")
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 2 and fields[2] == str(pgid):
                found.append(int(entry.name))
    return found


# ---- prefetch after a wake: process_madvise(MADV_WILLNEED), x86_64 syscall numbers

_SYS_PIDFD_OPEN = 434
_SYS_PROCESS_MADVISE = 440
_MADV_WILLNEED = 3
_IOV_MAX = 512  # ranges per call
_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class AdviceRefused(Exception):
    """The kernel refused process_madvise (no CAP_SYS_NICE or ptrace access, or too old)."""


def _ranges(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in _read_text(PROC / str(pid) / "maps").splitlines():
        span, _, rest = line.partition(" ")
        if "[vsyscall]" in rest or "[vvar" in rest or "[vdso]" in rest:
            continue
        start, _, end = span.partition("-")
        try:
            out.append((int(start, 16), int(end, 16)))
        except ValueError:
            continue
    return out


def advise(pids: list[int], advice: str, cancelled: threading.Event) -> int:
    """process_madvise(MADV_WILLNEED) over every mapping of each process (``advice``:
    "willneed", the one advice used).

    Blocking (0.2 s for a 220 MiB heap here): run it in a thread. Stops between calls
    once ``cancelled`` is set (a wake came). Returns the processes advised; raises
    AdviceRefused when the kernel says no for every one of them.
    """
    if advice != "willneed":
        raise ValueError(f"unknown advice {advice!r}")
    code = _MADV_WILLNEED
    syscall = _libc.syscall
    done = 0
    refusal = ""
    for pid in pids:
        if cancelled.is_set():
            break
        pidfd = syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
        if pidfd < 0:
            refusal = os.strerror(ctypes.get_errno())
            continue
        try:
            ranges = _ranges(pid)
            for first in range(0, len(ranges), _IOV_MAX):
                if cancelled.is_set():
                    break
                chunk = ranges[first : first + _IOV_MAX]
                vec = (_Iovec * len(chunk))(*(_Iovec(start, end - start) for start, end in chunk))
                result = syscall(
                    _SYS_PROCESS_MADVISE,
                    ctypes.c_int(pidfd),
                    vec,
                    ctypes.c_size_t(len(chunk)),
                    ctypes.c_int(code),
                    ctypes.c_uint(0),
                )
                if result < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                        refusal = f"process_madvise: {os.strerror(err)}"
                        break
                    # EINVAL/ENOMEM on a range that went away: the rest still count.
            else:
                done += 1
        finally:
            os.close(pidfd)
    if done == 0 and refusal and not cancelled.is_set():
        raise AdviceRefused(refusal)
    return done
