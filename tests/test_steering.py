"""The kernel's fast path at the host layer (host/bpf.py, host/steering.py), on the real
kernel: the sk_lookup program hands SYNs to a socket taken from another process, the
kernel forgets a socket its owner closed, and no link outlives the process that made it.
Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_PTRACE): skipped without, failed in CI."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import PYTHON, backend_command, free_port, in_ci, port_answers
from wakeproxy.host import bpf
from wakeproxy.host.listeners import listener_fd
from wakeproxy.host.steering import Steering, route_keys, take_socket


def _kernel_steers() -> str | None:
    """Why the fast path cannot run here, or None."""
    try:
        Steering().close()
    except (bpf.BpfError, OSError) as exc:
        return str(exc)
    return None


WHY_NOT = _kernel_steers()
if WHY_NOT is not None and not in_ci():
    pytest.skip(f"the kernel's fast path cannot load here: {WHY_NOT}", allow_module_level=True)


def _wait(condition, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def backend() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """tests/backends/server.py in peer mode: it says whom it sees, then echoes."""
    port = free_port()
    proc = subprocess.Popen(backend_command(port, "peer"))
    try:
        _wait(lambda: port_answers(port))
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def front() -> Iterator[socket.socket]:
    """The proxy's listener stand-in: whatever reaches it was not steered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen(64)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _take(proc: subprocess.Popen[bytes], port: int) -> int:
    found = listener_fd([proc.pid], port)
    assert found is not None, "the backend's listener was not found in its fd table"
    return take_socket(*found)


