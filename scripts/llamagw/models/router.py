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

Layout: this module holds RouterController (lifecycle, the request API, /admin/events, following
the router's state) and its timings; models/router_loads.py the waiting, granting, loading and
unloading it does (LoadScheduler, mixed in); models/router_client.py the HTTP client to the router;
models/router_errors.py the errors. Their public names are importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator, Iterable

from llamagw.models import preset
from llamagw.models.catalog import Catalog, CatalogError, State
from llamagw.models.router_client import (
    REQUEST_TIMEOUT, EventStream, RouterClient, RouterError, RouterHTTP, SSEStream,
    error_message, no_autoload,
)
from llamagw.models.router_errors import (
    RETRY_AFTER_LOADING, ModelError, ModelFailed, ModelLoading, ModelNotAllowed, ModelNotFound,
)
from llamagw.models.router_loads import LoadScheduler, _Waiter

__all__ = [
    "RouterController", "Lease", "format_sse",
    "EventStream", "RouterClient", "RouterError", "RouterHTTP", "SSEStream", "error_message",
    "no_autoload",
    "RETRY_AFTER_LOADING", "ModelError", "ModelFailed", "ModelLoading", "ModelNotAllowed",
    "ModelNotFound",
]

log = logging.getLogger("gateway.models")

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

# What the router sends when the instance behind a proxied answer dies mid-answer, and what the
# client gets instead: net/answers.py (ROUTER_CUT_MARKER); the lease is then released as cut.


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


class RouterController(LoadScheduler):
    """What the gateway holds in router mode (see the module docstring)."""

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

    def try_acquire(self, name: str) -> Lease | None:
        """acquire() without waiting: a lease when the model serves now and no request waits
        for it (the common case costs no coroutine), else None (then await acquire())."""
        m = self.catalog.get(name)
        if m is not None and m.serving and not self._waiters.get(name):
            self.catalog.acquire(name)
            return Lease(self, name)
        return None

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

    # ---- reacting to changes ----------------------------------------------------------------------
    def _on_change(self, names: set[str]) -> None:
        for sub in self._subs:
            for name in names:
                sub.pending[name] = None
            sub.wake.set()
        self._dirty.update(names)
        self._bump()
        self._process()


def format_sse(event: dict) -> bytes:
    """One /admin/events item as SSE bytes (a heartbeat is a comment line)."""
    kind = event.get("type", "message")
    if kind == "heartbeat":
        return b": heartbeat\n\n"
    return (f"event: {kind}\ndata: " + json.dumps(event, separators=(",", ":")) + "\n\n").encode()
