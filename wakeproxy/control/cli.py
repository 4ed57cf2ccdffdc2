"""The command line: ``wakeproxy run|check`` (the proxy, ``runner.py``), the admin API's
verbs (``client.py``), ``completion bash|zsh`` and ``--version``.

Only the standard library is imported here: the client verbs must stay light (the
image's health check runs one every 2 s), so ``runner`` (the proxy: uvloop, aiodocker,
the config schema) is imported only for ``run`` and ``check``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import client

COMMANDS = {
    "run": "run the proxy in the foreground",
    "check": "validate a config file and exit",
    "health": "exit 0 if the proxy's admin API answers (a container health check)",
    "status": "show every service, or one",
    "wake": "wake a service now; returns once it is ready",
    "sleep": "put a service to sleep now (its sleep_policy's action)",
    "stop": "stop a service now (its memory given back; a start wakes it)",
    "hibernate": "pause a service and give its memory back",
    "scale": "wake the first COUNT replicas, sleep the rest",
    "sleep-all": "put every service that may sleep to sleep now",
    "wake-all": "wake every service now",
    "reload": "make the running proxy re-read its config file",
    "metrics": "print the Prometheus metrics",
    "completion": "print a shell completion script: bash or zsh",
}
FORCEABLE = ("sleep", "stop", "hibernate", "sleep-all")
SHELLS = ("bash", "zsh")


def _client_options(sub: argparse.ArgumentParser) -> None:
    """Where the admin API is and its token: the same for every client verb."""
    sub.add_argument(
        "--admin",
        metavar="URL",
        help=f"the admin API (default: ${client.ADMIN_ENV}, else the config's admin.listen)",
    )
    sub.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file with the admin token (${client.TOKEN_ENV} wins over it; default: the "
        "config's admin.token_file)",
    )
    sub.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"the config whose admin: section to read (default: ${client.CONFIG_ENV}, "
        f"else ./{client.LOCAL_CONFIG} if there is one, else {client.DEFAULT_CONFIG_PATH})",
    )


def _output(sub: argparse.ArgumentParser, *choices: str) -> None:
    sub.add_argument(
        "-o",
        "--output",
        choices=choices,
        default="table",
        help="table (the default), json (the API's answer as is)"
        + (", name (the services' names, one a line)" if "name" in choices else ""),
    )


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, that command's own options alone (all of them
    cost a third of a client verb's own work, for options it never reads)."""
    top = argparse.ArgumentParser(
        prog="wakeproxy",
        description="A wake-on-demand proxy: idle backends sleep, connections wake them.",
        epilog="Exit codes: 0 done; 1 the API refused (or: unhealthy); 2 a config problem; "
        "3 the admin API cannot be reached.",
    )
    top.add_argument("--version", action="version", version=f"wakeproxy {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        if only is None or name == only:
            _options(name, commands.add_parser(name, help=text, description=text))
    return top


def _options(name: str, sub: argparse.ArgumentParser) -> None:
    if name in ("run", "check"):
        default = client.default_config(os.environ)
        sub.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            default=default,
            help=(
                f"config file (default: ${client.CONFIG_ENV}, else ./{client.LOCAL_CONFIG} "
                f"if there is one, else {client.DEFAULT_CONFIG_PATH})"
            ),
        )
    if name == "run":
        sub.add_argument(
            "--admin-listen",
            metavar="HOST:PORT",
            help="the admin API's address instead of the config's admin.listen",
        )
        sub.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        sub.add_argument("--log-format", choices=["text", "json"])
    if name == "status":
        sub.add_argument("name", nargs="?", help="one service (or a service's replicas)")
        sub.add_argument(
            "--watch",
            nargs="?",
            const=2.0,
            type=float,
            metavar="SECONDS",
            help="show it again every SECONDS (default 2) until Ctrl-C",
        )
    if name in ("wake", "sleep", "stop", "hibernate"):
        sub.add_argument("name", help="the service (a replica: NAME@N)")
    if name == "scale":
        sub.add_argument("name", help="a service with replicas")
        sub.add_argument("count", type=int, help="how many replicas to keep awake")
    if name in FORCEABLE:
        sub.add_argument("--force", action="store_true", help="even with connections open")
    if name == "completion":
        sub.add_argument("shell", choices=SHELLS)
    if name not in ("run", "check", "completion", "health", "metrics"):
        _output(sub, *(("table", "json", "name") if name == "status" else ("table", "json")))
    if name not in ("run", "check", "completion"):
        _client_options(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the command named is built (its own --help included); anything else, such
    # as --help, --version or a typo, gets every command.
    args = parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    if args.command in ("run", "check"):
        from . import runner  # the proxy itself: only to run or check a config

        return runner.main(args)
    if args.command == "completion":
        from .completion import script

        print(script(parser(), args.shell), end="")
        return 0
    try:
        return _client_verb(args)
    except client.Unusable as exc:
        print(f"wakeproxy: {exc}", file=sys.stderr)
        return client.EXIT_CONFIG


def _client_verb(args: argparse.Namespace) -> int:
    target = client.find_target(args.admin, args.token_file, args.config)
    if args.command == "health":
        return client.health(target)
    if args.command == "status" and args.watch is not None:
        if args.watch <= 0:
            print("wakeproxy: --watch: SECONDS must be above 0", file=sys.stderr)
            return client.EXIT_CONFIG
        return client.watch(target, args.name, args.watch, args.output)
    if args.command == "scale" and args.count < 0:
        print("wakeproxy: scale: COUNT must be 0 or more", file=sys.stderr)
        return client.EXIT_CONFIG
    return client.run(
        args.command,
        target,
        name=getattr(args, "name", None),
        force=getattr(args, "force", False),
        count=getattr(args, "count", None),
        output=getattr(args, "output", "table"),
    )
