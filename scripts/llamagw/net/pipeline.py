"""One request from its head to its end: PendingRequest, shared by both ways a request is served.

The client connection (net/connection.py) serves a request on its callback path (the whole
request at hand, nothing to wait for) or in its task (anything that waits). Both executors run
the same synchronous steps, in this order, on a PendingRequest:

    p = PendingRequest(client, req)   begin: context, request id, in_flight
    p.prepare(route=None)             CORS headers, the route (404 / 405), key, rate and
                                      concurrency limits (admission): raises GatewayError
    p.check_body(body)                the JSON body check (400) once the body is in
    p.take_slot()                     the backend check and a free backend slot without waiting;
                                      False: the task waits in the queue (execute)
    p.fail(err)                       the error answer in the route's envelope (if no head is out)
    p.release()                       slot, ticket, in_flight, duration, observe: idempotent,
                                      called once from one place by each executor

No await sits between a check and the action it allows: prepare and take_slot are synchronous.
The slot is taken once the body is in, so a slow upload never holds a backend slot.

Hot path: the callback path runs this for every proxied request (slots, few calls, no closures).
"""

from __future__ import annotations

import time

from llamagw.api import routes
from llamagw.api.ollama import error_body as ollama_error_body
from llamagw.context import REQUEST_ID_RE, RequestContext, new_request_id
from llamagw.errors import GatewayError
from llamagw.limits import admission
from llamagw.wire import http11, jsonguard


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
                 "ollama", "released")

    def __init__(self, client, req: http11.Request):
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
        self.ollama = False      # errors in Ollama's shape {"error": "..."}
        self.released = False
        if not req.keep_alive or services.shutting_down:
            client.keep_alive = False
        services.in_flight += 1

    # ---------------- the steps ----------------
    def prepare(self, route=None) -> None:
        """CORS, the route (given by the callback path, which looked it up), then admission:
        key, rate limit, per-key concurrency. Raises GatewayError."""
        req = self.req
        origin = req.get("origin")
        if origin is not None:
            self.ctx.response_headers.extend(self.services.cors.headers_for(origin))
        if route is None:
            # Ollama clients get Ollama-shaped errors, unknown /api/* paths (404/405) included.
            self.ollama = req.path == "/" or req.path.startswith("/api/")
            if req.method == "OPTIONS":
                return                   # a preflight: answered by execute
            route = routes.match(req.method, req.path)
        self.route = route
        self.ctx.route = route.name
        self.ticket = self.services.admission.admit(req, route, self.ctx)

    def check_body(self, body: bytes) -> None:
        """The body is in: 400 for a JSON body out of jsonguard's limits, before any slot."""
        self.body = body
        if self.route is not None and self.route.json_body:
            jsonguard.check(body)

    def take_slot(self) -> bool:
        """The backend check and a free backend slot, without waiting; False when the request
        must wait in the queue. Raises GatewayError (503: backend not ready, queue full)."""
        slot = self.services.try_backend_slot()
        self.slot = slot
        return slot is not None

    async def execute(self) -> None:
        """The task's part, once the body is in: a local answer, or a backend slot (waiting in
        the bounded queue if need be) and llama-server."""
        client = self.client
        services = self.services
        route = self.route
        ctx = self.ctx
        if route is None:                          # a CORS preflight
            self.respond(*services.cors.preflight(self.req))
            ctx.outcome = "ok"
            return
        if services.is_local(route):
            self.respond(*services.local(route, self.req, ctx, self.body))
            ctx.outcome = "ok"
            return
        if self.slot is None and not self.take_slot():
            client.stop_if_gone = True             # a client that leaves gives up its place
            try:
                self.slot = await services.backend_slot(ctx)
            finally:
                client.stop_if_gone = False
        if client.gone or client.eof:
            raise ClientGone()
        await services.dispatch(self)

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
            body = ollama_error_body(err.message) if self.ollama else err.body()
            self.respond(err.status, headers, body)

    def release(self) -> None:
        """Free the backend slot and the key's ticket, end the request and observe it. Called by
        each executor once, from one place, on every exit; a second call does nothing."""
        if self.released:
            return
        self.released = True
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
        if status != 204:
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
