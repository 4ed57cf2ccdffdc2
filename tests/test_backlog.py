"""TCP sockets read from the kernel (sock_diag), against real listeners: a backend's
accept queue, and the connections on a listen address with their last received data."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from wakeproxy.config import Address
from wakeproxy.net.backlog import AcceptQueue, accept_queue
from wakeproxy.net.sockdiag import Connections, connections


def _listener(family: int, host: str, backlog: int) -> socket.socket:
    sock = socket.socket(family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, host != "::")
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def room(address: Address) -> int | None:
    found = accept_queue(address)
    return None if found is None else found.room


def test_the_room_is_the_backlog_less_the_connections_waiting() -> None:
    with contextlib.ExitStack() as stack:
        v4 = stack.enter_context(_listener(socket.AF_INET, "127.0.0.1", 37))
        v6 = stack.enter_context(_listener(socket.AF_INET6, "::1", 11))
        assert accept_queue(Address("127.0.0.1", v4.getsockname()[1])) == AcceptQueue(0, 37)
        assert accept_queue(Address("::1", v6.getsockname()[1])) == AcceptQueue(0, 11)
        small = stack.enter_context(_listener(socket.AF_INET, "127.0.0.1", 2))
        port = small.getsockname()[1]
        for _ in range(3):  # never accepted: they wait in the queue (Linux takes one more)
            client = stack.enter_context(socket.socket())
            client.connect(("127.0.0.1", port))
        assert accept_queue(Address("127.0.0.1", port)) == AcceptQueue(3, 2)
        assert room(Address("127.0.0.1", port)) == 0, "full"


def test_wildcard_listeners_count_only_for_addresses_of_this_namespace() -> None:
    with contextlib.ExitStack() as stack:
        wildcard = stack.enter_context(_listener(socket.AF_INET, "0.0.0.0", 7))
        port = wildcard.getsockname()[1]
        assert room(Address("127.0.0.1", port)) == 7
        # A container's address on a bridge reaches its own listener, not this one.
        assert accept_queue(Address("172.31.255.254", port)) is None
        dual = stack.enter_context(_listener(socket.AF_INET6, "::", 5))
        assert room(Address("127.0.0.1", dual.getsockname()[1])) == 5, "dual-stack"
        assert accept_queue(Address("127.0.0.1", 1)) is None, "nothing listens"


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_connections_on_a_listen_address_and_when_they_last_received() -> None:
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(_listener(socket.AF_INET, "127.0.0.1", 16))
        port = listener.getsockname()[1]
        other = stack.enter_context(_listener(socket.AF_INET, "127.0.0.1", 16))
        stack.enter_context(socket.create_connection(other.getsockname()))  # another port
        assert connections("127.0.0.1", port, set()) == Connections(0, None)
        first = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        accepted = stack.enter_context(listener.accept()[0])
        waiting = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        # The accepted one and the one waiting in the accept queue (the clients' own
        # sockets are on their ephemeral ports).
        assert connections("127.0.0.1", port, set()).attached == 2
        assert connections("127.0.0.1", port, {_inode(accepted)}).attached == 1, "excluded"
        assert connections("127.0.0.2", port, set()).attached == 0, "another address"
        time.sleep(0.3)
        first.sendall(b"x")
        assert accepted.recv(1) == b"x"
        found = connections("127.0.0.1", port, set())
        assert found.idle_ms is not None and found.idle_ms < 250, found
        alone = connections("127.0.0.1", port, {_inode(accepted)})
        assert alone.idle_ms is not None and alone.idle_ms >= 250, "the waiting one is quiet"
        first.close()  # the client left; the server still holds its side (CLOSE_WAIT)
        assert connections("127.0.0.1", port, set()).attached == 2
        accepted.close()
        assert connections("127.0.0.1", port, set()).attached == 1
        waiting.close()
        server_side = listener.accept()[0]
        server_side.close()  # closed by its owner: no longer attached
        assert connections("127.0.0.1", port, set()).attached == 0
