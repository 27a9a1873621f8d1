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
  cors       False: same origin only (the admin API and the dashboard): no CORS headers on any
             answer and no CORS preflight answer, whatever CORS_ORIGINS says; instead `headers`
             (the security headers) go on every answer, errors included
Adding a route: one row in its API's table below, and its handler. An admin route: a row made
with admin_route() in ADMIN_ROUTES (tests/test_admin_api.py walks that table: no session -> 401,
an inference key -> 403, a POST on a session without its CSRF token -> 403).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llamagw.admin import (info_api, keys_api, live_api, models_api, pull_api, session_api,
                           static, ui_api, usage_api)
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
    cors: bool = True
    headers: tuple[tuple[str, str], ...] = ()

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
    # Router mode: pull and delete for admin keys (admin/pull_api.py; single-model mode 501).
    _ollama("POST", "/api/pull", "ollama_pull", pull_api.ollama_pull, Auth.ADMIN, streams=True,
            json_body=True),
    _ollama("DELETE", "/api/delete", "ollama_delete", pull_api.ollama_delete, Auth.ADMIN,
            json_body=True),
    # The rest of model management belongs to the container: a clear 501 whatever the body.
    _ollama("POST", "/api/push", "ollama_unsupported", ollama.unsupported),
    _ollama("POST", "/api/create", "ollama_unsupported", ollama.unsupported),
    _ollama("POST", "/api/copy", "ollama_unsupported", ollama.unsupported),
)


def admin_route(method: str, path: str, name: str, handler: Callable, auth: Auth = Auth.ADMIN,
                *, streams: bool = False, json_body: bool = False) -> Route:
    """A row of the admin API: Envelope.ADMIN, same origin only, the API's security headers
    (admin/static.API_HEADERS: CSP, nosniff, no-store, ...) on every answer. auth: Auth.ADMIN
    (an admin key, or a dashboard session with a CSRF token for POST) for all but the way in.
    name: starts with "admin" (the live channel leaves the dashboard's own traffic out)."""
    return Route(method, path, name, handler, auth, Envelope.ADMIN, streams=streams,
                 json_body=json_body, cors=False, headers=static.API_HEADERS)


# The admin API (ADMIN-API.md): every route Auth.ADMIN and Envelope.ADMIN but the way in (setup,
# sign-in). Each feature's rows in its own block.
ADMIN_ROUTES: tuple[Route, ...] = (
    # --- sessions, live channel, logs, system, keys (issue 29: admin/*_api.py) ---
    admin_route("GET", "/admin/setup", "admin_setup", session_api.setup, Auth.NONE),
    admin_route("POST", "/admin/session", "admin_sign_in", session_api.sign_in, Auth.NONE,
                json_body=True),
    admin_route("GET", "/admin/session", "admin_session", session_api.session_info),
    admin_route("POST", "/admin/session/logout", "admin_sign_out", session_api.sign_out),
    admin_route("GET", "/admin/live", "admin_live", live_api.live, streams=True),
    admin_route("GET", "/admin/logs", "admin_logs", info_api.logs),
    admin_route("GET", "/admin/system", "admin_system", info_api.system),
    admin_route("GET", "/admin/keys", "admin_keys", keys_api.list_keys),
    admin_route("POST", "/admin/keys", "admin_key_create", keys_api.create, json_body=True),
    admin_route("POST", "/admin/keys/rotate", "admin_key_rotate", keys_api.rotate,
                json_body=True),
    admin_route("POST", "/admin/keys/revoke", "admin_key_revoke", keys_api.revoke,
                json_body=True),
    # --- models (issue 27: admin/models_api.py) ---
    admin_route("GET", "/admin/models", "admin_models", models_api.list_models),
    admin_route("POST", "/admin/models/load", "admin_models_load", models_api.load,
                json_body=True),
    admin_route("POST", "/admin/models/unload", "admin_models_unload", models_api.unload,
                json_body=True),
    admin_route("POST", "/admin/models/switch", "admin_models_switch", models_api.switch,
                json_body=True),
    admin_route("POST", "/admin/models/pull", "admin_models_pull", pull_api.admin_pull,
                streams=True, json_body=True),
    admin_route("POST", "/admin/models/delete", "admin_models_delete", pull_api.admin_delete,
                json_body=True),
    admin_route("GET", "/admin/events", "admin_events", models_api.events, streams=True),
    # --- usage (issue 28): the ledger added up, JSON or CSV (admin/usage_api.py) ---
    admin_route("GET", "/admin/usage", "admin_usage", usage_api.usage_report),
)

# The dashboard's files (admin/static.py: each answer carries its own CSP and headers), open.
UI_ROUTES: tuple[Route, ...] = tuple(
    Route("GET", path, "ui", ui_api.files, Auth.NONE, Envelope.ADMIN, cors=False)
    for path in (static.UI_PREFIX[:-1], static.UI_PREFIX,
                 *(static.UI_PREFIX + name for name in static.FILES))
) + (Route("GET", "/favicon.ico", "ui_favicon", ui_api.favicon, Auth.NONE, Envelope.ADMIN,
           cors=False),)

# Where a path no route serves gets its errors shaped (404, 405, a preflight's 404): the API
# whose clients ask there. Ollama clients probe "/" and /api/*.
ENVELOPE_PREFIXES = (("/api/", Envelope.OLLAMA), ("/admin/", Envelope.ADMIN),
                     (static.UI_PREFIX, Envelope.ADMIN))
ENVELOPE_PATHS = {"/": Envelope.OLLAMA, static.UI_PREFIX[:-1]: Envelope.ADMIN}


def table(*tables: tuple[Route, ...]) -> dict[tuple[str, str], Route]:
    """One table from the per-API ones; a (method, path) listed twice is an error, and so is an
    admin-envelope route that allows CORS (a row not made with admin_route)."""
    out: dict[tuple[str, str], Route] = {}
    for routes in tables:
        for route in routes:
            if route.key in out:
                raise ValueError(f"route {route.key} defined twice")
            if route.envelope is Envelope.ADMIN and route.cors:
                raise ValueError(f"route {route.key}: the admin API is same-origin only "
                                 "(make its row with admin_route)")
            out[route.key] = route
    return out


ROUTES = table(OPENAI_ROUTES, LOCAL_ROUTES, OLLAMA_ROUTES, ADMIN_ROUTES, UI_ROUTES)

# OPTIONS on any path: the CORS preflight, answered locally in the envelope of its path; on the
# admin API and the dashboard, no CORS preflight answer (same origin only).
PREFLIGHTS = {envelope: Route("OPTIONS", "*", "preflight", local.preflight, Auth.NONE, envelope)
              for envelope in Envelope if envelope is not Envelope.ADMIN}
PREFLIGHTS[Envelope.ADMIN] = Route("OPTIONS", "*", "admin_preflight", local.same_origin_preflight,
                                   Auth.NONE, Envelope.ADMIN, cors=False,
                                   headers=static.API_HEADERS)


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
