"""Gateway metrics: cheap counters on the hot path, formatting only when scraped.

Prometheus text exposition format 0.0.4 by default (render_prometheus), JSON for clients that
send Accept: application/json (render_json); content_for(accept) picks one.

Metrics (all prefixed gateway_):
  requests_total{route,status,key_id}             counter
  request_duration_seconds{route}                  histogram, LATENCY_BUCKETS
  ttfb_seconds{route}                              histogram, TTFB_BUCKETS (time to first byte)
  in_flight                                        gauge (the gateway updates .in_flight)
  queue_depth                                      gauge (callable, requests waiting for a slot)
  rate_limited_total{key_id}                       counter
  auth_failed_total                                counter
  upstream_errors_total{kind}                      counter
  tokens_total{key_id,model,kind}                  counter, kind = prompt | completion
  usage_rows_dropped_total                         counter (callable: the usage ledger's losses)
  backend_up                                       gauge 0/1 (callable)
  keys_loaded                                      gauge (callable)
  uptime_seconds                                   gauge
  model_requests_total{model,status}               counter, requests that named a model
  model_state{model,state}                         gauge 1/0, state = loaded | loading |
                                                   unloaded | failed (callable)
  model_in_flight{model}, model_queue_depth{model} gauges (callable)

Cardinality is bounded: key_id values are the known keys (set_known_keys, from the key file;
anything else is "unknown", no key is "-"), routes, upstream error kinds and models are capped at
MAX_ROUTES / MAX_ERROR_KINDS / MAX_MODEL_LABELS distinct values (then "other"; no model is "-"),
status is a number 100..599. Model values are catalog names in router mode (the gateway resolves
every model a client names before it counts it) or the model llama-server answered with.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Callable, Iterable

# Request latency of an LLM gateway spans a cached 404 (ms) to a long generation; 300 s is
# REQUEST_TIMEOUT's default, so the top finite bucket catches everything short of a timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
# Time to first byte is prompt processing: ms for short prompts on a GPU, minutes for a long
# context on a slow one (same 300 s ceiling).
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The route table has a few dozen entries; a caller that passes raw paths can't grow memory.
MAX_ROUTES = 64
# Upstream error kinds are a handful (connect, timeout, reset, bad_response ...).
MAX_ERROR_KINDS = 32
# Without set_known_keys, at most this many key_id label values (the rest are "unknown").
MAX_KEY_LABELS = 10_000
# Model label values: catalog names (router mode lists at most a few hundred models,
# models/catalog.MAX_CATALOG_MODELS) or the one model llama-server answers with; the cap only
# guards against a bug or a misbehaving upstream.
MAX_MODEL_LABELS = 1024
# The states a model's gateway_model_state series cover (models/catalog.State).
MODEL_STATES = ("loaded", "loading", "unloaded", "failed")

# Status label of every valid status code, made once (not str() per request).
_STATUS_LABELS = {code: str(code) for code in range(100, 600)}

UNKNOWN_KEY = "unknown"
NO_KEY = "-"
OTHER = "other"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

_HELP = {
    "gateway_requests_total": "Requests answered, by route, status and key.",
    "gateway_request_duration_seconds": "Time from request head to the last response byte.",
    "gateway_ttfb_seconds": "Time from request head to the first response byte.",
    "gateway_in_flight": "Requests being handled now.",
    "gateway_queue_depth": "Requests waiting for a llama-server slot.",
    "gateway_rate_limited_total": "Requests refused by the per-key rate or concurrency limit.",
    "gateway_auth_failed_total": "Requests refused for a missing or unknown key.",
    "gateway_upstream_errors_total": "Failures talking to llama-server, by kind.",
    "gateway_tokens_total": "Tokens processed, by key, model and kind (prompt or completion).",
    "gateway_usage_rows_dropped_total": "Usage ledger rows lost (queue full, disk failing).",
    "gateway_backend_up": "1 when llama-server answers its health check, else 0.",
    "gateway_keys_loaded": "API keys in force.",
    "gateway_uptime_seconds": "Seconds since the gateway started.",
    "gateway_model_requests_total": "Requests that named a model, by model and status.",
    "gateway_model_state": "1 for the model's current state, else 0.",
    "gateway_model_in_flight": "Requests holding the model (at llama-server or about to be).",
    "gateway_model_queue_depth": "Requests waiting for one of the model's backend slots.",
}


def escape_label_value(value: str) -> str:
    """Exposition format: backslash, double quote and line feed are escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class _Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = less or equal)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((format_value(bound), running))
        out.append(("+Inf", self.count))
        return out


