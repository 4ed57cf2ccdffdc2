"""The forwarding headers a request carries to the backend (``http.forwarded_headers``):
the proxy is their only source. A client's own are dropped (it would choose its own
address, host and scheme), unless the peer is a proxy named in ``trust_forwarded_from``:
then its lines stay and its address is appended to X-Forwarded-For."""

from __future__ import annotations

import functools
import ipaddress

from .heads import Head

# What the proxy writes itself (from a trusted proxy in front: taken over, extended).
_REWRITTEN = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def _forwarding(name: bytes) -> bool:
    """A header that says where a request came from: the proxy's to give."""
    return name.startswith(b"x-forwarded-") or name in (b"forwarded", b"x-real-ip")


@functools.lru_cache(maxsize=64)
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(net) for net in spec)


def trusted(peer: str, spec: tuple[str, ...]) -> bool:
    """Whether ``peer`` is in one of the networks of ``trust_forwarded_from``."""
    if not spec or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in _networks(spec))


def with_forwarded(raw: bytes, head: Head, peer: str, spec: tuple[str, ...]) -> bytes:
    """The head with the proxy's X-Forwarded-* lines (see the module's rules)."""
    trust = trusted(peer, spec)
    lines = raw[:-4].split(b"\r\n")  # CRLF throughout (parse_head)
    kept, given = [lines[0]], dict[bytes, bytes]()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if not _forwarding(name):
            kept.append(line)
        elif not trust:
            continue
        elif name in _REWRITTEN:  # a field given twice is one list (RFC 9110 5.3)
            value = value.strip()
            given[name] = given[name] + b", " + value if name in given else value
        else:
            kept.append(line)  # the proxy in front's own (Forwarded, -Port, -Prefix)
    chain = given.get(b"x-forwarded-for")
    forwarded_for = (chain + b", " if chain else b"") + peer.encode()
    kept.append(b"X-Forwarded-For: " + forwarded_for)
    kept.append(b"X-Forwarded-Proto: " + given.get(b"x-forwarded-proto", b"http"))
    host = given.get(b"x-forwarded-host") or head.get(b"host")
    if host:
        kept.append(b"X-Forwarded-Host: " + host)
    return b"\r\n".join(kept) + b"\r\n\r\n"
