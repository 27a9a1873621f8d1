"""Who may use the admin API: an admin bearer key, or a dashboard session (+ CSRF on POST).

limits/admission.py calls AdminGuard.check() for every Auth.ADMIN route (api/routes.py), JSON and
SSE alike, before the handler runs; nothing else is accepted:
- `Authorization: Bearer <key>` / `x-api-key`: the key must be in the key file with role=admin
  (401 for an unknown key, 403 `forbidden` for an inference key). A request that presents a key
  is judged by the key alone: a cookie next to a bad key does not rescue it. No CSRF token: a
  browser never adds an Authorization header to a request another site makes it send.
- else the `llamagw_session` cookie (admin/sessions.py): a live session whose key is still in
  the key file with role=admin (a key revoked, rotated or demoted in the file ends its sessions
  at the next reload: keys_changed()); else 401 `unauthorized`.
- a state change (every method but GET and HEAD) made with a cookie also needs the session's
  CSRF token in X-CSRF-Token and a same-origin Origin / Sec-Fetch-Site (admin/origin.py): else
  403 `csrf`.

Sign-in (POST /admin/session, admin/session_api.py) goes through sign_in(): the per-client and
global failure limits (SignInLimiter: 429 with Retry-After), the key lookup in constant time, the
admin role (403 `not_admin` for an inference key), then a new session.

The gateway itself never terminates TLS: a request reached it over https only through a proxy
that says so (X-Forwarded-Proto: https, RunPod's): that header may ADD Secure to the cookie,
never remove it (sessions.request_is_https).
"""

from __future__ import annotations

import hashlib
import logging

from llamagw.admin import origin, sessions
from llamagw.errors import GatewayError
from llamagw.limits import keys

log = logging.getLogger("gateway")

ADMIN_ROLE = keys.ROLE_ADMIN
# The scheme of every request the gateway reads itself (TLS ends at a proxy, if any).
SCHEME = "http"
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_HEADER = "x-csrf-token"


def unauthorized(message: str, code: str = "unauthorized", presented: bool = False
                 ) -> GatewayError:
    """401 with a Bearer challenge (RFC 6750 3.1; never Basic, so no browser prompt)."""
    challenge = keys.bearer_challenge(keys.AUTH_REALM, "invalid_token" if presented else None,
                                      message)
    return GatewayError(401, message, code, headers=[("www-authenticate", challenge)])


def _is_admin(info) -> bool:
    return info is not None and info.role == ADMIN_ROLE


def _secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


class AdminGuard:
    """The admin API's credentials check and the dashboard's sessions. One event loop owns it."""

    def __init__(self, store: keys.KeyStore | None, metrics=None, *,
                 sessions_store: sessions.SessionStore | None = None,
                 limiter: sessions.SignInLimiter | None = None):
        self.store = store
        self.metrics = metrics
        self.sessions = sessions_store or sessions.SessionStore()
        self.limiter = limiter or sessions.SignInLimiter()
        # key_id -> SHA-256 of the secret it signed in with: a key rotated in the file (same
        # id, new secret) ends its sessions at the next reload. One entry per admin key.
        self._signed_in: dict[str, bytes] = {}

    # ---------------- every Auth.ADMIN request ----------------
    def check(self, req, ctx) -> str:
        """The caller's key_id (also set on ctx), or GatewayError 401 / 403."""
        presented = keys.extract_key(req.headers)          # 400 on two Authorization headers
        if presented is not None:
            info = self.store.lookup(presented) if self.store is not None else None
            if info is None:
                self._auth_failed()
                raise unauthorized("Invalid API key", "invalid_api_key", presented=True)
            ctx.key_id = info.key_id
            if not _is_admin(info):
                raise GatewayError(403, f"Key '{info.key_id}' may not use the admin API",
                                   "forbidden")
            return info.key_id
        session = self.session_of(req)
        if session is None:
            self._auth_failed()
            raise unauthorized("Sign in to the dashboard, or send an admin key: "
                               "'Authorization: Bearer <key>'")
        ctx.key_id = session.key_id
        if req.method not in SAFE_METHODS:
            if not sessions.csrf_ok(session, req.get(CSRF_HEADER)):
                raise GatewayError(403, "Missing or wrong X-CSRF-Token", "csrf")
            if not origin.same_origin(req.headers, scheme=SCHEME):
                raise GatewayError(403, "A request from another origin", "csrf")
        return session.key_id

    def session_of(self, req) -> sessions.Session | None:
        """The live session of the request's cookie whose key is still an admin key, or None
        (a session whose key lost the admin role or left the key file is ended here)."""
        sid = sessions.session_id_from(req.headers)
        if sid is None:
            return None
        session = self.sessions.get(sid)
        if session is None:
            return None
        if not _is_admin(self.store.get(session.key_id) if self.store is not None else None):
            self.end_sessions(session.key_id)
            return None
        return session

    def _auth_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.inc_auth_failed()

    # ---------------- sign-in / sign-out ----------------
    def sign_in(self, client: str, key: object) -> tuple[str, sessions.Session]:
        """A new session for an admin key: (its id for the cookie, the Session). Raises 429
        (too many failures from `client` or from everyone), 401 (unknown key), 403 not_admin."""
        wait = self.limiter.retry_after(client)
        if wait:
            raise GatewayError(429, "Too many failed sign-in attempts; retry later",
                               "rate_limited", headers=[("retry-after", str(wait))])
        info = None
        if isinstance(key, str) and self.store is not None:
            info = self.store.lookup(key.strip())
        if info is None:
            self.limiter.failure(client)
            self._auth_failed()
            log.warning("admin: failed sign-in from %s (unknown key)", client)
            raise unauthorized("That key is not valid")
        if not _is_admin(info):
            self.limiter.failure(client)
            log.warning("admin: failed sign-in from %s (key %r is not an admin key)", client,
                        info.key_id)
            raise GatewayError(403, "An inference key cannot sign in to the dashboard: it "
                                    "needs a key with role=admin", "not_admin")
        sid, session = self.sessions.create(info.key_id)
        self._signed_in[info.key_id] = _secret_digest(key.strip())
        log.info("admin: %r signed in from %s", info.key_id, client)
        return sid, session

    def sign_out(self, req) -> bool:
        return self.sessions.revoke(sessions.session_id_from(req.headers))

    def end_sessions(self, key_id: str) -> int:
        """End every session of `key_id` (its key was revoked, rotated or demoted)."""
        self._signed_in.pop(key_id, None)
        n = self.sessions.revoke_key(key_id)
        if n:
            log.info("admin: ended %d session(s) of key %r", n, key_id)
        return n

    def keys_changed(self) -> int:
        """After a key file reload: end the sessions of keys that are gone, are no longer admin
        keys, or have a new secret (rotated). Returns how many sessions ended."""
        ended = 0
        for key_id, digest in list(self._signed_in.items()):
            info = self.store.get(key_id) if self.store is not None else None
            same = self.store is not None and self.store.holds(key_id, digest)
            if not (_is_admin(info) and same):
                ended += self.end_sessions(key_id)
        return ended

    def admin_keys(self) -> bool:
        """The key file holds at least one admin key (GET /admin/setup)."""
        store = self.store
        if store is None:
            return False
        return any(_is_admin(store.get(k)) for k in store.key_ids())
