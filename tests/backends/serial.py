"""A backend that serves one request at a time, each taking --delay seconds (20 ms), and
answers with its own port: an I/O-bound server that one replica cannot scale past
1/delay requests a second. Blocking and stdlib only, so any command or container can run
it: ``python3 serial.py --port P``.
"""

from __future__ import annotations

import argparse
import socket
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen(1024)
    body = f"{args.port}\n".encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                if not request:
                    continue  # a readiness probe: connected, sent nothing
                time.sleep(args.delay)
                conn.sendall(head + body)
            except OSError:
                pass


if __name__ == "__main__":
    main()
