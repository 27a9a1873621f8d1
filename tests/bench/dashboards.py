#!/usr/bin/env python3
"""Open dashboards for the benchmark: N live streams (GET /admin/live) read and thrown away.

    python3 tests/bench/dashboards.py --port P --key ADMIN_KEY [--n 8] [--host 127.0.0.1]

What a browser tab with the dashboard open costs the gateway: its live channel (the page's other
requests are a few a minute). Prints `ready N` once every stream has answered 200, then reads
until SIGTERM or SIGINT and prints one JSON line: {"streams", "bytes", "events", "dropped",
"ended"} ("dropped": the `dropped` notices the gateway sent, a dashboard that fell behind;
"ended": streams the gateway closed). Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
import time

# A stream's head within 5 s (the gateway answers in milliseconds).
HEAD_TIMEOUT_S = 5.0
# The select() wait: how soon a signal is seen.
POLL_S = 0.2
READ_BYTES = 65536


def open_stream(host: str, port: int, key: str) -> tuple[socket.socket, bytes]:
    """A live stream whose head said 200; returns the socket and the bytes read past the head."""
    sock = socket.create_connection((host, port), timeout=HEAD_TIMEOUT_S)
    sock.sendall(f"GET /admin/live HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + HEAD_TIMEOUT_S
    while b"\r\n\r\n" not in data:
        if time.monotonic() > deadline:
            raise RuntimeError("no answer head in time")
        chunk = sock.recv(READ_BYTES)
        if not chunk:
            raise RuntimeError("closed before the head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"answered {status.decode(errors='replace')}")
    sock.setblocking(False)
    return sock, rest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args()
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sel = selectors.DefaultSelector()
    total = events = dropped = ended = 0
    socks = []
    for _ in range(args.n):
        sock, rest = open_stream(args.host, args.port, args.key)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ)
        total += len(rest)
        events += rest.count(b"event: ")
    print(f"ready {len(socks)}", flush=True)
    while not stop and ended < len(socks):
        for key, _ in sel.select(POLL_S):
            try:
                data = key.fileobj.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                ended += 1
                continue
            total += len(data)
            events += data.count(b"event: ")
            dropped += data.count(b"event: dropped")
    for sock in socks:
        sock.close()
    print(json.dumps({"streams": len(socks), "bytes": total, "events": events,
                      "dropped": dropped, "ended": ended}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
