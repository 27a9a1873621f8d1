"""The probe server's loop, HealthServer: it serves what health/prober.py's Prober decides.

One thread, non-blocking sockets, one selector (not asyncio): a connection costs a descriptor
and a small object, and nothing it does (send nothing, trickle, never read) holds up the others.
At most MAX_CONNECTIONS are held; when a new one arrives at the cap, the oldest one still waiting
for its head is dropped to make room (a probe sends its head at once, so the connections that
wait longest are the idle ones of a flood), but only once it has been held MIN_HOLD: while every
connection held is younger than that, no more are accepted (they wait in the listen queue, in
order), so a flood that reconnects at once cannot push a probe out before its head is read. A
head must arrive whole within HEAD_TIMEOUT and fit in MAX_HEAD_BYTES. The gateway check is a
non-blocking connect too: probes that need it wait for it, up to GATEWAY_CONNECT_TIMEOUT
(health/prober.py), while the others are answered.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

from llamagw.health.prober import Prober

# A probe's request head is ~100 bytes; 8 KiB is the common server default for a request head
# (nginx large_client_header_buffers, h11) and far more than any probe needs.
MAX_HEAD_BYTES = 8192
# Bytes asked of the kernel per read of a head (a probe's head comes in one read).
RECV_SIZE = 4096
# A probe sends its head in the first packet after the TCP handshake, one round trip after its
# connect: 1 s is generous for that, and a connection that sends nothing gives its place back
# within 1 s (a trickled head does not extend it).
HEAD_TIMEOUT = 1.0
# From the answer to the close: the answer (~150 bytes) goes into the socket's send buffer at
# once, then what the client still sends (a body, the rest of an oversized head) is read and
# dropped for up to this long / this much, so closing does not reset the connection before the
# client has read the answer (a "lingering close", as Apache and nginx do).
LINGER_TIMEOUT = 0.5
LINGER_MAX_BYTES = 65536
LINGER_RECV_SIZE = 16384
# Connections held at once. An idle one costs a descriptor and a small object (no buffer until
# bytes arrive), so 512 is cheap, far beyond what the platform's probes need (one every few
# seconds), and under the usual descriptor limit of 1024 (see connection_cap). The cap only
# matters against a flood: the oldest connection still waiting for its head makes room.
MAX_CONNECTIONS = 512
# A connection is not dropped to make room until it has been held this long; while all held are
# younger, newcomers wait in the listen queue. Without it, a flood that reconnects each dropped
# connection at once turns the cap over every millisecond or so, and a probe accepted a moment
# before its head arrives (the head follows the handshake; a busy client takes a few ms to send
# it) is pushed out unanswered. 50 ms is ten times the longest such delay seen on a loaded
# 2-core machine, and well under HEAD_TIMEOUT. The price, only at the cap: a flood turns over at
# most MAX_CONNECTIONS / MIN_HOLD connections a second, so a probe waits in the listen queue
# behind at most LISTEN_BACKLOG others, LISTEN_BACKLOG / MAX_CONNECTIONS * MIN_HOLD = 0.1 s.
MIN_HOLD = 0.05
# Descriptors kept apart from the connections: stdio, the listener, the selector, the gateway
# check's socket, the state file while it is read, and spares.
FD_RESERVE = 16
# Connections accepted per wake-up: a burst is taken in rounds, with the heads received meanwhile
# read in between (each round serves the readable connections first, then accepts).
ACCEPT_BATCH = 64
# No descriptor left (EMFILE/ENFILE) and nothing of ours that may make room (see _victim): stop
# accepting for this long.
ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Connections waiting to be accepted; a flood's reconnects come in bursts (all the connections
# dropped at one head deadline reconnect together), and a full queue drops a probe's SYN (its
# client resends it 1 s later). The kernel caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """`limit`, lowered to fit the process's descriptor limit (less FD_RESERVE)."""
    try:
        import resource
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return limit
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(1, min(limit, soft - FD_RESERVE))


def render(status: int, body: bytes, head_only: bool, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS[status]}", "Connection: close",
             "Cache-Control: no-store"]
    if status != 204:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if extra:
        lines.append(extra)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 204 else head + body


def head_end(buf: bytes, start: int) -> int:
    """Offset just past the blank line ending a head in buf (searched from `start`), or -1."""
    i = buf.find(b"\r\n\r\n", start)
    j = buf.find(b"\n\n", start)
    if i < 0:
        return j + 2 if j >= 0 else -1
    return i + 4 if j < 0 or i < j else j + 2


class _Conn:
    """One client connection: its socket, the head read so far, its deadline and phase."""

    __slots__ = ("sock", "fd", "buf", "deadline", "phase", "out", "dropped", "head_only")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.deadline = deadline
        self.phase = _HEAD
        self.out = b""
        self.dropped = 0
        self.head_only = False


