"""The seam every API request passes before it is proxied: who is it, may it run now?

Admin routes (Auth.ADMIN) are checked by admin/guard.AdminGuard (self.admin): an admin key or a
dashboard session, with a CSRF token and a same-origin check for a session's state changes.

admit() is synchronous (no await between the check and the action it allows): it authenticates the
key, applies the per-key rate limit and token budget and takes a per-key concurrency slot, then
returns a Ticket whose release() is idempotent and is called in a `finally` on every exit path. The
global limit to llama-server (a bounded queue, shared fairly between keys: limits/fairqueue.py) is
taken afterwards, once the body is in, by backend_slot().

Token budgets (tpm / tpd in the key file, limits/budget.py): a request is admitted while its key
is under budget, counted from finished requests (the gateway charges each one's tokens when it
ends: Gateway.observe). Keys with a token limit get X-RateLimit-Limit-Tokens and
X-RateLimit-Remaining-Tokens on every answer (the binding window, as of admission); keys without
one get neither: they have no budget to report.
"""

from __future__ import annotations

import enum
import hmac
import logging
import time

from llamagw.admin.guard import AdminGuard
from llamagw.errors import RETRY_AFTER_CONCURRENCY, RETRY_AFTER_QUEUE, GatewayError
from llamagw.limits import budget, fairqueue, keys, ratelimit

log = logging.getLogger("gateway")

ANONYMOUS = "anonymous"


class Auth(enum.Enum):
    """What a route needs (api/routes.py)."""
    NONE = "none"          # nothing: open (platform probes, liveness)
    KEY = "key"            # an inference key (none needed when AUTH_ENABLED=false)
    ADMIN = "admin"        # an admin key or a dashboard session, whatever AUTH_ENABLED says
                           # (admin/guard.py; no per-key rate or concurrency limit)
    METRICS = "metrics"    # the metrics key, when METRICS_KEY is set


# Module names for the members: an Enum member read through its class costs ~60 ns (3.11), and
# admit() runs for every request.
_NONE, _KEY, _ADMIN, _METRICS = Auth.NONE, Auth.KEY, Auth.ADMIN, Auth.METRICS


class Ticket:
    __slots__ = ("_limiter", "_key_id")

    def __init__(self, limiter: ratelimit.KeyConcurrency | None, key_id: str):
        self._limiter = limiter
        self._key_id = key_id

    def release(self) -> None:
        limiter = self._limiter
        if limiter is not None:
            self._limiter = None
            limiter.release(self._key_id)


NO_TICKET = Ticket(None, "")


def _unauthorized(message: str, code: str, realm: str = keys.AUTH_REALM,
                  presented: bool = False, description: str = "") -> GatewayError:
    """401 with its Bearer challenge (RFC 6750 3.1): error="invalid_token" when a key was
    presented and is not valid, no error code when none was presented."""
    challenge = keys.bearer_challenge(realm, "invalid_token" if presented else None,
                                      description or message)
    return GatewayError(401, message, code, headers=[("www-authenticate", challenge)])


