"""Socket transports and a listener for the gateway's connections, lighter than asyncio's.

asyncio's selector transports cost, per connection, a task and a future to accept it (or to
connect it), three call_soon round trips to start it and one to end it, and a few Python calls per
read. Case (c) of the benchmarks (thousands of streams, each on a new client connection and a new
llama-server connection) spent about half of the gateway's Python time in that machinery.

SocketTransport is an asyncio.Transport over a non-blocking stream socket, driven by the loop's
add_reader/add_writer (public API). It keeps asyncio's contract for what the gateway uses:
- connection_made is called synchronously by start(); connection_lost always comes later, from
  the loop (call_soon), never from inside a write() or close() call, exactly once;
- data_received gets a bytes copy of each read (recvbuf's per-thread buffer, no fresh 256 KiB
  allocation per read); eof_received returning true keeps the write side open (half-close);
- write() sends at once when nothing is queued, queues the rest and writes it when the socket is
  writable; pause_writing/resume_writing at the high/low water marks (asyncio's defaults);
- pause_reading/resume_reading; close() lets queued data go out first, abort() drops it;
- linger_on_close() makes the close a lingering one (RFC 9112 9.6, see LINGER_TIMEOUT): after an
  error answer that ends the connection, the client still sending reads the answer, not a reset;
- an exception escaping a protocol callback is logged and the connection aborted (as asyncio).

Listener accepts on a listening socket from the loop's reader callback, up to ACCEPT_BATCH per
wake-up (a burst whole); with no descriptors left (EMFILE/ENFILE) it stops accepting for
ACCEPT_RETRY_DELAY s, as asyncio's server does, instead of spinning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import weakref

from llamagw.net.recvbuf import thread_buffer

log = logging.getLogger("gateway.io")

# asyncio's defaults: pause the protocol past 64 KiB queued, resume at a quarter of that.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = WRITE_HIGH_WATER // 4
# Connections accepted per wake-up of the listener: a burst is taken whole, in one go. Its
# requests are then read and sent on together in the next loop iterations, and the events of
# the streams already running, read less often meanwhile, come several to a read. Taken 64 at a
# time instead, a burst of 1,000 new streams (bench case c) alternated 16 accept rounds with the
# relaying: the last stream's first byte came 240-390 ms after its connect, against 170-220 ms
# taken whole. The bound is how long one wake-up may hold the loop: an accept costs about
# 26 us here (socket, transport, registration) plus the protocol's set-up, so ~35 ms at most.
ACCEPT_BATCH = 1024
# No file descriptor left (EMFILE/ENFILE) or no kernel memory: stop accepting for this long
# (asyncio's server waits 1 s too); the pending connections wait in the backlog meanwhile.
ACCEPT_RETRY_DELAY = 1.0
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A lingering close (linger_on_close, for an error answer that ends the connection: a 408 at a
# deadline, a 400, a 413; RFC 9112 9.6): once the answer is out and connection_lost called, the
# write side is shut (the client reads the answer, then its end-of-stream), and what the client
# still sends is read and dropped until its end-of-stream, LINGER_MAX_BYTES or LINGER_TIMEOUT,
# whichever comes first; then the socket closes. Closed at once with bytes of the client unread
# (sent after the last read: a client trickling a head or body at the deadline), the socket sends
# a reset instead of the end-of-stream: the client reads ECONNRESET after the answer, and one that
# had not taken the answer from its buffer yet loses it (asyncio's StreamReader raises the error
# first): 5 of 120 runs of the gateway's 408 tests on a loaded machine, none since. The client has
# the answer and the end-of-stream within one round trip; 1 s covers any client that reads while
# it sends, and holds a descriptor for a short time only (as app.py's over-capacity refusals).
LINGER_TIMEOUT = 1.0
# A request head and a small body; a client that keeps sending is not reading the answer anyway.
LINGER_MAX_BYTES = 64 * 1024
# Lingering closes at once on one event loop: past it a close is plain (a client still sending
# may see a reset). Each holds a descriptor for LINGER_TIMEOUT at most, beyond MAX_CONNECTIONS.
MAX_LINGERING = 256
# Errors that only say the peer went away: no log line.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class SocketTransport(asyncio.Transport):
    __slots__ = ("_loop", "_sock", "_fd", "_protocol", "_buffer", "_closing", "_lost",
                 "_paused", "_eof", "_protocol_paused", "_view", "_linger")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.BaseProtocol, extra: dict | None = None):
        super().__init__(extra)
        self._extra.setdefault("socket", sock)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()
        self._closing = False      # close() or abort() called: reading stopped
        self._lost = False         # connection_lost scheduled
        self._paused = False       # pause_reading
        self._eof = False          # the peer's EOF seen: no more reading
        self._protocol_paused = False
        self._view = thread_buffer()   # this thread's receive buffer (recvbuf)
        self._linger = False       # linger_on_close: close() ends in a lingering close

    def start(self) -> None:
        """connection_made, then reading starts (unless the protocol closed or paused us). Called
        once, right after construction: nothing else can reach the transport before."""
        try:
            self._protocol.connection_made(self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "connection_made")
            return
        if not self._closing and not self._paused:
            self._loop.add_reader(self._fd, self._read_ready)

    # ---------------- reading ----------------
    def _read_ready(self) -> None:
        if self._closing:
            return
        view = self._view
        try:
            n = self._sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "recv")
            return
        protocol = self._protocol
        if n:
            try:
                # Copied out at once: the buffer is the next read's, on whichever connection.
                protocol.data_received(view[:n].tobytes())
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal(exc, "data_received")
            return
        self._eof = True
        self._loop.remove_reader(self._fd)
        try:
            keep_open = protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "eof_received")
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        if not self._eof:
            self._loop.remove_reader(self._fd)
        self._paused = True

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        if not self._eof:
            self._loop.add_reader(self._fd, self._read_ready)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing and not self._eof

    # ---------------- writing ----------------
    def write(self, data) -> None:
        if self._lost or not data:
            return
        if not self._buffer:
            try:
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal(exc, "send")
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._write_ready)
        self._buffer += data
        if not self._protocol_paused and len(self._buffer) > WRITE_HIGH_WATER:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _write_ready(self) -> None:
        if self._lost:
            return
        buffer = self._buffer
        try:
            n = self._sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, "send")
            return
        del buffer[:n]
        if self._protocol_paused and len(buffer) <= WRITE_LOW_WATER:
            self._protocol_paused = False
            self._call_protocol("resume_writing")
        if not buffer:
            self._loop.remove_writer(self._fd)
            if self._closing and not self._lost:
                self._schedule_lost(None)

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc, name)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    # ---------------- closing ----------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the queued data goes out, then the connection is lost."""
        if self._closing:
            return
        self._stop_reading()
        if not self._buffer:
            self._schedule_lost(None)

    def abort(self) -> None:
        """Close now; queued data is dropped."""
        self._force_close(None)

    def linger_on_close(self) -> None:
        """Make the close (close(), not abort() nor a failure) a lingering close: see
        LINGER_TIMEOUT. Nothing changes for the protocol: connection_lost comes once the queued
        data is out, as always; the socket then lingers on its own."""
        self._linger = True

    def _fatal(self, exc: BaseException, where: str) -> None:
        if isinstance(exc, _PEER_GONE):
            log.debug("connection %s: %r", where, exc)
        else:
            log.error("connection failed in %s", where, exc_info=exc)
        self._force_close(exc if isinstance(exc, Exception) else None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._linger = False
        if self._buffer:
            self._buffer.clear()
            self._loop.remove_writer(self._fd)
        if not self._closing:
            self._stop_reading()
        self._schedule_lost(exc)

    def _stop_reading(self) -> None:
        self._closing = True
        if not self._eof and not self._paused:
            self._loop.remove_reader(self._fd)

    def _schedule_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = None
            if self._linger and not self._eof:
                _Linger.start(self._loop, self._sock)
            else:
                self._sock.close()


class _Linger:
    """A socket in its lingering close (SocketTransport.linger_on_close): write side shut, what
    the peer sends read and dropped until its end-of-stream, LINGER_MAX_BYTES or LINGER_TIMEOUT;
    then closed."""

    __slots__ = ("_loop", "_sock", "_fd", "_left", "_timer")

    @staticmethod
    def start(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        if _lingering.get(loop, 0) >= MAX_LINGERING:
            sock.close()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:             # the peer is gone already
            sock.close()
            return
        _Linger(loop, sock)

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket):
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._left = LINGER_MAX_BYTES
        _lingering[loop] = _lingering.get(loop, 0) + 1
        loop.add_reader(self._fd, self._read_ready)
        self._timer = loop.call_later(LINGER_TIMEOUT, self._end)

    def _read_ready(self) -> None:
        view = thread_buffer()
        try:
            n = self._sock.recv_into(view, min(self._left, len(view)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:            # a reset: the peer is gone
            n = 0
        self._left -= n
        if n == 0 or self._left <= 0:
            self._end()

    def _end(self) -> None:
        if self._sock is None:
            return
        self._timer.cancel()
        self._loop.remove_reader(self._fd)
        self._sock.close()
        self._sock = None
        _lingering[self._loop] -= 1


# Lingering closes per event loop, each loop's bounded by MAX_LINGERING. Per loop: a loop closed
# while some lingered (a test's) leaves them out of the next one's count.
_lingering: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int]" = (
    weakref.WeakKeyDictionary())


def lingering_closes(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Sockets of `loop` (default: the running one) in their lingering close now."""
    return _lingering.get(loop or asyncio.get_running_loop(), 0)


def linger_on_close(transport: asyncio.BaseTransport) -> None:
    """transport.linger_on_close() for a SocketTransport; any other transport closes as it does."""
    if type(transport) is SocketTransport:
        transport.linger_on_close()


class Listener:
    """Accepts connections on a bound stream socket; each gets a SocketTransport and a protocol
    from protocol_factory(). TCP connections get TCP_NODELAY (small writes go out at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory,
                 backlog: int):
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        sock.listen(backlog)
        loop.add_reader(sock.fileno(), self._accept_ready)

    @property
    def sockets(self) -> list[socket.socket]:
        return [] if self._closed else [self._sock]

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    log.error("accept failed (%s); accepting again in %.1f s",
                              exc.strerror, ACCEPT_RETRY_DELAY)
                    self._loop.remove_reader(self._sock.fileno())
                    self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                    return
                raise
            self._start(conn, addr)

    def _start(self, conn: socket.socket, addr) -> None:
        try:
            conn.setblocking(False)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = self._factory()
        except Exception:
            log.exception("could not set up an accepted connection")
            conn.close()
            return
        SocketTransport(self._loop, conn, protocol, {"peername": addr}).start()

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def close(self) -> None:
        """Stop accepting (connections already accepted are not touched)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def start_connection(loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol,
                     peername="") -> SocketTransport:
    """A connected non-blocking socket -> a started SocketTransport (connection_made called)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = SocketTransport(loop, sock, protocol, {"peername": peername})
    transport.start()
    return transport
