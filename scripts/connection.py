"""One client connection: deadlines, keep-alive, pipelining, dispatch, close.

ClientConnection is an asyncio Protocol that feeds every received byte to a sans-IO RequestParser;
one coroutine per connection (run) takes requests off the parser in order, so pipelined requests
are answered in order. The transport's flow-control callbacks (pause_writing / resume_writing) and
connection_lost are forwarded to the proxy exchange in flight, which is how a slow reader slows
llama-server and a vanished client closes the upstream socket at once.

A client that closes or half-closes (EOF) while its API request waits in the queue or is being
answered is treated as gone (as nginx does): the request never reaches llama-server, or its
upstream socket is closed so the generation stops. Local answers (/ping, /health) still go out.

Deadlines (config):
- CLIENT_HEADER_TIMEOUT: from the first byte of a request head to its end (trickling bytes do not
  reset it): expiry 408, close. It is also the wait for the first byte on a new connection: a
  connection that sends nothing is closed silently.
- CLIENT_BODY_TIMEOUT (whole body) and CLIENT_BODY_IDLE_TIMEOUT (between body bytes): 408, close.
- KEEPALIVE_TIMEOUT: idle time between requests; expiry closes silently.
- CLIENT_WRITE_TIMEOUT: a response the client does not read for this long is dropped (proxy).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time

import http11
import proxy
import routes
from errors import GatewayError, ProtocolError
from ollama_api import error_body as ollama_error_body

log = logging.getLogger("gateway")

# Pipelined bytes buffered while a request is in flight before reading pauses. Clients rarely
# pipeline; this bounds memory per connection without blocking disconnect detection in practice.
MAX_PIPELINED_BYTES = 256 * 1024
# A client-provided X-Request-Id is kept only if it looks like an id (no log injection).
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Our request ids: a random per-process prefix (8 bytes from secrets, drawn once: not guessable,
# distinct across processes and restarts) and a counter (unique within the process). A
# secrets call per request cost ~9% of the gateway's CPU on small requests (bench case a).
REQUEST_ID_PREFIX_BYTES = 8
_RID_PREFIX = secrets.token_hex(REQUEST_ID_PREFIX_BYTES)
_rid_counter = itertools.count(1)
# A wait's timer may fire this early (the loop runs timers due within its clock resolution);
# closer than this to the deadline counts as expired.
DEADLINE_SLACK = 0.001


def new_request_id() -> str:
    """24+ hex digits: the process prefix, then the request counter (at least 8 digits)."""
    return f"{_RID_PREFIX}{next(_rid_counter):08x}"


class RequestContext:
    """What one request did: filled in along the way, read by the access log and metrics."""

    __slots__ = ("request_id", "key_id", "client", "method", "path", "route", "status",
                 "bytes_in", "bytes_out", "started", "ttfb", "duration", "stream", "outcome",
                 "prompt_tokens", "completion_tokens", "response_headers", "upstream_error",
                 "continued", "ollama")

    def __init__(self, client: str, method: str, path: str, request_id: str):
        self.request_id = request_id
        self.key_id = "-"
        self.client = client
        self.method = method
        self.path = path
        self.route = "-"
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()
        self.ttfb: float | None = None
        self.duration = 0.0
        self.stream = False
        self.outcome = ""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.response_headers: list[tuple[str, str]] = []
        self.upstream_error = ""
        self.continued = False     # 100 Continue sent
        self.ollama = False        # errors in Ollama's shape {"error": "..."}


class ClientGone(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    def __init__(self, gw):
        self.gw = gw
        self.parser = http11.RequestParser(gw.config.max_request_body_size)
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # set by connection_made
        self.peer_host = ""
        self.keep_alive = True
        self.gone = False
        self.eof = False
        self.idle = True
        self.write_paused = False
        self.exchange: proxy.Exchange | None = None
        self.task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None
        # One timer per connection for every deadline: the waits (keep-alive, head, body) and
        # the proxy exchange in flight (first byte, stream idle). arm() moves it only to an
        # earlier time; on firing it checks what is due (_deadline while waiting, else the
        # exchange's own deadlines) and re-arms for the rest. A keep-alive connection pushes
        # its deadline forward at every request; a timer per wait and per exchange cost a heap
        # push and a cancel each, per request.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pipelined = 0
        self._reading_paused = False
        # The current request's body is in: bytes arriving now are pipelined requests, bounded
        # by MAX_PIPELINED_BYTES while it is answered (queue wait included).
        self._body_read = False
        self._queued = False      # waiting for a backend slot

    # ---------------- asyncio.Protocol ----------------
    def connection_made(self, transport):
        self.transport = transport
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_host = peer[0] if peer else ""
        self.gw.connections.add(self)
        self.task = self._loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self._body_read:
            self._pipelined += len(data)
            if self._pipelined > MAX_PIPELINED_BYTES and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
        self._wake(True)

    def eof_received(self):
        self.eof = True
        self.parser.feed_eof()
        if self.exchange is not None:
            # Half-close while an answer is being produced: treated as a client that went away
            # (as nginx does), so llama-server stops generating for nobody.
            self.exchange.on_client_gone()
        if self._queued and self.task is not None:
            self.task.cancel()       # the same for a request still waiting in the queue
        self._wake(True)
        return True   # keep the write side open to answer requests already received

    def connection_lost(self, exc):
        self.gone = True
        self.gw.connections.discard(self)
        if self.exchange is not None:
            self.exchange.on_client_gone()
        if self._queued and self.task is not None:
            self.task.cancel()
        self._wake(True)

    def pause_writing(self):
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.on_client_paused()

    def resume_writing(self):
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.on_client_resumed()

    # ---------------- used by the proxy ----------------
    def write(self, data: bytes) -> None:
        if not self.gone:
            self.transport.write(data)

    def close_after_write(self) -> None:
        """No more responses on this connection; the run loop closes it (buffered data is sent)."""
        self.keep_alive = False

    def abort(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.abort()

    # ---------------- waiting ----------------
    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def _wait_data(self, deadline: float) -> bool:
        """Wait for more bytes (True) until the loop-time deadline (False)."""
        if self.gone or self.eof:
            return False
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._deadline = deadline
        self.arm(deadline)
        try:
            return await waiter
        finally:
            self._waiter = None

    def arm(self, when: float) -> None:
        """Make the connection's timer fire no later than loop time `when` (the waits, and the
        exchange's deadlines: its on_deadline re-arms when it is woken early)."""
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._waiter is None:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_deadline()
            return                       # else not waiting now: the next wait arms a timer
        if self._deadline - self._loop.time() > DEADLINE_SLACK:
            self.arm(self._deadline)     # the deadline was pushed forward meanwhile
            return
        self._wake(False)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def wake_if_idle(self) -> None:
        """Shutdown: an idle keep-alive connection stops waiting and closes."""
        if self.idle:
            self._wake(False)

    # ---------------- the connection's life ----------------
    async def run(self) -> None:
        gw = self.gw
        try:
            first = True
            while not self.gone:
                req = await self._next_request(first)
                first = False
                if req is None:
                    break
                await self._handle(req)
                if not self.keep_alive or self.gone:
                    break
        except ProtocolError as err:
            self._send_error_simple(err)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            pass
        except Exception:   # a bug: never leave the socket open
            log.exception("connection handler failed")
        finally:
            self._stop_timer()
            if self.exchange is not None:
                self.exchange.abort()
            if not self.gone and self.transport is not None:
                self.transport.close()
            gw.connections.discard(self)

    async def _next_request(self, first: bool) -> http11.Request | None:
        parser = self.parser
        cfg = self.gw.config
        loop = self._loop
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._pipelined = 0
        self._body_read = False
        event = parser.next_event()
        if event is http11.NEED_DATA:
            if not parser.has_buffered:
                if self.gw.shutting_down:
                    return None
                self.idle = True
                wait = cfg.client_header_timeout if first else cfg.keepalive_timeout
                got = await self._wait_data(loop.time() + wait)
                self.idle = False
                if not got and not parser.has_buffered:
                    return None      # idle timeout, EOF between requests, or shutdown
            deadline = loop.time() + cfg.client_header_timeout
            while (event := parser.next_event()) is http11.NEED_DATA:
                if self.gone or self.eof:
                    return None
                if not await self._wait_data(deadline) and loop.time() >= deadline:
                    raise ProtocolError("Request header not received in time", 408,
                                        "header_timeout")
        self.idle = False
        if type(event) is not http11.Request:   # parser contract: a head comes first
            raise ProtocolError("Unexpected data before a request", 400)
        return event

    def _end_bodiless(self) -> None:
        """A request without a body: take its END_OF_MESSAGE off the parser at once, so the next
        request on the connection parses whatever this one's answer is (errors included)."""
        if type(self.parser.next_event()) is not http11.EndOfMessage:
            raise ProtocolError("Unexpected body framing", 400)
        self._body_read = True

    def _drain_body(self, parts: list[bytes], ctx: RequestContext) -> bool:
        """Take the body pieces already parsed into parts; True once END_OF_MESSAGE is taken."""
        parser = self.parser
        while True:
            event = parser.next_event()
            if type(event) is http11.Data:
                parts.append(event.data)
                ctx.bytes_in += len(event.data)
            elif type(event) is http11.EndOfMessage:
                self._body_read = True
                return True
            else:
                return False

    def _buffered_body(self, req: http11.Request, ctx: RequestContext,
                       parts: list[bytes]) -> bytes | None:
        """The body if it has all arrived already (the usual small POST): no await, no
        coroutine. None when the caller must wait for it (_read_body, which goes on from parts)."""
        if not req.chunked and not req.content_length:
            self._body_read = True
            return b""          # END_OF_MESSAGE already taken by _handle (_end_bodiless)
        if req.expect_continue and not ctx.continued:
            return None         # 100 Continue first (_read_body)
        if not parts:
            body = self.parser.take_whole_body()
            if body is not None:
                ctx.bytes_in += len(body)
                self._body_read = True
                return body
        if not self._drain_body(parts, ctx):
            return None
        return b"".join(parts) if len(parts) != 1 else parts[0]

    async def _read_body(self, req: http11.Request, ctx: RequestContext,
                         parts: list[bytes] | None = None) -> bytes:
        if not req.chunked and not req.content_length:
            self._body_read = True
            return b""          # END_OF_MESSAGE already taken by _handle (_end_bodiless)
        if req.expect_continue and not ctx.continued:
            # Only now, once the request is accepted: a refused one gets its final status
            # instead (RFC 9110 10.1.1), and the client never sends the body.
            ctx.continued = True
            self.write(http11.CONTINUE_100)
        cfg = self.gw.config
        loop = self._loop
        total_deadline = loop.time() + cfg.client_body_timeout
        if parts is None:
            parts = []
        while not self._drain_body(parts, ctx):
            if self.gone:
                raise ClientGone()
            if self.eof:
                # feed_eof makes the parser raise for an incomplete body; be explicit anyway
                raise ProtocolError("Request body incomplete", 400, "incomplete_request")
            deadline = min(loop.time() + cfg.client_body_idle_timeout, total_deadline)
            if not await self._wait_data(deadline) and loop.time() >= deadline:
                raise ProtocolError("Request body not received in time", 408, "body_timeout")
        return b"".join(parts) if len(parts) != 1 else parts[0]

    async def _handle(self, req: http11.Request) -> None:
        gw = self.gw
        rid = req.get("x-request-id")
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            rid = new_request_id()
        ctx = RequestContext(self.peer_host, req.method, req.path, rid)
        ctx.response_headers.append(("x-request-id", rid))
        if not req.keep_alive or gw.shutting_down:
            self.keep_alive = False
        body_done = not (req.chunked or req.content_length)
        gw.in_flight += 1
        try:
            if body_done:
                self._end_bodiless()
            origin = req.get("origin")
            if origin is not None:
                ctx.response_headers.extend(gw.cors.headers_for(origin))
            if req.method == "OPTIONS":
                await self._read_body(req, ctx)      # a preflight body means nothing: drop it
                body_done = True
                self.respond(ctx, req, *gw.cors.preflight(req))
                ctx.outcome = "ok"
                return
            # Ollama clients get Ollama-shaped errors, unknown /api/* paths (404/405) included.
            ctx.ollama = req.path == "/" or req.path.startswith("/api/")
            route = routes.match(req.method, req.path)
            ctx.route = route.name
            ticket = gw.admit(req, route, ctx)       # auth, rate and key concurrency; raises
            try:
                parts: list[bytes] = []
                body = self._buffered_body(req, ctx, parts)
                if body is None:
                    body = await self._read_body(req, ctx, parts)
                body_done = True
                if gw.is_local(route):               # answered here, no backend slot
                    self.respond(ctx, req, *gw.local(route, req, ctx, body))
                    ctx.outcome = "ok"
                    return
                slot = gw.try_backend_slot()          # global limit; raises
                if slot is None:
                    slot = await self._backend_slot(ctx)  # bounded queue; raises
                try:
                    if self.gone or self.eof:
                        raise ClientGone()
                    await gw.dispatch(self, ctx, req, route, body)
                finally:
                    slot.release()
            finally:
                ticket.release()
        except GatewayError as err:
            if not body_done or err.close:
                self.keep_alive = False
            if ctx.status:                     # a head was already sent: nothing more to say
                self.keep_alive = False
            elif not self.gone:
                self._send_error(err, ctx, req)
        except ClientGone:
            ctx.outcome = "client_closed"
            raise
        finally:
            gw.in_flight -= 1
            ctx.duration = time.monotonic() - ctx.started
            if not ctx.outcome:
                ctx.outcome = "client_closed" if self.gone or self.eof else "error"
            if self.gone and ctx.outcome == "ok" and ctx.status == 0:
                ctx.outcome = "client_closed"
            gw.observe(ctx)

    async def _backend_slot(self, ctx: RequestContext):
        """Wait in the global queue. A client that disconnects (or half-closes) meanwhile cancels
        the wait, so it neither holds a queue place nor reaches llama-server."""
        self._queued = True
        try:
            return await self.gw.backend_slot(ctx)
        finally:
            self._queued = False

    # ---------------- responses ----------------
    def respond(self, ctx: RequestContext, req: http11.Request, status: int,
                 headers: list[tuple[str, str]], body: bytes) -> None:
        out = list(headers)
        out.extend(ctx.response_headers)
        if status != 204:
            out.append(("content-length", str(len(body))))
        if not self.keep_alive:
            out.append(("connection", "close"))
        elif req.version == (1, 0):
            out.append(("connection", "keep-alive"))   # HTTP/1.0 closes unless told otherwise
        ctx.status = status
        if req.method == "HEAD":
            body = b""
        ctx.bytes_out += len(body)
        self.write(http11.response_head(status, out) + body)

    def _send_error(self, err: GatewayError, ctx: RequestContext, req: http11.Request) -> None:
        headers = [("content-type", "application/json")]
        headers.extend(err.headers)
        if not ctx.outcome:
            ctx.outcome = err.code
        body = ollama_error_body(err.message) if ctx.ollama else err.body()
        self.respond(ctx, req, err.status, headers, body)

    def _send_error_simple(self, err: GatewayError) -> None:
        """A protocol error outside any request: answer and close."""
        self.keep_alive = False
        if self.gone:
            return
        body = err.body()
        head = http11.response_head(err.status, [("content-type", "application/json"),
                                                 ("content-length", str(len(body))),
                                                 ("connection", "close")] + err.headers)
        self.write(head + body)
        self.gw.observe_protocol_error(self.peer_host, err)
