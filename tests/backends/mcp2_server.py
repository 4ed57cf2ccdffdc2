"""A real MCP server of the 2026-07-28 generation (SDK 2.x, stateless): ``MCPServer``
over streamable HTTP. Runs with the SDK 2.x venv's Python (``./dev test`` makes it):
``mcp2_server.py --port P``."""

from __future__ import annotations

import argparse

from mcp.server import MCPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="echo2")
    args = parser.parse_args()
    server = MCPServer(args.name, log_level="WARNING")

    @server.tool()
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper() + "!"

    @server.tool()
    def whoami() -> str:
        """Which server answered: its port."""
        return str(args.port)

    server.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
