"""A listening socket's backlog, read from the kernel (Linux sock_diag), not guessed.

For a TCP listener, sock_diag's ``idiag_wqueue`` is the accept queue's limit (what
``ss -ltn`` shows as Send-Q) and ``idiag_rqueue`` how many connections wait in it. The
release after a wake is paced to this limit: more connects in flight than the backend's
accept queue takes are SYNs dropped and retried a second later. Seen only in the proxy's
own network namespace (the process runtime, containers on host networking); elsewhere
the answer is None and the pacing keeps its fallback.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import struct
from typing import NamedTuple

from ..config import Address

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes)
_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big-endian, src
# 16 bytes, dst 16 bytes, if, cookie 8 bytes), expires, rqueue, wqueue, uid, inode
_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


class AcceptQueue(NamedTuple):
    """A listener's accept queue: how many connections wait in it, and its limit (the
    listen backlog; Linux lets one more in)."""

    queued: int
    limit: int

    @property
    def room(self) -> int:
        """How many more connections it takes now (0 when full)."""
        return max(0, self.limit - self.queued)


def accept_queue(address: Address) -> AcceptQueue | None:
    """The accept queue of the TCP listener ``address`` reaches, or None when it cannot
    be seen (another network namespace, not Linux, no listener)."""
    try:
        ip = ipaddress.ip_address("127.0.0.1" if address.host == "localhost" else address.host)
    except ValueError:
        return None
    if not _local(ip):
        # Another host's or another namespace's address (a container's on a bridge): a
        # wildcard listener here on that port is not the one it reaches (often our own).
        return None
    families = [socket.AF_INET, socket.AF_INET6] if ip.version == 4 else [socket.AF_INET6]
    for family in families:  # an IPv4 client may reach a dual-stack [::] listener
        for found_ip, port, queued, limit in _listeners(family):
            exact = found_ip == ip and family == _family(ip)
            if port == address.port and (exact or found_ip.is_unspecified):
                return AcceptQueue(queued, limit)
    return None


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


@functools.lru_cache(maxsize=256)
def _local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is an address of this network namespace (one can bind to it)."""
    if ip.is_loopback:
        return True
    try:
        with socket.socket(_family(ip), socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _listeners(
    family: int,
) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int, int]]:
    """(local address, port, connections queued, queue limit) of every TCP listener."""
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
    header = _HEADER.pack(
        _HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    )
    found: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int, int]] = []
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return []
    with contextlib.closing(sock):
        try:
            sock.settimeout(1.0)
            sock.send(header + request)
            while True:
                data = sock.recv(65536)
                offset = 0
                while offset + _HEADER.size <= len(data):
                    length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < _HEADER.size:
                        return found
                    body = offset + _HEADER.size
                    if length - _HEADER.size >= _MESSAGE.size:
                        fields = _MESSAGE.unpack_from(data, body)
                        sport, src, queued, limit = fields[4], fields[6], fields[11], fields[12]
                        raw = src[:4] if family == socket.AF_INET else src
                        port = int.from_bytes(sport, "big")
                        found.append((ipaddress.ip_address(raw), port, queued, limit))
                    offset += (length + 3) & ~3  # messages are 4-byte aligned
        except OSError:
            return found
