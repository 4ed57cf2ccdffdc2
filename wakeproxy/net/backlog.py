"""A listening socket's backlog, read from the kernel (Linux sock_diag), not guessed.

For a TCP listener, sock_diag's ``idiag_wqueue`` is the accept queue's limit (what
``ss -ltn`` shows as Send-Q) and ``idiag_rqueue`` how many connections wait in it. The
release after a wake is paced to this limit: more connects in flight than the backend's
accept queue takes are SYNs dropped and retried a second later. Seen only in the proxy's
own network namespace (the process runtime, containers on host networking); elsewhere
the answer is None and the pacing keeps its fallback.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import NamedTuple

from ..config import Address
from .sockdiag import LISTEN, dump


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
        for found in dump(family, 1 << LISTEN, port=address.port):
            exact = found.local == ip and family == _family(ip)
            if exact or found.local.is_unspecified:
                return AcceptQueue(found.queued, found.limit)
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
