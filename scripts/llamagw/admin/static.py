"""The dashboard's files (llamagw/static/), read once at start and served from memory.

The request's path never becomes a file path: FILES is the exact list, read by name at load();
a request either names one of them or gets None (the caller's 404). Each file is served with
the security headers of the admin contract (a strict CSP: only our own scripts, styles, images
and connections; no framing; Trusted Types required, so a stray innerHTML assignment throws) and
a strong ETag (If-None-Match -> 304).

Public API:
    StaticFiles.load(directory=STATIC_DIR) -> StaticFiles     synchronous: call at start
    StaticFiles.respond(method, target, headers) -> StaticResponse | None
    SECURITY_HEADERS, API_HEADERS                             for admin API responses too
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable

from llamagw import errors

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
UI_PREFIX = "/ui/"
# name -> Content-Type. The only files served; nothing else in the folder is read.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
INDEX = "index.html"
# 256 KiB a file: the whole dashboard is meant to stay under 60 KB; a file past this bound is a
# mistake (a screenshot dropped in the folder), refused at start rather than held in memory.
MAX_FILE_BYTES = 256 * 1024

# default-src 'none': anything not listed is refused (fonts, frames, media, workers, manifests).
# Everything the page loads comes from this origin; the live channel is an EventSource to
# 'self'; images: the favicon and data: URLs only. require-trusted-types-for 'script': assigning
# a string to innerHTML / outerHTML / insertAdjacentHTML / document.write throws, so a regression
# that renders data as markup fails loudly (a page error the browser tests catch).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
       "require-trusted-types-for 'script'")
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
)
# The dashboard's files: revalidated each time (the ETag makes that a 304), so a gateway upgrade
# is seen at the next load. The admin API's answers (keys, usage): never stored.
STATIC_HEADERS = SECURITY_HEADERS + (("cache-control", "no-cache"),)
API_HEADERS = SECURITY_HEADERS + (("cache-control", "no-store"),)


@dataclasses.dataclass(frozen=True)
class StaticFile:
    name: str
    body: bytes
    content_type: str
    etag: str


@dataclasses.dataclass(frozen=True)
class StaticResponse:
    """What to send: status, headers (lower-case names), body (empty for HEAD and 304)."""
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison over the list; "*" matches."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip(" \t")
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


class StaticFiles:
    """The files of FILES, in memory."""

    def __init__(self, files: dict[str, StaticFile]):
        self._files = files
        self._routes = {UI_PREFIX + name: f for name, f in files.items()}
        self._routes[UI_PREFIX] = files[INDEX]

    @classmethod
    def load(cls, directory: str = STATIC_DIR) -> StaticFiles:
        """Read every file of FILES (OSError if one is missing; ValueError if one is too large).
        Synchronous disk reads: call once at start, before the event loop serves."""
        files = {}
        for name, content_type in FILES.items():
            with open(os.path.join(directory, name), "rb") as fh:
                body = fh.read(MAX_FILE_BYTES + 1)
            if len(body) > MAX_FILE_BYTES:
                raise ValueError(f"{name}: over {MAX_FILE_BYTES} bytes")
            files[name] = StaticFile(name, body, content_type, _etag(body))
        return cls(files)

    def get(self, name: str) -> StaticFile:
        return self._files[name]

    @property
    def total_bytes(self) -> int:
        return sum(len(f.body) for f in self._files.values())

    def handles(self, path: str) -> bool:
        """`path` (no query) is the dashboard's: /ui, /ui/ or one of its files."""
        return path == UI_PREFIX[:-1] or path in self._routes

    def respond(self, method: str, target: str,
                headers: Iterable[tuple[str, str]] = ()) -> StaticResponse | None:
        """The answer to a request for the dashboard, or None when `target` is not one of its
        paths. GET and HEAD only (405 otherwise); /ui -> 308 /ui/; If-None-Match -> 304."""
        path = target.partition("?")[0]
        if path == UI_PREFIX[:-1]:
            if method not in ("GET", "HEAD"):
                return self._not_allowed()
            return StaticResponse(308, [("location", UI_PREFIX), ("content-length", "0"),
                                        *SECURITY_HEADERS])
        f = self._routes.get(path)
        if f is None:
            return None
        if method not in ("GET", "HEAD"):
            return self._not_allowed()
        common = [("etag", f.etag), *STATIC_HEADERS]
        inm = [v for n, v in headers if n.lower() == "if-none-match"]
        if inm and _etag_matches(",".join(inm), f.etag):
            return StaticResponse(304, common)
        out = [("content-type", f.content_type), ("content-length", str(len(f.body))), *common]
        return StaticResponse(200, out, b"" if method == "HEAD" else f.body)

    @staticmethod
    def _not_allowed() -> StaticResponse:
        body = errors.error_body("Method not allowed: the dashboard's files are GET and HEAD",
                                 "invalid_request_error", "method_not_allowed")
        return StaticResponse(405, [("allow", "GET, HEAD"), ("content-type", "application/json"),
                                    ("content-length", str(len(body))), *SECURITY_HEADERS], body)
