"""The admin API's client: ``wakeproxy health|status|wake|sleep|stop|hibernate|scale|
sleep-all|wake-all|reload|metrics``.

Light on purpose: the image's HEALTHCHECK runs ``wakeproxy health`` every 2 s, so this
path imports the standard library and, only when it must read the config, PyYAML; never
the proxy (``wakeproxy.app``, aiodocker, aiohttp, uvloop, prometheus_client, the config
schema). tests/test_cli.py checks the modules ``wakeproxy status`` loads.

Where the API is: ``--admin``, else ``$WAKEPROXY_ADMIN``, else the config's
``admin.listen``. The token: ``$WAKEPROXY_ADMIN_TOKEN``, else ``--token-file``, else the
config's ``admin.token_file``. The config is ``-c``, else ``$WAKEPROXY_CONFIG``, else
``config.yaml`` in the current directory, else the default path; only its ``admin:``
section is read, and only when one of the two is still missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time

from .printed import (
    format_acted,
    format_all,
    format_reload,
    format_scale,
    format_status,
    status_services,
)

# typing and dataclasses are left out on purpose: they were a fifth of this path's
# start-up (mypy reads the annotations; nothing evaluates them at run time).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# Spelled here rather than imported: their modules (control.admin, config.model) pull in
# h11 and the whole config schema. tests/test_cli.py checks they agree.
TOKEN_ENV = "WAKEPROXY_ADMIN_TOKEN"
ADMIN_ENV = "WAKEPROXY_ADMIN"
CONFIG_ENV = "WAKEPROXY_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/wakeproxy/config.yaml"
# Looked for in the current directory before the default path: the CLI works without
# flags from the folder that holds the config.
LOCAL_CONFIG = "config.yaml"


def default_config(env: Mapping[str, str]) -> str:
    """The config when no ``-c`` names one: ``$WAKEPROXY_CONFIG``, else ``config.yaml`` in
    the current directory if there is one, else the default path."""
    named = env.get(CONFIG_ENV)
    if named:
        return named
    return LOCAL_CONFIG if os.path.isfile(LOCAL_CONFIG) else DEFAULT_CONFIG_PATH


DEFAULT_LISTEN = "127.0.0.1:9000"
# The proxy refuses a bigger config (config.source.MAX_CONFIG_BYTES); so does the client.
MAX_CONFIG_BYTES = 2 * 1024 * 1024

EXIT_API_ERROR = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3

# A wake answers once the backend is ready: allow for a long wake_timeout.
ACT_TIMEOUT = 300.0
READ_TIMEOUT = 30.0
HEALTH_TIMEOUT = 2.0


class Unusable(Exception):
    """The config or token file named for the client cannot be used (exit 2)."""


class Unreachable(Exception):
    """No answer from the admin API (exit 3)."""


class Target:
    """Where the admin API is and what to send it; the ``*_from`` say where each came
    from, for the messages (a 401 names where the token was looked for)."""

    __slots__ = ("token", "token_from", "token_problem", "url", "url_from")

    def __init__(
        self,
        url: str,
        url_from: str,
        token: str | None = None,
        token_from: str | None = None,
        token_problem: str | None = None,
    ) -> None:
        self.url = url
        self.url_from = url_from
        self.token = token
        self.token_from = token_from
        # A token file the config named that could not be read: said only if it mattered.
        self.token_problem = token_problem


class AdminSection:
    """What the client reads of a config: ``admin.listen`` and ``admin.token_file``
    (relative to the config file's folder), unchecked beyond the listen address."""

    __slots__ = ("listen", "token_file")

    def __init__(self, listen: str = DEFAULT_LISTEN, token_file: str | None = None) -> None:
        self.listen = listen
        self.token_file = token_file


def read_admin_section(path: str) -> AdminSection:
    """``admin:`` of the config at ``path``, without building the rest.

    The document is composed, not constructed: an alias elsewhere in the file (an
    alias bomb included) stays one node, so reading costs one pass over the text
    whatever the file holds; the proxy itself validates everything else.
    """
    import yaml  # here: only a client that needs the config pays for it

    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise Unusable(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise Unusable(f"{path}: the config is over {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(raw, Loader=loader)
    except yaml.YAMLError as exc:
        raise Unusable(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise Unusable(f"{path}: nested too deep") from None
    values: dict[str, str] = {}
    admin = _child(root, "admin")
    for key in ("listen", "token_file"):
        node = _child(admin, key)
        if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null":
            values[key] = node.value
    token_file = values.get("token_file")
    if token_file is not None:
        # As the proxy reads it: relative to the config file's folder.
        token_file = os.path.join(os.path.dirname(os.path.abspath(path)), token_file)
    return AdminSection(values.get("listen", DEFAULT_LISTEN), token_file)


def _child(node: Any, key: str) -> Any:
    """The value of ``key`` in a YAML mapping node (the last one given), else None."""
    import yaml

    found = None
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                found = value
    return found


_LISTEN = re.compile(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)")


def admin_url(listen: str) -> str:
    """Where a client on this host reaches an admin API listening on ``listen``
    (``host:port``, ``[v6]:port``): a wildcard address is asked on loopback."""
    match = _LISTEN.fullmatch(listen.strip())
    if not match:
        raise ValueError(f"expected host:port such as 127.0.0.1:9000, got {listen!r}")
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_token(path: str) -> str | None:
    with open(path, encoding="utf-8") as file:
        return file.read().strip() or None


def find_target(
    admin: str | None,
    token_file: str | None,
    config: str | None,
    env: Mapping[str, str] = os.environ,
) -> Target:
    """The admin API's URL and token, each from the first source that gives it."""
    url, url_from = admin, "--admin"
    if not url and env.get(ADMIN_ENV):
        url, url_from = env[ADMIN_ENV], f"${ADMIN_ENV}"
    token, token_from = env.get(TOKEN_ENV, "").strip() or None, f"${TOKEN_ENV}"
    if token is None and token_file:
        try:
            token, token_from = _read_token(token_file), f"--token-file {token_file}"
        except OSError as exc:
            raise Unusable(f"--token-file: cannot read {token_file}: {exc.strerror}") from None
    problem = None
    if not url or (token is None and not token_file):
        path = config or default_config(env)
        named = path != DEFAULT_CONFIG_PATH
        section, where = AdminSection(), f"the default (no {path})"
        if named or os.path.exists(path):
            try:
                section, where = read_admin_section(path), path
            except Unusable as exc:
                if not url:
                    raise
                # Wanted for the token only: a GET needs none unless reads are protected.
                problem = str(exc)
        if not url:
            try:
                url, url_from = admin_url(section.listen), f"admin.listen in {where}"
            except ValueError as exc:
                raise Unusable(f"{path}: admin.listen: {exc}") from None
        if token is None and not token_file and section.token_file is not None:
            # Not fatal here: reads need no token unless admin.protect_reads is set,
            # and a user who may not read the file may still read the status.
            try:
                token = _read_token(section.token_file)
                token_from = f"admin.token_file {section.token_file}"
            except OSError as exc:
                problem = f"admin.token_file: cannot read {section.token_file}: {exc.strerror}"
    assert url is not None
    if "://" not in url:
        url = "http://" + url  # --admin 127.0.0.1:9000 means the obvious
    return Target(url.rstrip("/"), url_from, token, token_from if token else None, problem)


class Answer:
    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            text = self.body[:200].decode("utf-8", "replace")
            return {"error": f"not a JSON answer: {text!r}"}


_URL = re.compile(r"(https?)://(\[[^\]]+\]|[^/:\[\]]+)(?::(\d+))?(/.*)?")
# The biggest answer read: /metrics of thousands of services is a few MiB.
MAX_ANSWER = 64 * 1024 * 1024


def call(
    target: Target,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    timeout: float = READ_TIMEOUT,
) -> Answer:
    """One request to the admin API; Unreachable when nothing answers it.

    HTTP/1.1 over a plain socket with ``Connection: close``: http.client (with the
    email package it parses headers with) was a third of this path's start-up, and
    the admin API's answers need no more than this (a status, a length or chunks).
    """
    match = _URL.fullmatch(target.url)
    if match is None:
        raise Unusable(
            f"the admin API's URL {target.url!r} ({target.url_from}) is not http://HOST[:PORT]"
        )
    scheme, host, port, prefix = match.groups()
    host = host.strip("[]")
    number = int(port) if port else (443 if scheme == "https" else 80)
    headers = [
        f"{method} {(prefix or '').rstrip('/')}{path} HTTP/1.1",
        f"Host: {host if ':' not in host else f'[{host}]'}:{number}",
        "Accept: application/json",
        "Connection: close",
        f"Content-Length: {len(body or b'')}",
    ]
    if target.token:
        headers.append(f"Authorization: Bearer {target.token}")
    if body is not None:
        headers.append("Content-Type: application/json")
    wire = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (body or b"")
    try:
        if scheme == "https":
            answer = _https(host, number, wire, timeout)
        else:
            with socket.create_connection((host, number), timeout=timeout) as sock:
                sock.sendall(wire)
                answer = _read_all(sock)
        return _parse(answer)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or repr(exc)
        raise Unreachable(
            f"cannot reach the admin API at {target.url} ({target.url_from}): {why}"
        ) from None


def _https(host: str, port: int, wire: bytes, timeout: float) -> bytes:
    """An admin API behind a TLS front: ssl only then."""
    import ssl

    context = ssl.create_default_context()
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(wire)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    chunks, size = [], 0
    while data := sock.recv(65536):
        chunks.append(data)
        size += len(data)
        if size > MAX_ANSWER:
            raise ValueError(f"an answer over {MAX_ANSWER // (1024 * 1024)} MiB")
    return b"".join(chunks)


def _parse(answer: bytes) -> Answer:
    """A whole HTTP/1.1 response, as read up to the server's close."""
    head, found, rest = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not found or len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {answer[:80]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        rest = _unchunk(rest)
    elif fields.get("content-length", "").isdigit():
        rest = rest[: int(fields["content-length"])]
    return Answer(int(parts[1]), rest, fields.get("content-type", ""))


def _unchunk(data: bytes) -> bytes:
    out: list[bytes] = []
    at = 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


class Request:
    __slots__ = ("body", "method", "path", "timeout")

    def __init__(
        self, method: str, path: str, body: bytes | None = None, timeout: float = ACT_TIMEOUT
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.timeout = timeout


_NAME = re.compile(r"[A-Za-z0-9._@-]+")


def request_for(command: str, name: str | None, force: bool, count: int | None) -> Request:
    """The API request a verb makes."""
    query = "?force=true" if force else ""
    if command == "status":
        return Request("GET", "/services", timeout=READ_TIMEOUT)
    if command == "metrics":
        return Request("GET", "/metrics", timeout=READ_TIMEOUT)
    if command == "reload":
        return Request("POST", "/reload")
    if command in ("sleep-all", "wake-all"):
        return Request("POST", f"/services/{command}{query}")
    assert name is not None
    # Service names are letters, digits, . _ - (and @ for a replica): anything else
    # is no service's, and must not reach the request line as it is.
    quoted = name if _NAME.fullmatch(name) else "".join(f"%{b:02X}" for b in name.encode())
    if command == "scale":
        return Request("POST", f"/services/{quoted}/scale", json.dumps({"count": count}).encode())
    return Request("POST", f"/services/{quoted}/{command}{query}")


def _refused(command: str, answer: Answer, target: Target) -> None:
    body = answer.json()
    error = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    if isinstance(body, dict) and body.get("forceable"):
        # The API's hint names its query parameter; here the flag is what to type.
        error = f"{body['reason']}; add --force to {command} anyway"
    if answer.status == 401:
        sent = f"the token sent came from {target.token_from}" if target.token else "none was sent"
        error += (
            f" ({sent}): pass the proxy's token with --token-file FILE or ${TOKEN_ENV}"
            " (the config's admin.token_file is read when neither is given)"
        )
        if target.token_problem:
            error += f"; {target.token_problem}"
    print(f"wakeproxy: {answer.status}: {error}", file=sys.stderr)
    if isinstance(body, dict):
        for problem in body.get("problems", ()):
            print(problem, file=sys.stderr)


def _render(command: str, answer: Answer, output: str, name: str | None) -> tuple[str, int]:
    """What to print for an accepted request, and the exit code."""
    if command == "metrics":
        return answer.body.decode("utf-8", "replace").rstrip("\n"), 0
    body = answer.json()
    if command == "status":
        services = status_services(body, name)
        if services is None:
            print(f"wakeproxy: no such service: {name}", file=sys.stderr)
            return "", EXIT_API_ERROR
        if output == "json":
            return json.dumps(body if name is None else {"services": services}, indent=2), 0
        if output == "name":
            return "\n".join(s["name"] for s in services), 0
        return format_status(services), 0
    failed = command in ("sleep-all", "wake-all") and any(s.get("error") for s in body["services"])
    code = EXIT_API_ERROR if failed else 0
    if output == "json":
        return json.dumps(body, indent=2), code
    if command == "reload":
        return format_reload(body), code
    if command == "scale":
        return format_scale(body), code
    if command in ("sleep-all", "wake-all"):
        return format_all(body), code
    return format_acted(body), code


def run(
    command: str,
    target: Target,
    *,
    name: str | None = None,
    force: bool = False,
    count: int | None = None,
    output: str = "table",
) -> int:
    """One verb: the request, the answer printed; 0, 1 (refused) or 3 (unreachable)."""
    req = request_for(command, name, force, count)
    try:
        answer = call(target, req.method, req.path, body=req.body, timeout=req.timeout)
    except Unreachable as exc:
        print(f"wakeproxy: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if answer.status != 200:
        _refused(command, answer, target)
        return EXIT_API_ERROR
    text, code = _render(command, answer, output, name)
    if text:
        print(text)
    if code and command in ("sleep-all", "wake-all"):
        refused = sum(bool(s.get("error")) for s in answer.json()["services"])
        print(f"wakeproxy: {command}: {refused} service(s) left as they were", file=sys.stderr)
    return code


def watch(target: Target, name: str | None, every: float, output: str) -> int:
    """``status --watch``: the status again every ``every`` seconds until Ctrl-C. Only
    reads; an API that stops answering is shown as such and asked again."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}every {every:g} s, {stamp} ({target.url}); Ctrl-C stops", flush=True)
            try:
                answer = call(target, "GET", "/services")
            except Unreachable as exc:
                print(f"wakeproxy: {exc}", flush=True)
            else:
                if answer.status != 200:
                    _refused("status", answer, target)
                else:
                    text, _ = _render("status", answer, output, name)
                    print(text, flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def health(target: Target) -> int:
    """``wakeproxy health``: 0 when the admin API answers /health, else 1 (the image's
    HEALTHCHECK)."""
    try:
        answer = call(target, "GET", "/health", timeout=HEALTH_TIMEOUT)
    except Unreachable as exc:
        print(f"wakeproxy: unhealthy: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    if answer.status == 200:
        return 0
    print(f"wakeproxy: unhealthy: {target.url}/health answered {answer.status}", file=sys.stderr)
    return EXIT_API_ERROR
