"""Keep-alive connections to llama-server: connect, pool, reuse, discard.

An UpstreamConnection is an asyncio Protocol. It parses the response with http11.ResponseParser in
data_received and hands each event to the current exchange's sink synchronously, so relaying a
streamed body costs no task switch per chunk. Flow control goes both ways: the sink may pause this
connection's reading (slow client), and the pool never hands out a connection that is closing.

Stale connections: llama-server closes keep-alive connections idle for about 5 s. A pooled
connection idle longer than IDLE_TTL is closed instead of reused, and the proxy retries once on a
fresh connection when a reused one dies before any response byte arrived.

Connect storms: at most MAX_CONNECTING connects are in flight per pool; further ones wait in FIFO
order, and the connect deadline covers the wait and the connect together.

Transport: TCP to host:port, or a Unix stream socket (unix_path; what entrypoint.sh wires by
default). A send and its receive on a Unix socket cost about a third of loopback TCP's CPU (no
TCP/IP stack, no ACKs, no handshake, no TIME_WAIT; 2.6 vs 7.7 us measured for 300 bytes), and
only processes the socket file's permissions allow can reach llama-server. A full listen backlog
answers a Unix connect with EAGAIN at once (TCP would drop the SYN and retry after 1 s): the
connect is retried after UNIX_RETRY_FIRST s, doubling up to UNIX_RETRY_MAX s, until the connect
deadline.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time

from llamagw.net import fastio
from llamagw.wire import http11

# Client request headers passed to llama-server. Everything else is dropped: hop-by-hop headers,
# Authorization / X-Api-Key (our keys, not llama-server's), X-Conversation-Id (lets recent
# llama-server builds keep generating after a disconnect), client-sent X-Forwarded-*.
UPSTREAM_HEADERS = frozenset({"content-type", "accept", "user-agent"})


def build_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                  host: str, peer: str, request_id: str) -> bytes:
    out = [(name, value) for name, value in headers if name in UPSTREAM_HEADERS]
    out.append(("host", host))
    out.append(("x-forwarded-for", peer))
    out.append(("x-request-id", request_id))
    if method == "POST" or body:
        out.append(("content-length", str(len(body))))
    return http11.request_head(method, path, out) + body


# llama-server (cpp-httplib) closes idle keep-alive connections after ~5 s; stay well below.
IDLE_TTL = 3.0
# Idle connections kept per pool: enough for the concurrency llama-server serves (-np slots);
# more would only hold sockets that go stale.
MAX_IDLE = 64
# Connects in flight per pool. Thousands of streams starting at once (bench case c: 10,000)
# overflowed llama-server's listen backlog and the SYN retries ran past the connect deadline
# (504s). llama-server sets CPPHTTPLIB_LISTEN_BACKLOG to 512 (cpp-httplib's default is 5); 64
# in flight stays well inside it while a burst still connects in a few round trips.
MAX_CONNECTING = 64
# Unix socket, full backlog (EAGAIN): first retry after 1 ms (llama-server's accept thread drains
# its backlog in microseconds), doubling to 50 ms so a stalled server costs few wake-ups; the
# connect deadline (BACKEND_CONNECT_TIMEOUT) bounds the whole.
UNIX_RETRY_FIRST = 0.001
UNIX_RETRY_MAX = 0.05


class UpstreamClosed(Exception):
    """The connection closed before the response was complete."""

    def __init__(self, message: str, got_bytes: bool):
        super().__init__(message)
        self.got_bytes = got_bytes


class Sink:
    """What an exchange implements to receive the response events."""

    # True while the sink takes whole canonical chunks as they came (on_chunks) instead of
    # one on_data per chunk: for a chunked relay that would frame each chunk the same way.
    bulk = False

    def on_head(self, response: http11.Response) -> None: ...
    def on_data(self, data: bytes) -> None: ...
    def on_chunks(self, framed: bytes, spans: list[int], size: int) -> None: ...   # take_chunks()
    def on_end(self) -> None: ...
    def on_error(self, exc: BaseException) -> None: ...
    def flush(self) -> None: ...   # end of one read: write out what its events produced


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "sink", "closed", "last_used", "got_bytes",
                 "reused")

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: http11.ResponseParser | None = None
        self.sink: Sink | None = None
        self.closed = False
        self.last_used = 0.0
        self.got_bytes = False
        self.reused = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        parser = self.parser
        if sink is None or parser is None:
            # Bytes while idle in the pool: llama-server never does that; the connection is unusable.
            self.abort()
            return
        self.got_bytes = True
        try:
            if sink.bulk:
                # A stream's usual read: whole chunks, taken from data without a copy; with
                # nothing left over there is nothing more to parse until the next read.
                chunks = parser.feed_chunks(data)
                if chunks is not None:
                    sink.on_chunks(*chunks)
                    if self.sink is not sink or not parser.has_buffered:
                        return
            else:
                parser.feed(data)
            self._relay(sink, parser)
        finally:
            sink.flush()

    def _relay(self, sink: Sink, parser: http11.ResponseParser, at_eof: bool = False) -> None:
        """Hand the parser's events to the sink until it needs more bytes or the response ends.
        At EOF a protocol error (an unfinished response) is left to connection_lost, which tells
        the sink whether any byte had arrived (a stale pooled connection is then retried)."""
        try:
            while True:
                if sink.bulk:
                    chunks = parser.take_chunks()
                    if chunks is not None:
                        sink.on_chunks(*chunks)
                        if self.sink is not sink:
                            return
                event = parser.next_event()
                if event is http11.NEED_DATA:
                    return
                if type(event) is http11.Data:
                    sink.on_data(event.data)
                elif type(event) is http11.Response:
                    sink.on_head(event)
                    if self.sink is not sink:
                        return
                    body = parser.take_whole_body()    # a small answer, all in this read
                    if body is not None:
                        if body:
                            sink.on_data(body)
                            if self.sink is not sink:
                                return
                        self._end(sink, parser)
                        return
                else:  # EndOfMessage
                    self._end(sink, parser)
                    return
                if self.sink is not sink:   # the sink detached (abort) while handling the event
                    return
        except http11.ProtocolError as exc:
            if at_eof:
                return
            self.sink = None
            self.abort()
            sink.on_error(exc)

    def _end(self, sink: Sink, parser: http11.ResponseParser) -> None:
        self.sink = None
        self.parser = None
        if parser.has_buffered:
            # Bytes past the end of the response: llama-server never sends them; the stream
            # is out of step, so the connection is closed instead of pooled.
            self.abort()
        sink.on_end()

    def eof_received(self):
        sink = self.sink
        parser = self.parser
        if sink is not None and parser is not None:
            # Close-delimited body ends at EOF; anything else is an unfinished response.
            parser.feed_eof()
            try:
                self._relay(sink, parser, at_eof=True)
            finally:
                sink.flush()
        return False  # close the transport

    def connection_lost(self, exc):
        self.closed = True
        self.pool._forget(self)
        sink = self.sink
        self.sink = None
        if sink is not None:
            sink.on_error(UpstreamClosed("llama-server closed the connection", self.got_bytes))

    # --- used by the proxy ---
    def start(self, sink: Sink, method: str, payload: bytes) -> None:
        """Send one request (head and body in one write) and route the response to sink."""
        self.sink = sink
        self.parser = http11.ResponseParser(method)
        self.got_bytes = False
        self.transport.write(payload)

    def detach(self) -> None:
        """The exchange no longer wants events (it is aborting)."""
        self.sink = None

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close at once (RST): llama-server sees the disconnect and frees its slot."""
        if not self.closed:
            self.closed = True
            self.transport.abort()


