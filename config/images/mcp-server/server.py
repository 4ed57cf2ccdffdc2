"""An MCP server for the gateway example: FastMCP (the MCP Python SDK 1.x) over streamable
HTTP, MCP's standard transport, at ``http://HOST:PORT/mcp``.

    python server.py --role clock|notes [--host 0.0.0.0] [--port 8000]

Two roles, so the example has two different servers from one image:

- ``clock``: ``now`` (the time in an IANA zone) and ``days_between`` (two dates). It holds
  nothing, so wakeproxy may stop it when idle: it gives all its memory back.
- ``notes``: ``remember`` and ``recall``, notes kept in memory. wakeproxy pauses it when
  idle: a paused process keeps its memory, so the notes survive the sleep (a stop would
  lose them).
"""

from __future__ import annotations

import argparse
import datetime as dt
from zoneinfo import ZoneInfo

from mcp.server.fastmcp import FastMCP


def clock(server: FastMCP) -> None:
    @server.tool()
    def now(timezone: str = "UTC") -> str:
        """The current date and time in an IANA time zone (e.g. Europe/Berlin), ISO 8601."""
        return dt.datetime.now(ZoneInfo(timezone)).isoformat(timespec="seconds")

    @server.tool()
    def days_between(start: str, end: str) -> int:
        """Days from one date to another, both YYYY-MM-DD (negative when end comes first)."""
        return (dt.date.fromisoformat(end) - dt.date.fromisoformat(start)).days


def notes(server: FastMCP) -> None:
    kept: list[str] = []

    @server.tool()
    def remember(text: str) -> str:
        """Keep a note (in this server's memory)."""
        kept.append(text)
        return f"noted; {len(kept)} note(s) kept"

    @server.tool()
    def recall() -> str:
        """Every note kept so far, oldest first, one a line."""
        return "\n".join(kept) if kept else "no notes yet"


ROLES = {"clock": clock, "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    # All addresses by default: in compose, wakeproxy reaches it at its container's address.
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = FastMCP(f"example-{args.role}", host=args.host, port=args.port, log_level="WARNING")
    ROLES[args.role](server)
    server.run(transport="streamable-http")


if __name__ == "__main__":
    main()