def _seconds(value: float) -> float:
    # NaN, negative or absurd durations (a broken clock) count as 0 so sums stay finite.
    return value if 0.0 <= value < 1e9 else 0.0


def _zero() -> int:
    return 0


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._started = clock()
        self.in_flight = 0
        self._requests: dict[tuple[str, str, str], int] = {}
        self._duration: dict[str, _Histogram] = {}
        self._ttfb: dict[str, _Histogram] = {}
        self._rate_limited: dict[str, int] = {}
        self.auth_failed = 0
        self._upstream_errors: dict[str, int] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}     # (key_id, model, kind)
        self._models: set[str] = set()
        self._known_keys: frozenset[str] | None = None
        self._seen_keys: set[str] = set()
        self._routes: set[str] = set()
        self._queue_depth: Callable[[], float] = _zero
        self._backend_up: Callable[[], float] = _zero
        self._keys_loaded: Callable[[], float] = _zero
        self._usage_rows_dropped: Callable[[], float] = _zero
        self._model_requests: dict[tuple[str, str], int] = {}
        self._models_source: Callable[[], list] = list

    # -- configuration -------------------------------------------------------------------------
    def set_gauge_sources(self, *, queue_depth: Callable[[], float] = _zero,
                          backend_up: Callable[[], float] = _zero,
                          keys_loaded: Callable[[], float] = _zero) -> None:
        self._queue_depth = queue_depth
        self._backend_up = backend_up
        self._keys_loaded = keys_loaded

    def set_counter_sources(self, *, usage_rows_dropped: Callable[[], float] = _zero) -> None:
        """Counters kept elsewhere, read when scraped (the usage ledger's `dropped`)."""
        self._usage_rows_dropped = usage_rows_dropped
    def set_model_source(self, source: Callable[[], list]) -> None:
        """source() -> [(model, state, in_flight, queued)], read at each scrape."""
        self._models_source = source

    def set_known_keys(self, key_ids: Iterable[str]) -> None:
        """Key ids allowed as label values (call at start and after each key reload). Series of
        keys no longer known are dropped, so memory stays bounded by the key file."""
        known = frozenset(key_ids)
        self._known_keys = known
        self._seen_keys &= known
        ok = known | {UNKNOWN_KEY, NO_KEY}
        self._requests = {k: v for k, v in self._requests.items() if k[2] in ok}
        self._rate_limited = {k: v for k, v in self._rate_limited.items() if k in ok}
        self._tokens = {k: v for k, v in self._tokens.items() if k[0] in ok}

    # -- label guards --------------------------------------------------------------------------
    def _key(self, key_id: str | None) -> str:
        if not key_id or key_id == NO_KEY:
            return NO_KEY
        if self._known_keys is not None:
            return key_id if key_id in self._known_keys else UNKNOWN_KEY
        if key_id in self._seen_keys:
            return key_id
        if len(self._seen_keys) < MAX_KEY_LABELS:
            self._seen_keys.add(key_id)
            return key_id
        return UNKNOWN_KEY

    def _route(self, route: str) -> str:
        if route in self._routes:
            return route
        if len(self._routes) < MAX_ROUTES:
            self._routes.add(route)
            return route
        return OTHER

    # -- hot path ------------------------------------------------------------------------------
    def observe_request(self, route: str, status: int, key_id: str, duration_s: float,
                        ttfb_s: float | None) -> None:
        # Once per request: the label guards are short-cut for the usual values (same rules as
        # _route and _key).
        if route not in self._routes:
            route = self._route(route)
        status_label = _STATUS_LABELS.get(status, OTHER) if type(status) is int else OTHER
        known = self._known_keys
        if known is None or key_id not in known:
            key_id = self._key(key_id)
        labels = (route, status_label, key_id)
        requests = self._requests
        requests[labels] = requests.get(labels, 0) + 1
        hist = self._duration.get(route)
        if hist is None:
            hist = self._duration[route] = _Histogram(LATENCY_BUCKETS)
        hist.observe(_seconds(duration_s))
        if ttfb_s is not None:
            hist = self._ttfb.get(route)
            if hist is None:
                hist = self._ttfb[route] = _Histogram(TTFB_BUCKETS)
            hist.observe(_seconds(ttfb_s))

    def observe_model(self, model: str, status: int) -> None:
        status_label = _STATUS_LABELS.get(status, OTHER) if type(status) is int else OTHER
        labels = (model, status_label)
        counts = self._model_requests
        if labels not in counts and len(counts) >= MAX_MODEL_LABELS * 8:
            labels = (OTHER, status_label)
        counts[labels] = counts.get(labels, 0) + 1

    def _model_rows(self) -> list:
        try:
            return list(self._models_source())[:MAX_MODEL_LABELS]
        except Exception:  # a broken source must not break the scrape
            return []

    def inc_rate_limited(self, key_id: str) -> None:
        k = self._key(key_id)
        self._rate_limited[k] = self._rate_limited.get(k, 0) + 1

    def inc_auth_failed(self) -> None:
        self.auth_failed += 1

    def inc_upstream_error(self, kind: str) -> None:
        if kind not in self._upstream_errors and len(self._upstream_errors) >= MAX_ERROR_KINDS:
            kind = OTHER
        self._upstream_errors[kind] = self._upstream_errors.get(kind, 0) + 1

    def add_tokens(self, key_id: str, prompt: int, completion: int,
                   model: str | None = None) -> None:
        known = self._known_keys
        k = key_id if known is not None and key_id in known else self._key(key_id)
        if model not in self._models:
            model = self._model(model)
        tokens = self._tokens
        if prompt and prompt > 0:
            labels = (k, model, "prompt")
            tokens[labels] = tokens.get(labels, 0) + int(prompt)
        if completion and completion > 0:
            labels = (k, model, "completion")
            tokens[labels] = tokens.get(labels, 0) + int(completion)

    def _model(self, model: str | None) -> str:
        if not model:
            return NO_KEY
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        return OTHER

    def totals(self, skip_routes: tuple[str, ...] = ()) -> tuple[int, int, int]:
        """(requests, those answered 5xx or not at all, completion tokens) since the start,
        leaving out the routes whose label starts with one of skip_routes. For the dashboard's
        rates (a tick's sum over the series, never on the hot path). A key reload drops the
        series of removed keys: a total may then go down."""
        requests = errors = 0
        for (route, status, _key), n in self._requests.items():
            if skip_routes and route.startswith(skip_routes):
                continue
            requests += n
            if status[0] == "5" or status == OTHER:
                errors += n
        tokens = sum(n for (_key, _model, kind), n in self._tokens.items() if kind == "completion")
        return requests, errors, tokens

    # -- rendering -----------------------------------------------------------------------------
    @staticmethod
    def _sample(source: Callable[[], float]) -> float:
        try:
            return source()
        except Exception:  # a broken gauge source must not break the scrape
            return math.nan

    def _gauges(self) -> dict[str, float]:
        return {
            "gateway_in_flight": self.in_flight,
            "gateway_queue_depth": self._sample(self._queue_depth),
            "gateway_backend_up": self._sample(self._backend_up),
            "gateway_keys_loaded": self._sample(self._keys_loaded),
            "gateway_uptime_seconds": max(0.0, self._clock() - self._started),
        }

    def render_prometheus(self) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str) -> None:
            out.append(f"# HELP {name} {_escape_help(_HELP[name])}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, labels: Iterable[tuple[str, str]], value: float) -> None:
            out.append(f"{name}{_labels(labels)} {format_value(value)}")

        family("gateway_requests_total", "counter")
        for (route, status, key), n in sorted(self._requests.items()):
            sample("gateway_requests_total",
                   (("route", route), ("status", status), ("key_id", key)), n)
        for name, hists in (("gateway_request_duration_seconds", self._duration),
                            ("gateway_ttfb_seconds", self._ttfb)):
            family(name, "histogram")
            for route, hist in sorted(hists.items()):
                for le, n in hist.cumulative():
                    sample(name + "_bucket", (("route", route), ("le", le)), n)
                sample(name + "_sum", (("route", route),), hist.sum)
                sample(name + "_count", (("route", route),), hist.count)
        family("gateway_rate_limited_total", "counter")
        for key, n in sorted(self._rate_limited.items()):
            sample("gateway_rate_limited_total", (("key_id", key),), n)
        family("gateway_auth_failed_total", "counter")
        sample("gateway_auth_failed_total", (), self.auth_failed)
        family("gateway_upstream_errors_total", "counter")
        for kind, n in sorted(self._upstream_errors.items()):
            sample("gateway_upstream_errors_total", (("kind", kind),), n)
        family("gateway_tokens_total", "counter")
        for (key, model, kind), n in sorted(self._tokens.items()):
            sample("gateway_tokens_total", (("key_id", key), ("model", model), ("kind", kind)), n)
        family("gateway_usage_rows_dropped_total", "counter")
        sample("gateway_usage_rows_dropped_total", (), self._sample(self._usage_rows_dropped))
        for name, value in self._gauges().items():
            family(name, "gauge")
            sample(name, (), value)
        family("gateway_model_requests_total", "counter")
        for (model, status), n in sorted(self._model_requests.items()):
            sample("gateway_model_requests_total", (("model", model), ("status", status)), n)
        rows = self._model_rows()
        family("gateway_model_state", "gauge")
        for model, state, _, _ in rows:
            for each in MODEL_STATES:
                sample("gateway_model_state", (("model", model), ("state", each)),
                       1 if each == state else 0)
        for name, index in (("gateway_model_in_flight", 2), ("gateway_model_queue_depth", 3)):
            family(name, "gauge")
            for row in rows:
                sample(name, (("model", row[0]),), row[index])
        return ("\n".join(out) + "\n").encode("utf-8")

    def render_json(self) -> bytes:
        def hist_json(hists: dict[str, _Histogram]) -> dict:
            return {route: {"buckets": dict(h.cumulative()), "sum": h.sum, "count": h.count}
                    for route, h in sorted(hists.items())}

        def num(value: float):
            return None if isinstance(value, float) and math.isnan(value) else value

        data = {name.removeprefix("gateway_"): num(v) for name, v in self._gauges().items()}
        data.update({
            "requests": [{"route": r, "status": s, "key_id": k, "count": n}
                         for (r, s, k), n in sorted(self._requests.items())],
            "request_duration_seconds": hist_json(self._duration),
            "ttfb_seconds": hist_json(self._ttfb),
            "rate_limited": dict(sorted(self._rate_limited.items())),
            "auth_failed": self.auth_failed,
            "upstream_errors": dict(sorted(self._upstream_errors.items())),
            "tokens": {},
            "tokens_by_model": {},
            "usage_rows_dropped": num(self._sample(self._usage_rows_dropped)),
            "models": [{"model": m, "state": st, "in_flight": f, "queue": q}
                       for m, st, f, q in self._model_rows()],
            "model_requests": [{"model": m, "status": st, "count": n}
                               for (m, st), n in sorted(self._model_requests.items())],
        })
        for (key, model, kind), n in sorted(self._tokens.items()):
            data["tokens"].setdefault(key, {"prompt": 0, "completion": 0})[kind] += n
            data["tokens_by_model"].setdefault(key, {}).setdefault(
                model, {"prompt": 0, "completion": 0})[kind] = n
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def content_for(self, accept: str | None) -> tuple[str, bytes]:
        """(content type, body): JSON when the Accept header asks for application/json."""
        if accept and "application/json" in accept.lower():
            return JSON_CONTENT_TYPE, self.render_json()
        return PROMETHEUS_CONTENT_TYPE, self.render_prometheus()
