#!/usr/bin/env python3
"""The floor of a Python proxy: a byte relay on the gateway's own transports, nothing above them.

    python3 tests/bench/pyrelay.py --port P --unix PATH [--host 127.0.0.1]

Each client connection gets its own connection to the upstream's Unix socket, and bytes go both
ways as they come: no HTTP parsing, no key, no limits, no accounting, no log. It runs on the
gateway's event loop and transports (`scripts/llamagw/net/fastio.py`), so what the gateway costs
beyond it in `make bench` case (a) is the gateway's own work per request; what it costs beyond
direct is the hop itself in Python (the event loop, four socket calls per request). A reference for
the benchmark only, never a product path: it forwards anything, unchecked.

Backpressure: a side that cannot write pauses reading on the other side (fastio's high and low
water marks), so the relay's memory stays bounded by a slow reader.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from llamagw.net import fastio  # noqa: E402

# Connections waiting in the listen queue: above case (a)'s 64 connections.
BACKLOG = 1024


class _Side(asyncio.Protocol):
    """One socket of a relayed pair: what it reads goes to the other side's transport."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.other.transport.close()      # no half-close: the pair ends (its data goes out first)
        return False

    def connection_lost(self, exc) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.close()

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()


class _Client(_Side):
    """The accepted side: connects its upstream side at once (a Unix connect does not wait)."""

    def __init__(self, unix_path: str):
        super().__init__()
        self._unix_path = unix_path

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            transport.abort()
            return
        up = _Side()
        up.other, self.other = self, up
        fastio.start_connection(asyncio.get_running_loop(), sock, up)


async def serve(host: str, port: int, unix_path: str, ready=None) -> None:
    """Relay from host:port to unix_path until cancelled; ready(port) once listening."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    listener = fastio.Listener(loop, sock, lambda: _Client(unix_path), BACKLOG)
    if ready is not None:
        ready(sock.getsockname()[1])
    try:
        await asyncio.Event().wait()
    finally:
        listener.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--unix", required=True, help="the upstream's Unix socket")
    args = p.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.unix,
                          lambda port: print(f"relaying 127.0.0.1:{port} -> {args.unix}",
                                             flush=True)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
