"""The SDK 2.x client, as mcp-context-forge 1.1.0 uses it (``mode="auto"``: it asks
``server/discover`` and falls back to ``initialize`` on a server of the handshake era).

``mcp2_client.py URL --checks N [--call TOOL JSON]``: N health checks (each a fresh
client that connects and leaves: what the gateway does every health interval), then
one session calling TOOL. Prints one JSON object: the server name each check saw, the
protocol version, and the tool's text."""

from __future__ import annotations

import argparse
import asyncio
import json

from mcp import Client


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--checks", type=int, default=0)
    parser.add_argument("--call", nargs=2, metavar=("TOOL", "ARGS"))
    args = parser.parse_args()
    report: dict[str, object] = {"checks": [], "versions": []}
    for _ in range(args.checks):
        async with Client(args.url) as client:
            info = client.server_info
            report["checks"].append(info.name if info else "")  # type: ignore[union-attr]
            report["versions"].append(client.protocol_version)  # type: ignore[union-attr]
    if args.call:
        async with Client(args.url) as client:
            result = await client.call_tool(args.call[0], json.loads(args.call[1]))
            report["call"] = result.content[0].text  # type: ignore[union-attr]
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
