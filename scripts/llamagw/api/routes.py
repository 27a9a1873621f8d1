"""The whole public API on one screen: (method, path) -> Route, assembled from per-API tables.

Paths match exactly, byte for byte, after the query string is cut off: no normalisation, so
`/v1//models`, `/v1/models/`, `/v1/%6dodels` and `/v1/../slots` are simply unknown (404) and never
reach llama-server. Anything not listed here is 404; a listed path with another method is 405;
HEAD is served for every GET route (same status and headers, no body); OPTIONS is the CORS
preflight (api/cors.py) for every path listed.

A Route carries all its facts:
  handler    async def handler(call) -> Response | StreamResponse | None (context.py): a local
             handler returns its answer, whole or streamed; a relaying one (relay.proxy, the
             Ollama inference handlers) answers through the relay and returns None
  auth       what it needs (limits/admission.Auth): nothing, an inference key, an admin key, or
             the metrics key
  envelope   the shape of its error bodies (errors.Envelope): OpenAI, Ollama or admin
  local      answered by the gateway itself: no backend slot, no llama-server
  streams    it may answer a stream (SSE or NDJSON)
  json_body  the body must be a JSON object within jsonguard's limits, checked once it is read
             and before a backend slot is taken (400 otherwise): every route whose body
             llama-server or the Ollama translation parses
  upstream   the llama-server path of a proxied route: served on the connection's callback path
             when nothing makes it wait (net/connection.py)
  model      its body names a model (models/serving.py): resolved (404), scoped to the key
             (403) and, in router mode, given that model's own backend slots
  lease      router mode: the pipeline leases the model (loading it first) before the handler,
             and the body goes to llama-server under the model's canonical name; the Ollama
             inference handlers lease it themselves (an empty prompt loads, or unloads)
Adding a route: one row in its API's table below, and its handler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llamagw.admin import models_api, usage_api
from llamagw.api import local, model_api
from llamagw.api import ollama_handlers as ollama
from llamagw.errors import Envelope, GatewayError, not_found
from llamagw.limits.admission import Auth
from llamagw.net import relay


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    name: str             # label for metrics and the access log
    handler: Callable     # async (call) -> Response | StreamResponse | None
    auth: Auth
    envelope: Envelope
    local: bool = True
    streams: bool = False
    json_body: bool = False
    upstream: str = ""
    model: bool = False
    lease: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.path


def _proxy(method: str, path: str, name: str, streams: bool = False) -> Route:
    """A model's route relayed to llama-server as it is (the body names the model)."""
    return Route(method, path, name, relay.proxy, Auth.KEY, Envelope.OPENAI, local=False,
                 streams=streams, json_body=True, upstream=path, model=True, lease=True)


# OpenAI-compatible inference API (llama-server's /v1 routes), relayed to llama-server.
OPENAI_ROUTES = (
    _proxy("POST", "/v1/chat/completions", "chat_completions", streams=True),
    _proxy("POST", "/v1/completions", "completions", streams=True),
    _proxy("POST", "/v1/embeddings", "embeddings"),
    # The models the key may use: llama-server's list (one model), or the gateway's catalog
    # (router mode: never the router's raw list, which holds paths and command lines).
    Route("GET", "/v1/models", "models", model_api.v1_models, Auth.KEY, Envelope.OPENAI,
          local=False),
    # Token counting for clients that budget context (no other user's data involved).
    _proxy("POST", "/tokenize", "tokenize"),
    _proxy("POST", "/detokenize", "detokenize"),
)

# The gateway's own: liveness, state, metrics (api/local.py).
LOCAL_ROUTES = (
    Route("GET", "/ping", "ping", local.ping, Auth.NONE, Envelope.OPENAI),
    Route("GET", "/health", "health", local.health, Auth.NONE, Envelope.OPENAI),
    Route("GET", "/metrics", "metrics", local.metrics, Auth.METRICS, Envelope.OPENAI),
)


def _ollama(method: str, path: str, name: str, handler: Callable, auth: Auth = Auth.KEY, *,
            infer: bool = False, streams: bool = False, json_body: bool = False) -> Route:
    """infer: a translated llama-server call (a backend slot, the model's); else answered
    locally."""
    return Route(method, path, name, handler, auth, Envelope.OLLAMA, local=not infer,
                 streams=streams, json_body=json_body, model=infer)


