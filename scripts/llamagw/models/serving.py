"""The gateway's model layer: which model a request is for, may its key use it, is it loaded.

ModelService is what the Gateway holds (gw.models), in both modes:

- router mode (MODELS_DIR set; entrypoint.sh runs llama-server as a router over it): a
  RouterController (models/router.py) follows the router's model states and loads, drains and
  unloads models on the gateway's terms. A request's model is resolved against the gateway's
  own catalog (names and aliases, case-sensitive; unknown: 404 model_not_found before anything
  reaches llama-server; none named: MODELS_DEFAULT, else 400 model_required), checked against
  the key's `models=` (403 model_not_allowed), written back into the body under its canonical
  name, and leased: loaded first when needed, waiting at most MODEL_LOAD_WAIT (then 503
  model_loading + Retry-After; the load goes on), or 503 model_failed + Retry-After while a
  failed model backs off. Each model has its own backend slots (concurrency and queue), made
  by the gateway's one factory (Gateway.new_slots), so requests waiting for a model that is
  loading never hold up those of a loaded one.
- single-model mode: the one model (MODEL_NAME / MODEL_PATH); only the key's `models=`
  applies (403 model_not_allowed); the global backend slots serve every request.

Request path (net/pipeline.PendingRequest): pick(p) once the body is in (synchronous: resolve,
scope, rewrite); the backend slot from slots_for(name); then try_lease(name), or await
lease(name) in the request's task; the lease is released with the request, with cut=True when
llama-server cut the answer (the controller then re-reads the router's state at once).
Listings (/v1/models, /api/tags, /api/ps) show only catalog names, scoped to the key: never a
path or llama-server's command line. Admin (admin/models_api.py): snapshot(), action(),
open_events(). Health and metrics read health() and states(): none of them loads a model (the
router is only ever asked with autoload=false).

The router is connected to in the background (start()): the gateway starts before llama-server
(entrypoint.sh), and answers 503 backend_starting until the first /models snapshot is in.
close() at the start of shutdown: requests waiting for a load or a model's slot get 503 at once,
/admin/events streams end, and the leases of streams still draining are released into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from llamagw.errors import RETRY_AFTER_STARTING, GatewayError
from llamagw.models import pulls
from llamagw.models.catalog import State
from llamagw.models.router import (
    HEARTBEAT_INTERVAL, Lease, ModelError, RouterClient, RouterController, RouterError,
    format_sse,
)

log = logging.getLogger("gateway.models")

# One attempt to read the router's first /models (RouterController.start retries within it);
# the router is up ~0.05 s after llama-server starts, which entrypoint.sh does after the gateway.
CONNECT_ATTEMPT_S = 10.0
# Between attempts while the router is not there (a model download, a slow start): a warning
# each time, so one every few seconds at most.
CONNECT_RETRY_S = 5.0
# Single-model /admin/events: the supervisor's state file is looked at this often (a cached
# read; the state changes on a restart only).
STATE_POLL_S = 1.0
# The model's state in single-model mode, from the supervisor's backend state.
SINGLE_STATES = {"ready": "loaded", "unknown": "loaded", "starting": "loading",
                 "failed": "failed", "stopping": "unloaded"}
ACTIONS = ("load", "unload", "switch")


def model_error(exc: ModelError) -> GatewayError:
    """A controller's refusal as the gateway's error (the route's envelope renders it)."""
    headers = [("retry-after", str(exc.retry_after))] if exc.retry_after else []
    return GatewayError(exc.status, exc.message, exc.code, headers=headers)


def router_error(exc: RouterError) -> GatewayError:
    return GatewayError(502, f"llama-server's router did not answer as expected: {exc}",
                        "router_error")


def starting() -> GatewayError:
    return GatewayError(503, "The model backend is starting; retry shortly", "backend_starting",
                        headers=[("retry-after", str(RETRY_AFTER_STARTING))])


def controller_from_config(config) -> RouterController:
    """llama-server's router where the gateway reaches llama-server (BACKEND_SOCKET or
    BACKEND_HOST:PORT_BACKEND), with MODELS_MAX and MODEL_LOAD_WAIT."""
    client = RouterClient(config.backend_socket, host=config.backend_host,
                          port=config.port_backend)
    return RouterController(client, models_max=config.models_max,
                            load_wait=config.model_load_wait)


class ModelService:
    """The gateway's models (module docstring). `gw` is the Gateway: its config, backend state,
    GGUF descriptions (gw.catalog), admission and slot factory (gw.new_slots)."""

    def __init__(self, gw, *, controller: RouterController | None = None):
        config = gw.config
        self.gw = gw
        if controller is None and config.models_dir:
            controller = controller_from_config(config)
        self.controller = controller
        self.router = controller is not None
        # router mode: pulls and deletes into MODELS_DIR (admin only; models/pulls.py)
        self.pulls = pulls.Pulls(config.models_dir, controller,
                                 preset_file=config.models_preset_file,
                                 endpoint=config.hf_endpoint,
                                 token=os.environ.get("HF_TOKEN"),
                                 described=gw.catalog) if self.router else None
        # the one model's name in single-model mode ("" when unknown: llama-server by hand)
        self.single_name = "" if self.router or not gw.catalog.path else gw.catalog.name
        self.default = config.models_default
        self.load_wait = config.model_load_wait
        self.slots: dict[str, Any] = {}          # router mode: model -> its backend slots
        self.started_wall = int(time.time())
        self._closed = False
        self._closing: asyncio.Event | None = None
        self._connector: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the router in the background (router mode; returns at once)."""
        self._closing = asyncio.Event()
        if self.router and self._connector is None:
            self._connector = self._spawn(self._connect())

    async def _connect(self) -> None:
        while not self._closed:
            try:
                await self.controller.start(timeout=CONNECT_ATTEMPT_S)
            except RouterError as exc:
                log.warning("%s; trying again in %.0f s", exc, CONNECT_RETRY_S)
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            names = self.controller.catalog.names()
            log.info("router mode: %d model(s): %s", len(names), ", ".join(names))
            return

    async def close(self) -> None:
        """Shutdown: end every wait for a model or one of its slots (503 at once), the admin
        actions in progress and the /admin/events streams."""
        if self._closed:
            return
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        for slots in self.slots.values():
            slots.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.controller is not None:
            await self.controller.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- the request path ----------------------------------------------------------------------------
    def pick(self, p) -> None:
        """The request's model (net/pipeline.PendingRequest.ready, once the body is in): sets
        p.ctx.model; in router mode rewrites the body's "model" to the canonical name on routes
        that forward the body (route.lease). Raises GatewayError: 400, 403, 404, 503."""
        ctx = p.ctx
        if not self.router:
            name = self.single_name
            if name and ctx.key_models is not None and name not in ctx.key_models:
                raise GatewayError(403, f"this key may not use model '{name}'",
                                   "model_not_allowed")
            ctx.model = name or None
            return
        ctl = self.controller
        if not ctl.catalog.synced:
            raise starting()
        try:
            data = json.loads(p.body)
        except ValueError:
            raise GatewayError(400, "The body must be a JSON object", "invalid_json") from None
        requested = data.get("model") if isinstance(data, dict) else None
        if requested is None or requested == "":
            if not self.default:
                raise GatewayError(400, "This server has several models: name one in "
                                        "\"model\" (GET /v1/models lists them)",
                                   "model_required")
            requested = self.default
        elif not isinstance(requested, str):
            raise GatewayError(400, "\"model\" must be a string", "invalid_model")
        try:
            name = ctl.resolve(requested)
            ctl.check_allowed(ctx.key_models, name)
        except ModelError as exc:
            raise model_error(exc) from None
        ctx.model = name
        if p.route.lease and data.get("model") != name:
            data["model"] = name
            try:
                p.body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
            except UnicodeEncodeError:       # a lone surrogate escape: keep it escaped
                p.body = json.dumps(data, separators=(",", ":")).encode()

    def slots_for(self, name: str | None):
        """The model's backend slots (router mode), made on first use for a catalog name; None:
        the global ones (single-model mode, no model, or shutting down)."""
        slots = self.slots.get(name)
        if slots is None:
            if not self.router or self._closed or not name or name not in self.controller.catalog:
                return None
            slots = self.slots[name] = self.gw.new_slots()
        return slots

    def try_lease(self, name: str) -> Lease | None:
        return self.controller.try_acquire(name)

    async def lease(self, name: str) -> Lease:
        """A lease on a loaded model, loading it first if needed (MODEL_LOAD_WAIT)."""
        try:
            return await self.controller.acquire(name, self.load_wait)
        except ModelError as exc:
            raise model_error(exc) from None

    async def load(self, name: str) -> None:
        """Ollama's empty request: load the model without a request to it."""
        try:
            await self.controller.ensure_loaded(name, self.load_wait)
        except ModelError as exc:
            raise model_error(exc) from None
        except RouterError as exc:
            raise router_error(exc) from None

    async def unload(self, name: str) -> None:
        """Ollama's keep_alive 0: drain (in-flight requests end first), then unload."""
        try:
            await self.controller.unload(name)
        except ModelError as exc:
            raise model_error(exc) from None
        except RouterError as exc:
            raise router_error(exc) from None

    # ---- listings ----------------------------------------------------------------------------------
    def resolve_listed(self, requested, key_models) -> str:
        """A model name for /api/show and admin actions: 404 unknown, 403 not for this key."""
        if not isinstance(requested, str) or not requested:
            raise GatewayError(400, "\"model\" is required", "model_required")
        try:
            name = self.controller.resolve(requested)
            self.controller.check_allowed(key_models, name)
        except ModelError as exc:
            raise model_error(exc) from None
        return name

    def visible(self, key_models) -> list:
        return self.controller.catalog.visible(key_models)

    def loaded(self, key_models) -> list:
        return self.controller.catalog.loaded(key_models)

    def v1_models(self, key_models) -> dict:
        """GET /v1/models in router mode: the catalog, never the router's raw list."""
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.started_wall,
             "owned_by": "llamacpp", "aliases": list(m.aliases), "state": m.state.value}
            for m in self.visible(key_models)]}

    # ---- admin -------------------------------------------------------------------------------------
    def single_state(self) -> str:
        return SINGLE_STATES.get(str(self.gw.backend.get()), "loading")

    def single_public(self) -> dict:
        """The one model as /admin/models shows a model (single-model mode)."""
        info = self.gw.catalog.info
        state = self.single_state()
        slots = self.gw.admission.slots
        return {"name": self.gw.catalog.name, "aliases": [], "state": state,
                "router_state": None, "draining": False, "in_flight": slots.active,
                "last_used": None,
                "size": info.size_bytes if info is not None else None,
                "quantization": info.quantization_level if info is not None else None,
                "context": info.context_length if info is not None else None,
                "context_train": info.context_length if info is not None else None,
                "parameters": info.parameter_count if info is not None else None,
                "progress": None,
                "failure": "llama-server failed (see the logs)" if state == "failed" else None,
                "retry_after": None, "input_modalities": ["text"]}

    def snapshot(self) -> dict:
        """GET /admin/models."""
        if self.router:
            ctl = self.controller
            return {"models": ctl.snapshot(), "max": ctl.models_max, "mode": "router"}
        models = [self.single_public()] if self.gw.catalog.path else []
        return {"models": models, "max": 1, "mode": "single"}

    async def action(self, action: str, requested) -> tuple[int, dict]:
        """POST /admin/models/{load,unload,switch}: run it, and answer its outcome when it comes
        within MODEL_LOAD_WAIT (200 {"model", "state"}), else 202 with the state now (the
        action goes on). An operator's load ignores a failed model's back-off."""
        if action not in ACTIONS:
            raise GatewayError(404, f"no model action {action!r}", "not_found")
        if not self.router:
            raise GatewayError(409, "Loading, unloading and switching models needs router mode "
                                    "(MODELS_DIR); this gateway serves one model",
                               "single_model_mode")
        if not self.controller.catalog.synced:
            raise starting()
        name = self.resolve_listed(requested, None)
        ctl = self.controller
        if action == "load":
            coro = ctl.ensure_loaded(name, ctl.load_timeout, force=True)
        elif action == "unload":
            coro = ctl.unload(name)
        else:
            coro = ctl.switch(name)
        task = self._spawn(coro)
        task.add_done_callback(_log_outcome(action, name))
        await asyncio.wait([task], timeout=self.load_wait)
        if not task.done():
            return 202, self._state_of(name)
        if task.cancelled():                 # shutdown (close()) ended it
            raise GatewayError(503, "The gateway is stopping", "backend_stopping",
                               headers=[("retry-after", str(RETRY_AFTER_STARTING))])
        exc = task.exception()
        if isinstance(exc, ModelError):
            raise model_error(exc)
        if isinstance(exc, RouterError):
            raise router_error(exc)
        if exc is not None:
            raise exc
        return 200, self._state_of(name)

    def _state_of(self, name: str) -> dict:
        m = self.controller.catalog.get(name)
        state = m.state.value if m is not None else "unloaded"
        if m is not None and (m.draining or m.stopping) and m.state is State.LOADED:
            state = "draining"
        return {"model": name, "state": state}

    async def open_events(self, heartbeat: float = HEARTBEAT_INTERVAL) -> AsyncIterator[bytes]:
        """GET /admin/events: SSE bytes, the snapshot first, then each change (router mode) or
        each backend state change (single-model mode), a heartbeat comment after `heartbeat` s
        of silence; ends at shutdown. Raises GatewayError (503) before anything is sent when
        too many streams are open."""
        if self.router:
            events = self.controller.events(heartbeat=heartbeat)
            try:
                first = await anext(events)
            except ModelError as exc:
                await events.aclose()
                raise model_error(exc) from None
            return _router_events(first, events)
        return self._single_events(heartbeat)

    async def _single_events(self, heartbeat: float) -> AsyncIterator[bytes]:
        snapshot = self.snapshot()["models"]
        yield format_sse({"type": "snapshot", "models": snapshot})
        state = snapshot[0]["state"] if snapshot else None
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        closing = self._closing
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATE_POLL_S):
                    await closing.wait()
            if self._closed:
                return
            if self.gw.catalog.path and self.single_state() != state:
                model = self.single_public()
                state = model["state"]
                quiet_since = loop.time()
                yield format_sse({"type": "model", "model": model})
            elif loop.time() - quiet_since >= heartbeat:
                quiet_since = loop.time()
                yield format_sse({"type": "heartbeat"})

    # ---- health and metrics --------------------------------------------------------------------------
    def health(self) -> dict | None:
        """Router mode, for the gateway's /health: the router connection, the models per state
        (counts only: /health is open) and the preload models' state (starting | ready |
        failed). The health port is the supervisor's (entrypoint.sh waits for the preload
        models at boot); after the boot a model that fails is reported on its requests, in
        /admin/models and in the metrics, and the worker keeps serving the others."""
        if not self.router:
            return None
        counts = {state.value: 0 for state in State}
        for m in self.controller.catalog.models():
            counts[m.state.value] += 1
        return {"router": "connected" if self.controller.connected else "disconnected",
                "models": counts,
                "preload": self.controller.health(self.gw.config.models_preload)}

    def states(self) -> list[tuple[str, str, int, int]]:
        """(model, state, in flight, queued) for each model: gateway_model_* gauges."""
        if self.router:
            out = []
            for m in self.controller.catalog.models():
                slots = self.slots.get(m.name)
                out.append((m.name, m.state.value, m.in_flight,
                            slots.waiting if slots is not None else 0))
            return out
        if not self.gw.catalog.path:
            return []
        slots = self.gw.admission.slots
        return [(self.gw.catalog.name, self.single_state(), slots.active, slots.waiting)]

    def waiting(self) -> int:
        """Requests waiting in the models' own queues (router mode)."""
        return sum(s.waiting for s in self.slots.values())

    def active(self) -> int:
        """Requests holding one of the models' own slots (router mode)."""
        return sum(s.active for s in self.slots.values())


async def _router_events(first: dict, events) -> AsyncIterator[bytes]:
    try:
        yield format_sse(first)
        async for event in events:
            yield format_sse(event)
    finally:
        await events.aclose()


def _log_outcome(action: str, name: str):
    def done(task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            log.info("admin %s of model %s: done", action, name)
        else:
            log.warning("admin %s of model %s: %s", action, name, exc)
    return done
