"""Forward one request to llama-server and relay the answer, chunk by chunk, with backpressure.

The upstream request is rebuilt, never copied: the route's fixed upstream path, no query string,
only net/upstream.UPSTREAM_HEADERS from the client, our own Host / Content-Length / X-Forwarded-For /
X-Request-Id. The response is rebuilt the same way: RESPONSE_HEADERS from llama-server (its CORS
reflection and server banner stay behind), our framing and request id.

Relay: Exchange is the sink of an upstream connection. The body pieces of one upstream read are
collected and written to the client transport in one write when the read has been handled
(flush): SSE events go out in the read they arrived in, never buffered across reads, and a small
non-streamed answer leaves as one write, head and body together. When the client's
transport buffer passes its high-water mark the upstream socket stops being read, so a slow reader
slows llama-server's sends instead of growing memory; a client that reads nothing for
CLIENT_WRITE_TIMEOUT is dropped. A client that goes away closes the upstream socket at once (never
pooled), which makes llama-server cancel the generation and free its slot.

A stream cut by llama-server mid-body: for SSE the client gets one last event
`data: {"error": {..., "code": "upstream_closed"}}` and then the connection is closed WITHOUT the
chunked terminator, so both SDKs that read error events and plain HTTP clients can tell. In
router mode (the request holds a model's lease) a stream that ENDS cleanly without its
`data: [DONE]` was cut too: llama-server's router ends the 200 body of an instance that died or
was killed with raw `proxy error: ...` text (net/answers.ROUTER_CUT_MARKER) or nothing: the
client gets the same last event (code upstream_cut; an Ollama stream its NDJSON error line) and
no clean end.

An error answer (4xx/5xx, not a stream) is held until it is whole: llama-server's are JSON and go
on as they are (or through the route's transform), but the router answers a non-streamed request
whose instance died with a 500 whose body is the raw `proxy error: ...` text under a JSON content
type. A body that is not a JSON object becomes the gateway's own 502 in the route's envelope
(code upstream_cut for the router's text, bad_upstream_response otherwise).
"""

from __future__ import annotations

import asyncio
import time

from llamagw.context import Call
from llamagw.errors import RETRY_AFTER_LOADING, GatewayError
from llamagw.net.answers import (ERROR_BODY_LIMIT, ROUTER_CUT_EVENT, UPSTREAM_CLOSED_EVENT,
                                 closed_without_answer, error_answer_problem)
from llamagw.net.upstream import UpstreamClosed, build_request
from llamagw.observe.tokens import account, account_cut, sse_finished
from llamagw.wire import http11

# llama-server response headers passed to the client (the rest, CORS reflection included, dropped).
RESPONSE_HEADERS = frozenset({"content-type"})
# Non-streamed bodies up to this size are kept to read `usage` for accounting; larger ones are
# relayed without accounting (an embeddings batch can be megabytes; usage is a nicety).
USAGE_BODY_LIMIT = 256 * 1024
# Tail of an SSE stream kept to find the last event carrying `usage` (a few events' worth).
SSE_TAIL_BYTES = 16 * 1024


