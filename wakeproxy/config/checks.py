"""The validators: each takes a raw value and returns the typed one or raises ``Bad``
with what was expected; ``Problems`` collects the faults with where they are.

They work on plain Python values plus an optional map of key path -> line, so the same
code and the same texts check a YAML file (file:line: key.path), a JSON body of the
admin API (key.path) and container labels (container and label).
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..core.predict import PredictSettings
from ..core.schedule import Window, load_zone, parse_window
from .model import Address, KeyPath, ListenRange

_E = TypeVar("_E", bound=enum.Enum)
Check = Callable[[Any], Any]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


class Bad(ValueError):
    """A value that fails its check; the message says what was expected."""


class Problems:
    """Collects faults with their location; raised together as one ConfigError."""

    def __init__(
        self,
        source: str | None,
        lines: Mapping[KeyPath, int],
        where: Callable[[KeyPath], str | None] | None = None,
    ) -> None:
        self.source = source
        self.lines = lines
        # Names a location other than a key path (a container label), when it can.
        self.where = where
        self.items: list[str] = []

    def add(self, path: KeyPath, message: str) -> None:
        named = self.where(path) if self.where is not None else None
        if named is not None:
            self.items.append(f"{named}: {message}")
            return
        dotted = ".".join(str(p) for p in path) or "(top level)"
        line = self._line_of(path)
        if self.source is not None and line is not None:
            self.items.append(f"{self.source}:{line}: {dotted}: {message}")
        elif self.source is not None:
            self.items.append(f"{self.source}: {dotted}: {message}")
        else:
            self.items.append(f"{dotted}: {message}")

    def _line_of(self, path: KeyPath) -> int | None:
        # An error inside a value that has no line of its own (a flow list, a merged
        # key) points at the nearest enclosing key that has one.
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


# ---- scalar checks: each takes the raw value and returns the typed one or raises Bad


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, int) and value.bit_length() > 64:
        # repr() of a huge int is slow, and refused past 4,300 digits.
        return f"a whole number of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except ValueError:  # a huge int inside a list or mapping
        return f"a {type(value).__name__} holding a number too large to print"
    return text if len(text) <= 60 else text[:57] + "..."


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Bad(f"expected true or false, got {describe(value)}")


# Above this a number is a mistake (a year is 3.2e7 s), and floats lose whole units.
_MAX_NUMBER = 1e15


def _finite(value: int | float, what: str) -> float:
    if value != value or abs(value) > _MAX_NUMBER:
        raise Bad(f"expected {what} up to {_MAX_NUMBER:g}, got {describe(value)}")
    return float(value)


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Bad(f"expected a number, got {describe(value)}")
    return _finite(value, "a number")


# The shortest timeout, interval or delay any duration key takes (0 aside, where 0 means
# none or at once). Below it a timer fires as soon as it is armed and a probe or health
# loop spins: the API took `wake_timeout: 1e-9`, and every wake then failed at once.
MIN_SECONDS = 0.01


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Bad(f"expected a duration in seconds (a number), got {describe(value)}")
    if value < 0 or value != value:
        raise Bad(f"expected a duration of 0 seconds or more, got {describe(value)}")
    return _finite(value, "a duration in seconds")


def seconds(value: Any) -> float:
    """A duration where 0 means none (or at once): 0, or at least ``MIN_SECONDS``."""
    duration = _duration(value)
    if 0 < duration < MIN_SECONDS:
        raise Bad(
            f"expected 0 or a duration of at least {MIN_SECONDS:g} seconds, got {describe(value)}"
        )
    return duration


def positive_seconds(value: Any) -> float:
    """A duration that must pass: at least ``MIN_SECONDS``."""
    duration = _duration(value)
    if duration <= 0:
        raise Bad(f"expected a duration above 0 seconds, got {describe(value)}")
    if duration < MIN_SECONDS:
        raise Bad(f"expected a duration of at least {MIN_SECONDS:g} seconds, got {describe(value)}")
    return duration


def int_between(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"expected a whole number, got {describe(value)}")
        if not low <= value <= high:
            raise Bad(f"expected a whole number from {low} to {high}, got {value}")
        return value

    return check


# A value that was once accepted: what replaced it, said instead of the option list.
PAGEOUT_GONE = (
    "'pageout' is no longer offered: it freed no memory (the pages went to swap but stayed "
    "in RAM as swap cache: MemAvailable -4 MiB for a 214 MiB backend); use 'cgroup' (the "
    "default, 'auto', is the same)"
)


def choice(*options: str, gone: Mapping[str, str] | None = None) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if gone and isinstance(value, str) and value in gone:
            raise Bad(gone[value])
        if value not in options:
            listed = ", ".join(options)
            raise Bad(f"expected one of {listed}, got {describe(value)}")
        return str(value)

    return check


def switch(on: str, off: str) -> Callable[[Any], str]:
    """``on`` or ``off``; YAML reads a bare ``off`` (and ``no``, ``false``) as False and
    ``on`` as True: those mean the same."""
    words = choice(on, off)

    def check(value: Any) -> str:
        if isinstance(value, bool):
            return on if value else off
        return words(value)

    return check


def enum_choice(kind: type[_E]) -> Callable[[Any], _E]:
    """A member of ``kind``, given by its value."""
    options = [member.value for member in kind]

    def check(value: Any) -> _E:
        if value not in options:
            raise Bad(f"expected one of {', '.join(options)}, got {describe(value)}")
        return kind(value)

    return check


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Bad(f"expected a non-empty string, got {describe(value)}")
    return value


def size(value: Any) -> int:
    """Bytes from ``256MB`` (10^6), ``256MiB`` (2^20), ``1.5G`` or a plain number."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return _bounded_size(value, value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            amount = float(match.group(1)) * _SIZE_UNITS[unit]  # inf for 400 digits
            return _bounded_size(int(amount) if amount <= _MAX_SIZE else _MAX_SIZE + 1, value)
    raise Bad(f"expected a size such as 256MB or 256MiB, got {describe(value)}")


