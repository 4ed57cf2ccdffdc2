"""A real MCP server for the tests: the SDK's FastMCP with one tool.

``python3 mcp_server.py --port P --transport sse|streamable-http``. Runs under the
process runtime and inside a container (stdlib plus the ``mcp`` package).
"""

from __future__ import annotations

import argparse

from mcp.server.fastmcp import FastMCP
from sse_starlette.sse import EventSourceResponse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=["sse", "streamable-http"], default="sse")
    parser.add_argument("--ping", type=float, default=15.0, help="SSE keepalive interval (s)")
    args = parser.parse_args()
    # sse-starlette's keepalive comments (": ping"), sent on every open SSE stream.
    EventSourceResponse.DEFAULT_PING_INTERVAL = args.ping
    server = FastMCP("echo", host="127.0.0.1", port=args.port, log_level="WARNING")

    @server.tool()
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper() + "!"

    @server.tool()
    def whoami() -> str:
        """Which server answered (replica tests): its port."""
        return str(args.port)

    server.run(transport=args.transport)


if __name__ == "__main__":
    main()
