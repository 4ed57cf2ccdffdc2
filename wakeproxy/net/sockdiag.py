"""TCP sockets as the kernel lists them (Linux sock_diag, ``inet_diag``), read in one dump.

Two readers use it: a listener's accept queue (``net.backlog``: the release after a wake
is paced to it) and the connections the kernel's fast path hands to a backend without
the proxy (``connections``: how many, and when each last received data, from
``tcp_info``). A filter compiled for the kernel (``INET_DIAG_REQ_BYTECODE``) keeps the
dump to one port, so the read costs the same however many sockets the machine has.
Only this network namespace is seen.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big-endian, src
# 16 bytes, dst 16 bytes, if, cookie 8 bytes), expires, rqueue, wqueue, uid, inode
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_ATTR = struct.Struct("=HH")  # rtattr: len, type
_INET_DIAG_INFO = 2  # the attribute holding struct tcp_info
_REQ_BYTECODE = 1
_BC_S_EQ = 11  # INET_DIAG_BC_S_EQ: the local port equals the next op's ``no``
# struct tcp_info: tcpi_last_data_recv (ms), tcpi_bytes_received
_LAST_DATA_RECV, _BYTES_RECEIVED = 52, 128

# TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_RECV, CLOSE_WAIT, LISTEN, NEW_SYN_RECV = 1, 3, 8, 10, 12


class Socket(NamedTuple):
    """One socket of a dump. ``inode`` 0: nobody holds it (waiting in an accept queue,
    a handshake under way, or closed by its owner). The last two are None where the
    kernel keeps no ``tcp_info`` (a handshake under way)."""

    family: int
    state: int
    local: IP
    port: int
    queued: int  # a listener: connections in its accept queue
    limit: int  # a listener: its accept queue's limit
    inode: int
    idle_ms: int | None  # ms since it last received data
    received: int | None  # bytes received


def dump(family: int, states: int, *, port: int | None = None, info: bool = False) -> list[Socket]:
    """The TCP sockets of ``family`` in ``states`` (a bit per state), only those on
    local ``port`` if given; empty when the kernel cannot be asked."""
    request = _REQUEST.pack(
        family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1) if info else 0, 0, states
    )
    if port is not None:
        # yes: on to the end (accept); no: past the end (reject).
        code = struct.pack("=BBH", _BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)
        request += _ATTR.pack(_ATTR.size + len(code), _REQ_BYTECODE) + code
    header = _HEADER.pack(
        _HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return []
    found: list[Socket] = []
    with contextlib.closing(sock):
        try:
            sock.settimeout(1.0)
            sock.send(header + request)
            while True:
                for message in _messages(sock.recv(65536)):
                    if message is None:
                        return found
                    found.append(_parse(family, message))
        except OSError:
            return found


def _messages(data: bytes) -> Iterator[memoryview | None]:
    """Each message's body in one read; None at the end of the dump."""
    view = memoryview(data)
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
        if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < _HEADER.size:
            yield None
            return
        if length - _HEADER.size >= _MESSAGE.size:
            yield view[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3  # messages are 4-byte aligned


def _parse(family: int, body: memoryview) -> Socket:
    fields = _MESSAGE.unpack_from(body, 0)
    state, sport, src, queued, limit, inode = (
        fields[1],
        fields[4],
        fields[6],
        fields[11],
        fields[12],
        fields[14],
    )
    idle_ms = received = None
    offset = _MESSAGE.size
    while offset + _ATTR.size <= len(body):
        length, kind = _ATTR.unpack_from(body, offset)
        if length < _ATTR.size:
            break
        if kind == _INET_DIAG_INFO and length - _ATTR.size >= _BYTES_RECEIVED + 8:
            start = offset + _ATTR.size
            idle_ms = struct.unpack_from("=I", body, start + _LAST_DATA_RECV)[0]
            received = struct.unpack_from("=Q", body, start + _BYTES_RECEIVED)[0]
        offset += (length + 3) & ~3
    raw = bytes(src[:4]) if family == socket.AF_INET else bytes(src)
    local = ipaddress.ip_address(raw)
    port = int.from_bytes(sport, "big")
    return Socket(family, state, local, port, queued, limit, inode, idle_ms, received)


class Connections(NamedTuple):
    """Connections on a listen address: how many, and the least time since one of them
    last received data (None when none has ``tcp_info``)."""

    attached: int
    idle_ms: int | None


# Attached: it carries a client (waiting to be accepted, open, or the client's side
# closed while the server's is not). A socket its owner closed (FIN_WAIT, LAST_ACK,
# TIME_WAIT) no longer is.
_ATTACHED = (1 << ESTABLISHED) | (1 << SYN_RECV) | (1 << NEW_SYN_RECV) | (1 << CLOSE_WAIT)


def connections(host: str, port: int, exclude: set[int]) -> Connections:
    """The connections to ``host:port`` (a wildcard: any local address) except the
    sockets whose inodes are in ``exclude`` (the proxy's own)."""
    ip = ipaddress.ip_address(host or "0.0.0.0")
    families = [socket.AF_INET] if ip.version == 4 else [socket.AF_INET6]
    if ip.version == 6 and ip.is_unspecified:
        families.append(socket.AF_INET)  # a dual-stack listener takes IPv4 too
    count = 0
    idle: int | None = None
    for family in families:
        for found in dump(family, _ATTACHED, port=port, info=True):
            if found.inode and found.inode in exclude:
                continue
            if not ip.is_unspecified and found.local != ip:
                continue
            count += 1
            if found.idle_ms is not None:
                idle = found.idle_ms if idle is None else min(idle, found.idle_ms)
    return Connections(count, idle)
