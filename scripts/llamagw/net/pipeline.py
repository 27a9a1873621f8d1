"""One request from its head to its end: PendingRequest, shared by both ways a request is served.

The client connection (net/connection.py) serves a request on its callback path (the whole
request at hand, nothing to wait for) or in its task (anything that waits). Both executors run
the same synchronous steps, in this order, on a PendingRequest:

    p = PendingRequest(client, req)   begin: context, request id, in_flight
    p.prepare(route, body)            the route (404 / 405), CORS headers (or a same-origin
                                      route's security headers), key, rate and concurrency
                                      limits (admission); with the body at hand (the callback
                                      path) ready(body) too. Raises GatewayError
    p.ready(body)                     once the body is in: the JSON body check (400), the
                                      model (route.model: resolved, scoped, models/serving.py),
                                      then, without waiting, the model's lease (router mode)
                                      and the backend check and a free backend slot (the
                                      model's own in router mode); False: the task waits for
                                      them (execute, hold)
    p.fail(err)                       the error answer in the route's envelope (if no head is out)
    p.release()                       lease, slot, ticket, in_flight, duration, observe:
                                      idempotent, called once from one place by each executor

No await sits between a check and the action it allows: prepare and ready are synchronous. The
slot is taken once the body is in, so a slow upload never holds a backend slot.

Hot path: the callback path runs this for every proxied request (slots, few calls, no closures).
"""

from __future__ import annotations

import asyncio
import time

from llamagw.api import routes
from llamagw.context import (REQUEST_ID_RE, Client, RequestContext, Response, StreamResponse,
                             new_request_id)
from llamagw.errors import Envelope, GatewayError, ProtocolError
from llamagw.limits import admission
from llamagw.net import fastio
from llamagw.wire import http11, jsonguard

# Added to every streamed answer: no cache and no proxy buffering may hold its chunks back.
STREAM_HEADERS = [("cache-control", "no-cache"), ("x-accel-buffering", "no")]


class ClientGone(Exception):
    """The client went away (or half-closed) while its request waited or was answered."""


def internal_error() -> GatewayError:
    """The answer to a request whose handling failed unexpectedly (a bug): logged where it is
    caught, the client gets a 500 in its route's envelope, and the connection is closed (its
    state is not to be trusted)."""
    return GatewayError(500, "Internal error: the gateway could not handle this request",
                        "internal_error", close=True)


