"""CORS: off by default; CORS_ORIGINS is an allowlist of exact origins, or `*`.

An unlisted origin is never reflected. Preflights (OPTIONS with Access-Control-Request-Method) are
answered here and never reach llama-server (which would reflect any Origin).
"""

from __future__ import annotations

from llamagw.api import routes
from llamagw.errors import not_found

ALLOW_HEADERS = "authorization, content-type, x-api-key, x-request-id"
EXPOSE_HEADERS = ("x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining, "
                  "x-ratelimit-reset")
# How long a browser may cache a preflight answer (seconds): short, so a config change lands.
PREFLIGHT_MAX_AGE = "600"


class Cors:
    def __init__(self, origins: tuple[str, ...]):
        self.any = "*" in origins
        self.origins = frozenset(o for o in origins if o != "*")

    def allow_origin(self, origin: str) -> str | None:
        if self.any:
            return "*"
        if origin in self.origins:
            return origin
        return None

    def headers_for(self, origin: str) -> list[tuple[str, str]]:
        allowed = self.allow_origin(origin)
        if allowed is None:
            return []
        headers = [("access-control-allow-origin", allowed),
                   ("access-control-expose-headers", EXPOSE_HEADERS)]
        if allowed != "*":
            headers.append(("vary", "origin"))
        return headers

    def preflight(self, req, *, cors: bool = True) -> tuple[int, list[tuple[str, str]], bytes]:
        """Answer an OPTIONS request: (status, headers, body). CORS headers for the origin, if
        allowed, were already added to the context by the connection. cors=False (the admin
        API and the dashboard: same origin only): the methods, never a CORS answer."""
        methods = routes.allowed_methods(req.path)
        if not methods and req.target != "*":
            raise not_found()
        headers = [("allow", ", ".join(methods + ["OPTIONS"]))]
        origin = req.get("origin")
        if (cors and origin is not None and req.get("access-control-request-method") is not None
                and self.allow_origin(origin) is not None):
            headers += [("access-control-allow-methods", ", ".join(methods)),
                        ("access-control-allow-headers", ALLOW_HEADERS),
                        ("access-control-max-age", PREFLIGHT_MAX_AGE)]
        return 204, headers, b""
