"""What one request is, and the seams request code sees.

RequestContext: what a request did, filled in along the way, read by the access log and metrics.
Request ids: ours, or the client's X-Request-Id when it looks like one.

The seams are typing.Protocols (checked by a type checker, free at run time): request code (the
pipeline, the relay, the handlers) depends on them, not on the modules that implement them.
- Services: what request code uses of the gateway (app.Gateway implements it);
- Client: what the relay and the request cycle use of a client connection (net/connection.py);
- Call: what a route handler is given (net/pipeline.PendingRequest).
Response / StreamResponse: what a local handler answers, whole or streamed.

At run time this module imports nothing of the package, so every layer may import it.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # annotations only: none of these imports this module
    import asyncio

    from llamagw.config import Config
    from llamagw.limits.admission import Admission
    from llamagw.net.upstream import UpstreamPool
    from llamagw.observe.metrics import Metrics
    from llamagw.wire.http11 import Request, RequestParser

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
                 "continued", "model", "key_models",
                 # usage (issue 28): cached prompt tokens, the model llama-server answered with
                 "cached_tokens", "answered_model")

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
        # The model it was for: a catalog name, never what the client wrote (models/serving.py)
        self.model: str | None = None
        # The key's `models=` (limits/keys.KeyInfo.models; None: every model), set by admission
        self.key_models: frozenset[str] | None = None
        self.cached_tokens: int | None = None     # prompt tokens llama-server had cached
        self.answered_model: str | None = None    # the answer's "model" (observe/tokens.py)


class Client(Protocol):
    """A client connection, as the request cycle and the relay see it."""

    services: Services
    loop: asyncio.AbstractEventLoop
    transport: Any            # its transport (fastio.SocketTransport): linger_on_close on errors
    parser: RequestParser     # the request's events
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
    async def wait_data(self, deadline: float) -> bool: ...
    async def drained(self, timeout: float) -> bool: ...


class Services(Protocol):
    """What request code uses of the gateway: its parts, its counters and five request services.
    Parts whose module imports request code are typed Any (naming them would make a cycle)."""

    config: Config
    metrics: Metrics
    admission: Admission
    cors: Any                 # api.cors.Cors
    pool: UpstreamPool
    backend: Any              # the backend state (ready, starting ...): get(), refresh()
    ledger: Any               # observe.usage.Ledger, or None (USAGE_ENABLED=false)
    catalog: Any              # the models' GGUF descriptions (models/describe.ModelCatalog)
    models: Any               # models/serving.ModelService: names, scoping, leases, slots
    router_mode: bool         # MODELS_DIR: llama-server runs as a router over several models
    backend_hostport: str     # the Host header of upstream requests
    started: float            # time.monotonic() at start
    connections: set
    in_flight: int
    shutting_down: bool

    def try_backend_slot(self, ctx: RequestContext, model: str | None = None) -> Any: ...
    async def backend_slot(self, ctx: RequestContext) -> Any: ...
    def unreachable(self, exc: OSError) -> Exception: ...
    def observe(self, ctx: RequestContext) -> None: ...
    def observe_protocol_error(self, peer: str, err: Exception) -> None: ...


class Call(Protocol):
    """What a route handler is given: the request, its body, its context and the services."""

    client: Client
    services: Services
    req: Request
    ctx: RequestContext
    route: Any                # api.routes.Route
    body: bytes
    fresh: bool               # relay: on a new llama-server connection only (a retry)
    lease: Any                # router mode: the model's lease (models/router.Lease) or None

    async def hold(self) -> None: ...    # router mode: the model's lease, then a backend slot


@dataclasses.dataclass(slots=True)
class Response:
    """A whole answer. The gateway adds Content-Length, the connection header, the request id
    and CORS headers; HEAD gets the same head without the body."""
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclasses.dataclass(slots=True)
class StreamResponse:
    """A streamed answer (SSE, NDJSON): the head, then each chunk of `chunks` as it comes.

    Written with chunked framing (to an HTTP/1.0 client: until the connection closes), with
    Cache-Control: no-cache and X-Accel-Buffering: no added. Backpressure: while the client's
    transport buffer is over its high-water mark the next chunk is not asked for; a client that
    reads nothing for CLIENT_WRITE_TIMEOUT is dropped. A client that goes away (or half-closes)
    cancels the iterator where it waits, and the iterator is closed on every exit.

    Every stream is bounded: `idle_timeout` (seconds; None: STREAM_IDLE_TIMEOUT) is the longest
    wait for the next chunk, past which the stream is cut (closed without its last chunk). A
    stream that may be silent for longer yields a heartbeat within it (an SSE comment line
    b": ping\\n\\n"), which also finds a client that vanished without a word."""
    status: int
    headers: list[tuple[str, str]]
    chunks: AsyncIterable[bytes]
    idle_timeout: float | None = None
