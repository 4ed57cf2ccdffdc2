"""A real MCP server for the tests: the SDK's FastMCP with a few tools.

``python3 mcp_server.py --port P --transport sse|streamable-http [--stateless]``. Runs
under the process runtime and inside a container (stdlib plus the ``mcp`` package).
"""

from __future__ import annotations

import argparse

from mcp.server.fastmcp import Context, FastMCP
from sse_starlette.sse import EventSourceResponse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=["sse", "streamable-http"], default="sse")
    parser.add_argument("--ping", type=float, default=15.0, help="SSE keepalive interval (s)")
    parser.add_argument("--stateless", action="store_true", help="streamable HTTP, no sessions")
    parser.add_argument("--name", default="echo", help="the server's name (serverInfo)")
    args = parser.parse_args()
    # sse-starlette's keepalive comments (": ping"), sent on every open SSE stream.
    EventSourceResponse.DEFAULT_PING_INTERVAL = args.ping
    server = FastMCP(
        args.name,
        host="127.0.0.1",
        port=args.port,
        log_level="WARNING",
        stateless_http=args.stateless,
    )

    @server.tool()
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper() + "!"

    @server.tool()
    def whoami() -> str:
        """Which server answered (replica tests): its port."""
        return str(args.port)

    @server.tool()
    def session(ctx: Context) -> str:  # type: ignore[type-arg]
        """The session id this server knows the request by (streamable HTTP's header)."""
        request = ctx.request_context.request
        headers = getattr(request, "headers", None)
        return headers.get("mcp-session-id", "") if headers is not None else ""

    server.run(transport=args.transport)


if __name__ == "__main__":
    main()
