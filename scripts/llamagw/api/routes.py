"""The whole public API on one screen: (method, path) -> Route.

Paths match exactly, byte for byte, after the query string is cut off: no normalisation, so
`/v1//models`, `/v1/models/`, `/v1/%6dodels` and `/v1/../slots` are simply unknown (404) and never
reach llama-server. Anything not listed here is 404; a listed path with another method is 405.

auth: "key"     an inference key is required (issue 3: key file, limits, accounting)
      "none"    open (platform probes, liveness)
      "metrics" open unless METRICS_KEY is set
kind: "proxy"   forwarded to llama-server at `upstream` (rebuilt request, allowlisted headers)
      "local"   answered by the gateway itself (handler name on the Gateway)
      "ollama"  translated to an OpenAI-compatible llama-server call (issue 7)
json_body: the body must be a JSON object within jsonguard's limits, checked once it is read and
      before a backend slot is taken (400 otherwise): every route whose body llama-server or the
      Ollama translation parses. The Ollama model-management routes answer 501 whatever the body.
"""

from __future__ import annotations

import dataclasses

from llamagw.errors import GatewayError, not_found


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    name: str             # label for metrics and the access log
    kind: str             # "proxy" | "local" | "ollama"
    auth: str             # "key" | "none" | "metrics"
    upstream: str = ""    # llama-server path for kind "proxy"
    handler: str = ""     # local/ollama handler name
    stream_capable: bool = False   # body may ask for "stream": true
    json_body: bool = False        # the body is checked by jsonguard


def _proxy(name: str, path: str, stream: bool = False, json_body: bool = True) -> Route:
    return Route(name, "proxy", "key", upstream=path, stream_capable=stream, json_body=json_body)


def _local(name: str, auth: str = "none") -> Route:
    return Route(name, "local", auth, handler=name)


ROUTES: dict[tuple[str, str], Route] = {
    # OpenAI-compatible inference API (llama-server's /v1 routes)
    ("POST", "/v1/chat/completions"): _proxy("chat_completions", "/v1/chat/completions", True),
    ("POST", "/v1/completions"): _proxy("completions", "/v1/completions", True),
    ("POST", "/v1/embeddings"): _proxy("embeddings", "/v1/embeddings"),
    ("GET", "/v1/models"): _proxy("models", "/v1/models", json_body=False),
    # Token counting for clients that budget context (no other user's data involved).
    ("POST", "/tokenize"): _proxy("tokenize", "/tokenize"),
    ("POST", "/detokenize"): _proxy("detokenize", "/detokenize"),
    # gateway's own
    ("GET", "/ping"): _local("ping"),
    ("GET", "/health"): _local("health"),
    ("GET", "/metrics"): _local("metrics", "metrics"),
}


def _ollama(name: str, handler: str, auth: str = "key", json_body: bool = False) -> Route:
    return Route(name, "ollama", auth, handler=handler, json_body=json_body)


# Ollama-compatible API (handlers in ollama_routes.py). "/" and /api/version are what Ollama
# clients probe to find a server, so they are open like /ping.
OLLAMA_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): _ollama("ollama_root", "root", "none"),
    ("GET", "/api/version"): _ollama("ollama_version", "version", "none"),
    ("GET", "/api/tags"): _ollama("ollama_tags", "tags"),
    ("POST", "/api/show"): _ollama("ollama_show", "show", json_body=True),
    ("GET", "/api/ps"): _ollama("ollama_ps", "ps"),
    ("POST", "/api/chat"): _ollama("ollama_chat", "chat", json_body=True),
    ("POST", "/api/generate"): _ollama("ollama_generate", "generate", json_body=True),
    ("POST", "/api/embed"): _ollama("ollama_embed", "embed", json_body=True),
    ("POST", "/api/embeddings"): _ollama("ollama_embeddings", "embeddings", json_body=True),
    # Model management belongs to the container: a clear 501.
    ("POST", "/api/pull"): _ollama("ollama_unsupported", "unsupported"),
    ("POST", "/api/push"): _ollama("ollama_unsupported", "unsupported"),
    ("POST", "/api/create"): _ollama("ollama_unsupported", "unsupported"),
    ("POST", "/api/copy"): _ollama("ollama_unsupported", "unsupported"),
    ("DELETE", "/api/delete"): _ollama("ollama_unsupported", "unsupported"),
}
ROUTES.update(OLLAMA_ROUTES)

# HEAD is served for every GET route: same status and headers, no body.
_PATHS: dict[str, list[str]] = {}
for (_method, _path) in ROUTES:
    _PATHS.setdefault(_path, []).append(_method)


def add_routes(extra: dict[tuple[str, str], Route]) -> None:
    """Register more routes (the Ollama API). Called once at start, before serving."""
    for key, route in extra.items():
        if key in ROUTES:
            raise ValueError(f"route {key} defined twice")
        ROUTES[key] = route
        _PATHS.setdefault(key[1], []).append(key[0])


def allowed_methods(path: str) -> list[str]:
    methods = list(_PATHS.get(path, ()))
    if "GET" in methods and "HEAD" not in methods:
        methods.append("HEAD")
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
    methods = allowed_methods(path)
    if not methods:
        raise not_found()
    raise GatewayError(405, f"Method {method} is not allowed on {path}", "method_not_allowed",
                       headers=[("allow", ", ".join(methods))])