class Exchange:
    """One request/response with llama-server, relayed to one client connection."""

    __slots__ = ("client", "ctx", "conn", "head_only", "http10", "loop", "done", "head_written",
                 "chunked_out", "sse", "keep_body", "body_parts", "body_size", "tail",
                 "last_activity", "idle_timeout", "write_timeout", "first_byte_timeout",
                 "_stall_timer", "upstream_keep_alive", "status", "transform",
                 "_head", "_pending", "finished", "_on_done", "bulk", "events", "router",
                 "held", "held_size", "held_type")

    def __init__(self, client, ctx, *, head_only: bool, http10: bool, first_byte_timeout: float,
                 idle_timeout: float, write_timeout: float, account: bool, transform=None,
                 loop: asyncio.AbstractEventLoop | None = None, on_done=None):
        self.client = client
        # Optional response transform (API translators, e.g. Ollama): .head(status),
        # .streaming, .status, .content_type, .feed(bytes) -> bytes, .finish() -> bytes,
        # .cut(message=None) -> bytes (the last words of a stream cut short: upstream closed
        # or went silent). Streaming transforms are written as they go; others at the end.
        self.transform = transform
        self.ctx = ctx
        self.conn = None
        self.head_only = head_only
        self.http10 = http10
        # The caller passes its loop: on Python 3.11 asyncio.get_running_loop() makes a getpid()
        # system call each time (fork detection), twice per request on the hot path.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        # How the end is told: on_done(exchange, exc or None), called once and synchronously
        # (the client connection's callback path: no task waits), else the `done` future.
        self.finished = False
        self._on_done = on_done
        self.done = self.loop.create_future() if on_done is None else None
        self.head_written = False
        self.chunked_out = False
        # on_chunks instead of on_data (set by on_head): see there.
        self.bulk = False
        self.sse = False
        self.keep_body = account
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.tail = bytearray()
        self.events = 0          # SSE events relayed: a cut stream's count (tokens.account_cut)
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.last_activity = self.loop.time()
        client.arm(self.last_activity + first_byte_timeout)   # on_deadline when due
        self._stall_timer = None
        self.upstream_keep_alive = False
        self.status = 0
        # Output of the upstream read being handled, written by flush(): the response head
        # (once) and the body pieces, each already framed as its own chunk when chunked.
        self._head: bytes | None = None
        self._pending: list[bytes] = []
        self.router = False        # router mode: a stream must end with [DONE] (on_end)
        # An error answer's body, held whole (on_head, on_end); None: not an error answer.
        # A 503 (llama-server loading) becomes our model_loading whatever its body says.
        self.held: list[bytes] | None = None
        self.held_size = 0
        self.held_type = ""

    # ---- upstream events (Sink) ----
    def on_head(self, resp: http11.Response) -> None:
        self.last_activity = now = self.loop.time()
        if self.idle_timeout < self.first_byte_timeout:
            # From now on the stream idle deadline applies; it may come before what is left of
            # the first-byte one. (A later one needs nothing: on_deadline re-arms when due.)
            self.client.arm(now + self.idle_timeout)
        self.ctx.ttfb = time.monotonic() - self.ctx.started
        self.status = resp.status
        self.upstream_keep_alive = resp.keep_alive
        client = self.client
        ctype = resp.get("content-type") or ""
        self.sse = ctype.startswith("text/event-stream")
        if resp.status >= 400 and (resp.status == 503 or not self.sse):
            self.held, self.held_type = [], ctype       # answered by on_end
            return
        if (resp.content_length or 0) > USAGE_BODY_LIMIT:
            self.keep_body = False
        transform = self.transform
        if transform is not None:
            transform.head(resp.status)
            if not transform.streaming:
                return                       # the whole answer is written by on_end
            headers = [("content-type", transform.content_type),
                       ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
            self.ctx.stream = True
        else:
            headers = [(n, v) for n, v in resp.headers if n in RESPONSE_HEADERS]
            if self.sse:
                headers.append(("cache-control", "no-cache"))
                headers.append(("x-accel-buffering", "no"))
                self.ctx.stream = True
        if transform is None and resp.content_length is not None and not resp.chunked:
            headers.append(("content-length", str(resp.content_length)))
        elif self.http10:
            client.keep_alive = False        # close-delimited body for an HTTP/1.0 client
        else:
            headers.append(("transfer-encoding", "chunked"))
            self.chunked_out = True
            # A chunked answer relayed as it is to a chunked client: whole chunks that are
            # framed as chunk() would frame them go out as received, a read's worth at once
            # (on_chunks). Not with a transform (it rewrites the data), for HEAD, or when a
            # non-SSE body is kept for its usage (body_parts wants the data, and such bodies
            # come with a Content-Length anyway).
            self.bulk = transform is None and not self.head_only and (
                self.sse or not self.keep_body)
        headers.extend(self.ctx.response_headers)
        if not client.keep_alive:
            headers.append(("connection", "close"))
        elif self.http10:
            headers.append(("connection", "keep-alive"))   # HTTP/1.0 closes unless told so
        status = resp.status if transform is None else transform.status
        self.ctx.status = status
        self.head_written = True
        self._head = http11.response_head(status, headers)   # written by flush()

    def on_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.held is not None:
            self.held_size += len(data)
            if self.held_size <= ERROR_BODY_LIMIT:
                self.held.append(data)
            return
        if self.keep_body:
            if self.sse:
                self.events += 1
                tail = self.tail
                tail += data
                if len(tail) > 2 * SSE_TAIL_BYTES:
                    del tail[:-SSE_TAIL_BYTES]
            else:
                self.body_size += len(data)
                if self.body_size <= USAGE_BODY_LIMIT:
                    self.body_parts.append(data)
                else:
                    self.keep_body = False
                    self.body_parts.clear()
        if self.head_only:
            return
        if self.transform is not None:
            data = self.transform.feed(data)
            if not data or not self.head_written:
                return
        self.ctx.bytes_out += len(data)
        self._pending.append(http11.chunk(data) if self.chunked_out else data)

    def on_chunks(self, framed: bytes, spans: list[int], size: int) -> None:
        """Whole chunks from the parser (take_chunks): the same bytes on_data would write for
        each chunk's data, so they are queued as they are. Only while self.bulk."""
        self.last_activity = self.loop.time()
        if self.keep_body:       # an SSE stream (see on_head): keep its last events
            self.events += len(spans) >> 1
            tail = self.tail
            if len(spans) == 2:  # one chunk (a paced stream's read)
                tail += framed[spans[0]:spans[1]]
            else:
                parts = []
                kept = 0
                i = len(spans)
                while i and kept < SSE_TAIL_BYTES:   # newest first, enough to fill the tail
                    i -= 2
                    part = framed[spans[i]:spans[i + 1]]
                    parts.append(part)
                    kept += len(part)
                if i:
                    tail.clear()  # the chunks left out are newer than anything in the tail
                parts.reverse()
                tail += b"".join(parts)
            if len(tail) > 2 * SSE_TAIL_BYTES:
                del tail[:-SSE_TAIL_BYTES]
        self.ctx.bytes_out += size
        self._pending.append(framed)

    def _take_output(self) -> bytes:
        """The head (if not yet written) and the pending body pieces; clears both."""
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
        else:
            data = b""
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        return data

    def flush(self) -> None:
        """End of one upstream read: write what it produced in one write."""
        if self._head is not None or self._pending:
            data = self._take_output()
            if data:
                self.client.write(data)

    def on_end(self) -> None:
        if self.held is not None:
            self._end_error_answer()
            return
        transform = self.transform
        cut = self.router and self.sse and self.status == 200 and not sse_finished(self.tail)
        if cut:
            self.ctx.upstream_error = "upstream_cut"     # the lease is released as cut
            if transform is None:
                self.on_error(None)
                return
        if transform is not None:
            tail = transform.finish()
            if not self.head_written:      # collected answer: one response with its length
                self.head_written = True
                self._write_whole(transform.status, transform.content_type, tail)
            elif tail:
                self.ctx.bytes_out += len(tail)
                self._pending.append(http11.chunk(tail) if self.chunked_out else tail)
        out = self._take_output()
        if self.chunked_out and not self.head_only:
            out += http11.LAST_CHUNK
        if out:
            self.client.write(out)
        if self.keep_body:
            self._account()
        self.ctx.outcome = "upstream_error" if cut else "ok"
        self._finish(pool=not cut)
        if not self.client.keep_alive:
            self.client.close_after_write()

    def on_error(self, exc: BaseException | None) -> None:
        if self.head_written:
            # Cut mid-body: tell the client in-band (SSE) and close without a clean end.
            # Counted like the same failure before the head (the 502's code), by observe().
            self.ctx.outcome = "upstream_error"
            if exc is None:                  # on_end: the router cut a stream (upstream_cut)
                event = ROUTER_CUT_EVENT if not self.head_only else b""
            else:
                self.ctx.upstream_error = ("upstream_closed" if isinstance(exc, UpstreamClosed)
                                           else "bad_upstream_response")
                event = UPSTREAM_CLOSED_EVENT if self.sse and not self.head_only else b""
            if self.transform is not None:
                event = self.transform.cut()
            if event and not self.client.gone:
                self._pending.append(http11.chunk(event) if self.chunked_out else event)
            self.flush()
            self.client.close_after_write()
            self._finish(pool=False)
            return
        if isinstance(exc, UpstreamClosed):
            self._fail(exc)
        else:
            self._fail(GatewayError(502, f"Invalid response from llama-server: {exc}",
                                    "bad_upstream_response"))

    def _end_error_answer(self) -> None:
        """An error answer is whole: a 503 is our model_loading; another goes on as it is if
        it is a JSON object, else it is our 502."""
        if self.status == 503:
            # llama-server is loading (or overloaded): our own 503 with Retry-After.
            self._finish(exc=GatewayError(
                503, "The model is still loading; retry shortly", "model_loading",
                headers=[("retry-after", str(RETRY_AFTER_LOADING))]), pool=True)
            return
        body = b"".join(self.held) if self.held_size <= ERROR_BODY_LIMIT else b""
        exc = error_answer_problem(body, self.status, self.router)
        if exc is not None:
            self.ctx.upstream_error = exc.code      # upstream_cut: the lease is released as cut
            self._fail(exc)
            return
        transform = self.transform
        if transform is None:
            self._write_whole(self.status, self.held_type or "application/json", body)
        else:
            transform.head(self.status)
            transform.feed(body)
            tail = transform.finish()
            self._write_whole(transform.status, transform.content_type, tail)
        self.head_written = True
        self.ctx.outcome = "ok"
        self._finish(pool=True)
        if not self.client.keep_alive:
            self.client.close_after_write()

    def _write_whole(self, status: int, content_type: str, body: bytes) -> None:
        client = self.client
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        headers.extend(self.ctx.response_headers)
        if not client.keep_alive:
            headers.append(("connection", "close"))
        elif self.http10:
            headers.append(("connection", "keep-alive"))
        self.ctx.status = status
        self.ctx.bytes_out += len(body)
        client.write(http11.response_head(status, headers) + body)

    # ---- client events (called by the client connection) ----
    def on_client_paused(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.write_timeout, self._on_stall)

    def on_client_resumed(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self.conn is not None:
            self.conn.resume_reading()

    def on_client_gone(self) -> None:
        if self.finished:
            return
        if self.sse and self.keep_body and sse_finished(self.tail):
            # Everything up to the stream's `data: [DONE]` was relayed: a client (the OpenAI
            # SDK) may hang up there, before llama-server's closing chunk. The answer was
            # delivered: count it and its tokens as such.
            self._account()
            self.ctx.outcome = "ok"
        else:
            self.ctx.outcome = "client_closed"
        self._finish(pool=False)

    # ---- internals ----
    def _on_stall(self) -> None:
        self._stall_timer = None
        if self.finished:
            return
        self.ctx.outcome = "client_write_timeout"
        self.client.abort()
        self._finish(pool=False)

    def on_deadline(self) -> None:
        """The client connection's timer fired (it holds this exchange's deadlines)."""
        if self.finished:
            return
        now = self.loop.time()
        limit = self.first_byte_timeout if self.status == 0 else self.idle_timeout
        due = self.last_activity + limit
        if now < due:
            self.client.arm(due)
            return
        if not self.head_written:
            self._fail(GatewayError(504, "llama-server did not answer in time", "upstream_timeout"))
            return
        self.ctx.outcome = "upstream_timeout"
        self.ctx.upstream_error = "upstream_timeout"     # as the 504 before the head
        if self.transform is not None and not self.head_only and not self.client.gone:
            # A translated stream (Ollama NDJSON) ends with an in-band error line.
            event = self.transform.cut(f"llama-server sent nothing for {self.idle_timeout:g} s")
            if event:
                self._pending.append(http11.chunk(event) if self.chunked_out else event)
        self.flush()
        self.client.close_after_write()
        self._finish(pool=False)

    def _fail(self, exc: BaseException) -> None:
        """Before a head was written: drop the upstream socket, the caller raises exc."""
        self._finish(pool=False, exc=exc)

    def _finish(self, pool: bool, exc: BaseException | None = None) -> None:
        self._release_conn(pool)
        self._cleanup()
        if self.finished:
            return
        self.finished = True
        if self.events and self.ctx.completion_tokens is None:    # a stream cut before its counts
            account_cut(self.ctx, self.tail, self.events)
        if self._on_done is not None:
            self._on_done(self, exc)
            return
        done = self.done
        if not done.done():          # cancelled with the task that awaited it: nobody to tell
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def _release_conn(self, pool: bool) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if pool and self.upstream_keep_alive:
            conn.pool.release(conn, True)
        else:
            conn.detach()
            conn.abort()

    def _cleanup(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self.client.exchange is self:
            self.client.exchange = None

    def abort(self) -> None:
        """Cancelled from outside (shutdown, task cancellation): drop the upstream socket."""
        if not self.finished:
            if self.ctx.outcome == "ok" or not self.ctx.outcome:
                self.ctx.outcome = "cancelled"
            self._finish(pool=False)

    def _account(self) -> None:
        if self.sse:
            account(self.ctx, bytes(self.tail))
        elif self.body_parts:
            parts = self.body_parts
            account(self.ctx, parts[0] if len(parts) == 1 else b"".join(parts), sse=False)


def _launch(call: Call, conn, method: str, payload: bytes, transform=None, on_done=None) -> Exchange:
    """Bind a new Exchange to the call's client and to `conn`, and send the request."""
    cfg = call.services.config
    client = call.client
    req = call.req
    ex = Exchange(client, call.ctx, head_only=req.method == "HEAD", http10=req.version == (1, 0),
                  first_byte_timeout=cfg.request_timeout, idle_timeout=cfg.stream_idle_timeout,
                  write_timeout=cfg.client_write_timeout, account=call.route.name != "models",
                  transform=transform, loop=client.loop, on_done=on_done)
    ex.conn = conn
    ex.router = call.lease is not None
    client.exchange = ex
    if client.write_paused:
        ex.on_client_paused()
    conn.start(ex, method, payload)
    return ex


async def proxy(call: Call) -> None:
    """The handler of the OpenAI-compatible routes (api/routes.py): the request, rebuilt, to
    llama-server at route.upstream, and its answer relayed. The connection's callback path calls
    start() instead when a pooled connection is at hand."""
    await forward(call)


def start(call: Call, conn, on_done) -> Exchange:
    """forward() without a coroutine, for a connection already at hand (a pooled one): the end,
    failures before the head included, is told to on_done(exchange, exc), which also decides on
    the retry of a stale connection (UpstreamClosed without bytes)."""
    req = call.req
    method = "GET" if req.method == "HEAD" else req.method
    payload = build_request(method, call.route.upstream, req.headers, call.body,
                                     call.services.backend_hostport, call.client.peer_host,
                                     call.ctx.request_id)
    return _launch(call, conn, method, payload, on_done=on_done)


async def forward(call: Call, *, upstream_path: str | None = None, method: str | None = None,
                  headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                  transform=None) -> None:
    """Send the rebuilt request to llama-server and relay the response to the call's client.

    API translators pass their own upstream path, method, headers, body and a response
    transform. call.fresh: the retry after a stale pooled connection (start()): one attempt, on a
    new connection. Raises GatewayError before the response head is written (the caller renders
    it); after that, failures are handled in-band by the Exchange and recorded in ctx.outcome."""
    req = call.req
    ctx = call.ctx
    client = call.client
    services = call.services
    pool = services.pool
    if method is None:
        method = "GET" if req.method == "HEAD" else req.method
    payload = build_request(method, upstream_path or call.route.upstream,
                                     req.headers if headers is None else headers,
                                     call.body if body is None else body,
                                     services.backend_hostport, client.peer_host, ctx.request_id)
    for attempt in ((1,) if call.fresh else (0, 1)):
        try:
            conn = None if attempt else pool.take_idle()   # no await when one is idle
            if conn is None:
                conn = await pool.acquire(fresh=True)
        except TimeoutError:
            raise GatewayError(504, "llama-server did not accept the connection in time",
                               "upstream_connect_timeout") from None
        except OSError as exc:
            raise services.unreachable(exc) from None     # 503 from the state file, or 502
        if client.gone or client.eof:
            # The client left while we connected: send nothing; the unused connection is pooled.
            pool.release(conn, True)
            ctx.outcome = "client_closed"
            return
        ex = _launch(call, conn, method, payload, transform)
        try:
            await ex.done
            return
        except UpstreamClosed as exc:
            if attempt == 0 and conn.reused and not exc.got_bytes:
                continue    # a stale pooled connection: nothing was answered, try a fresh one
            raise closed_without_answer() from None
        except asyncio.CancelledError:
            ex.abort()
            raise
