"""What the dashboard's live channel carries, besides log lines: requests, metrics, models.

LiveFeed produces the typed events of GET /admin/live (ADMIN-API.md) into the LiveHub:
- `request`: one per finished request, from Gateway.observe -> on_request(ctx), called only
  while a dashboard listens (`hub.active`), so the proxy pays one attribute test otherwise. Never
  a prompt: only the request's context (RequestContext) is read. The dashboard's own traffic
  (the admin and /ui/ routes) is left out.
- `metrics`: every TICK_S while a dashboard listens (the ticker task starts with the first stream
  and ends with the last): requests/s and generated tokens/s over RATE_WINDOW_S, TTFT p50/p95
  and the error rate over LATENCY_WINDOW_S, in flight, queue, backend state, uptime, the loaded
  models. The windows hold what on_request saw, so they fill from the moment a dashboard opens.
  Each point is kept (HISTORY_POINTS, one hour) and `hello` carries the last hour thinned to one
  point per HISTORY_STEP_S, so a dashboard opened later draws its charts at once.
- `models`: the snapshot of GET /admin/models: first on every new stream, then on each change.

THE models hook (router mode, wired by whoever owns the model router):
    feed.models_source = router_snapshot      # () -> {"models": [...], "max", "mode"}
    feed.models_changed()                     # after any state change: publishes the snapshot
    feed.models_changed(snapshot)             # or with a snapshot already at hand
Without it the snapshot is the single served model (single_model_snapshot). Whatever the source,
the ticker compares (name, state, failure, draining) each second and publishes a change it finds,
so a change nobody announced still reaches the page within a second.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("gateway")

TICK_S = 1.0
# Rates are averaged over 10 s: steady enough to read at a glance, quick to show a burst.
RATE_WINDOW_S = 10.0
# TTFT percentiles and the error rate look at the last minute (a percentile of a few samples
# is noise).
LATENCY_WINDOW_S = 60.0
# At most this many requests in the latency window (a sort of 10,000 floats a second is ~1 ms);
# past it the oldest go first, so the percentiles describe the most recent 10,000.
MAX_LATENCY_SAMPLES = 10_000
# One hour of 1-s points for the charts; hello sends one point per 10 s (360 points, ~80 KB).
HISTORY_POINTS = 3600
HISTORY_STEP_S = 10
# What counts as an error in the error rate: the gateway or llama-server failed the request (5xx)
# or it got no answer at all (status 0: cut, client gone). 4xx are the client's own.
ERROR_STATUS = 500
# Route names of the dashboard's own traffic (api/routes.py names them so): not published.
DASHBOARD_ROUTE_PREFIXES = ("admin", "ui")
# Backend state -> the single model's state in the models snapshot.
SINGLE_STATES = {"ready": "loaded", "unknown": "loaded", "starting": "loading",
                 "failed": "failed", "stopping": "unloaded"}


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def _models_signature(snapshot: dict) -> tuple:
    models = snapshot.get("models") if isinstance(snapshot, dict) else None
    if not isinstance(models, list):
        return ()
    return tuple((m.get("name"), m.get("state"), m.get("failure"), m.get("draining"))
                 for m in models if isinstance(m, dict))


class LiveFeed:
    """The producers of the live channel's request / metrics / models events.

    `services` is the gateway (context.Services): backend, in_flight, admission.slots, started,
    catalog are read at each tick."""

    def __init__(self, hub, services, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, tick_s: float = TICK_S):
        self.hub = hub
        self.services = services
        self.clock = clock
        self.wall = wall
        self.tick_s = tick_s
        self.models_source: Callable[[], dict] = self.single_model_snapshot
        self._models_sig: tuple | None = None
        # Cumulative counts while dashboards listen, and their samples at each tick.
        self.requests = 0
        self.errors = 0
        self.tokens = 0
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque(
            maxlen=int(max(RATE_WINDOW_S, LATENCY_WINDOW_S) / tick_s) + 2)
        self._ttfb: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=MAX_LATENCY_SAMPLES)
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_POINTS)
        self._ticker: asyncio.Task | None = None

    # ---------------- requests (Gateway.observe, only while hub.active) ----------------
    def on_request(self, ctx) -> None:
        route = ctx.route
        if route.startswith(DASHBOARD_ROUTE_PREFIXES):
            return
        status = ctx.status
        ttfb = ctx.ttfb
        completion = ctx.completion_tokens
        self.requests += 1
        if status >= ERROR_STATUS or status == 0:
            self.errors += 1
        if completion:
            self.tokens += completion
        if ttfb is not None and 200 <= status < 400:
            self._ttfb.append((self.clock(), ttfb))
        self.hub.publish("request", {
            "t": round(self.wall(), 3),
            "request_id": ctx.request_id,
            "key_id": ctx.key_id,
            # the model a request named: set by the request code that reads the body (the usage
            # ledger's wiring); None until then
            "model": getattr(ctx, "model", None),
            "route": ctx.path,
            "method": ctx.method,
            "status": status,
            "outcome": ctx.outcome,
            "stream": ctx.stream,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": completion,
            "duration_ms": round(ctx.duration * 1000, 1),
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 1),
        })

    # ---------------- models ----------------
    def single_model_snapshot(self) -> dict:
        """GET /admin/models's shape for the one model llama-server serves (no router)."""
        services = self.services
        catalog = services.catalog
        info = catalog.info
        state = str(services.backend.get())
        return {"models": [{
            "name": catalog.name,
            "aliases": [],
            "state": SINGLE_STATES.get(state, "unloaded"),
            "size": info.size_bytes if info is not None else None,
            "quantization": info.quantization_level if info is not None else None,
            "context": info.context_length if info is not None else None,
            "in_flight": services.admission.slots.active,
            "last_used": None,
            "failure": "llama-server failed and was not restarted (see Logs)"
                       if state == "failed" else None,
            "draining": state == "stopping",
        }], "max": 1, "mode": "single"}

    def models_snapshot(self) -> dict:
        try:
            snapshot = self.models_source()
        except Exception:      # a bug in a source must not end the stream or the ticker
            log.exception("live: the models snapshot failed")
            snapshot = {"models": [], "max": 0, "mode": "unknown"}
        return snapshot

    def first_models(self) -> dict:
        """The snapshot a new stream starts with (remembered: the ticker publishes changes)."""
        snapshot = self.models_snapshot()
        self._models_sig = _models_signature(snapshot)
        return snapshot

    def models_changed(self, snapshot: dict | None = None) -> None:
        """Publish the models snapshot (the hook: call after every model state change)."""
        if snapshot is None:
            if not self.hub.active:
                return
            snapshot = self.models_snapshot()
        self._models_sig = _models_signature(snapshot)
        self.hub.publish("models", snapshot)

    # ---------------- metrics ----------------
    def metrics(self, opening: int = 0) -> dict:
        """The numbers of one `metrics` event, now (also sent first on every new stream:
        opening=1, that stream is not subscribed yet)."""
        now = self.clock()
        sample = (now, self.requests, self.errors, self.tokens)
        rate_from = self._sample_at(now - RATE_WINDOW_S, sample)
        lat_from = self._sample_at(now - LATENCY_WINDOW_S, sample)
        span = now - rate_from[0]
        rps = (sample[1] - rate_from[1]) / span if span > 0 else 0.0
        tps = (sample[3] - rate_from[3]) / span if span > 0 else 0.0
        done = sample[1] - lat_from[1]
        error_rate = (sample[2] - lat_from[2]) / done if done else None
        while self._ttfb and self._ttfb[0][0] < now - LATENCY_WINDOW_S:
            self._ttfb.popleft()
        ordered = sorted(v for _, v in self._ttfb)
        p50, p95 = _percentile(ordered, 0.50), _percentile(ordered, 0.95)
        services = self.services
        models = self.models_snapshot()
        loaded = [m.get("name") for m in models.get("models", ())
                  if isinstance(m, dict) and m.get("state") == "loaded"]
        return {
            "t": round(self.wall(), 3),
            "requests_per_s": round(rps, 3),
            "tokens_per_s": round(tps, 2),
            "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "ttft_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            # the open live streams are requests in flight too: not counted
            "in_flight": max(0, services.in_flight - len(self.hub) - opening),
            "queue": services.admission.slots.waiting,
            "error_rate": None if error_rate is None else round(error_rate, 4),
            "state": str(services.backend.get()),
            "uptime_s": round(now - services.started, 1),
            "loaded": loaded,
        }

    def _sample_at(self, since: float, current: tuple) -> tuple:
        """The oldest kept sample no older than `since` (the window's start), else `current`."""
        samples = self._samples
        i = bisect.bisect_left([s[0] for s in samples], since)
        return samples[i] if i < len(samples) else current

    def history_for_hello(self) -> list[dict]:
        """The last hour of metrics points, one per HISTORY_STEP_S."""
        step = max(1, int(HISTORY_STEP_S / self.tick_s))
        points = list(self.history)
        return points[len(points) - 1::-step][::-1] if points else []

    def tick(self) -> None:
        """One metrics event (and a models event if the models changed unannounced)."""
        now = self.clock()
        self._samples.append((now, self.requests, self.errors, self.tokens))
        point = self.metrics()
        self.history.append(point)
        self.hub.publish("metrics", point)
        snapshot = self.models_snapshot()
        if _models_signature(snapshot) != self._models_sig:
            self.models_changed(snapshot)

    # ---------------- the ticker: runs while a dashboard listens ----------------
    def ensure_ticker(self) -> None:
        """Start the ticker unless it runs (called by each new live stream)."""
        if self._ticker is None or self._ticker.done():
            self._samples.append((self.clock(), self.requests, self.errors, self.tokens))
            self._ticker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self.hub.active:
            next_at += self.tick_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if not self.hub.active:
                break
            try:
                self.tick()
            except Exception:      # never lose the ticker to one bad tick
                log.exception("live: metrics tick failed")
            if loop.time() - next_at > self.tick_s:
                next_at = loop.time()      # the loop was stalled: no burst of catch-up ticks

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
