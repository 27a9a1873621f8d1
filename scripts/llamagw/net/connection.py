"""One client connection: deadlines, keep-alive, pipelining, the two executors, close.

ClientConnection is an asyncio Protocol that feeds every received byte to a sans-IO RequestParser.
Requests are taken off the parser in order, so pipelined requests are answered in order. The
transport's flow-control callbacks (pause_writing / resume_writing) and connection_lost are
forwarded to the proxy exchange in flight, which is how a slow reader slows llama-server and a
vanished client closes the upstream socket at once.

Each request is a PendingRequest (net/pipeline.py: the steps both executors share, one release).
Two executors, one request at a time:
- callbacks (the common request, no task): the bytes of a whole proxied request arrive,
  data_received parses it, prepares it (key, limits), takes a free backend slot and a pooled
  llama-server connection and sends it; the exchange's end (_exchange_done) answers errors,
  releases the request and takes the next one. No coroutine, no task wake-up, no future.
- the connection's task (run): anything that must wait (a head or body still arriving, 100
  Continue, the backend queue, a connect, the retry after a stale pooled connection) and the
  route handlers that are not plain proxying (Ollama, OPTIONS, local and streamed answers). The
  task serves until the connection is idle again, then ends; the next request starts on the
  callback path again.
_serve_fast only takes a request when nothing can make it wait; everything else goes to the task,
which is the reference behaviour.

A client that closes or half-closes (EOF) while its API request waits in the queue or is being
answered is treated as gone (as nginx does): the request never reaches llama-server, or its
upstream socket is closed so the generation stops, or its stream is cancelled. Whole local
answers (/ping, /health) still go out.

Deadlines (config):
- CLIENT_HEADER_TIMEOUT: from the first byte of a request head to its end (trickling bytes do not
  reset it): expiry 408, close. It is also the wait for the first byte on a new connection: a
  connection that sends nothing is closed silently.
- CLIENT_BODY_TIMEOUT (whole body) and CLIENT_BODY_IDLE_TIMEOUT (between body bytes): 408, close.
- KEEPALIVE_TIMEOUT: idle time between requests; expiry closes silently.
- CLIENT_WRITE_TIMEOUT: a response the client does not read for this long is dropped (relayed
  and streamed answers).
"""

from __future__ import annotations

import asyncio
import enum
import logging

from llamagw.api import routes
from llamagw.context import Services
from llamagw.errors import GatewayError, ProtocolError
from llamagw.net import fastio, relay
from llamagw.net.answers import closed_without_answer
from llamagw.net.pipeline import ClientGone, PendingRequest, internal_error
from llamagw.net.upstream import UpstreamClosed
from llamagw.wire import http11

log = logging.getLogger("gateway")

# Pipelined bytes buffered while a request is in flight before reading pauses. Clients rarely
# pipeline; this bounds memory per connection without blocking disconnect detection in practice.
MAX_PIPELINED_BYTES = 256 * 1024
# A wait's timer may fire this early (the loop runs timers due within its clock resolution);
# closer than this to the deadline counts as expired.
DEADLINE_SLACK = 0.001


class ConnState(enum.Enum):
    """A connection's state: what data_received does with new bytes."""
    IDLE = "idle"        # no request: the bytes start one (_serve)
    BUSY = "busy"        # a request served on the callback path: the bytes wait in the parser
    TASK = "task"        # the task serves: the bytes wake it if it waits for them
    CLOSED = "closed"


# Module names for the members: a read through the class costs ~60-100 ns, on every data_received.
_IDLE, _BUSY, _TASK, _CLOSED = ConnState.IDLE, ConnState.BUSY, ConnState.TASK, ConnState.CLOSED
_GO_IDLE = object()   # _next_request: nothing buffered, the task may end


