"""A backend that serves one request at a time, each taking --delay seconds (20 ms), and
answers with its own port: an I/O-bound server that one replica cannot scale past
1/delay requests a second. SIGUSR1 closes its listening socket (connects are refused
while the process lives on), SIGUSR2 opens it again. Blocking and stdlib only, so any
command or container can run it: ``python3 serial.py --port P``.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import time

LISTENING = {"on": True}


def listener(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(1024)
    return server


def serve(conn: socket.socket, delay: float, answer: bytes) -> None:
    with conn:
        conn.settimeout(5)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return  # a readiness probe: connected, sent nothing
                request += chunk
            time.sleep(delay)
            conn.sendall(answer)
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    signal.signal(signal.SIGUSR1, lambda *_: LISTENING.update(on=False))
    signal.signal(signal.SIGUSR2, lambda *_: LISTENING.update(on=True))
    body = f"{args.port}\n".encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    server: socket.socket | None = listener(args.port)
    while True:
        if not LISTENING["on"] and server is not None:
            server.close()
            server = None
        if LISTENING["on"] and server is None:
            server = listener(args.port)
        if server is None:
            time.sleep(0.01)
            continue
        ready, _, _ = select.select([server], [], [], 0.05)
        if ready:
            conn, _ = server.accept()
            serve(conn, args.delay, answer + body)


if __name__ == "__main__":
    main()
