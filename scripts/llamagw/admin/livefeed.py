"""What the dashboard's live channel carries, besides log lines: requests, metrics, models.

LiveFeed produces the typed events of GET /admin/live (ADMIN-API.md) into the LiveHub:
- `request`: one per finished request, up to a rate. Gateway.observe hands each request's
  context to on_request only while a dashboard listens (`hub.active`): the proxy pays one
  attribute test otherwise, and then one append to a deque that keeps the last RECENT_REQUESTS.
  Every FLUSH_S the ticker takes them and publishes at most MAX_REQUEST_EVENTS (errors first,
  then the newest), with a `skipped` {"count"} event for the requests of that batch it did not
  show: a page keeps 500 rows and a person reads far fewer, while framing every row of thousands
  a second for 8 dashboards cost the proxy a quarter of its CPU per request (measured with
  tests/bench/hotpath.py --dashboards 8). Never a prompt: only the request's context
  (RequestContext) is read. The dashboard's own traffic (the admin and /ui/ routes) is left out.
- `metrics`: every TICK_S while a dashboard listens (the ticker task starts with the first stream
  and ends with the last): requests/s and generated tokens/s over RATE_WINDOW_S, TTFT p50/p95
  and the error rate over LATENCY_WINDOW_S, in flight, queue, backend state, uptime, the loaded
  models. Counts and tokens come from the gateway's own counters (observe/metrics.Metrics.totals:
  every request, nothing added to the hot path); TTFT from the requests the batches saw (a
  sample under heavy load), so the percentiles fill from the moment a dashboard opens.
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
import itertools
import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("gateway")

TICK_S = 1.0
# Requests are taken in batches every 0.25 s: a row shows within a quarter second, and the
# subscribers' writers wake 4 times a second, not once per request.
FLUSH_S = 0.25
# At most 50 `request` events a batch (200 a second) to every dashboard; the rest are counted
# in `skipped` (and in the metrics, which count every request).
MAX_REQUEST_EVENTS = 50
# The requests a batch chooses from: the last 256 finished (older ones fall out of the deque, in
# C, at no cost to the proxy); also the TTFT sample of a busy quarter second.
RECENT_REQUESTS = 256
# Rates are averaged over 10 s: steady enough to read at a glance, quick to show a burst.
RATE_WINDOW_S = 10.0
# TTFT percentiles and the error rate look at the last minute (a percentile of a few samples
# is noise).
LATENCY_WINDOW_S = 60.0
# At most 40 TTFT samples a batch: 240 batches a minute make ~10,000 in the window (a sort of
# 10,000 floats, once a second, is ~1 ms).
TTFT_SAMPLES_PER_BATCH = 40
# One hour of 1-s points for the charts; hello sends one point per 10 s (360 points, ~80 KB).
HISTORY_POINTS = 3600
HISTORY_STEP_S = 10
# What counts as an error in the error rate: the gateway or llama-server failed the request (5xx)
# or it got no answer at all (status 0: cut, client gone). 4xx are the client's own.
ERROR_STATUS = 500
# Route names of the dashboard's own traffic (api/routes.py names them so): not in the rates.
DASHBOARD_ROUTE_PREFIXES = ("admin", "ui")
# Its paths: not published (an admin path no route serves included: the page's own 404s).
DASHBOARD_PATH_PREFIXES = ("/admin/", "/ui", "/favicon.ico")
# Backend state -> the single model's state in the models snapshot.
SINGLE_STATES = {"ready": "loaded", "unknown": "loaded", "starting": "loading",
                 "failed": "failed", "stopping": "unloaded"}


def _ended(ctx) -> float:
    return ctx.started + ctx.duration


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
        # Samples of the gateway's totals (t, requests, errors, completion tokens) at each tick.
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque(
            maxlen=int(max(RATE_WINDOW_S, LATENCY_WINDOW_S) / tick_s) + 2)
        # (batch time, [TTFT s]) of the batches in the latency window
        self._ttfb: collections.deque[tuple[float, list[float]]] = collections.deque()
        self.history: collections.deque[dict] = collections.deque(maxlen=HISTORY_POINTS)
        self.flush_s = FLUSH_S
        self._recent: collections.deque = collections.deque(maxlen=RECENT_REQUESTS)
        # Gateway.observe calls this for every finished request while a dashboard listens.
        self.on_request = self._recent.append
        self._flushed_total = 0           # the request total at the last batch
        self.skipped = 0
        self._ticker: asyncio.Task | None = None

    def totals(self) -> tuple[int, int, int]:
        """(requests, errors, completion tokens) of the gateway so far, the dashboard's own
        routes left out."""
        return self.services.metrics.totals(DASHBOARD_ROUTE_PREFIXES)

    # ---------------- requests (batched, from the ticker) ----------------
    def flush(self) -> int:
        """Publish (some of) the requests finished since the last batch; returns how many."""
        total = self.totals()[0]
        finished, self._flushed_total = max(0, total - self._flushed_total), total
        recent = self._recent
        if not recent:
            return 0
        batch = list(recent)
        recent.clear()
        now = self.clock()
        errors, others, ttfbs = [], [], []
        for ctx in batch:
            if ctx.path.startswith(DASHBOARD_PATH_PREFIXES):
                continue
            status = ctx.status
            if status >= ERROR_STATUS or status == 0:
                errors.append(ctx)
            else:
                others.append(ctx)
                if ctx.ttfb is not None and status < 400:
                    ttfbs.append(ctx.ttfb)
        if ttfbs:
            self._ttfb.append((now, ttfbs[-TTFT_SAMPLES_PER_BATCH:]))
        shown = errors[-MAX_REQUEST_EVENTS:]
        if len(shown) < MAX_REQUEST_EVENTS:
            shown += others[len(shown) - MAX_REQUEST_EVENTS:]
        if len(batch) < RECENT_REQUESTS:        # every request of the batch is at hand
            skipped = len(errors) + len(others) - len(shown)
        else:                                   # some fell out of the deque: the counters say
            skipped = max(0, finished - len(shown))
        if skipped:
            self.skipped += skipped
            self.hub.publish("skipped", {"count": skipped})
        shown.sort(key=_ended)
        wall = self.wall()
        for ctx in shown:
            self.hub.publish("request", self.request_event(ctx, now, wall))
        return len(shown)

    @staticmethod
    def request_event(ctx, now: float, wall: float) -> dict:
        """A `request` event: what the context says, never a prompt; `t` is when it ended."""
        ttfb = ctx.ttfb
        return {
            "t": round(wall - (now - _ended(ctx)), 3),
            "request_id": ctx.request_id,
            "key_id": ctx.key_id,
            # the model a request named: set by the request code that reads the body (the usage
            # ledger's wiring); None until then
            "model": ctx.model,
            "route": ctx.path,
            "method": ctx.method,
            "status": ctx.status,
            "outcome": ctx.outcome,
            "stream": ctx.stream,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "duration_ms": round(ctx.duration * 1000, 1),
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 1),
        }

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
        sample = (now, *self.totals())
        rate_from = self._sample_at(now - RATE_WINDOW_S, sample)
        lat_from = self._sample_at(now - LATENCY_WINDOW_S, sample)
        span = now - rate_from[0]
        rps = max(0, sample[1] - rate_from[1]) / span if span > 0 else 0.0
        tps = max(0, sample[3] - rate_from[3]) / span if span > 0 else 0.0
        done = sample[1] - lat_from[1]
        error_rate = max(0, sample[2] - lat_from[2]) / done if done > 0 else None
        while self._ttfb and self._ttfb[0][0] < now - LATENCY_WINDOW_S:
            self._ttfb.popleft()
        ordered = sorted(itertools.chain.from_iterable(v for _, v in self._ttfb))
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
        self.flush()
        self._samples.append((self.clock(), *self.totals()))
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
            self._recent.clear()           # left from an earlier listening spell
            self._flushed_total = self.totals()[0]
            self._samples.append((self.clock(), *self.totals()))
            self._ticker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Every flush_s a batch of requests, every tick_s the metrics, while anyone listens."""
        loop = asyncio.get_running_loop()
        step = min(self.flush_s, self.tick_s)
        next_at = next_tick = loop.time()
        next_tick += self.tick_s
        while self.hub.active:
            next_at += step
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if not self.hub.active:
                break
            try:
                if loop.time() >= next_tick - step / 2:
                    next_tick += self.tick_s
                    self.tick()
                else:
                    self.flush()
            except Exception:      # never lose the ticker to one bad tick
                log.exception("live: metrics tick failed")
            if loop.time() - next_at > self.tick_s:
                next_at = next_tick = loop.time()   # the loop stalled: no catch-up burst

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
