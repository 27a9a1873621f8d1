"""Talk to llama-server's router: follow its model states, and load, unload and switch models on
the gateway's terms (/work/shared/ROUTER-MODE.md has the router's real behaviour).

RouterController is what the gateway holds. The request path calls, in this order:

    name = ctl.resolve(body["model"])            # ModelNotFound (404 model_not_found)
    ctl.check_allowed(key.models, name)          # ModelNotAllowed (403 model_not_allowed)
    lease = await ctl.acquire(name, timeout)     # loads it if needed: ModelLoading (503 +
                                                 # Retry-After), ModelFailed (503 + reason)
    try: ... forward with "model": name ...
    finally: lease.release(cut=stream_was_cut)

acquire() returns only when the model is loaded and not draining, and counts the request in
flight from that moment (no await between the check and the count), so an unload or an eviction
can never pull the model away from under it: unloads first stop routing new requests to the model
(`draining`: new requests wait for it to come back), then wait for the in-flight ones to end (up to
a drain deadline), then ask the router, then wait for the instance to exit.

Loads are the gateway's decision. llama-server runs with --no-models-autoload, and every load goes
through one load task per model that first makes room: when MODELS_MAX models occupy memory it
drains and unloads one (idle ones first, then the least recently used) before it asks the router
(which would otherwise evict the LRU model itself, busy streams or not, and even for a model
that then fails to load). A model that failed is not loaded again by requests before its back-off
(catalog.py) and, after EVICT_AFTER_FAILURES_MAX failures, never evicts a healthy model again
(it loads into free room only, or by an admin load/switch).

Waiters are granted in the same step that sees the model loaded: when a load completes, every
request waiting for it is counted in flight before anything else runs, so a model loaded for
waiting requests always serves them before another switch may drain it (no livelock with
MODELS_MAX=1 and requests for two models).

State comes from GET /models (at start, after every reconnect, every RESYNC_INTERVAL, and every
WAIT_POLL_INTERVAL while someone waits for a change) and /models/sse in between. Every GET the
gateway sends carries autoload=false: no probe ever loads a model (ROUTER-MODE.md §5).

Every wait has a deadline; every queue has a bound (the constants below say why).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import AsyncIterator, Iterable, Protocol

from llamagw.errors import RETRY_AFTER_LOADING
from llamagw.models import preset
from llamagw.models.catalog import Catalog, CatalogError, MAX_MODELS_BODY, State

log = logging.getLogger("gateway.models")

# --- limits and timings ---------------------------------------------------------------------------
# Connect to the router: a Unix connect completes or fails at once; loopback TCP within ms.
CONNECT_TIMEOUT = 5.0
# A router-native route (/models, /models/load, /models/unload) answers in ms: a load returns
# once the child is spawned (after an LRU victim exited: 0.06 s seen). 10 s means it hangs.
REQUEST_TIMEOUT = 10.0
# Response head from the router: ~200 bytes; 64 KiB is the gateway's own request-head bound.
MAX_HEAD_BYTES = 64 * 1024
# One SSE event: a `loaded` event carries the child's /v1/models entry (~1 KB).
MAX_EVENT_BYTES = 1 << 20
# The router's SSE has neither sequence numbers nor heartbeats: a lost event is caught only by
# re-reading /models. 30 s bounds how long a missed change can go unnoticed when nobody waits.
RESYNC_INTERVAL = 30.0
# While a load, an unload or a drain is waited on, /models is re-read at least this often, so a
# missed SSE event delays it by at most this much.
WAIT_POLL_INTERVAL = 1.0
# Reconnect to /models/sse: first retry soon (a restarted router is up in ~0.05 s), doubling up
# to RECONNECT_MAX so a router that is down costs one attempt every few seconds.
RECONNECT_INITIAL = 0.2
RECONNECT_MAX = 5.0
# Requests waiting for one model to load: the gateway's own queue bounds (MAX_QUEUE_SIZE) are
# far below this; it only stops a flood from growing memory without bound.
MAX_WAITERS_PER_MODEL = 1024
# /admin/events subscribers: an admin dashboard or two; 64 bounds the fan-out work per change.
MAX_SUBSCRIBERS = 64
# /admin/events heartbeat: below common proxy idle timeouts (60 s).
HEARTBEAT_INTERVAL = 15.0
# Defaults for what the gateway configures (MODEL_LOAD_WAIT and friends):
# a request waits this long for its model to load, then 503 model_loading (the load goes on);
DEFAULT_LOAD_WAIT = 120.0
# a load may take this long in llama-server before it counts as failed (a big model from a
# network volume takes minutes; the entrypoint's MODEL_LOAD_TIMEOUT is the same 600 s);
DEFAULT_LOAD_TIMEOUT = 600.0
# an unload or an eviction waits this long for in-flight requests before it unloads anyway (the
# gateway's REQUEST_TIMEOUT / STREAM_IDLE_TIMEOUT are 300 s: a stream alive longer is rare).
DEFAULT_DRAIN_TIMEOUT = 300.0
# After POST /models/unload, the instance exits within the preset's stop-timeout (killed then).
UNLOAD_TIMEOUT = preset.ROUTER_STOP_TIMEOUT + 10.0
# After the router said "model limit reached" (its count and ours disagreed for a moment).
LIMIT_RETRY_DELAY = 0.2

# What llama-server's router appends, as raw text inside a 200 body, when the instance behind a
# proxied answer dies or is killed mid-response (ROUTER-MODE.md §4): no [DONE], no SSE framing.
# A relay that sees it (or a stream that ends without its last event) ends the client's answer
# with an error event / NDJSON error line and releases its lease with cut=True.
ROUTER_CUT_MARKER = b"proxy error: "


# ---- errors ------------------------------------------------------------------------------------
class ModelError(Exception):
    """A request cannot use a model; status/code/message form the gateway's error answer."""
    status = 503
    code = "model_error"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ModelNotFound(ModelError):
    status = 404
    code = "model_not_found"


