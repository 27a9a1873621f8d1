"""One client connection: deadlines, keep-alive, pipelining, dispatch, close.

ClientConnection is an asyncio Protocol that feeds every received byte to a sans-IO RequestParser.
Requests are taken off the parser in order, so pipelined requests are answered in order. The
transport's flow-control callbacks (pause_writing / resume_writing) and connection_lost are
forwarded to the proxy exchange in flight, which is how a slow reader slows llama-server and a
vanished client closes the upstream socket at once.

Two ways to serve, one request at a time:
- callbacks (the common request, no task): the bytes of a whole API request arrive, data_received
  parses it, authenticates it, takes a free backend slot and a pooled llama-server connection and
  sends it; the exchange's end (_exchange_done) answers errors, releases everything and takes the
  next request. No coroutine, no task wake-up, no future per request.
- the connection's task (run): anything that must wait (a head or body still arriving, 100
  Continue, the backend queue, a connect, the retry after a stale pooled connection) and the
  routes that are not plain proxying (Ollama, OPTIONS, local answers). The task serves until the
  connection is idle again, then ends; the next request starts on the callback path again.
_serve_fast only takes a request when nothing can make it wait; everything else goes to the task,
which is the reference behaviour.

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

from llamagw.api import routes
from llamagw.api.ollama import error_body as ollama_error_body
from llamagw.errors import GatewayError, ProtocolError
from llamagw.limits import admission
from llamagw.net import fastio
from llamagw.net import relay as proxy
from llamagw.net.upstream import UpstreamClosed
from llamagw.wire import http11, jsonguard

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

# The connection's states (what data_received does with new bytes):
_IDLE = "idle"        # no request: the bytes start one (_serve)
_BUSY = "busy"        # a request served on the callback path: the bytes wait in the parser
_TASK = "task"        # the task serves: the bytes wake it if it waits for them
_CLOSED = "closed"
_GO_IDLE = object()   # _next_request: nothing buffered, the task may end


def internal_error() -> GatewayError:
    """The answer to a request whose handling failed unexpectedly (a bug): logged where it is
    caught, the client gets a 500 in its route's envelope, and the connection is closed (its
    state is not to be trusted)."""
    return GatewayError(500, "Internal error: the gateway could not handle this request",
                        "internal_error", close=True)


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
        self.write_paused = False
        self.exchange: proxy.Exchange | None = None
        self.task: asyncio.Task | None = None
        self._state = _IDLE
        self._served = False      # a request was taken: idle waits are keep-alive waits
        self._waiter: asyncio.Future | None = None
        # One timer per connection for every deadline: the idle and task waits (keep-alive,
        # head, body) and the proxy exchange in flight (first byte, stream idle). arm() moves it
        # only to an earlier time; on firing it checks what is due (_deadline while waiting,
        # else the exchange's own deadlines) and re-arms for the rest. A keep-alive connection
        # pushes its deadline forward at every request; a timer per wait and per exchange cost
        # a heap push and a cancel each, per request.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pipelined = 0
        self._reading_paused = False
        # The current request's body is in: bytes arriving now are pipelined requests, bounded
        # by MAX_PIPELINED_BYTES while it is answered (queue wait included).
        self._body_read = False
        self._queued = False      # waiting for a backend slot
        # The request served on the callback path: (ctx, req, route, ticket, slot, body, reused:
        # its llama-server connection came from the pool) until its exchange ends; or handed to
        # a task that has not started yet (_resume: ..., body, fresh).
        self._fast: tuple | None = None
        self._resume: tuple | None = None

    # ---------------- asyncio.Protocol ----------------
    def connection_made(self, transport):
        self.transport = transport
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_host = peer[0] if peer else ""
        self.gw.connections.add(self)
        self._go_idle(self.gw.config.client_header_timeout)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self._body_read:
            self._pipelined += len(data)
            if self._pipelined > MAX_PIPELINED_BYTES and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
        state = self._state
        if state is _IDLE:
            self._serve()
        elif state is _TASK:
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
        if self._state is _IDLE:
            self._serve()            # requests already buffered are answered, then close
        else:
            self._wake(True)
        return True   # keep the write side open to answer requests already received

    def connection_lost(self, exc):
        self.gone = True
        self.gw.connections.discard(self)
        if self.exchange is not None:
            self.exchange.on_client_gone()
        if self._queued and self.task is not None:
            self.task.cancel()
        if self._state is _IDLE:
            self._close()
        else:
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
        """No more responses on this connection; it closes once this one is out."""
        self.keep_alive = False

    def abort(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.abort()

    def cancel(self) -> None:
        """Shutdown's last resort: drop the client and end what it was doing now (the slots
        and the llama-server connection are freed before this returns or the task ends)."""
        self.abort()
        if self.exchange is not None:
            self.exchange.abort()
        if self.task is not None:
            self.task.cancel()

    # ---------------- waiting ----------------
    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def _wait_data(self, deadline: float) -> bool:
        """The task waits for more bytes (True) until the loop-time deadline (False)."""
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

    def _go_idle(self, timeout: float) -> None:
        """Wait for the next request on the callback path: its first byte within `timeout`
        (keep-alive, or the header timeout of a new connection), else close silently."""
        self._state = _IDLE
        self._deadline = self._loop.time() + timeout
        self.arm(self._deadline)

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
        if self._waiter is None and self._state is not _IDLE:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_deadline()
            return                       # else not waiting now: the next wait arms a timer
        if self._deadline - self._loop.time() > DEADLINE_SLACK:
            self.arm(self._deadline)     # the deadline was pushed forward meanwhile
            return
        if self._state is _IDLE:
            self._close()                # keep-alive or first-byte timeout: close silently
        else:
            self._wake(False)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def wake_if_idle(self) -> None:
        """Shutdown: an idle keep-alive connection closes now."""
        if self._state is _IDLE:
            self._close()

    def _close(self) -> None:
        """The end of the connection (the data already written still goes out)."""
        self._state = _CLOSED
        self._stop_timer()
        if self.exchange is not None:
            self.exchange.abort()
        if not self.gone and self.transport is not None:
            self.transport.close()
        self.gw.connections.discard(self)

    # ---------------- the callback path ----------------
    def _serve(self) -> None:
        """Take the requests already buffered, each on the callback path when nothing can make
        it wait, else hand over to the task; then wait idle for more (or close)."""
        try:
            self._state = _BUSY
            parser = self.parser
            while True:
                if self.gone or not self.keep_alive:
                    self._close()
                    return
                self._next_begins()
                try:
                    event = parser.next_event()
                    if event is not http11.NEED_DATA and type(event) is not http11.Request:
                        raise ProtocolError("Unexpected data before a request", 400)
                except ProtocolError as err:
                    self._send_error_simple(err)
                    self._close()
                    return
                if event is http11.NEED_DATA:
                    if parser.has_buffered:       # a head in pieces: the task waits for it
                        self._start_task()
                    elif self.eof or self.gw.shutting_down:
                        self._close()
                    else:
                        cfg = self.gw.config
                        self._go_idle(cfg.keepalive_timeout if self._served
                                      else cfg.client_header_timeout)
                    return
                if not self._serve_fast(event):
                    self._start_task(event)
                    return
                if self._state is not _BUSY or self.exchange is not None:
                    return      # in flight (_exchange_done goes on), or handed to the task
        except Exception:   # a bug: never leave the socket open
            log.exception("connection handler failed")
            self._close()

    def _next_begins(self) -> None:
        """Before the next request is taken: its own pipelining budget, reading resumed."""
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._pipelined = 0
        self._body_read = False

    def _serve_fast(self, req: http11.Request) -> bool:
        """Serve `req` without waiting: answered here, or sent to llama-server on a pooled
        connection with _exchange_done to finish. False, having done nothing, for a request that
        may have to wait or is not plain proxying: the task serves it."""
        gw = self.gw
        if (req.chunked or req.expect_continue or self.gone or self.eof or gw.shutting_down):
            return False
        route = routes.ROUTES.get((req.method, req.path))
        if route is None or route.kind != "proxy":
            return False
        bodiless = not req.content_length
        if not bodiless:
            body = self.parser.take_whole_body()    # None, and nothing taken, while arriving
            if body is None:
                return False
        ctx = self._begin(req)
        ticket = admission.NO_TICKET
        slot = None
        conn = None
        sent = False     # handed to proxy.start: the exchange ends the request
        try:
            if bodiless:
                self._end_bodiless()
                body = b""
            else:
                ctx.bytes_in += len(body)
                self._body_read = True
            origin = req.get("origin")
            if origin is not None:
                ctx.response_headers.extend(gw.cors.headers_for(origin))
            ctx.route = route.name
            ticket = gw.admission.admit(req, route, ctx)   # auth, rate, key concurrency; raises
            if route.json_body:
                jsonguard.check(body)                # 400 before a backend slot; raises
            slot = gw.try_backend_slot()            # global limit; raises
            if slot is not None:                     # a pooled connection, or a Unix connect
                conn = gw.pool.take_idle() or gw.pool.connect_now(self._loop)
            if conn is None:                         # the queue, or a connect: the task waits
                self._start_task(resume=(ctx, req, route, ticket, slot, body, False))
                return True
            self._fast = (ctx, req, route, ticket, slot, body, conn.reused)
            sent = True
            proxy.start(gw, self, ctx, req, route, body, conn, self._exchange_done)
            return True
        except GatewayError as err:
            if slot is not None:
                slot.release()
            ticket.release()
            self._failed(err, ctx, req, True)
            self._end(ctx)
            return True
        except Exception:
            log.exception("request failed unexpectedly: %s %s", req.method, req.path)
            if sent:
                if self._fast is None:               # _exchange_done has ended it already
                    self.keep_alive = False
                    self._close()
                    return True
                if self.exchange is not None:
                    # Its end (_exchange_done) answers the 500, releases and ends the request.
                    self.exchange._fail(internal_error())
                    return True
                self._fast = None
            if conn is not None:                     # taken from the pool, never bound
                conn.detach()
                conn.abort()
            if slot is not None:
                slot.release()
            ticket.release()
            self._failed(internal_error(), ctx, req, True)
            self._end(ctx)
            return True
        except BaseException:
            if slot is not None:
                slot.release()
            ticket.release()
            self._end(ctx)
            raise

    def _exchange_done(self, ex: proxy.Exchange, exc: BaseException | None) -> None:
        """The end of a request served on the callback path (Exchange on_done)."""
        ctx, req, route, ticket, slot, body, reused = self._fast
        self._fast = None
        if isinstance(exc, UpstreamClosed) and not exc.got_bytes and reused:
            # A stale pooled connection answered nothing: once more on a fresh one (a connect:
            # the task does it), as proxy.forward does.
            self._start_task(resume=(ctx, req, route, ticket, slot, body, True))
            return
        try:
            slot.release()
            ticket.release()
            if exc is not None:
                if not isinstance(exc, GatewayError):
                    exc = proxy.closed_without_answer()
                self.gw.upstream_failed(exc, ctx)
                self._failed(exc, ctx, req, True)
        finally:
            self._end(ctx)
        try:
            if self.gone or not self.keep_alive:
                self._close()
            elif self.parser.has_buffered:
                # Pipelined requests: taken from the loop, not from inside the callback of
                # llama-server's connection that called us.
                self._loop.call_soon(self._serve)
            elif self.eof or self.gw.shutting_down:
                self._close()
            else:                  # nothing to take: wait idle for the next request
                self._next_begins()
                self._go_idle(self.gw.config.keepalive_timeout)
        except Exception:   # a bug: never leave the socket open
            log.exception("connection handler failed")
            self._close()

    # ---------------- the task ----------------
    def _start_task(self, req: http11.Request | None = None, resume: tuple | None = None) -> None:
        self._state = _TASK
        self._resume = resume
        task = self._loop.create_task(self.run(req))
        self.task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if self.task is not task:
            return                  # a newer task serves the connection already
        self.task = None
        resume = self._resume
        if resume is not None:
            # Cancelled before it started: what was handed over to it is released here.
            self._resume = None
            ctx, _req, _route, ticket, slot, _body, _fresh = resume
            if slot is not None:
                slot.release()
            ticket.release()
            ctx.outcome = ctx.outcome or "cancelled"
            self._end(ctx)
        if self._state is _TASK:
            self._close()

    async def run(self, req: http11.Request | None = None) -> None:
        """Serve until the connection is idle (then back to the callback path) or closes."""
        idle = False
        try:
            resume, self._resume = self._resume, None
            if resume is not None:
                await self._proxy(*resume)
                if not self.keep_alive:
                    return
            while not self.gone:
                if req is None:
                    req = await self._next_request()
                    if req is None:
                        return
                    if req is _GO_IDLE:
                        idle = True
                        return
                this, req = req, None
                await self._handle(this)
                if not self.keep_alive or self.gone:
                    return
        except ProtocolError as err:
            self._send_error_simple(err)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            pass
        except Exception:   # a bug: never leave the socket open
            log.exception("connection handler failed")
        finally:
            if idle:
                self._go_idle(self.gw.config.keepalive_timeout)
            else:
                self._close()

    async def _next_request(self):
        """The next request: a Request, None to close, or _GO_IDLE when nothing is buffered."""
        parser = self.parser
        loop = self._loop
        self._next_begins()
        event = parser.next_event()
        if event is http11.NEED_DATA:
            if not parser.has_buffered:
                if self.gone or self.eof or self.gw.shutting_down:
                    return None
                return _GO_IDLE
            deadline = loop.time() + self.gw.config.client_header_timeout
            while (event := parser.next_event()) is http11.NEED_DATA:
                if self.gone or self.eof:
                    return None
                if not await self._wait_data(deadline) and loop.time() >= deadline:
                    raise ProtocolError("Request header not received in time", 408,
                                        "header_timeout")
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

    async def _read_body(self, req: http11.Request, ctx: RequestContext) -> bytes:
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
        parts: list[bytes] = []
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

    # ---------------- one request, either path ----------------
    def _begin(self, req: http11.Request) -> RequestContext:
        rid = req.get("x-request-id")
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            rid = new_request_id()
        ctx = RequestContext(self.peer_host, req.method, req.path, rid)
        ctx.response_headers.append(("x-request-id", rid))
        gw = self.gw
        if not req.keep_alive or gw.shutting_down:
            self.keep_alive = False
        self._served = True
        gw.in_flight += 1
        return ctx

    def _failed(self, err: GatewayError, ctx: RequestContext, req: http11.Request,
                body_done: bool) -> None:
        """Answer a request's error, unless its head is already out; close where needed."""
        if not body_done or err.close:
            self.keep_alive = False
        if ctx.status:                     # a head was already sent: nothing more to say
            self.keep_alive = False
        elif not self.gone:
            self._send_error(err, ctx, req)
            if not self.keep_alive:        # the client may still be sending: it reads the error
                fastio.linger_on_close(self.transport)

    def _end(self, ctx: RequestContext) -> None:
        gw = self.gw
        gw.in_flight -= 1
        ctx.duration = time.monotonic() - ctx.started
        if not ctx.outcome:
            ctx.outcome = "client_closed" if self.gone or self.eof else "error"
        if self.gone and ctx.outcome == "ok" and ctx.status == 0:
            ctx.outcome = "client_closed"
        gw.observe(ctx)

    async def _handle(self, req: http11.Request) -> None:
        gw = self.gw
        ctx = self._begin(req)
        body_done = not (req.chunked or req.content_length)
        ticket = admission.NO_TICKET
        handed = False       # to _proxy, which ends the request
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
            ticket = gw.admission.admit(req, route, ctx)   # auth, rate, key concurrency; raises
            body = await self._read_body(req, ctx)
            body_done = True
            if route.json_body:
                jsonguard.check(body)                # 400 before a backend slot; raises
            if gw.is_local(route):                   # answered here, no backend slot
                self.respond(ctx, req, *gw.local(route, req, ctx, body))
                ctx.outcome = "ok"
                return
            handed = True
        except GatewayError as err:
            self._failed(err, ctx, req, body_done)
        except ClientGone:
            ctx.outcome = "client_closed"
            raise
        except Exception:
            log.exception("request failed unexpectedly: %s %s", req.method, req.path)
            self._failed(internal_error(), ctx, req, body_done)
        finally:
            if not handed:
                ticket.release()
                self._end(ctx)
        if handed:
            await self._proxy(ctx, req, route, ticket, None, body, False)

    async def _proxy(self, ctx: RequestContext, req: http11.Request, route, ticket, slot,
                     body: bytes, fresh: bool) -> None:
        """A request with its body, admitted (ticket): a backend slot (waiting in the queue
        unless `slot` is given), then llama-server. Ends the request: releases both, observes."""
        gw = self.gw
        try:
            try:
                if slot is None:
                    slot = gw.try_backend_slot()          # global limit; raises
                    if slot is None:
                        slot = await self._backend_slot(ctx)  # bounded queue; raises
                try:
                    if self.gone or self.eof:
                        raise ClientGone()
                    await gw.dispatch(self, ctx, req, route, body, fresh=fresh)
                finally:
                    slot.release()
            finally:
                ticket.release()
        except GatewayError as err:
            self._failed(err, ctx, req, True)
        except ClientGone:
            ctx.outcome = "client_closed"
            raise
        except Exception:
            log.exception("request failed unexpectedly: %s %s", req.method, req.path)
            self._failed(internal_error(), ctx, req, True)
            if self.exchange is not None:        # still bound to llama-server: dropped
                self.exchange.abort()
        finally:
            self._end(ctx)

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
        fastio.linger_on_close(self.transport)   # a 408 at a deadline: the client may be sending
        self.gw.observe_protocol_error(self.peer_host, err)