# Ollama-compatible API (api/ollama_handlers.py). "/" and /api/version are what Ollama clients
# probe to find a server, so they are open like /ping.
OLLAMA_ROUTES = (
    _ollama("GET", "/", "ollama_root", ollama.root, Auth.NONE),
    _ollama("GET", "/api/version", "ollama_version", ollama.version, Auth.NONE),
    _ollama("GET", "/api/tags", "ollama_tags", ollama.tags),
    _ollama("POST", "/api/show", "ollama_show", ollama.show, json_body=True),
    _ollama("GET", "/api/ps", "ollama_ps", ollama.ps),
    _ollama("POST", "/api/chat", "ollama_chat", ollama.chat, infer=True, streams=True,
            json_body=True),
    _ollama("POST", "/api/generate", "ollama_generate", ollama.generate, infer=True,
            streams=True, json_body=True),
    _ollama("POST", "/api/embed", "ollama_embed", ollama.embed, infer=True, json_body=True),
    _ollama("POST", "/api/embeddings", "ollama_embeddings", ollama.embeddings, infer=True,
            json_body=True),
    # Model management belongs to the container: a clear 501 whatever the body.
    _ollama("POST", "/api/pull", "ollama_unsupported", ollama.unsupported),
    _ollama("POST", "/api/push", "ollama_unsupported", ollama.unsupported),
    _ollama("POST", "/api/create", "ollama_unsupported", ollama.unsupported),
    _ollama("POST", "/api/copy", "ollama_unsupported", ollama.unsupported),
    _ollama("DELETE", "/api/delete", "ollama_unsupported", ollama.unsupported),
)

def _admin(method: str, path: str, name: str, handler: Callable, *, streams: bool = False,
           json_body: bool = False) -> Route:
    return Route(method, path, name, handler, Auth.ADMIN, Envelope.ADMIN, streams=streams,
                 json_body=json_body)


# ---- admin: models (issue 27; admin/models_api.py) ----
ADMIN_MODEL_ROUTES = (
    _admin("GET", "/admin/models", "admin_models", models_api.list_models),
    _admin("POST", "/admin/models/load", "admin_models_load", models_api.load, json_body=True),
    _admin("POST", "/admin/models/unload", "admin_models_unload", models_api.unload,
           json_body=True),
    _admin("POST", "/admin/models/switch", "admin_models_switch", models_api.switch,
           json_body=True),
    _admin("GET", "/admin/events", "admin_events", models_api.events, streams=True),
)
# ---- end of admin: models ----

# The admin API (keys, models, usage): every route Auth.ADMIN and Envelope.ADMIN.
ADMIN_ROUTES: tuple[Route, ...] = (
    *ADMIN_MODEL_ROUTES,
    # Usage (issue 28): the ledger added up, JSON or CSV (admin/usage_api.py).
    Route("GET", "/admin/usage", "admin_usage", usage_api.usage_report, Auth.ADMIN,
          Envelope.ADMIN),
)

# Where a path no route serves gets its errors shaped (404, 405, a preflight's 404): the API
# whose clients ask there. Ollama clients probe "/" and /api/*.
ENVELOPE_PREFIXES = (("/api/", Envelope.OLLAMA), ("/admin/", Envelope.ADMIN))
ENVELOPE_PATHS = {"/": Envelope.OLLAMA}


def table(*tables: tuple[Route, ...]) -> dict[tuple[str, str], Route]:
    """One table from the per-API ones; a (method, path) listed twice is an error."""
    out: dict[tuple[str, str], Route] = {}
    for routes in tables:
        for route in routes:
            if route.key in out:
                raise ValueError(f"route {route.key} defined twice")
            out[route.key] = route
    return out


ROUTES = table(OPENAI_ROUTES, LOCAL_ROUTES, OLLAMA_ROUTES, ADMIN_ROUTES)

# OPTIONS on any path: the CORS preflight, answered locally in the envelope of its path.
PREFLIGHTS = {envelope: Route("OPTIONS", "*", "preflight", local.preflight, Auth.NONE, envelope)
              for envelope in Envelope}


def envelope_for(path: str) -> Envelope:
    """The error shape for a path no route serves."""
    envelope = ENVELOPE_PATHS.get(path)
    if envelope is not None:
        return envelope
    for prefix, envelope in ENVELOPE_PREFIXES:
        if path.startswith(prefix):
            return envelope
    return Envelope.OPENAI


def allowed_methods(path: str) -> list[str]:
    """The methods served on `path` (GET brings HEAD), sorted; a scan: only errors and
    preflights ask."""
    methods = {method for method, p in ROUTES if p == path}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def match(method: str, path: str) -> Route:
    """The route for this request, or GatewayError 404 / 405 (with Allow)."""
    route = ROUTES.get((method, path))
    if route is not None:
        return route
    if method == "HEAD":
        route = ROUTES.get(("GET", path))
        if route is not None:
            return route
    if method == "OPTIONS":
        return PREFLIGHTS[envelope_for(path)]
    methods = allowed_methods(path)
    if not methods:
        raise not_found()
    raise GatewayError(405, f"Method {method} is not allowed on {path}", "method_not_allowed",
                       headers=[("allow", ", ".join(methods))])
