"""What the probe server answers: the state file, and a cached TCP check of the gateway port.

Prober decides; health/server.py runs the check (a non-blocking connect) and serves. The only
traffic this causes is a bare TCP connect+close to the gateway port, at most once per
GATEWAY_CHECK_TTL and at once when the state file is replaced.
"""

from __future__ import annotations

import os
import socket

from llamagw.backend_state import read_state

# The gateway is on loopback: a connect either succeeds or is refused in well under a millisecond.
GATEWAY_CONNECT_TIMEOUT = 0.5
# Probes may come several times a second; one TCP connect per second at most is plenty.
GATEWAY_CHECK_TTL = 1.0


def probe_address(host: str) -> str:
    """Where to reach a listener bound to `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class Prober:
    """Decides the answer: the state file, plus a cached TCP check of the gateway port when
    ready. The check itself (a non-blocking connect) is the server's to run; see HealthServer."""

    def __init__(self, state_file: str, gateway_host: str, gateway_port: int,
                 ttl: float = GATEWAY_CHECK_TTL, connect_timeout: float = GATEWAY_CONNECT_TIMEOUT):
        self.state_file = state_file
        self.gateway = (gateway_host, gateway_port)
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        # (checked_at, state file version, ok)
        self._cached: tuple[float, tuple[int, int, int], bool] | None = None
        self._address: tuple | None = None

    def state_version(self) -> tuple[int, int, int]:
        # Every atomic replace (temp file + rename) makes a new inode: a rewrite is always seen.
        try:
            st = os.stat(self.state_file)
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def answer(self, now: float) -> tuple[int, bytes] | tuple[None, tuple[int, int, int]]:
        """(status, JSON body) for a GET (204: empty body); or (None, state file version) when
        the answer needs a gateway check first (then gateway_answer with its outcome)."""
        state = read_state(self.state_file)
        if state == "starting":
            return 204, b""
        if state == "ready":
            version = self.state_version()
            cached = self._cached
            if cached and now - cached[0] < self.ttl and cached[1] == version:
                return self.gateway_answer(cached[2])
            return None, version
        return 503, b'{"status":"%s"}' % state.encode()

    @staticmethod
    def gateway_answer(ok: bool) -> tuple[int, bytes]:
        if ok:
            return 200, b'{"status":"ready"}'
        return 503, b'{"status":"ready","gateway":"not accepting"}'

    def record(self, checked_at: float, version: tuple[int, int, int], ok: bool) -> None:
        self._cached = (checked_at, version, ok)

    def address(self) -> tuple:
        """(family, sockaddr) of the gateway port, resolved once (normally a numeric address)."""
        if self._address is None:
            info = socket.getaddrinfo(self.gateway[0], self.gateway[1], type=socket.SOCK_STREAM)
            self._address = (info[0][0], info[0][4])
        return self._address
