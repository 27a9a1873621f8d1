"""What one request is, and the seams request code sees.

RequestContext: what a request did, filled in along the way, read by the access log and metrics.
Request ids: ours, or the client's X-Request-Id when it looks like one.

The seams are typing.Protocols (checked by a type checker, free at run time): request code (the
pipeline, the relay, the handlers) depends on them, not on the modules that implement them.
- Services: what request code uses of the gateway (app.Gateway implements it);
- Client: what the relay and the request cycle use of a client connection (net/connection.py);
- Call: what a route handler is given (net/pipeline.PendingRequest).

This module imports nothing of the package but the wire types, so every layer may import it.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # annotations only
    import asyncio

    from llamagw.wire.http11 import Request

# A client-provided X-Request-Id is kept only if it looks like an id (no log injection).
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Our request ids: a random per-process prefix (8 bytes from secrets, drawn once: not guessable,
# distinct across processes and restarts) and a counter (unique within the process): a secrets
# call per request is a measurable share of a small request's CPU.
REQUEST_ID_PREFIX_BYTES = 8
_RID_PREFIX = secrets.token_hex(REQUEST_ID_PREFIX_BYTES)
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """24+ hex digits: the process prefix, then the request counter (at least 8 digits)."""
    return f"{_RID_PREFIX}{next(_rid_counter):08x}"


class RequestContext:
    """What one request did: filled in along the way, read by the access log and metrics."""

    __slots__ = ("request_id", "key_id", "client", "method", "path", "route", "status",
                 "bytes_in", "bytes_out", "started", "ttfb", "duration", "stream", "outcome",
                 "prompt_tokens", "completion_tokens", "response_headers", "upstream_error",
                 "continued")

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


class Client(Protocol):
    """A client connection, as the request cycle and the relay see it."""

    loop: asyncio.AbstractEventLoop
    peer_host: str
    keep_alive: bool          # False: the connection closes after this answer
    gone: bool                # the client went away
    eof: bool                 # the client half-closed
    body_read: bool           # the request's body is in (an error answer may keep the connection)
    write_paused: bool        # the transport's buffer is over its high-water mark
    stop_if_gone: bool        # the task waits for this client only: its leaving cancels the task
    exchange: Any             # the relay exchange in flight (net/relay.Exchange) or None

    def write(self, data: bytes) -> None: ...
    def close_after_write(self) -> None: ...
    def abort(self) -> None: ...
    def arm(self, when: float) -> None: ...
    async def drained(self, timeout: float) -> bool: ...


class Services(Protocol):
    """What request code uses of the gateway: its parts, its counters and four request services.
    The parts are typed loosely (Any) where naming their class would import the module."""

    config: Any               # config.Config
    metrics: Any              # observe.metrics.Metrics
    admission: Any            # limits.admission.Admission
    cors: Any                 # api.cors.Cors
    pool: Any                 # net.upstream.UpstreamPool
    backend: Any              # the backend state (ready, starting ...)
    catalog: Any              # the served model for the Ollama API
    backend_hostport: str     # the Host header of upstream requests
    started: float            # time.monotonic() at start
    connections: set
    in_flight: int
    shutting_down: bool

    def try_backend_slot(self) -> Any: ...
    async def backend_slot(self, ctx: RequestContext) -> Any: ...
    def unreachable(self, exc: OSError) -> Exception: ...
    def observe(self, ctx: RequestContext) -> None: ...


class Call(Protocol):
    """What a route handler is given: the request, its body, its context and the services."""

    client: Client
    services: Services
    req: Request
    ctx: RequestContext
    route: Any                # api.routes.Route
    body: bytes
    fresh: bool               # relay: on a new llama-server connection only (a retry)