class Admission:
    def __init__(self, config, store: keys.KeyStore | None, metrics, clock=time.monotonic):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.rate = ratelimit.RateLimiter(config.max_requests_per_minute)
        self.concurrency = ratelimit.KeyConcurrency(config.max_concurrent_requests_per_key)
        self.slots = fairqueue.FairBackendSlots(config.max_concurrent_requests,
                                                config.max_queue_size, errors=ratelimit)
        # tpm / tpd per key: checked by admit(), charged by the gateway when a request ends.
        self.budget = budget.TokenBudget()
        # The admin API's credentials: admin keys and the dashboard's sessions.
        self.admin = AdminGuard(store, metrics)

    def identify(self, req) -> keys.KeyInfo:
        presented = keys.extract_key(req.headers)          # 400 on two Authorization headers
        if presented is None:
            self.metrics.inc_auth_failed()
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'",
                                "missing_api_key")
        info = self.store.lookup(presented) if self.store is not None else None
        if info is None:
            self.metrics.inc_auth_failed()
            raise _unauthorized("Invalid API key", "invalid_api_key", presented=True)
        return info

    def admit(self, req, route, ctx) -> Ticket:
        """The route's auth, then the key's rate limit and a per-key concurrency slot.

        Admin routes take neither: the limits are the inference budget of a key, and a
        dashboard holds its live stream open and polls a few routes (it is bounded by the
        live hub's cap, the session table and MAX_CONNECTIONS instead)."""
        auth = route.auth
        if auth is not _KEY:
            if auth is _NONE:
                return NO_TICKET
            if auth is _METRICS:
                self.check_metrics_key(req)
                return NO_TICKET
            if auth is _ADMIN:
                self.admin.check(req, ctx)
                return NO_TICKET
        if self.config.auth_enabled:
            info = self.identify(req)
            key_id, rpm, cap = info.key_id, info.rpm, info.concurrency
            ctx.key_models = info.models                     # the models it may use
        else:
            info = None
            key_id, rpm, cap = ANONYMOUS, None, None
        ctx.key_id = key_id
        tokens = None
        if info is not None and auth is _KEY and (info.tpm is not None or info.tpd is not None):
            tokens = self.token_decision(info, ctx)      # its headers on every answer
        decision = self.rate.check(key_id, self.clock(), rpm)
        ctx.response_headers += [("x-ratelimit-limit", str(decision.limit)),
                                 ("x-ratelimit-remaining", str(decision.remaining)),
                                 ("x-ratelimit-reset", str(decision.reset_s))]
        if not decision.allowed:
            self.metrics.inc_rate_limited(key_id)
            raise GatewayError(429, f"Rate limit of {decision.limit} requests per minute reached "
                                    f"for key '{key_id}'", "rate_limit_exceeded",
                               headers=[("retry-after", str(decision.retry_after_s))])
        if tokens is not None and not tokens.allowed:
            self.metrics.inc_rate_limited(key_id)
            raise GatewayError(429, f"Token limit of {tokens.limit} tokens per {tokens.window} "
                                    f"reached for key '{key_id}'", "token_limit_exceeded",
                               headers=[("retry-after", str(tokens.retry_after_s))])
        if not self.concurrency.try_acquire(key_id, cap):
            self.metrics.inc_rate_limited(key_id)
            raise GatewayError(429, f"Too many concurrent requests for key '{key_id}'",
                               "concurrency_limit_exceeded",
                               headers=[("retry-after", str(RETRY_AFTER_CONCURRENCY))])
        return Ticket(self.concurrency, key_id)

    def token_decision(self, info: keys.KeyInfo, ctx) -> budget.TokenDecision:
        """The key's token budget now (nothing charged), its headers added to the answer."""
        decision = self.budget.check(info.key_id, budget.TokenLimits(info.tpm, info.tpd))
        ctx.response_headers += [("x-ratelimit-limit-tokens", str(decision.limit)),
                                 ("x-ratelimit-remaining-tokens", str(decision.remaining))]
        return decision

    def charge(self, key_id: str, tokens: int) -> None:
        """A finished request's tokens, for a key with a token limit (others are not tracked:
        a limit added by a key reload counts from then on, or from the ledger at the next
        start)."""
        store = self.store
        info = store.get(key_id) if store is not None else None
        if info is not None and (info.tpm is not None or info.tpd is not None):
            self.budget.charge(key_id, tokens)

    def check_metrics_key(self, req) -> None:
        expected = self.config.metrics_key
        if not expected:
            return
        presented = keys.extract_key(req.headers) or ""
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            self.metrics.inc_auth_failed()
            raise _unauthorized("Invalid or missing metrics key", "invalid_metrics_key",
                                keys.METRICS_REALM, bool(presented), "Invalid metrics key")

    def try_backend_slot(self, key_id: str, slots=None) -> fairqueue.FairSlot | None:
        """A free slot without waiting, or None (then await backend_slot). At shutdown
        ratelimit.SlotsClosed passes through: the gateway answers it (backend_stopping).
        slots: a model's own (router mode, models/serving.py); None: the global ones."""
        try:
            return (self.slots if slots is None else slots).try_acquire(key_id)
        except ratelimit.SlotsClosed:
            raise
        except ratelimit.QueueFull:
            raise _busy("queue_full", "queue full") from None

    async def backend_slot(self, ctx, slots=None) -> fairqueue.FairSlot:
        """A slot, waiting in the queue if need be, the key's turn shared fairly with other
        keys'. SlotsClosed passes through (shutdown; it ends the waits of those already queued
        too). slots: the model's own in router mode (None: the gateway's)."""
        try:
            return await (self.slots if slots is None else slots).acquire(
                self.config.queue_timeout, ctx.key_id)
        except ratelimit.SlotsClosed:
            raise
        except ratelimit.QueueFull:
            raise _busy("queue_full", "queue full") from None
        except ratelimit.QueueTimeout:
            raise _busy("queue_timeout", "timed out in queue") from None


def _busy(code: str, why: str) -> GatewayError:
    return GatewayError(503, f"The server is busy ({why}); retry shortly", code,
                        headers=[("retry-after", str(RETRY_AFTER_QUEUE))])