class ModelNotAllowed(ModelError):
    status = 403
    code = "model_not_allowed"


class ModelLoading(ModelError):
    code = "model_loading"


class ModelFailed(ModelError):
    code = "model_failed"


class RouterError(Exception):
    """The router did not answer as HTTP should (connection, framing, size, timeout)."""


# ---- the HTTP client ---------------------------------------------------------------------------
class RouterHTTP(Protocol):
    """What the controller needs from HTTP (tests inject a fake)."""

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]: ...

    async def events(self, path: str) -> EventStream:
        """Connected to an SSE stream (its 200 head read), or RouterError."""


class EventStream(Protocol):
    def __aiter__(self) -> AsyncIterator[dict]: ...   # each event's `data:` JSON
    async def aclose(self) -> None: ...


def no_autoload(path: str) -> str:
    """A GET path with autoload=false: llama-server loads a model for any GET naming one
    (`?model=`) unless told not to (ROUTER-MODE.md §5)."""
    if "autoload=" in path:
        return path
    return path + ("&" if "?" in path else "?") + "autoload=false"


class RouterClient:
    """A tiny HTTP/1.1 client for the router's own routes: one connection per request
    (`Connection: close`), over the Unix socket (or loopback TCP)."""

    def __init__(self, unix_path: str = "", host: str = "127.0.0.1", port: int = 0, *,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT):
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout

    async def _open(self):
        async with asyncio.timeout(self.connect_timeout):
            if self.unix_path:
                return await asyncio.open_unix_connection(self.unix_path, limit=MAX_HEAD_BYTES)
            return await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES)

    def _head(self, method: str, path: str, body: bytes | None, accept: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close",
                 f"Accept: {accept}"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]:
        if method == "GET":
            path = no_autoload(path)
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await self._open()
                try:
                    writer.write(self._head(method, path, body, "application/json"))
                    await writer.drain()
                    status, headers = await _read_head(reader)
                    data = await _read_body(reader, headers, MAX_MODELS_BODY)
                    return status, data
                finally:
                    writer.transport.abort()
        except TimeoutError:
            raise RouterError(f"{method} {path}: no answer within {self.request_timeout} s")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            raise RouterError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from None

    async def events(self, path: str) -> SSEStream:
        """Connect to an SSE stream and read its head (bounded by request_timeout); the
        stream itself is not bounded in time: the router's SSE is silent while nothing
        changes. RouterError unless the answer is 200."""
        path = no_autoload(path)
        writer = None
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await self._open()
                writer.write(self._head("GET", path, None, "text/event-stream"))
                await writer.drain()
                status, headers = await _read_head(reader)
        except BaseException as exc:
            if writer is not None:
                writer.transport.abort()
            if isinstance(exc, TimeoutError):
                raise RouterError(f"GET {path}: no answer within {self.request_timeout} s")
            if isinstance(exc, (OSError, asyncio.IncompleteReadError,
                                asyncio.LimitOverrunError, ValueError)):
                raise RouterError(f"GET {path}: {exc.__class__.__name__}: {exc}") from None
            raise
        if status != 200:
            writer.transport.abort()
            raise RouterError(f"GET {path}: status {status}")
        return SSEStream(path, reader, writer, headers)


