"""Dashboard sign-in sessions: opaque ids kept server-side, CSRF tokens, the cookie, a sign-in
rate limiter. Pure (no I/O); the clock is injected; one event loop owns each object.

A session is made by POST /admin/session with an admin key (see ADMIN-API.md). The browser gets
only an opaque random id (secrets.token_urlsafe(32): 256 bits) in an HttpOnly, SameSite=Strict
cookie; the key never leaves the sign-in request. The store keeps the SHA-256 of each id, never
the id itself, so a memory dump or a debug print of the table holds nothing a browser could
replay; lookups hash the presented id and compare digests with hmac.compare_digest.

Expiry: IDLE_TIMEOUT_S after the last use, and ABSOLUTE_TIMEOUT_S after sign-in whatever the use.
At most MAX_SESSIONS live at once: a new sign-in past the bound drops the oldest session.
Sessions die with the process (a restart signs everyone out; nothing is written to disk).

Public API:
    SessionStore(clock=time.monotonic, idle_s=..., absolute_s=..., max_sessions=...)
        .create(key_id) -> (session_id, Session)   session_id goes in the cookie, once
        .get(session_id) -> Session | None         checks expiry, refreshes last_seen
        .revoke(session_id) -> bool                sign-out
        .revoke_key(key_id) -> int                 the key was revoked, rotated or demoted
        .expires_in(session) -> int                seconds until it expires if left idle
    csrf_ok(session, presented) -> bool            constant time
    cookie_header(session_id, secure=...) / clear_cookie_header(secure=...) -> Set-Cookie value
    session_id_from(headers) -> str | None         from the request's Cookie header(s)
    request_is_https(scheme, headers) -> bool      directly, or X-Forwarded-Proto: https
    SignInLimiter(...).retry_after(client) / .failure(client)
The same-origin check is in llamagw.admin.origin.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable

# --- limits -----------------------------------------------------------------------------------
SESSION_COOKIE = "llamagw_session"
# 32 bytes = 256 random bits, 43 url-safe characters: not guessable, not enumerable.
SESSION_ID_BYTES = 32
CSRF_TOKEN_BYTES = 32
# 30 min idle: an unattended signed-in browser stops being a way in soon after its operator left.
IDLE_TIMEOUT_S = 30 * 60
# 12 h absolute: even a dashboard left open and live must sign in again every working day.
ABSOLUTE_TIMEOUT_S = 12 * 3600
# 64: a gateway has a handful of operators, each with a few browsers; the bound keeps a loop of
# sign-ins (with a valid key) from growing the table; the oldest session is dropped past it.
MAX_SESSIONS = 64
# A cookie value longer than this is not one of ours (ours are 43 characters): not looked up.
MAX_SESSION_ID_LEN = 128
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_SESSION_ID_LEN)
# Cookie headers looked at: a browser sends one; more is a client that is not a browser.
MAX_COOKIE_HEADERS = 4

# Sign-in attempts that fail: 10 a minute per client address is far above a person mistyping
# and far below guessing (keys have >= 75 bits); 100 a minute over all clients bounds guessing
# from many addresses; 1024 clients tracked (an LRU table; the oldest entry is forgotten).
SIGNIN_FAILURES_PER_CLIENT = 10
SIGNIN_FAILURES_GLOBAL = 100
SIGNIN_WINDOW_S = 60.0
SIGNIN_MAX_CLIENTS = 1024


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii")).digest()


@dataclasses.dataclass
class Session:
    """A signed-in browser. `csrf` is sent back by GET/POST /admin/session; never the id."""
    key_id: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    """Live sessions by the SHA-256 of their id (insertion order = age, for the bound)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 idle_s: float = IDLE_TIMEOUT_S, absolute_s: float = ABSOLUTE_TIMEOUT_S,
                 max_sessions: int = MAX_SESSIONS):
        if max_sessions < 1 or idle_s <= 0 or absolute_s <= 0:
            raise ValueError("max_sessions, idle_s and absolute_s must be positive")
        self._clock = clock
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self.max_sessions = max_sessions
        self._by_digest: dict[bytes, Session] = {}
        self.dropped = 0      # sessions dropped by the bound (oldest first)

    def __len__(self) -> int:
        return len(self._by_digest)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.last_seen >= self.idle_s or now - s.created >= self.absolute_s

    def prune(self) -> int:
        """Forget the expired sessions; return how many. O(sessions); create() calls it."""
        now = self._clock()
        dead = [d for d, s in self._by_digest.items() if self._expired(s, now)]
        for d in dead:
            del self._by_digest[d]
        return len(dead)

    def create(self, key_id: str) -> tuple[str, Session]:
        """A new session for `key_id`: (its id, to put in the cookie once; the Session)."""
        self.prune()
        while len(self._by_digest) >= self.max_sessions:
            del self._by_digest[next(iter(self._by_digest))]
            self.dropped += 1
        now = self._clock()
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        session = Session(key_id, secrets.token_urlsafe(CSRF_TOKEN_BYTES), now, now)
        self._by_digest[_digest(session_id)] = session
        return session_id, session

    def _find(self, session_id: str | None) -> tuple[bytes, Session] | None:
        if not session_id or not _SESSION_ID_RE.fullmatch(session_id):
            return None
        # The dict probe sees only the SHA-256 of the presented id: how far a guess matched
        # a live id is not measurable through it (the same reasoning as keys.KeyStore.lookup).
        digest = _digest(session_id)
        session = self._by_digest.get(digest)
        return None if session is None else (digest, session)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of a cookie value, its last use set to now; None when unknown or
        expired (an expired one is forgotten)."""
        found = self._find(session_id)
        if found is None:
            return None
        digest, session = found
        now = self._clock()
        if self._expired(session, now):
            del self._by_digest[digest]
            return None
        session.last_seen = now
        return session

    def revoke(self, session_id: str | None) -> bool:
        """Sign-out: the id stops working at once. True if it was live."""
        found = self._find(session_id)
        if found is None:
            return False
        del self._by_digest[found[0]]
        return True

    def revoke_key(self, key_id: str) -> int:
        """End every session signed in with `key_id` (its key was revoked, rotated or lost the
        admin role); return how many."""
        dead = [d for d, s in self._by_digest.items() if s.key_id == key_id]
        for d in dead:
            del self._by_digest[d]
        return len(dead)

    def expires_in(self, session: Session) -> int:
        """Whole seconds until `session` expires if it is not used again (>= 0)."""
        now = self._clock()
        left = min(session.last_seen + self.idle_s, session.created + self.absolute_s) - now
        return max(0, math.floor(left))


def csrf_ok(session: Session, presented: str | None) -> bool:
    """The X-CSRF-Token header matches the session's token; constant time in its content."""
    if not presented:
        return False
    return hmac.compare_digest(session.csrf.encode(), presented.encode("utf-8", "replace"))