def _talk(port: int) -> tuple[str, tuple[str, int]]:
    """Connect, read the backend's first line if one comes; (line, our own address)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(0.5)
        mine = conn.getsockname()
        try:
            line = conn.recv(100).decode()
        except TimeoutError:
            line = ""
        return line, mine


def _accepted(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def test_route_keys_cover_the_wildcards() -> None:
    (v4,) = route_keys("127.0.0.1", 8021)
    assert struct.unpack("=II", v4[:8]) == (socket.AF_INET, 8021)
    assert v4[8:12] == bytes([127, 0, 0, 1]) and v4[12:] == bytes(12)
    (anywhere,) = route_keys("0.0.0.0", 8021)
    assert anywhere[8:] == bytes(16)
    dual = route_keys("::", 8021)  # a dual-stack listener takes IPv4 SYNs too
    assert [struct.unpack("=I", key[:4])[0] for key in dual] == [socket.AF_INET6, socket.AF_INET]


def test_a_syn_goes_to_the_socket_taken_from_another_process(backend, front) -> None:
    proc, port = backend
    listen = front.getsockname()[1]
    steering = Steering()
    try:
        steering.route(7, "127.0.0.1", listen)
        # A route without a socket in its slot: the proxy's own listener answers.
        line, _ = _talk(listen)
        assert line == "" and _accepted(front) == 1
        fd = _take(proc, port)
        steering.steer(7, fd)
        os.close(fd)  # the map keeps the socket, not this copy
        assert steering.steering(7)
        for _ in range(3):
            line, (host, client_port) = _talk(listen)
            # The backend accepted it and sees the client's own address.
            assert line == f"peer {host}:{client_port}\n"
        assert _accepted(front) == 0
        assert steering.steered(7) == 3
        assert steering.unsteer(7) is True
        assert steering.unsteer(7) is False
        line, _ = _talk(listen)
        assert line == "" and _accepted(front) == 1
        assert steering.steered(7) == 3
    finally:
        steering.close()


def test_a_port_without_a_route_is_left_alone(backend, front) -> None:
    proc, port = backend
    listen = front.getsockname()[1]
    steering = Steering()
    try:
        steering.route(1, "127.0.0.1", free_port())  # another port
        fd = _take(proc, port)
        steering.steer(1, fd)
        os.close(fd)
        line, _ = _talk(listen)
        assert line == "" and _accepted(front) == 1
        assert steering.steered(1) == 0
    finally:
        steering.close()


def test_a_wildcard_route_takes_every_address_of_the_port(backend) -> None:
    proc, port = backend
    with socket.socket() as wildcard:
        wildcard.bind(("0.0.0.0", free_port()))
        wildcard.listen(8)
        listen = wildcard.getsockname()[1]
        steering = Steering()
        try:
            steering.route(2, "0.0.0.0", listen)
            fd = _take(proc, port)
            steering.steer(2, fd)
            os.close(fd)
            with socket.create_connection(("127.0.0.2", listen), timeout=5) as conn:
                conn.settimeout(5)
                assert conn.recv(100).startswith(b"peer 127.0.0.1:")
            assert steering.steered(2) == 1
        finally:
            steering.close()


def test_the_kernel_drops_a_socket_its_owner_closed(backend, front) -> None:
    proc, port = backend
    listen = front.getsockname()[1]
    steering = Steering()
    try:
        steering.route(0, "127.0.0.1", listen)
        fd = _take(proc, port)
        steering.steer(0, fd)
        os.close(fd)
        proc.kill()
        proc.wait()
        _wait(lambda: not steering.steering(0))
        # The SYN falls through to the proxy's listener: nothing hangs on a dead socket.
        line, _ = _talk(listen)
        assert line == "" and _accepted(front) == 1
    finally:
        steering.close()


def _our_links(link_id: int) -> list[bpf.LinkInfo]:
    return [link for link in bpf.links() if link.id == link_id]


def test_closing_detaches_the_program_from_the_namespace() -> None:
    steering = Steering()
    (link,) = _our_links(steering.link_id)
    assert link.kind == bpf.LINK_NETNS and link.attach == bpf.ATTACH_SK_LOOKUP
    assert link.netns_ino == os.stat("/proc/self/ns/net").st_ino
    steering.close()
    assert _our_links(steering.link_id) == []


def test_a_killed_owner_leaves_no_link_attached() -> None:
    code = (
        "import sys, time\n"
        "from wakeproxy.host.steering import Steering\n"
        "s = Steering()\n"
        "print(s.link_id, flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            link_id = int(child.stdout.readline())
            assert len(_our_links(link_id)) == 1
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            _wait(lambda: _our_links(link_id) == [])
        finally:
            child.kill()


def test_a_refused_program_says_why_with_the_verifier_log() -> None:
    program = bpf.Asm()
    program.exit()  # R0 never set: the verifier refuses to return it
    with pytest.raises(bpf.BpfError) as caught:
        bpf.prog_load(bpf.PROG_SK_LOOKUP, bpf.ATTACH_SK_LOOKUP, program.code(), "wp_broken")
    assert caught.value.errno == errno.EACCES
    assert "R0" in caught.value.log
    assert "verifier log" in str(caught.value)


def test_a_load_a_signal_interrupted_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The verifier answers EAGAIN when a signal arrives while it works (seen under load:
    # a child's SIGCHLD); only that errno is tried again, and not forever.
    real, answers = bpf._call, [errno.EAGAIN, errno.EAGAIN]

    def flaky(cmd: int, attr: Any, what: str, log: str = "") -> int:
        if cmd == bpf.PROG_LOAD and answers:
            raise bpf.BpfError(what, answers.pop(), log)
        return real(cmd, attr, what, log)

    monkeypatch.setattr(bpf, "_call", flaky)
    Steering().close()
    assert answers == []
    answers[:] = [errno.EAGAIN] * bpf._LOAD_ATTEMPTS
    with pytest.raises(bpf.BpfError) as caught:
        Steering()
    assert caught.value.errno == errno.EAGAIN and answers == []


def test_without_the_capabilities_loading_fails_with_eperm() -> None:
    drop = "-bpf,-net_admin,-sys_admin,-perfmon"
    code = (
        "from wakeproxy.host.steering import Steering\n"
        "from wakeproxy.host.bpf import BpfError\n"
        "try:\n    Steering()\nexcept BpfError as exc:\n    print(exc.errno, exc)\n"
        "else:\n    print('loaded')\n"
    )
    out = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--", PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.split()[0] == str(errno.EPERM), out


def test_taking_a_socket_needs_the_process_to_exist() -> None:
    with pytest.raises(OSError):
        take_socket(2**22 + 12345, 3)  # above pid_max's default: no such process


def test_listener_fd_finds_only_the_given_processes_listener(backend) -> None:
    proc, port = backend
    found = listener_fd([proc.pid], port)
    assert found is not None and found[0] == proc.pid
    assert listener_fd([os.getpid()], port) is None
    assert listener_fd([proc.pid], free_port()) is None
    assert sys.platform == "linux"
