"""The probe server for the platform (RunPod load-balancing contract), its own process.

    python3 scripts/health_server.py        # config from env: HOST, PORT_HEALTH, PORT, RUN_DIR

Any GET/HEAD path answers from the one-word state file `$RUN_DIR/health` that entrypoint.sh
writes (`starting`, `ready`, `failed`, `stopping`; missing, unreadable or anything else reads as
`starting`):

    starting                                    -> 204 (RunPod: initializing; no body)
    ready, and 127.0.0.1:PORT accepts a TCP connect -> 200 {"status":"ready"}
    ready, but the gateway port refuses         -> 503 {"status":"ready","gateway":"not accepting"}
    failed / stopping                           -> 503 {"status":"failed"} / {"status":"stopping"}
    any other method                            -> 405

It never sends a request to llama-server or to the gateway's API: the only traffic it makes is a
bare TCP connect+close to the gateway port, cached for GATEWAY_CHECK_TTL and re-done at once when
the state file is replaced. It imports little so that it answers within a fraction of a second of
the container's start. Bad config exits 2 naming the variable; SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import config

# A probe's request head is ~100 bytes; 8 KiB is the common server default for a request head
# (nginx large_client_header_buffers, h11) and far more than any probe needs.
MAX_HEAD_BYTES = 8192
# Probes send their head in one packet; 2 s total is generous and bounds a slowloris.
HEAD_TIMEOUT = 2.0
# Writing ~150 bytes to a live client never takes this long.
WRITE_TIMEOUT = 2.0
# After answering, read and drop what the client still sends (a body, the rest of an oversized
# head) for this long / this much, so closing does not reset the connection before the client
# has read the answer (a "lingering close", as Apache and nginx do).
LINGER_TIMEOUT = 0.5
LINGER_MAX_BYTES = 65536
# Concurrent probe connections: the platform probes every few seconds; beyond this we close at once.
MAX_CONNECTIONS = 64
# The gateway is on loopback: a connect either succeeds or is refused in well under a millisecond.
GATEWAY_CONNECT_TIMEOUT = 0.5
# Probes may come several times a second; one TCP connect per second at most is plenty.
GATEWAY_CHECK_TTL = 1.0
# The state file holds one short word.
MAX_STATE_BYTES = 64
LISTEN_BACKLOG = 64

STATES = ("starting", "ready", "failed", "stopping")
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def read_state(path: str) -> str:
    """The state word in `path`; `starting` when missing, unreadable or not a known state."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES)
    except OSError:
        return "starting"
    word = raw.strip().decode("ascii", "replace")
    return word if word in STATES else "starting"


def probe_address(host: str) -> str:
    """Where to reach a listener bound to `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def tcp_accepts(host: str, port: int, timeout: float) -> bool:
    """True when host:port accepts a TCP connection (connect, then close; nothing sent)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Prober:
    """Decides the answer: state file, plus a cached TCP check of the gateway port when ready."""

    def __init__(self, state_file: str, gateway_host: str, gateway_port: int,
                 ttl: float = GATEWAY_CHECK_TTL, connect_timeout: float = GATEWAY_CONNECT_TIMEOUT):
        self.state_file = state_file
        self.gateway = (gateway_host, gateway_port)
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        # (checked_at, state file version, ok)
        self._cached: tuple[float, tuple[int, int, int], bool] | None = None

    def _state_version(self) -> tuple[int, int, int]:
        # Every atomic replace (temp file + rename) makes a new inode: a rewrite is always seen.
        try:
            st = os.stat(self.state_file)
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _gateway_ok(self) -> bool:
        version = self._state_version()
        with self._lock:
            cached = self._cached
            if cached and time.monotonic() - cached[0] < self.ttl and cached[1] == version:
                return cached[2]
            ok = tcp_accepts(self.gateway[0], self.gateway[1], self.connect_timeout)
            self._cached = (time.monotonic(), version, ok)
            return ok

    def answer(self) -> tuple[int, bytes]:
        """(status, JSON body) for a GET; 204 has an empty body."""
        state = read_state(self.state_file)
        if state == "starting":
            return 204, b""
        if state == "ready":
            if self._gateway_ok():
                return 200, b'{"status":"ready"}'
            return 503, b'{"status":"ready","gateway":"not accepting"}'
        return 503, b'{"status":"%s"}' % state.encode()


def read_head(conn: socket.socket, deadline: float) -> bytes | None:
    """The request head up to the blank line; None on timeout/EOF; raises ValueError if too big."""
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            raise ValueError("head too large")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096)
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def render(status: int, body: bytes, head_only: bool, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS[status]}", "Connection: close",
             "Cache-Control: no-store"]
    if status != 204:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if extra:
        lines.append(extra)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 204 else head + body


def handle(conn: socket.socket, prober: Prober) -> None:
    with conn:
        try:
            head = read_head(conn, time.monotonic() + HEAD_TIMEOUT)
        except ValueError:
            response = render(431, b'{"error":"request head too large"}', False)
        else:
            if head is None:
                return
            request_line = head.split(b"\n", 1)[0].strip()
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                response = render(400, b'{"error":"bad request"}', False)
            elif parts[0] in (b"GET", b"HEAD"):
                status, body = prober.answer()
                response = render(status, body, parts[0] == b"HEAD")
            else:
                response = render(405, b'{"error":"method not allowed"}', False,
                                  "Allow: GET, HEAD")
        try:
            conn.settimeout(WRITE_TIMEOUT)
            conn.sendall(response)
            conn.shutdown(socket.SHUT_WR)
            linger(conn)
        except OSError:
            pass


def linger(conn: socket.socket) -> None:
    deadline = time.monotonic() + LINGER_TIMEOUT
    dropped = 0
    while dropped < LINGER_MAX_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        conn.settimeout(remaining)
        chunk = conn.recv(16384)
        if not chunk:
            return
        dropped += len(chunk)


def serve(listener: socket.socket, prober: Prober) -> None:
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def run(conn: socket.socket) -> None:
        try:
            handle(conn, prober)
        finally:
            slots.release()

    while True:
        conn, _ = listener.accept()
        if not slots.acquire(blocking=False):
            conn.close()
            continue
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


def main() -> int:
    try:
        cfg = config.load_config()
    except config.ConfigError as exc:
        print(f"health_server: FATAL bad config: {exc}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((cfg.host, cfg.port_health))
    except OSError as exc:
        print(f"health_server: FATAL cannot listen on {cfg.host}:{cfg.port_health} "
              f"(PORT_HEALTH): {exc}", file=sys.stderr, flush=True)
        return 1
    listener.listen(LISTEN_BACKLOG)
    prober = Prober(cfg.health_file, probe_address(cfg.host), cfg.port)
    print(f"health_server: listening on {cfg.host}:{cfg.port_health}, state file "
          f"{cfg.health_file}, gateway check {prober.gateway[0]}:{cfg.port}", flush=True)
    try:
        serve(listener, prober)
    except SystemExit:
        pass
    finally:
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
