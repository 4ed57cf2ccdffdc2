"""The kernel's fast path: new connections handed straight to an awake backend's listener.

A BPF ``sk_lookup`` program (Linux 5.9+) runs in this network namespace whenever the
kernel looks for a listening socket (a new connection's SYN; a segment that matches no
connection), and may pick any socket held in a SOCKMAP. While a backend runs, its own
listening socket sits in the map under its service's slot, and SYNs for the service's
listen address go to it: the proxy does not accept, connect or copy anything, and the
backend sees the client's own address. With the slot empty (the proxy took it out before
a sleep, or the backend's socket closed and the kernel dropped it) SYNs fall through to
the proxy's own listener, which holds and wakes as it always does.

One program and one link serve every service of the proxy (a namespace takes at most 64
sk_lookup programs): a hash map routes (family, port, address) to a slot, a wildcard
listen address under the zero address; the SOCKMAP holds each slot's socket; an array
counts the hand-overs per slot (one per connection, and one per stray segment of a
connection whose socket is gone, which the backend's listener answers with a reset). The
link is owned by this process and not pinned: it goes when the proxy exits or is killed,
so no restart finds stale steering.

The backend's socket is taken from its process with ``pidfd_getfd`` (root, or
CAP_SYS_PTRACE over it), put in the map, and the proxy's copy closed at once: the map
alone does not keep the socket open, so when the backend closes it (it exits, it
restarts) the kernel takes it out of the map and steering stops by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct

from . import bpf
from .bpf import R0, R1, R2, R3, R4, R6, R7, R8, R10, Asm, BpfError

_SYS_PIDFD_GETFD = 438  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)

# Slots: services with the fast path in one proxy (the maps' size is fixed at creation).
SLOTS = 1024

# struct bpf_sk_lookup, the program's context
_FAMILY, _PROTOCOL, _LOCAL_IP4, _LOCAL_IP6, _LOCAL_PORT = 8, 12, 40, 44, 60
# A route's key on the program's stack: family, port, 16 bytes of address
_KEY = struct.Struct("=II16s")
_KEY_AT = -24
_SLOT_AT = -28


def route_keys(host: str, port: int) -> list[bytes]:
    """The route keys for a listen address. A wildcard is the zero address; ``::``
    (dual-stack) takes IPv4 SYNs too."""
    ip = ipaddress.ip_address(host or "0.0.0.0")
    if ip.version == 4:
        return [_KEY.pack(socket.AF_INET, port, ip.packed)]
    keys = [_KEY.pack(socket.AF_INET6, port, ip.packed)]
    if ip.is_unspecified:
        keys.append(_KEY.pack(socket.AF_INET, port, bytes(16)))
    return keys


def _program(routes: int, sockets: int, counts: int) -> bytes:
    """The sk_lookup program: route, pick the slot's socket, count a hand-over."""
    a = Asm()
    a.mov(R6, R1)  # the context, kept across calls
    a.load32(R2, R6, _PROTOCOL)
    a.jump_if_not32(R2, socket.IPPROTO_TCP, "pass")
    # The key: family, port, the local address (IPv4 in the first word, zeros after).
    a.load32(R2, R6, _FAMILY)
    a.store32(R10, _KEY_AT, R2)
    a.load32(R3, R6, _LOCAL_PORT)
    a.store32(R10, _KEY_AT + 4, R3)
    a.jump_if_not32(R2, socket.AF_INET, "ipv6")
    a.load32(R4, R6, _LOCAL_IP4)
    a.store32(R10, _KEY_AT + 8, R4)
    for word in (1, 2, 3):
        a.store32_imm(R10, _KEY_AT + 8 + 4 * word, 0)
    a.jump("lookup")
    a.label("ipv6")
    for word in range(4):
        a.load32(R4, R6, _LOCAL_IP6 + 4 * word)
        a.store32(R10, _KEY_AT + 8 + 4 * word, R4)
    a.label("lookup")
    a.map_fd(R1, routes)
    a.mov(R2, R10)
    a.add_imm(R2, _KEY_AT)
    a.call(bpf.FN_MAP_LOOKUP_ELEM)
    a.jump_if_nonzero(R0, "found")
    # No route for this address: one for the wildcard on the same port?
    for word in range(4):
        a.store32_imm(R10, _KEY_AT + 8 + 4 * word, 0)
    a.map_fd(R1, routes)
    a.mov(R2, R10)
    a.add_imm(R2, _KEY_AT)
    a.call(bpf.FN_MAP_LOOKUP_ELEM)
    a.jump_if_zero(R0, "pass")
    a.label("found")
    a.load32(R2, R0, 0)
    a.store32(R10, _SLOT_AT, R2)
    a.map_fd(R1, sockets)
    a.mov(R2, R10)
    a.add_imm(R2, _SLOT_AT)
    a.call(bpf.FN_MAP_LOOKUP_ELEM)
    a.jump_if_zero(R0, "pass")  # steering is off for this slot: the proxy's listener
    a.mov(R7, R0)
    a.mov(R1, R6)
    a.mov(R2, R7)
    a.mov_imm(R3, 0)
    a.call(bpf.FN_SK_ASSIGN)
    a.mov(R8, R0)
    a.mov(R1, R7)
    a.call(bpf.FN_SK_RELEASE)  # the lookup took a reference
    a.jump_if_nonzero(R8, "pass")  # refused (a family the socket does not take)
    a.map_fd(R1, counts)
    a.mov(R2, R10)
    a.add_imm(R2, _SLOT_AT)
    a.call(bpf.FN_MAP_LOOKUP_ELEM)
    a.jump_if_zero(R0, "pass")
    a.mov_imm(R1, 1)
    a.atomic_add64(R0, 0, R1)
    a.label("pass")
    a.mov_imm(R0, bpf.SK_PASS)
    a.exit()
    return a.code()