# phases of a connection
_HEAD = "head"          # waiting for its request head (self.waiting, accept order)
_CHECK = "check"        # head read, waiting for the gateway check (self.parked)
_WRITE = "write"        # answering (self.closing, answer order)
_LINGER = "linger"      # answer sent, write side shut: dropping what the client sends
_CLOSED = "closed"


class HealthServer:
    """The probe server's loop. Every connection is in one of three dicts, each in deadline
    order (all in it got the same timeout, in the order they are in): waiting (for a head),
    parked (for the gateway check) and closing (answer and linger)."""

    def __init__(self, listener: socket.socket, prober: Prober,
                 max_connections: int | None = None, clock=time.monotonic):
        self.listener = listener
        self.prober = prober
        self.max_connections = max_connections or connection_cap()
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self.waiting: dict[int, _Conn] = {}
        self.parked: dict[int, _Conn] = {}
        self.closing: dict[int, _Conn] = {}
        self.dropped_at_cap = 0      # connections closed to make room for a newer one
        self._check: tuple[socket.socket, tuple[int, int, int], float] | None = None
        self._accept_paused_until: float | None = None   # out of descriptors: retry then
        self.accepting = True           # the listener is registered (see _gate_accepts)
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, self._accept)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._woken)

    # -- the loop --
    def run(self) -> None:
        """Serve until stop() (or an exception, e.g. SystemExit from a signal handler)."""
        try:
            while not self._stopping:
                events = self.sel.select(self._timeout(self.clock()))
                # Connections first (a head that came is read before any newcomer may push its
                # connection out), then the listener, the gateway check and the wake-up.
                others = []
                for key, _mask in events:
                    data = key.data
                    if type(data) is _Conn:
                        if data.phase is not _CLOSED:   # closed earlier in this round
                            self._on_conn(data)
                    else:
                        others.append(data)
                for callback in others:
                    callback()
                now = self.clock()
                self._expire(now)
                self._gate_accepts(now)
        finally:
            self.close()

    def stop(self) -> None:
        """Make run() return (from another thread)."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        for table in (self.waiting, self.parked, self.closing):
            for conn in list(table.values()):
                self._drop(conn)
        if self._check is not None:
            self._check[0].close()
            self._check = None
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _woken(self) -> None:
        try:
            self._wake_r.recv(64)
        except OSError:
            pass

    def _timeout(self, now: float) -> float | None:
        deadlines = [next(iter(t.values())).deadline
                     for t in (self.waiting, self.closing) if t]
        if self._check is not None:
            deadlines.append(self._check[2])
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        elif not self.accepting and self.waiting:     # at the cap: until one may make room
            deadlines.append(self._evictable_at(next(iter(self.waiting.values()))))
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _expire(self, now: float) -> None:
        for table in (self.waiting, self.closing):
            while table:
                conn = next(iter(table.values()))
                if conn.deadline > now:
                    break
                self._drop(conn)
        if self._check is not None and now >= self._check[2]:
            self._check_done(False)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None

    def _gate_accepts(self, now: float) -> None:
        """Listen while a newcomer can be held: below the cap, or at it with a connection that
        may make room; otherwise newcomers wait in the listen queue, in their order."""
        waiting = self.waiting
        want = self._accept_paused_until is None and (
            self._count() < self.max_connections or bool(self.closing)
            or (bool(waiting) and self._evictable_at(next(iter(waiting.values()))) <= now))
        if want is self.accepting:
            return
        if want:
            self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        else:
            self.sel.unregister(self.listener)
        self.accepting = want

    # -- connections --
    def _count(self) -> int:
        return len(self.waiting) + len(self.parked) + len(self.closing)

    @staticmethod
    def _evictable_at(conn: _Conn) -> float:
        """When a connection waiting for its head may be dropped to make room (MIN_HOLD after
        its accept; its deadline is HEAD_TIMEOUT after it)."""
        return conn.deadline - HEAD_TIMEOUT + MIN_HOLD

    def _victim(self, now: float) -> _Conn | None:
        """At the cap: the connection to drop for a newcomer. The oldest one still waiting for
        its head, once held MIN_HOLD (its socket read once more first: a head that came since
        the select is answered, not dropped); else the oldest answered one (its answer is in
        the socket's send buffer, only the lingering is cut short). Parked ones (a probe
        waiting for the gateway check) are never dropped. None: nothing may go yet, or a read
        made room."""
        while self.waiting:
            conn = next(iter(self.waiting.values()))
            if self._evictable_at(conn) > now:
                break
            self._read_head(conn)
            if conn.phase is _HEAD:
                return conn
            if self._count() < self.max_connections:
                return None
        if self.closing:
            return next(iter(self.closing.values()))
        return None

    def _accept(self) -> None:
        now = self.clock()
        for _ in range(ACCEPT_BATCH):
            victim = None
            if self._count() >= self.max_connections:
                victim = self._victim(now)
                if victim is None and self._count() >= self.max_connections:
                    return      # held at the cap until one may go (see _gate_accepts)
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    victim = victim or self._victim(now)
                    if victim is not None:
                        self._drop(victim)
                        self.dropped_at_cap += 1
                    else:
                        self._accept_paused_until = now + ACCEPT_RETRY_DELAY
                return
            if victim is not None:      # dropped only now that a newcomer takes its place
                self._drop(victim)
                self.dropped_at_cap += 1
            try:
                sock.setblocking(False)
                conn = _Conn(sock, self.clock() + HEAD_TIMEOUT)
                self.sel.register(sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                sock.close()
                continue
            self.waiting[conn.fd] = conn
            self._read_head(conn)       # a probe's head is often there already: answered now

    def _drop(self, conn: _Conn) -> None:
        phase = conn.phase
        if phase is _CLOSED:
            return
        conn.phase = _CLOSED
        table = self.waiting if phase is _HEAD else self.parked if phase is _CHECK \
            else self.closing
        table.pop(conn.fd, None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _on_conn(self, conn: _Conn) -> None:
        phase = conn.phase
        if phase is _HEAD:
            self._read_head(conn)
        elif phase is _WRITE:
            self._write(conn)
        elif phase is _LINGER:
            self._linger(conn)
        # _CHECK: registered for nothing (see _park)

    def _read_head(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not chunk:                 # the client gave up before its head was complete
            self._drop(conn)
            return
        start = max(0, len(conn.buf) - 3)
        buf = conn.buf = conn.buf + chunk
        end = head_end(buf, start)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                conn.buf = b""
                self._answer(conn, render(431, b'{"error":"request head too large"}', False))
            return
        head = buf[:end]
        conn.buf = b""
        request_line = head.split(b"\n", 1)[0].strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(conn, render(400, b'{"error":"bad request"}', False))
        elif parts[0] in (b"GET", b"HEAD"):
            conn.head_only = parts[0] == b"HEAD"
            status, body = self.prober.answer(self.clock())
            if status is None:
                self._park(conn, body)
            else:
                self._answer(conn, render(status, body, conn.head_only))
        else:
            self._answer(conn, render(405, b'{"error":"method not allowed"}', False,
                                      "Allow: GET, HEAD"))

    def _answer(self, conn: _Conn, response: bytes) -> None:
        table = self.waiting if conn.phase is _HEAD else self.parked
        table.pop(conn.fd, None)
        conn.phase = _WRITE
        conn.out = response
        conn.deadline = self.clock() + LINGER_TIMEOUT
        self.closing[conn.fd] = conn
        self._write(conn, waited=False)

    def _write(self, conn: _Conn, waited: bool = True) -> None:
        """Send the answer; once it is all out, shut the write side and linger. `waited`: the
        socket is registered for writability (it had to wait), else for reading."""
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[n:]
        try:
            if conn.out:                 # the send buffer is full: wait until writable
                if not waited:
                    self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
                return
            conn.sock.shutdown(socket.SHUT_WR)
            conn.phase = _LINGER
            if waited:
                self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        except OSError:
            self._drop(conn)

    def _linger(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(LINGER_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        conn.dropped += len(chunk)
        if not chunk or conn.dropped > LINGER_MAX_BYTES:
            self._drop(conn)

    # -- the gateway check --
    def _park(self, conn: _Conn, version: tuple[int, int, int]) -> None:
        """Wait for the gateway check (started now unless one runs); no reading meanwhile."""
        self.waiting.pop(conn.fd, None)
        conn.phase = _CHECK
        self.parked[conn.fd] = conn
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if self._check is None:
            self._start_check(version)

    def _start_check(self, version: tuple[int, int, int]) -> None:
        try:
            family, address = self.prober.address()
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            self._check_finished(version, False)
            return
        sock.setblocking(False)
        try:
            err = sock.connect_ex(address)
        except OSError:
            err = errno.ECONNREFUSED
        if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            deadline = self.clock() + self.prober.connect_timeout
            self._check = (sock, version, deadline)
            self.sel.register(sock, selectors.EVENT_WRITE, self._check_ready)
            return
        sock.close()
        self._check_finished(version, err == 0)

    def _check_ready(self) -> None:
        sock = self._check[0]
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = -1
        self._check_done(err == 0)

    def _check_done(self, ok: bool) -> None:
        sock, version, _deadline = self._check
        self._check = None
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self._check_finished(version, ok)

    def _check_finished(self, version: tuple[int, int, int], ok: bool) -> None:
        self.prober.record(self.clock(), version, ok)
        status, body = self.prober.gateway_answer(ok)
        for conn in list(self.parked.values()):
            try:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError, KeyError):
                self._drop(conn)
                continue
            self._answer(conn, render(status, body, conn.head_only))
