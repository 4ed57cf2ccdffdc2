"""Rules across services, on addresses and names only: dependencies that exist and close
no cycle, listen addresses that take the same port, a backend that is the proxy's own
listener. Used by the schema for a file, by label discovery for what it adds, and by
``run`` for the admin address."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Protocol

from .model import Address


class _Dependent(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def depends_on(self) -> tuple[str, ...]: ...


def dependency_faults(services: Mapping[str, _Dependent]) -> list[tuple[str, str]]:
    """(service, why) for each dependency that does not exist or closes a cycle."""
    faults: list[tuple[str, str]] = []
    for service in services.values():
        for name in service.depends_on:
            if name not in services:
                known = ", ".join(sorted(services))
                faults.append((service.name, f"no service named {name!r}; services: {known}"))
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done" or name not in services:
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            faults.append((path[-1], f"a dependency cycle: {cycle}"))
            return
        state[name] = "visiting"
        for dependency in services[name].depends_on:
            visit(dependency, [*path, name])
        state[name] = "done"

    for name in services:
        visit(name, [])
    return faults


@functools.cache
def _bound(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a listener on ``host`` binds: localhost is what the resolver says
    (the hosts file: 127.0.0.1, and ::1 where it lists it), as it is for the listener."""
    if host == "localhost":
        try:
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            found = []
        addresses = {ipaddress.ip_address(str(info[4][0])) for info in found}
        return sorted(addresses, key=str) or [ipaddress.ip_address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return []


def overlaps(a: Address, b: Address) -> bool:
    """Whether two listen addresses take the same port: the same address, or one is
    the wildcard of the other's family (Linux refuses 127.0.0.1:P beside 0.0.0.0:P even
    with SO_REUSEADDR; asyncio binds IPv6 sockets v6-only, so :: takes only IPv6)."""
    if a.port != b.port:
        return False
    for x in _bound(a.host):
        for y in _bound(b.host):
            if x == y or (x.version == y.version and (x.is_unspecified or y.is_unspecified)):
                return True
    return False


def reaches(backend: Address, listen: Address) -> bool:
    """Whether connecting to ``backend`` would reach the proxy's own ``listen``: the
    same address, or a loopback one on a wildcard listener (loopback is this network
    namespace's own; another host's address on a wildcard listener is not)."""
    if backend.port != listen.port:
        return False
    for x in _bound(backend.host):
        for y in _bound(listen.host):
            local = x.is_loopback or x.is_unspecified
            if x == y or (y.is_unspecified and x.version == y.version and local):
                return True
    return False


class _Listening(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def listen(self) -> Address | None: ...

    @property
    def backend(self) -> Address | None: ...


def listener_faults(
    services: Iterable[_Listening], admin_listen: Address
) -> list[tuple[str, str, str]]:
    """(service, key, why) for a listen address another listener (the admin API's, an
    earlier service's) already takes, and for a backend that is the service's own listen
    address."""
    faults: list[tuple[str, str, str]] = []
    taken: list[tuple[Address, str]] = [(admin_listen, "admin.listen")]
    for service in services:
        if service.listen is None:
            continue
        for address, owner in taken:
            if overlaps(service.listen, address):
                same = "" if address == service.listen else f" ({address}: the same port)"
                faults.append(
                    (service.name, "listen", f"{service.listen} is already used by {owner}{same}")
                )
                break
        taken.append((service.listen, f"services.{service.name}.listen"))
        if service.backend is not None and reaches(service.backend, service.listen):
            faults.append(
                (
                    service.name,
                    "backend",
                    f"the backend {service.backend} is the proxy's own listen address "
                    f"({service.listen}): it would connect to itself",
                )
            )
    return faults