class ClientConnection(asyncio.Protocol):
    def __init__(self, services: Services):
        self.services = services       # the Gateway
        self.parser = http11.RequestParser(services.config.max_request_body_size)
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None   # set by connection_made
        self.peer_host = ""
        self.keep_alive = True
        self.gone = False
        self.eof = False
        self.write_paused = False
        self.exchange: relay.Exchange | None = None
        self.task: asyncio.Task | None = None
        self._state: ConnState = _IDLE
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
        self.body_read = False
        # The task waits for this client only (a queue place, a stream): its leaving cancels it.
        self.stop_if_gone = False
        self._drain_waiter: asyncio.Future | None = None   # drained()
        # The request served on the callback path until its exchange ends (_exchange_done), and
        # one handed to a task that has not started yet (_resume).
        self._current: PendingRequest | None = None
        self._resume: PendingRequest | None = None

    # ---------------- asyncio.Protocol ----------------
    def connection_made(self, transport):
        self.transport = transport
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_host = peer[0] if peer else ""
        self.services.connections.add(self)
        self._go_idle(self.services.config.client_header_timeout)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.body_read:
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
        if self.stop_if_gone and self.task is not None:
            self.task.cancel()       # the same for a request still waiting in the queue
        if self._state is _IDLE:
            self._serve()            # requests already buffered are answered, then close
        else:
            self._wake(True)
        return True   # keep the write side open to answer requests already received

    def connection_lost(self, exc):
        self.gone = True
        self.services.connections.discard(self)
        if self.exchange is not None:
            self.exchange.on_client_gone()
        if self.stop_if_gone and self.task is not None:
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
        elif self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)         # drained()

    # ---------------- used by the request (context.Client) ----------------
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

    async def drained(self, timeout: float) -> bool:
        """Wait until the transport's buffer is below its low-water mark again (a streamed
        answer's backpressure): False if it is not within `timeout` (the client reads nothing)."""
        if not self.write_paused:
            return True
        waiter = self._drain_waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            self._drain_waiter = None

    # ---------------- waiting ----------------
    def _wake(self, value: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def wait_data(self, deadline: float) -> bool:
        """The task waits for more bytes (True) until the loop-time deadline (False)."""
        if self.gone or self.eof:
            return False
        waiter = self.loop.create_future()
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
        self._deadline = self.loop.time() + timeout
        self.arm(self._deadline)

    def arm(self, when: float) -> None:
        """Make the connection's timer fire no later than loop time `when` (the waits, and the
        exchange's deadlines: its on_deadline re-arms when it is woken early)."""
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._waiter is None and self._state is not _IDLE:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_deadline()
            return                       # else not waiting now: the next wait arms a timer
        if self._deadline - self.loop.time() > DEADLINE_SLACK:
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
        self.services.connections.discard(self)

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
                    elif self.eof or self.services.shutting_down:
                        self._close()
                    else:
                        cfg = self.services.config
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
        self.body_read = False

    def _serve_fast(self, req: http11.Request) -> bool:
        """Serve `req` without waiting: answered here, or sent to llama-server on a pooled
        connection with _exchange_done to finish. False, having done nothing, for a request that
        may have to wait or is not plain proxying: the task serves it."""
        services = self.services
        if req.chunked or req.expect_continue or self.gone or self.eof or services.shutting_down:
            return False
        route = routes.ROUTES.get((req.method, req.path))
        if route is None or not route.upstream:    # not plain proxying
            return False
        if req.content_length:
            body = self.parser.take_whole_body()    # None, and nothing taken, while arriving
            if body is None:
                return False
        else:
            body = None
        self._served = True
        p = PendingRequest(self, req)
        conn = None
        try:
            if body is None:
                self._end_bodiless()
                body = b""
            else:
                p.ctx.bytes_in += len(body)
                self.body_read = True
            # CORS, key, limits, the body check, the backend state and a free slot; raises
            if p.prepare(route, body):
                pool = services.pool                 # a pooled connection, or a Unix connect
                conn = pool.take_idle() or pool.connect_now(self.loop)
            if conn is None:                         # the queue, or a connect: the task waits
                self._start_task(resume=p)
                return True
            p.fresh = not conn.reused                # a stale pooled one is retried (below)
            self._current = p
            relay.start(p, conn, self._exchange_done)
        except GatewayError as err:
            p.fail(err)
            p.release()
        except Exception:
            log.exception("request failed unexpectedly: %s %s", req.method, req.path)
            if p.released:                           # _exchange_done has ended it already
                self.keep_alive = False
                self._close()
                return True
            if self._current is p and self.exchange is not None:
                # Its end (_exchange_done) answers the 500, releases and ends the request.
                self.exchange._fail(internal_error())
                return True
            self._current = None
            if conn is not None:                     # taken from the pool, never bound
                conn.detach()
                conn.abort()
            p.fail(internal_error())
            p.release()
        except BaseException:
            p.release()
            raise
        return True

    def _exchange_done(self, ex: relay.Exchange, exc: BaseException | None) -> None:
        """The end of a request served on the callback path (Exchange on_done)."""
        p = self._current
        self._current = None
        if isinstance(exc, UpstreamClosed) and not exc.got_bytes and not p.fresh:
            # A stale pooled connection answered nothing: once more on a fresh one (a connect:
            # the task does it), as relay.forward does.
            p.fresh = True
            self._start_task(resume=p)
            return
        try:
            if exc is not None:
                p.fail(exc if isinstance(exc, GatewayError) else closed_without_answer())
        finally:
            p.release()
        try:
            if self.gone or not self.keep_alive:
                self._close()
            elif self.parser.has_buffered:
                # Pipelined requests: taken from the loop, not from inside the callback of
                # llama-server's connection that called us.
                self.loop.call_soon(self._serve)
            elif self.eof or self.services.shutting_down:
                self._close()
            else:                  # nothing to take: wait idle for the next request
                self._next_begins()
                self._go_idle(self.services.config.keepalive_timeout)
        except Exception:   # a bug: never leave the socket open
            log.exception("connection handler failed")
            self._close()

    # ---------------- the task ----------------
    def _start_task(self, req: http11.Request | None = None,
                    resume: PendingRequest | None = None) -> None:
        self._state = _TASK
        self._resume = resume
        task = self.loop.create_task(self.run(req))
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
            resume.ctx.outcome = resume.ctx.outcome or "cancelled"
            resume.release()
        if self._state is _TASK:
            self._close()

    async def run(self, req: http11.Request | None = None) -> None:
        """Serve until the connection is idle (then back to the callback path) or closes."""
        idle = False
        try:
            resume, self._resume = self._resume, None
            if resume is not None:
                await self._handle(resume, resumed=True)
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
                self._served = True
                await self._handle(PendingRequest(self, this))
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
                self._go_idle(self.services.config.keepalive_timeout)
            else:
                self._close()

    async def _handle(self, p: PendingRequest, resumed: bool = False) -> None:
        """One request in the task, from its head (or, resumed, from where the callback path
        handed it over) to its end; released here whatever happens."""
        req = p.req
        try:
            if not resumed:
                if not (req.chunked or req.content_length):
                    self._end_bodiless()
                p.prepare()                              # CORS, route, key, limits; raises
                p.ready(await p.read_body())             # body check, maybe a slot; raises
            await p.execute()
        except GatewayError as err:
            p.fail(err)
        except ClientGone:
            p.ctx.outcome = "client_closed"
            raise
        except Exception:
            log.exception("request failed unexpectedly: %s %s", req.method, req.path)
            p.fail(internal_error())
            if self.exchange is not None:        # still bound to llama-server: dropped
                self.exchange.abort()
        finally:
            p.release()

    async def _next_request(self):
        """The next request: a Request, None to close, or _GO_IDLE when nothing is buffered."""
        parser = self.parser
        loop = self.loop
        self._next_begins()
        event = parser.next_event()
        if event is http11.NEED_DATA:
            if not parser.has_buffered:
                if self.gone or self.eof or self.services.shutting_down:
                    return None
                return _GO_IDLE
            deadline = loop.time() + self.services.config.client_header_timeout
            while (event := parser.next_event()) is http11.NEED_DATA:
                if self.gone or self.eof:
                    return None
                if not await self.wait_data(deadline) and loop.time() >= deadline:
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
        self.body_read = True

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
        self.services.observe_protocol_error(self.peer_host, err)