class Steering:
    """The proxy's one sk_lookup program, attached to its network namespace.

    ``Steering()`` loads and attaches it, or raises BpfError saying why it cannot
    (no CAP_BPF/CAP_NET_ADMIN, a kernel without sk_lookup, a verifier refusal).
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        try:
            self.routes = self._keep(bpf.map_create(bpf.MAP_HASH, _KEY.size, 4, SLOTS, "wp_routes"))
            self.sockets = self._keep(bpf.map_create(bpf.MAP_SOCKMAP, 4, 8, SLOTS, "wp_sockets"))
            self.counts = self._keep(bpf.map_create(bpf.MAP_ARRAY, 4, 8, SLOTS, "wp_steered"))
            code = _program(self.routes, self.sockets, self.counts)
            prog = self._keep(
                bpf.prog_load(bpf.PROG_SK_LOOKUP, bpf.ATTACH_SK_LOOKUP, code, "wp_steer")
            )
            netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                what = "attaching the program to the network namespace"
                self.link = self._keep(bpf.link_create(prog, netns, bpf.ATTACH_SK_LOOKUP, what))
            finally:
                os.close(netns)
        except BaseException:
            self.close()
            raise
        self.link_id = bpf.link_info(self.link).id

    def _keep(self, fd: int) -> int:
        os.set_inheritable(fd, False)  # a started command must not keep the link alive
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Detach and free everything (the kernel does the same at exit)."""
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    # ---- one slot per service

    def route(self, slot: int, host: str, port: int) -> None:
        """SYNs for ``host:port`` go to ``slot``'s socket when it has one."""
        value = struct.pack("=I", slot)
        for key in route_keys(host, port):
            bpf.map_update(self.routes, key, value, f"routing {host}:{port}")

    def unroute(self, host: str, port: int) -> None:
        for key in route_keys(host, port):
            bpf.map_delete(self.routes, key)

    def steer(self, slot: int, fd: int) -> None:
        """Hand the slot's SYNs to the listening socket ``fd`` (the caller closes its fd)."""
        key, value = struct.pack("=I", slot), struct.pack("=Q", fd)
        bpf.map_update(self.sockets, key, value, "putting the backend's socket in the map")

    def unsteer(self, slot: int) -> bool:
        """SYNs for the slot come to the proxy's listener again; False if none was steered."""
        empty = (errno.ENOENT, errno.EINVAL)  # a SOCKMAP's empty slot is EINVAL
        return bpf.map_delete(self.sockets, struct.pack("=I", slot), missing=empty)

    def steering(self, slot: int) -> bool:
        """Whether the slot holds a socket (the kernel drops one its owner closed)."""
        return bpf.map_lookup(self.sockets, struct.pack("=I", slot), 8) is not None

    def steered(self, slot: int) -> int:
        """Connections handed to the slot's sockets since the program was loaded."""
        value = bpf.map_lookup(self.counts, struct.pack("=I", slot), 8)
        return struct.unpack("=Q", value)[0] if value is not None else 0

    def reset_count(self, slot: int) -> None:
        """A slot taken by another service starts from zero."""
        bpf.map_update(self.counts, struct.pack("=I", slot), bytes(8), "resetting a counter")


def take_socket(pid: int, fd: int) -> int:
    """A copy of another process's descriptor (pidfd_getfd: root or CAP_SYS_PTRACE)."""
    pidfd = os.pidfd_open(pid)
    try:
        result = _libc.syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), 0)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"pidfd_getfd of fd {fd} of pid {pid}: {os.strerror(code)}")
        return int(result)
    finally:
        os.close(pidfd)


__all__ = ["SLOTS", "BpfError", "Steering", "route_keys", "take_socket"]