class PendingRequest:
    """A request being served: what the executors and the handler share (the handler's Call)."""

    __slots__ = ("client", "services", "req", "ctx", "route", "ticket", "slot", "body", "fresh",
                 "released", "lease")

    def __init__(self, client: Client, req: http11.Request):
        services = client.services
        self.client = client
        self.services = services
        self.req = req
        rid = req.get("x-request-id")
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            rid = new_request_id()
        ctx = RequestContext(client.peer_host, req.method, req.path, rid)
        ctx.response_headers.append(("x-request-id", rid))
        self.ctx = ctx
        self.route = None
        self.ticket = admission.NO_TICKET
        self.slot = None
        self.body = b""
        self.fresh = False       # relay: a new llama-server connection only (the retry)
        self.released = False
        self.lease = None        # router mode: the model's (models/router.Lease)
        if not req.keep_alive or services.shutting_down:
            client.keep_alive = False
        services.in_flight += 1

    # ---------------- the steps ----------------
    def prepare(self, route=None, body: bytes | None = None) -> bool:
        """The route (given by the callback path, which looked it up), CORS (or, on a
        same-origin route, its security headers), then admission: key, rate limit, per-key
        concurrency; then, given the body, ready(body) (its answer is returned; False without
        a body). Raises GatewayError."""
        req = self.req
        ctx = self.ctx
        origin = req.get("origin")
        if route is None:
            try:
                route = routes.match(req.method, req.path)   # 404 / 405; OPTIONS: preflight
            except GatewayError:
                if origin is not None and routes.envelope_for(req.path) is not Envelope.ADMIN:
                    ctx.response_headers.extend(self.services.cors.headers_for(origin))
                raise
        self.route = route
        ctx.route = route.name
        if not route.cors:                       # the admin API, the dashboard
            ctx.response_headers.extend(route.headers)
        elif origin is not None:
            ctx.response_headers.extend(self.services.cors.headers_for(origin))
        self.ticket = self.services.admission.admit(req, route, ctx)
        return False if body is None else self.ready(body)

    def ready(self, body: bytes) -> bool:
        """The body is in: 400 for a JSON body out of jsonguard's limits, then, for a route
        served by llama-server, its model (route.model: 400, 403, 404), the backend check and a
        free backend slot, and in router mode the model's lease (route.lease), without waiting.
        True when nothing is left to wait for; False when the request must wait (execute).
        Raises GatewayError (400, 403, 404; 503: backend not ready, queue full)."""
        self.body = body
        route = self.route
        if route.json_body:
            jsonguard.check(body)
        if route.local:
            return True
        services = self.services
        ctx = self.ctx
        if route.model:
            if services.router_mode:
                services.models.pick(self)       # may rewrite self.body ("model")
                if not route.lease:
                    return True                  # the handler holds the model (hold())
                # The lease first: a request waiting for its model to load holds none of the
                # model's slots (those serve the requests that can run), and a model with
                # requests queued for its slots is never unloaded under them.
                self.lease = services.models.try_lease(ctx.model)
                if self.lease is None:
                    return False
            elif ctx.key_models is not None:
                services.models.pick(self)       # 403 for a key that may not use the model
            else:
                ctx.model = services.model_name
        slot = services.try_backend_slot(ctx, ctx.model)
        self.slot = slot
        return slot is not None

    async def read_body(self) -> bytes:
        """The body, in the task: CLIENT_BODY_TIMEOUT in all, CLIENT_BODY_IDLE_TIMEOUT between
        bytes (408, close). 100 Continue is sent only now, once the request is accepted: a
        refused one gets its final status instead (RFC 9110 10.1.1), and no body is sent."""
        client = self.client
        req = self.req
        ctx = self.ctx
        if not req.chunked and not req.content_length:
            client.body_read = True
            return b""          # its END_OF_MESSAGE is already taken (the connection did)
        if req.expect_continue and not ctx.continued:
            ctx.continued = True
            client.write(http11.CONTINUE_100)
        config = self.services.config
        loop = client.loop
        parser = client.parser
        total_deadline = loop.time() + config.client_body_timeout
        parts: list[bytes] = []
        while True:
            event = parser.next_event()
            if type(event) is http11.Data:
                parts.append(event.data)
                ctx.bytes_in += len(event.data)
                continue
            if type(event) is http11.EndOfMessage:
                client.body_read = True
                return b"".join(parts) if len(parts) != 1 else parts[0]
            if client.gone:
                raise ClientGone()
            if client.eof:
                # feed_eof makes the parser raise for an incomplete body; be explicit anyway
                raise ProtocolError("Request body incomplete", 400, "incomplete_request")
            deadline = min(loop.time() + config.client_body_idle_timeout, total_deadline)
            if not await client.wait_data(deadline) and loop.time() >= deadline:
                raise ProtocolError("Request body not received in time", 408, "body_timeout")

    async def execute(self) -> None:
        """The task's part, once ready: the wait in the bounded queue for a backend slot if
        ready() found none, then the route's handler, and its answer."""
        route = self.route
        if not route.local and (route.lease or not route.model
                                or not self.services.router_mode):
            await self.hold()
        answer = await route.handler(self)
        if answer is None:                         # answered through the relay
            return
        if type(answer) is Response:
            self.respond(answer.status, answer.headers, answer.body)
            self.ctx.outcome = "ok"
        elif type(answer) is StreamResponse and route.streams:
            await self._stream(answer)
        else:
            raise TypeError(f"route {route.name}: its handler answered {answer!r}")

    async def hold(self) -> None:
        """What ready() found missing, waited for: in router mode the model's lease (loading
        it first: MODEL_LOAD_WAIT), then a backend slot (the model's queue: QUEUE_TIMEOUT).
        The Ollama inference handlers call it themselves (an empty prompt loads or unloads the
        model instead). A client that leaves meanwhile gives up its place."""
        client = self.client
        services = self.services
        client.stop_if_gone = True
        try:
            if self.lease is None and services.router_mode and self.route.model:
                self.lease = await services.models.lease(self.ctx.model)
            if self.slot is None:
                self.slot = await services.backend_slot(self.ctx)
        finally:
            client.stop_if_gone = False
        if client.gone or client.eof:
            raise ClientGone()

    # ---------------- the end ----------------
    def fail(self, err: GatewayError) -> None:
        """Answer a request's error, unless its head is already out; close where needed."""
        client = self.client
        ctx = self.ctx
        if err.status in (502, 504):
            # llama-server failed it (the gateway's own failures are 500 / 503); counted once by
            # observe(), like an answer cut after its head (relay.Exchange).
            ctx.upstream_error = err.code
        if not client.body_read or err.close:
            client.keep_alive = False
        if ctx.status:                     # a head was already sent: nothing more to say
            client.keep_alive = False
        elif not client.gone:
            headers = [("content-type", "application/json")]
            headers.extend(err.headers)
            if not ctx.outcome:
                ctx.outcome = err.code
            self.respond(err.status, headers, err.body(self.envelope))
            if not client.keep_alive:      # the client may still be sending: it reads the error
                fastio.linger_on_close(client.transport)

    @property
    def envelope(self) -> Envelope:
        """Its route's error shape; for a path no route serves, the one of the API asked."""
        route = self.route
        return route.envelope if route is not None else routes.envelope_for(self.req.path)

    def release(self) -> None:
        """Free the backend slot and the key's ticket, end the request and observe it. Called by
        each executor once, from one place, on every exit; a second call does nothing."""
        if self.released:
            return
        self.released = True
        lease = self.lease
        if lease is not None:
            # cut: llama-server failed or cut the answer (the model may have died)
            self.lease = None
            lease.release(cut=bool(self.ctx.upstream_error))
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.release()
        self.ticket.release()
        client = self.client
        services = self.services
        services.in_flight -= 1
        ctx = self.ctx
        ctx.duration = time.monotonic() - ctx.started
        if not ctx.outcome:
            ctx.outcome = "client_closed" if client.gone or client.eof else "error"
        if client.gone and ctx.outcome == "ok" and ctx.status == 0:
            ctx.outcome = "client_closed"
        services.observe(ctx)

    # ---------------- answers ----------------
    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A whole answer with its length (HEAD: the same head, no body)."""
        client = self.client
        req = self.req
        ctx = self.ctx
        out = list(headers)
        out.extend(ctx.response_headers)
        if status != 204 and status != 304:
            out.append(("content-length", str(len(body))))
        if not client.keep_alive:
            out.append(("connection", "close"))
        elif req.version == (1, 0):
            out.append(("connection", "keep-alive"))   # HTTP/1.0 closes unless told otherwise
        ctx.status = status
        if req.method == "HEAD":
            body = b""
        ctx.bytes_out += len(body)
        client.write(http11.response_head(status, out) + body)

    async def _stream(self, answer: StreamResponse) -> None:
        """Write a streamed answer (context.StreamResponse: framing, backpressure, bounds)."""
        client = self.client
        req = self.req
        ctx = self.ctx
        config = self.services.config
        chunks = aiter(answer.chunks)
        try:
            headers = list(answer.headers)
            headers.extend(STREAM_HEADERS)
            headers.extend(ctx.response_headers)
            chunked = req.version != (1, 0)
            if chunked:
                headers.append(("transfer-encoding", "chunked"))
            else:
                client.keep_alive = False          # the end of the body is the connection's
            if not client.keep_alive:
                headers.append(("connection", "close"))
            ctx.status = answer.status
            ctx.stream = True
            client.write(http11.response_head(answer.status, headers))
            if req.method == "HEAD":
                ctx.outcome = "ok"
                return
            idle = answer.idle_timeout or config.stream_idle_timeout
            client.stop_if_gone = True             # a client that leaves cancels the stream
            try:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:           # cut: closed without its last chunk
                        ctx.outcome = "stream_idle_timeout"
                        client.keep_alive = False
                        return
                    if not chunk:
                        continue
                    ctx.bytes_out += len(chunk)
                    client.write(http11.chunk(chunk) if chunked else chunk)
                    if client.write_paused and not await client.drained(
                            config.client_write_timeout):
                        ctx.outcome = "client_write_timeout"
                        client.abort()
                        return
            finally:
                client.stop_if_gone = False
            if chunked:
                client.write(http11.LAST_CHUNK)
            ctx.outcome = "ok"
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