_MAX_SIZE = 2**63 - 1  # what the engine's API (and a 64-bit int) can carry


def _bounded_size(size: int, given: Any) -> int:
    if size > _MAX_SIZE:
        raise Bad(f"expected a size up to 8 EiB, got {describe(given)}")
    return size


def port(value: Any) -> int:
    return int_between(1, 65535)(value)


def address(value: Any) -> Address:
    """``host:port``, ``[v6]:port``; the host must be an IP address or ``localhost``."""
    if not isinstance(value, str):
        raise Bad(f"expected host:port such as 127.0.0.1:8080, got {describe(value)}")
    text = value.strip()
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise Bad(f"expected host:port such as 127.0.0.1:8080, got {describe(value)}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise Bad(f"{host!r} is not an IP address or host name") from None
    if not 1 <= port <= 65535:
        raise Bad(f"port must be from 1 to 65535, got {port}")
    return Address(host, port)


def command(value: Any) -> tuple[str, ...]:
    """A list of arguments, or one string split like a shell would (no shell runs it)."""
    if isinstance(value, str):
        try:
            parts = shlex.split(value)
        except ValueError as exc:
            raise Bad(f"cannot split the command: {exc}") from None
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        parts = list(value)
    else:
        raise Bad(f"expected a list of strings or a command line, got {describe(value)}")
    if not parts or not parts[0]:
        raise Bad("the command is empty")
    return tuple(parts)


def names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Bad(f"expected a list of service names, got {describe(value)}")
    return tuple(dict.fromkeys(value))


def networks(value: Any) -> tuple[str, ...]:
    """Addresses or CIDR networks (``10.0.0.0/8``, ``::1``), as a list or one string."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise Bad(f"expected a list of addresses or networks, got {describe(value)}")
    found = []
    for item in value:
        try:
            found.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise Bad(f"{item!r} is no address or network (such as 10.0.0.0/8)") from None
    return tuple(found)


def listen_range(value: Any) -> ListenRange:
    """``CIDR:PORT`` or ``CIDR:LOW-HIGH``; ``[v6-CIDR]:PORTS`` for IPv6; ``*`` for any port."""
    example = "such as 127.0.0.0/8:8000-8999 or [::1/128]:8080"
    if not isinstance(value, str):
        raise Bad(f"expected an address range and ports {example}, got {describe(value)}")
    match = re.fullmatch(r"\[([^\]]+)\]:(\S+)|([^:\[\]]+):(\S+)", value.strip())
    if not match:
        raise Bad(f"expected an address range and ports {example}, got {describe(value)}")
    host, ports = match.group(1) or match.group(3), match.group(2) or match.group(4)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise Bad(f"{host!r} is not an address or address range (CIDR)") from None
    low_text, _, high_text = ("1-65535" if ports == "*" else ports).partition("-")
    try:
        low, high = port(int(low_text)), port(int(high_text or low_text))
    except (ValueError, Bad):
        raise Bad(f"expected ports N or N-M from 1 to 65535, got {ports!r}") from None
    if low > high:
        raise Bad(f"the port range {ports!r} runs backwards")
    return ListenRange(network, low, high)


def listen_ranges(value: Any) -> tuple[ListenRange, ...]:
    if not isinstance(value, list):
        raise Bad(f"expected a list of address ranges with ports, got {describe(value)}")
    return tuple(listen_range(item) for item in value)


def env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Bad(f"expected a mapping of names to strings, got {describe(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, dict | list) or item is None:
            raise Bad(f"expected NAME: value pairs, got {describe(key)}: {describe(item)}")
        # YAML turns `DEBUG: true` into a bool; the process sees the text it would in a shell.
        out[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return out


# ---- sections: a mapping checked key by key against a table of validators


def nested(value: Any) -> Any:
    """A sub-section: passed through here and checked by its own parser."""
    return value


def section(
    data: Any, path: KeyPath, fields: Mapping[str, Check], problems: Problems
) -> dict[str, Any] | None:
    """Check each key of ``data`` with its validator; None when ``data`` is no mapping."""
    if not isinstance(data, dict):
        problems.add(path, f"expected a mapping of settings, got {describe(data)}")
        return None
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = fields.get(key) if isinstance(key, str) else None
        if check is None:
            problems.add((*path, str(key)), unknown_key(key, fields))
            continue
        try:
            out[key] = check(value)
        except Bad as exc:
            problems.add((*path, key), str(exc))
        except (OverflowError, ValueError):
            # A value no check foresaw (a number too large for its type): still a fault
            # of the file, named, not a traceback.
            problems.add((*path, key), f"out of range: {describe(value)}")
    return out


def unknown_key(key: Any, fields: Mapping[str, Check]) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(sorted(fields))
    return f"unknown key {key!r}{hint}; known keys: {known}"


def is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def url_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        raise Bad(f"expected a path starting with / (no spaces), got {describe(value)}")
    return value


def header_conditions(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise Bad(
            "expected header names mapped to text they contain (or !text they lack), "
            f"got {describe(value)}"
        )
    return {k.lower(): v.lower() for k, v in value.items()}


# ---- prediction (sleep_policy.keep_awake, asleep_windows, predict)


def windows(value: Any) -> tuple[Window, ...]:
    """Weekly windows: a list of ``[DAYS] HH:MM-HH:MM [ZONE]`` (a single one may stand alone)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise Bad(
            f'expected a list of windows like "mon-fri 08:00-18:00 Europe/Berlin", '
            f"got {describe(value)}"
        )
    out = []
    for item in items:
        if not isinstance(item, str):
            raise Bad(f"expected a window as text, got {describe(item)}")
        try:
            out.append(parse_window(item))
        except ValueError as exc:
            raise Bad(str(exc)) from None
    return tuple(out)


def zone(value: Any) -> str:
    """An IANA time zone name (Europe/Berlin, UTC)."""
    name = text(value)
    try:
        load_zone(name)
    except ValueError as exc:
        raise Bad(str(exc)) from None
    return name


_PREDICT_FIELDS: dict[str, Check] = {
    "arrivals": boolean,
    "chains": boolean,
    "threshold": number,
    "chain_window": positive_seconds,
    "min_wake_time": seconds,
    "min_samples": int_between(1, 1_000_000),
}


def predict(value: Any) -> PredictSettings:
    """``{arrivals, chains, threshold, chain_window, min_wake_time, min_samples}``."""
    if not isinstance(value, dict):
        raise Bad(f"expected a mapping of settings, got {describe(value)}")
    values: dict[str, Any] = {}
    for key, item in value.items():
        field = _PREDICT_FIELDS.get(key) if isinstance(key, str) else None
        if field is None:
            raise Bad(unknown_key(key, _PREDICT_FIELDS))
        try:
            values[key] = field(item)
        except Bad as exc:
            raise Bad(f"{key}: {exc}") from None
    try:
        return PredictSettings(**values)
    except ValueError as exc:
        raise Bad(str(exc)) from None
