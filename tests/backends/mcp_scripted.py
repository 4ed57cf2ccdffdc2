"""A scripted streamable-HTTP MCP server for the proxy's error paths (a real SDK server
cannot be made to refuse a replayed initialize on cue).

``mcp_scripted.py --port P --state FILE --then refuse|silent``: its first run answers
``initialize`` like a stateful server and writes FILE; every later run (a restart)
finds FILE and then refuses ``initialize`` (403 with a JSON-RPC error) or never answers
it. ``notifications/initialized`` is 202, any other request a result naming its method.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--then", choices=["refuse", "silent"], required=True)
    args = parser.parse_args()
    restarted = os.path.exists(args.state)
    with open(args.state, "a") as state:
        state.write("started\n")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *values: object) -> None:
            pass

        def _send(self, status: int, body: dict[str, object] | None, session: str = "") -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if session:
                self.send_header("Mcp-Session-Id", session)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            try:
                message = json.loads(self.rfile.read(length))
            except ValueError:
                error = {"code": -32700, "message": "Parse error"}
                self._send(400, {"jsonrpc": "2.0", "id": None, "error": error})
                return
            method = message.get("method")
            if method == "initialize":
                if restarted and args.then == "silent":
                    time.sleep(3600)
                if restarted:
                    error = {"code": -32001, "message": "no new sessions here"}
                    self._send(403, {"jsonrpc": "2.0", "id": message["id"], "error": error})
                    return
                result = {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "scripted", "version": "1"},
                }
                self._send(200, {"jsonrpc": "2.0", "id": message["id"], "result": result}, "s-1")
            elif "id" not in message:
                self._send(202, None)
            else:
                result = {"content": [{"type": "text", "text": method}]}
                self._send(200, {"jsonrpc": "2.0", "id": message["id"], "result": result})

        def do_DELETE(self) -> None:
            self._send(200, None)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