# --- the cookie -------------------------------------------------------------------------------
def cookie_header(session_id: str, *, secure: bool) -> str:
    """The Set-Cookie value that hands a new session to the browser: HttpOnly (no script reads
    it), SameSite=Strict (no cross-site request carries it), Path=/ (the page is under /ui/, the
    API under /admin/), Secure when the page came over HTTPS. No Max-Age: the cookie ends with
    the browser session; the server ends the session itself sooner or later."""
    if not _SESSION_ID_RE.fullmatch(session_id):
        raise ValueError("not a session id")
    return f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict" + (
        "; Secure" if secure else "")


def clear_cookie_header(*, secure: bool) -> str:
    """The Set-Cookie value of sign-out: the browser forgets the cookie."""
    return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + (
        "; Secure" if secure else "")


def _header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


def session_id_from(headers: Iterable[tuple[str, str]]) -> str | None:
    """The first well-formed `llamagw_session` value of the Cookie header(s), else None."""
    values = _header_values(headers, "cookie")[:MAX_COOKIE_HEADERS]
    for value in values:
        for part in value.split(";"):
            name, sep, cookie = part.strip(" \t").partition("=")
            if sep and name == SESSION_COOKIE:
                cookie = cookie.strip(" \t")
                if len(cookie) >= 2 and cookie[0] == cookie[-1] == '"':
                    cookie = cookie[1:-1]
                if _SESSION_ID_RE.fullmatch(cookie):
                    return cookie
    return None


def request_is_https(scheme: str, headers: Iterable[tuple[str, str]]) -> bool:
    """The browser reached us over HTTPS: directly, or through a proxy that says so
    (X-Forwarded-Proto: https, its first value; RunPod's proxy ends TLS before the gateway)."""
    if scheme == "https":
        return True
    values = _header_values(headers, "x-forwarded-proto")
    if not values:
        return False
    return values[0].split(",")[0].strip(" \t").lower() == "https"


# --- sign-in rate limit -----------------------------------------------------------------------
class SignInLimiter:
    """Failed sign-ins per client address in a sliding window, and over all clients.

    Before comparing a key: retry_after(client) -> 0 to go on, else the seconds to put in
    Retry-After (the 429). After a failed comparison: failure(client). A success does not reset
    the count (a guesser that has one key has nothing left to guess)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 per_client: int = SIGNIN_FAILURES_PER_CLIENT,
                 global_limit: int = SIGNIN_FAILURES_GLOBAL,
                 window_s: float = SIGNIN_WINDOW_S, max_clients: int = SIGNIN_MAX_CLIENTS):
        self._clock = clock
        self.per_client = per_client
        self.global_limit = global_limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clients: collections.OrderedDict[str, collections.deque[float]] = \
            collections.OrderedDict()
        self._all: collections.deque[float] = collections.deque(maxlen=global_limit)
        self.refused = 0

    def __len__(self) -> int:
        return len(self._clients)

    def _wait(self, times: collections.deque[float], limit: int, now: float) -> float:
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if len(times) < limit:
            return 0.0
        return times[0] + self.window_s - now

    def retry_after(self, client: str) -> int:
        """0 when `client` may try a key now, else whole seconds (>= 1) until it may."""
        now = self._clock()
        wait = self._wait(self._all, self.global_limit, now)
        times = self._clients.get(client)
        if times is not None:
            wait = max(wait, self._wait(times, self.per_client, now))
            if not times:
                del self._clients[client]
        if wait <= 0:
            return 0
        self.refused += 1
        return max(1, math.ceil(wait))

    def failure(self, client: str) -> None:
        """Count a failed sign-in of `client` (its table entry becomes the newest)."""
        now = self._clock()
        times = self._clients.pop(client, None)
        if times is None:
            times = collections.deque(maxlen=self.per_client)
            while len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
        self._clients[client] = times
        times.append(now)
        self._all.append(now)