def _ip_literal(host: str, port: int) -> list | None:
    """getaddrinfo's answer for an IP address literal, or None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    return None


class UpstreamPool:
    def __init__(self, host: str, port: int, connect_timeout: float, *,
                 unix_path: str = "", idle_ttl: float = IDLE_TTL, max_idle: int = MAX_IDLE,
                 max_connecting: int = MAX_CONNECTING, clock=time.monotonic):
        self.host = host
        self.port = port
        self.unix_path = unix_path     # non-empty: connect there instead of host:port
        self.connect_timeout = connect_timeout
        self.idle_ttl = idle_ttl
        self.max_idle = max_idle
        self.clock = clock
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._all: set[UpstreamConnection] = set()
        self.max_connecting = max_connecting
        self._connecting = 0
        self._connect_waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A usable connection: the most recently used idle one, or a new one.

        Raises ConnectionRefusedError/OSError (502) or TimeoutError (504)."""
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        async with asyncio.timeout(self.connect_timeout):   # the queue wait included
            await self._connect_slot()
            try:
                conn = await self._open()
            finally:
                self._connect_done()
        self._all.add(conn)
        return conn

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still fresh (LIFO: the warmest), or None.
        No await: reusing a pooled connection costs no coroutine."""
        idle = self._idle
        if not idle:
            return None
        now = self.clock()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.last_used > self.idle_ttl:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def connect_now(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection | None:
        """A new connection to llama-server's Unix socket, made without waiting (a Unix connect
        completes at once or fails), or None: TCP, connects already waiting for a place, a full
        backlog, or any error. The caller then uses acquire(), which waits its turn, retries and
        reports errors. Saves a task and its wake-ups per new connection (bench case c)."""
        if not self.unix_path or self._connect_waiters or self._connecting >= self.max_connecting:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            return None
        conn = UpstreamConnection(self)
        fastio.start_connection(loop, sock, conn, self.address)
        self._all.add(conn)
        return conn

    @property
    def address(self) -> str:
        """Where llama-server is, for logs and errors."""
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    async def _open(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        if self.unix_path:
            sock = await self._connect_unix()
        else:
            sock = await self._connect_tcp(loop)
        conn = UpstreamConnection(self)
        fastio.start_connection(loop, sock, conn, self.address)
        return conn

    async def _connect_tcp(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """A connected TCP socket to host:port (the first address that answers)."""
        infos = _ip_literal(self.host, self.port)   # no resolver round trip for an address
        if infos is None:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"no address for {self.host}")
        last: OSError | None = None
        for family, type_, proto, _name, addr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last

    async def _connect_unix(self) -> socket.socket:
        """A connected Unix stream socket. A Unix connect never waits (no EINPROGRESS): it
        succeeds, fails (no socket file: FileNotFoundError; nobody listening:
        ConnectionRefusedError), or finds the backlog full (EAGAIN), which is retried with
        backoff; the caller's deadline bounds the retries."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            delay = UNIX_RETRY_FIRST
            while True:
                try:
                    sock.connect(self.unix_path)
                    return sock
                except BlockingIOError:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, UNIX_RETRY_MAX)
        except BaseException:
            sock.close()
            raise

    async def _connect_slot(self) -> None:
        """One of max_connecting places; FIFO after those already waiting."""
        if self._connecting < self.max_connecting and not self._connect_waiters:
            self._connecting += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._connect_waiters.append(waiter)
        try:
            await waiter          # _connect_done hands its place over (counted for us)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._connect_done()          # handed over, then cancelled: pass it on
            else:
                try:
                    self._connect_waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def _connect_done(self) -> None:
        waiters = self._connect_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)       # the place goes to the next waiter
                return
        self._connecting -= 1

    @property
    def connecting(self) -> int:
        """Connects in flight (places taken)."""
        return self._connecting

    @property
    def connect_waiting(self) -> int:
        return len(self._connect_waiters)

    def release(self, conn: UpstreamConnection, keep_alive: bool) -> None:
        """The response is complete: pool the connection if it can serve another request."""
        if conn.closed or not keep_alive or conn.sink is not None:
            conn.abort()
            return
        conn.transport.resume_reading()
        conn.last_used = self.clock()
        self._idle.append(conn)
        while len(self._idle) > self.max_idle:
            self._idle.popleft().abort()

    def _forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        # An idle connection closed by llama-server leaves the deque lazily (checked on acquire).

    @property
    def idle_count(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    @property
    def open_count(self) -> int:
        return len(self._all)

    def close(self) -> None:
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
