"""The same-origin check of the admin API's state-changing requests made with a session cookie.

A browser says where a request comes from in two headers that a page cannot forge:
- Sec-Fetch-Site: "same-origin" (our own page), "none" (the user typed it), or "same-site" /
  "cross-site" (another page) -> only the first two pass;
- Origin: the scheme://host[:port] of the page that sent it ("null" for opaque origins) -> must
  be this gateway's own origin.
A request with neither header is a client that is not a browser (curl, an old browser): it passes
here; the CSRF token (sessions.csrf_ok) and SameSite=Strict still apply.

"This gateway's own origin" is the scheme and Host the request arrived with; behind a TLS
proxy (RunPod) the gateway sees http and the proxy's Host may be rewritten, so the scheme of
X-Forwarded-Proto and the host of X-Forwarded-Host are accepted too, and an https Origin is
accepted on a plain-http request to the same host (a TLS proxy that sends no X-Forwarded-Proto;
the reverse, an http page posting to an https gateway, is refused). A page on another origin
cannot add those headers to a request a browser sends for it without a CORS preflight, which the
admin API refuses.

Pure: same_origin(headers, scheme=...) -> bool; headers are (name, value) pairs.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_PORTS = {"http": "80", "https": "443"}
SAME_ORIGIN_FETCH_SITES = frozenset({"same-origin", "none"})
# An Origin or Host longer than this is not a real one (a DNS name is <= 253 characters).
MAX_ORIGIN_LEN = 300


def _values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [v.strip(" \t") for n, v in headers if n.lower() == name]


def _first_token(values: list[str]) -> str | None:
    if not values:
        return None
    token = values[0].split(",")[0].strip(" \t").lower()
    return token or None


def normalize_host(host: str, scheme: str) -> str | None:
    """host[:port] lower-cased with the scheme's default port dropped; None if malformed."""
    host = host.strip(" \t").lower()
    if not host or len(host) > MAX_ORIGIN_LEN or any(c in host for c in "/\\@?# "):
        return None
    if host.startswith("["):                   # [::1]:8000
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[:end + 1], host[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
    if not name or (port and not port.isdigit()) or ":" in port:
        return None
    if port == DEFAULT_PORTS.get(scheme) or port == "":
        return name
    return f"{name}:{int(port)}"


def parse_origin(origin: str) -> tuple[str, str] | None:
    """(scheme, normalized host) of an Origin header value, or None ("null", malformed)."""
    if len(origin) > MAX_ORIGIN_LEN:
        return None
    scheme, sep, rest = origin.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS or "/" in rest:
        return None
    host = normalize_host(rest, scheme)
    return None if host is None else (scheme, host)


def same_origin(headers: Iterable[tuple[str, str]], *, scheme: str) -> bool:
    """True when the request may come from our own page (see the module docstring).

    scheme: how the request reached the gateway ("http" or "https")."""
    headers = list(headers)
    sites = _values(headers, "sec-fetch-site")
    if len(sites) > 1 or (sites and sites[0].lower() not in SAME_ORIGIN_FETCH_SITES):
        return False
    origins = _values(headers, "origin")
    if not origins:
        return True
    if len(origins) > 1:
        return False
    parsed = parse_origin(origins[0])
    if parsed is None:
        return False
    origin_scheme, origin_host = parsed
    schemes = {scheme.lower()}
    forwarded_proto = _first_token(_values(headers, "x-forwarded-proto"))
    if forwarded_proto in DEFAULT_PORTS:
        schemes.add(forwarded_proto)
    if origin_scheme not in schemes and not (origin_scheme == "https" and scheme == "http"):
        return False
    hosts = _values(headers, "host")[:1] + _values(headers, "x-forwarded-host")[:1]
    for host in hosts:
        host = host.split(",")[0]
        if normalize_host(host, origin_scheme) == origin_host:
            return True
    return False