class SSEStream:
    """An open SSE response: iterate for each event's data (parsed JSON); aclose() drops it."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer, headers: dict):
        self.path = path
        self._reader = reader
        self._writer = writer
        self._headers = headers

    async def __aiter__(self):
        buf = b""
        try:
            async for piece in _body_pieces(self._reader, self._headers):
                buf = (buf + piece).replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    event = _sse_data(block)
                    if event is not None:
                        yield event
                if len(buf) > MAX_EVENT_BYTES:
                    raise RouterError(f"GET {self.path}: an SSE event over {MAX_EVENT_BYTES} "
                                      f"bytes")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            raise RouterError(f"GET {self.path}: {exc.__class__.__name__}: {exc}") from None
        finally:
            self._writer.transport.abort()

    async def aclose(self) -> None:
        self._writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body as it arrives: chunked, Content-Length or up to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            if size > MAX_MODELS_BODY:
                raise ValueError(f"chunk of {size} bytes")
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        if left > MAX_MODELS_BODY:
            raise ValueError(f"body of {left} bytes")
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def _read_body(reader, headers, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for piece in _body_pieces(reader, headers):
        size += len(piece)
        if size > limit:
            raise ValueError(f"body larger than {limit} bytes")
        parts.append(piece)
    return b"".join(parts)


def _sse_data(block: bytes) -> dict | None:
    data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None
    try:
        event = json.loads(b"\n".join(data))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:200]
        if isinstance(err, str):
            return err[:200]
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")


# ---- the controller ----------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Waiter:
    future: asyncio.Future
    lease: bool          # count it in flight when granted (a request), or not (admin/preload)
    force: bool          # an admin load: ignores the failure back-off and the eviction limit
    attempt: int         # load requests sent for the model before this waiter came


class Lease:
    """One request in flight on a model. release() exactly once (more calls are no-ops)."""

    __slots__ = ("_ctl", "name", "_released")

    def __init__(self, ctl: RouterController, name: str):
        self._ctl = ctl
        self.name = name
        self._released = False

    def release(self, *, cut: bool = False) -> None:
        """cut: llama-server ended the answer abnormally (a stream without its end, a `proxy
        error:` body): the model may have died, so /models is re-read at once."""
        if self._released:
            return
        self._released = True
        self._ctl.catalog.release(self.name)
        if cut:
            self._ctl.request_resync()

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Subscriber:
    __slots__ = ("pending", "wake")

    def __init__(self):
        self.pending: dict[str, None] = {}     # changed names, in order, each once
        self.wake = asyncio.Event()


class RouterController:
    def __init__(self, client: RouterHTTP, *, models_max: int = 1,
                 catalog: Catalog | None = None,
                 load_wait: float = DEFAULT_LOAD_WAIT,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 unload_timeout: float = UNLOAD_TIMEOUT,
                 resync_interval: float = RESYNC_INTERVAL,
                 poll_interval: float = WAIT_POLL_INTERVAL,
                 reconnect_initial: float = RECONNECT_INITIAL,
                 reconnect_max: float = RECONNECT_MAX):
        self.client = client
        self.models_max = models_max
        self.catalog = catalog or Catalog()
        self.load_wait = load_wait
        self.load_timeout = load_timeout
        self.drain_timeout = drain_timeout
        self.unload_timeout = unload_timeout
        self.resync_interval = resync_interval
        self.poll_interval = poll_interval
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.connected = False          # following /models/sse after a fresh snapshot
        self.snapshots = 0              # GET /models answers applied (for tests and metrics)
        self._waiters: dict[str, list[_Waiter]] = {}
        self._attempts: dict[str, int] = {}      # POST /models/load sent, per model
        self._loads: dict[str, asyncio.Task] = {}
        self._unloading: set[str] = set()
        self._capacity = asyncio.Lock()  # one eviction plan + load request at a time
        self._change: asyncio.Future | None = None
        self._dirty: set[str] = set()
        self._servicing = False
        self._subs: set[_Subscriber] = set()
        self._tasks: set[asyncio.Task] = set()
        self._snapshot_task: asyncio.Task | None = None
        self._closed = False
        self.catalog.listeners.append(self._on_change)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self, timeout: float = REQUEST_TIMEOUT) -> None:
        """Read /models (retrying until timeout: the router may still be starting), then
        follow its changes in the background. RouterError if it never answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = self.reconnect_initial
        while True:
            try:
                await self.resync()
                break
            except (RouterError, CatalogError) as exc:
                if loop.time() + delay >= deadline:
                    raise RouterError(f"llama-server's router did not answer /models: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
        self._spawn(self._follow())
        self._spawn(self._resync_loop())

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks) + list(self._loads.values())
        if self._snapshot_task is not None:
            tasks.append(self._snapshot_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for name in list(self._waiters):
            self._fail_waiters(name, ModelLoading("the gateway is shutting down",
                                                  retry_after=RETRY_AFTER_LOADING))
        for sub in self._subs:
            sub.wake.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- names and scoping ----------------------------------------------------------------------
    def resolve(self, requested) -> str:
        name = self.catalog.resolve(requested)
        if name is None:
            shown = requested if isinstance(requested, str) else ""
            raise ModelNotFound(f"model '{shown[:200]}' not found")
        return name

    def check_allowed(self, key_models: frozenset[str] | None, name: str) -> None:
        if not self.catalog.allowed(key_models, name):
            raise ModelNotAllowed(f"this key may not use model '{name}'")

    # ---- requests --------------------------------------------------------------------------------
    async def acquire(self, name: str, timeout: float | None = None) -> Lease:
        """A lease on a loaded model, loading it first when needed (waits at most timeout,
        default load_wait). ModelNotFound, ModelFailed, ModelLoading."""
        m = self.catalog.get(name)
        if m is None:
            raise ModelNotFound(f"model '{name}' not found")
        if m.serving and not self._waiters.get(name):
            self.catalog.acquire(name)
            return Lease(self, name)
        await self._wait_for(name, self.load_wait if timeout is None else timeout,
                             lease=True, force=False)
        return Lease(self, name)

    async def ensure_loaded(self, name: str, timeout: float | None = None, *,
                            force: bool = False) -> None:
        """Load a model without sending a request to it (admin load, Ollama's empty prompt,
        preload). force: an operator's load ignores the failure back-off and may evict."""
        if self.catalog.get(name) is None:
            raise ModelNotFound(f"model '{name}' not found")
        await self._wait_for(name, self.load_wait if timeout is None else timeout,
                             lease=False, force=force)

    async def preload(self, names: Iterable[str], timeout: float | None = None
                      ) -> dict[str, ModelError | None]:
        """Load several models (MODELS_PRELOAD when llama-server cannot); name -> error."""
        names = list(names)
        results = await asyncio.gather(*(self.ensure_loaded(n, timeout) for n in names),
                                       return_exceptions=True)
        out: dict[str, ModelError | None] = {}
        for name, result in zip(names, results):
            if isinstance(result, ModelError) or result is None:
                out[name] = result
            elif isinstance(result, BaseException):
                out[name] = ModelLoading(str(result), retry_after=RETRY_AFTER_LOADING)
        return out

    async def unload(self, name: str, drain_timeout: float | None = None) -> None:
        """Stop routing to the model, wait for its in-flight requests (drain_timeout, default
        self.drain_timeout), unload it and wait until it exited. Requests that arrive meanwhile
        wait for it to load again."""
        if self.catalog.get(name) is None:
            raise ModelNotFound(f"model '{name}' not found")
        loop = asyncio.get_running_loop()
        drain = self.drain_timeout if drain_timeout is None else drain_timeout
        await self._drain_and_unload(name, loop.time() + drain)

    async def switch(self, name: str, *, drain_timeout: float | None = None,
                     timeout: float | None = None) -> None:
        """Load `name` and unload every other model, in the order MODELS_MAX allows: when it
        fits next to them, load first (no gap), else unload them first."""
        target = self.catalog.get(name)
        if target is None:
            raise ModelNotFound(f"model '{name}' not found")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.load_timeout if timeout is None else timeout)
        drain = self.drain_timeout if drain_timeout is None else drain_timeout
        async with self._capacity:
            others = [m.name for m in self.catalog.occupied(exclude=name)]
            fits = self.models_max <= 0 or len(others) + 1 <= self.models_max
            if not fits:
                await self._unload_all(others, loop.time() + drain)
            if not target.occupies:
                await self._post_load(name)
        await self._await_loaded(name, deadline)
        if target.state is not State.LOADED:
            raise self._failed_error(name)
        if fits:
            await self._unload_all([m.name for m in self.catalog.occupied(exclude=name)],
                                   loop.time() + drain)

    def snapshot(self, key_models: frozenset[str] | None = None) -> list[dict]:
        return self.catalog.snapshot(key_models)

    def health(self, preload: Iterable[str]) -> str:
        return self.catalog.health(preload)

    # ---- /admin/events -------------------------------------------------------------------------
    async def events(self, *, heartbeat: float = HEARTBEAT_INTERVAL,
                     key_models: frozenset[str] | None = None) -> AsyncIterator[dict]:
        """{"type": "snapshot", "models": [...]} first, then {"type": "model", "model": {...}}
        for each change (coalesced per model: a slow reader gets the latest state, never a
        backlog), {"type": "removed", "name": ...}, and {"type": "heartbeat"} after
        `heartbeat` s without a change. Ends when the controller closes."""
        if len(self._subs) >= MAX_SUBSCRIBERS:
            raise ModelError(f"more than {MAX_SUBSCRIBERS} event subscribers",
                             retry_after=RETRY_AFTER_LOADING)
        sub = _Subscriber()
        self._subs.add(sub)
        try:
            yield {"type": "snapshot", "models": self.catalog.snapshot(key_models)}
            while not self._closed:
                try:
                    async with asyncio.timeout(heartbeat):
                        await sub.wake.wait()
                except TimeoutError:
                    yield {"type": "heartbeat"}
                    continue
                sub.wake.clear()
                names = list(sub.pending)
                sub.pending.clear()
                for name in names:
                    if name in self.catalog:
                        if self.catalog.allowed(key_models, name):
                            yield {"type": "model", "model": self.catalog.public(name)}
                    else:
                        yield {"type": "removed", "name": name}
        finally:
            self._subs.discard(sub)

    # ---- state from the router ------------------------------------------------------------------
    async def resync(self) -> None:
        """Re-read GET /models now (one request at a time: callers share the one in flight)."""
        task = self._snapshot_task
        if task is None or task.done():
            task = self._snapshot_task = asyncio.get_running_loop().create_task(
                self._snapshot())
        await asyncio.shield(task)

    def request_resync(self) -> None:
        """Re-read /models soon, without waiting (from synchronous code)."""
        if not self._closed:
            self._spawn(self._quiet_resync())

    async def _quiet_resync(self) -> None:
        with contextlib.suppress(RouterError, CatalogError):
            await self.resync()

    async def _snapshot(self) -> None:
        epoch = self.catalog.tick()
        status, body = await self.client.request("GET", "/models")
        if status != 200:
            raise RouterError(f"GET /models: status {status}: {error_message(body)}")
        self.catalog.replace(body, epoch=epoch)
        self.snapshots += 1

    async def _follow(self) -> None:
        """Follow /models/sse; on any end or error re-read /models and reconnect (backoff)."""
        delay = self.reconnect_initial
        while not self._closed:
            try:
                stream = await self.client.events("/models/sse")
                try:
                    # connected: what happened before now is in a snapshot read from now on
                    await self.resync()
                    self.connected = True
                    delay = self.reconnect_initial
                    async for event in stream:
                        if self.catalog.apply_event(event) is None:
                            await self.resync()
                    log.warning("router events: the stream ended; reconnecting")
                finally:
                    await stream.aclose()
            except (RouterError, CatalogError) as exc:
                log.warning("router events: %s; reconnecting in %.1f s", exc, delay)
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max)

    async def _resync_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.resync_interval)
            with contextlib.suppress(RouterError, CatalogError):
                await self.resync()

    # ---- waiting ----------------------------------------------------------------------------------
    def _bump(self) -> None:
        fut = self._change
        self._change = None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_change(self, deadline: float) -> None:
        """Until the next change or the deadline (returns either way)."""
        loop = asyncio.get_running_loop()
        if self._change is None or self._change.done():
            self._change = loop.create_future()
        left = deadline - loop.time()
        if left > 0:
            await asyncio.wait([self._change], timeout=left)

    async def _wait_until(self, predicate, deadline: float) -> bool:
        """Until predicate() holds (True) or the deadline (False), re-reading /models every
        poll_interval meanwhile: SSE events are hints, not guarantees."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_interval
        while not predicate():
            now = loop.time()
            if now >= deadline:
                return False
            if now >= next_poll:
                with contextlib.suppress(RouterError, CatalogError):
                    await self.resync()
                next_poll = loop.time() + self.poll_interval
                continue
            await self._wait_change(min(deadline, next_poll))
        return True

    async def _wait_for(self, name: str, timeout: float, *, lease: bool, force: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        m = self.catalog.get(name)
        if not force and m.state is State.FAILED and self.catalog.backoff_left(name) > 0:
            raise self._failed_error(name)
        queue = self._waiters.setdefault(name, [])
        if len(queue) >= MAX_WAITERS_PER_MODEL:
            raise ModelLoading(f"model '{name}' is loading; too many requests wait for it",
                               retry_after=RETRY_AFTER_LOADING)
        waiter = _Waiter(loop.create_future(), lease, force, self._attempts.get(name, 0))
        queue.append(waiter)
        self._service_soon(name)
        fut = waiter.future
        try:
            await asyncio.wait([fut], timeout=deadline - loop.time())
        except BaseException:
            self._drop_waiter(name, waiter)
            if fut.done() and not fut.cancelled() and fut.exception() is None and lease:
                self.catalog.release(name)       # granted, but the caller went away
            raise
        if not fut.done():
            self._drop_waiter(name, waiter)
            fut.cancel()
            raise ModelLoading(f"model '{name}' is loading; try again shortly",
                               retry_after=RETRY_AFTER_LOADING)
        exc = fut.exception()
        if exc is not None:
            raise exc

    def _drop_waiter(self, name: str, waiter: _Waiter) -> None:
        queue = self._waiters.get(name)
        if queue and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiters[name]
            self._bump()          # a load task may be waiting for nobody now

    def _wanted(self, name: str) -> bool:
        return bool(self._waiters.get(name))

    def _forced(self, name: str) -> bool:
        return any(w.force for w in self._waiters.get(name, ()))

    def _failed_error(self, name: str) -> ModelFailed:
        m = self.catalog.get(name)
        left = self.catalog.backoff_left(name)
        reason = m.failure if m is not None and m.failure else "failed to load"
        return ModelFailed(f"model '{name}' {reason}",
                           retry_after=int(left + 0.999) if left > 0 else RETRY_AFTER_LOADING)

    def _fail_waiters(self, name: str, exc: ModelError) -> None:
        for waiter in self._waiters.pop(name, []):
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        self._bump()

    # ---- reacting to changes ----------------------------------------------------------------------
    def _on_change(self, names: set[str]) -> None:
        for sub in self._subs:
            for name in names:
                sub.pending[name] = None
            sub.wake.set()
        self._dirty.update(names)
        self._bump()
        self._process()

    def _service_soon(self, name: str) -> None:
        self._dirty.add(name)
        self._process()

    def _process(self) -> None:
        if self._servicing:
            return                # the loop below picks the new names up
        self._servicing = True
        try:
            while self._dirty:
                self._service(self._dirty.pop())
        finally:
            self._servicing = False

    def _service(self, name: str) -> None:
        """Grant, fail or start a load for the requests waiting for `name`."""
        queue = self._waiters.get(name)
        if not queue or self._closed:
            return
        m = self.catalog.get(name)
        if m is None:
            self._fail_waiters(name, ModelNotFound(f"model '{name}' not found"))
            return
        if m.serving:
            del self._waiters[name]
            for waiter in queue:
                if not waiter.future.done():
                    if waiter.lease:
                        self.catalog.acquire(name)     # counted before anything else runs
                    waiter.future.set_result(None)
            return
        if m.draining or m.stopping or name in self._unloading:
            return                # it comes back once the unload is over
        if m.state is State.FAILED:
            # A request waits out the back-off; an admin load is failed by a load tried for it.
            attempts = self._attempts.get(name, 0)
            in_backoff = self.catalog.backoff_left(name) > 0
            failed = [w for w in queue
                      if (w.attempt < attempts if w.force else in_backoff)]
            if failed:
                error = self._failed_error(name)
                for waiter in failed:
                    queue.remove(waiter)
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                if not queue:
                    del self._waiters[name]
                    self._bump()
                    return
        if name not in self._loads and not self._closed:
            task = asyncio.get_running_loop().create_task(self._run_load(name))
            self._loads[name] = task

    # ---- loading ------------------------------------------------------------------------------------
    async def _run_load(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with self._capacity:
                m = self.catalog.get(name)
                if m is None or not self._wanted(name) or m.serving:
                    return
                if not m.occupies:
                    room = await self._make_room(name, loop.time() + self.load_timeout)
                    if not room:
                        return
                    await self._post_load(name)
            await self._await_loaded(name, loop.time() + self.load_timeout)
        except ModelError as exc:
            self._fail_waiters(name, exc)
        except RouterError as exc:
            log.warning("loading model %s: %s", name, exc)
            self._fail_waiters(name, ModelLoading(
                f"model '{name}' cannot be loaded now: llama-server's router is not answering",
                retry_after=RETRY_AFTER_LOADING))
        except asyncio.CancelledError:
            raise
        except Exception as exc:     # a bug must not leave requests waiting until their deadline
            log.exception("loading model %s", name)
            self._fail_waiters(name, ModelLoading(f"model '{name}' could not be loaded: {exc}",
                                                  retry_after=RETRY_AFTER_LOADING))
        finally:
            if self._loads.get(name) is asyncio.current_task():
                del self._loads[name]
            if not self._closed:
                self._service_soon(name)

    async def _make_room(self, name: str, deadline: float) -> bool:
        """Unload models until `name` fits in MODELS_MAX (the capacity lock is held).
        False when nobody wants `name` any more."""
        loop = asyncio.get_running_loop()
        while True:
            if self.models_max <= 0:
                return True
            occupied = self.catalog.occupied(exclude=name)
            if len(occupied) < self.models_max:
                return True
            if not self._wanted(name):
                return False
            if not self._forced(name) and not self.catalog.may_evict_for(name):
                m = self.catalog.get(name)
                raise ModelFailed(
                    f"model '{name}' failed {m.failures} times ({m.failure or 'failed to load'}); "
                    f"it loads again only when memory is free or by an admin load",
                    retry_after=max(RETRY_AFTER_LOADING,
                                    int(self.catalog.backoff_left(name) + 0.999)))
            candidates = [m for m in occupied
                          if m.state is State.LOADED and not m.draining and not m.stopping
                          and m.name not in self._unloading]
            if not candidates:       # all loading or already on their way out: wait
                if loop.time() >= deadline:
                    raise ModelLoading(f"model '{name}' waits for memory; try again shortly",
                                       retry_after=RETRY_AFTER_LOADING)
                await self._wait_change(min(deadline, loop.time() + self.poll_interval))
                continue
            victim = min(candidates, key=lambda m: (self._wanted(m.name), m.in_flight > 0,
                                                    m.last_used or 0.0, m.name))
            log.info("model %s: unloading %s to make room (MODELS_MAX=%d)", name, victim.name,
                     self.models_max)
            drain_deadline = min(loop.time() + self.drain_timeout, deadline)
            done = await self._drain_and_unload(victim.name, drain_deadline, for_model=name)
            if not done and not self._wanted(name):
                return False

    async def _post_load(self, name: str) -> None:
        """POST /models/load and mark it loading. A refusal is recorded as a failure in the
        catalog. ModelNotFound / RouterError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout
        body = json.dumps({"model": name}).encode()
        while True:
            self.catalog.mark_loading(name)
            self._attempts[name] = self._attempts.get(name, 0) + 1
            try:
                status, answer = await self.client.request("POST", "/models/load", body)
            except RouterError:
                self.catalog.settle(name, spawned=False)
                raise
            self.catalog.settle(name, spawned=status == 200)
            if status == 200:
                return
            message = error_message(answer)
            if status == 400 and "already running" in message:
                await self.resync()
                return
            if status == 404:
                await self.resync()
                raise ModelNotFound(f"model '{name}' not found")
            if status == 500 and "limit reached" in message and loop.time() < deadline:
                # the router counts an instance we think is gone (or not yet there): re-read
                await asyncio.sleep(LIMIT_RETRY_DELAY)
                await self.resync()
                continue
            # the waiters learn it from the catalog change (_service)
            self.catalog.record_failure(name, f"llama-server refused to load it ({status}: "
                                              f"{message})")
            return

    async def _await_loaded(self, name: str, deadline: float) -> None:
        """Until the load ends; its outcome is in the catalog (the waiters are served or
        failed from there by _service). A load past the deadline is stopped and recorded as
        a failure; so is an instance that went away without the gateway unloading it."""
        m = self.catalog.get(name)

        def settled() -> bool:
            return m.state is not State.LOADING
        if not await self._wait_until(settled, deadline):
            log.warning("model %s: not loaded within %.0f s; stopping it", name,
                        self.load_timeout)
            with contextlib.suppress(RouterError):
                await self.client.request("POST", "/models/unload",
                                          json.dumps({"model": name}).encode())
            self.catalog.record_failure(name, f"not loaded within {self.load_timeout:g} s")
        elif m.state is State.UNLOADED and name not in self._unloading:
            self.catalog.record_failure(name, "stopped before it was loaded")

    # ---- unloading ---------------------------------------------------------------------------------
    async def _unload_all(self, names: list[str], drain_deadline: float) -> None:
        results = await asyncio.gather(*(self._drain_and_unload(n, drain_deadline)
                                         for n in names), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _drain_and_unload(self, name: str, drain_deadline: float,
                                for_model: str = "") -> bool:
        """Drain (no new requests, wait for in-flight ones up to drain_deadline), then unload
        and wait for the exit. for_model: an eviction for that model, abandoned (False) when
        nobody wants that model any more before the unload starts."""
        m = self.catalog.get(name)
        if m is None:
            return True
        if name in self._unloading:     # someone else is unloading it: wait for that
            return await self._wait_until(lambda: name not in self._unloading,
                                          drain_deadline + self.unload_timeout)
        loop = asyncio.get_running_loop()
        self._unloading.add(name)
        self.catalog.set_draining(name, True)
        try:
            while m.in_flight > 0:
                if for_model and not self._wanted(for_model):
                    return False
                if loop.time() >= drain_deadline:
                    log.warning("model %s: unloading with %d request(s) still in flight after "
                                "the drain deadline", name, m.in_flight)
                    break
                await self._wait_change(drain_deadline)
            if for_model and not self._wanted(for_model):
                return False
            if not m.occupies:
                return True
            self.catalog.mark_stopping(name)
            try:
                status, answer = await self.client.request(
                    "POST", "/models/unload", json.dumps({"model": name}).encode())
            except RouterError:
                self.catalog.unmark_stopping(name)
                raise
            self.catalog.settle(name, spawned=False)
            if status != 200:
                message = error_message(answer)
                if status == 400 and "not running" in message:
                    await self.resync()
                    return True
                self.catalog.unmark_stopping(name)
                raise RouterError(f"unload of {name}: status {status}: {message}")
            if not await self._wait_until(lambda: not m.occupies,
                                          loop.time() + self.unload_timeout):
                raise RouterError(f"model {name} did not exit within {self.unload_timeout:g} s "
                                  f"of its unload")
            log.info("model %s unloaded", name)
            return True
        finally:
            self._unloading.discard(name)
            self.catalog.set_draining(name, False)
            self._service_soon(name)


def format_sse(event: dict) -> bytes:
    """One /admin/events item as SSE bytes (a heartbeat is a comment line)."""
    kind = event.get("type", "message")
    if kind == "heartbeat":
        return b": heartbeat\n\n"
    return (f"event: {kind}\ndata: " + json.dumps(event, separators=(",", ":")) + "\n\n").encode()
