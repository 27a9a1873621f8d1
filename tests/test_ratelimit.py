"""ratelimit.py: token bucket (injected clock), per-key concurrency, BackendSlots FIFO queue
including the grant-and-cancel race; the headers and per-key tickets admission.py makes of them."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from llamagw.config import load_config
from llamagw.context import RequestContext
from llamagw.errors import GatewayError
from llamagw.limits.admission import ANONYMOUS, Admission, Auth, Ticket
from llamagw.limits.ratelimit import KeyConcurrency, RateLimiter
from llamagw.observe.metrics import Metrics


def run(coro):
    return asyncio.run(coro)


# --- RateLimiter ------------------------------------------------------------------------------
@pytest.mark.parametrize("rpm", [1, 2, 7, 60, 120, 1000])
def test_burst_of_rpm_passes_next_is_refused(rpm):
    rl = RateLimiter(default_rpm=rpm)
    now = 1000.0
    for i in range(rpm):
        d = rl.check("alice", now)
        assert d.allowed, i
        assert d.limit == rpm
        assert d.remaining == rpm - 1 - i
        assert d.retry_after_s == 0
    d = rl.check("alice", now)
    assert not d.allowed
    assert d.remaining == 0
    assert d.retry_after_s == max(1, math.ceil(60 / rpm))
    assert isinstance(d.retry_after_s, int) and d.retry_after_s >= 1
    assert d.reset_s == 60  # an empty bucket refills completely in one minute


def test_refill_one_token_per_interval():
    rl = RateLimiter(default_rpm=6)  # one token every 10 s
    for _ in range(6):
        assert rl.check("k", 0.0).allowed
    refused = rl.check("k", 4.0)
    assert not refused.allowed and refused.retry_after_s == 6  # ceil(10 - 4)
    assert not rl.check("k", 9.9).allowed
    d = rl.check("k", 10.0)
    assert d.allowed and d.remaining == 0
    assert not rl.check("k", 10.0).allowed
    assert rl.check("k", 20.0).allowed


def test_retry_after_is_ceil_and_at_least_one():
    rl = RateLimiter(default_rpm=600)  # one token every 0.1 s
    for _ in range(600):
        rl.check("k", 0.0)
    d = rl.check("k", 0.0)
    assert not d.allowed and d.retry_after_s == 1  # 0.1 s -> 1
    rl2 = RateLimiter(default_rpm=7)  # 60/7 = 8.57 s per token
    for _ in range(7):
        rl2.check("k", 0.0)
    assert rl2.check("k", 0.0).retry_after_s == 9
    # refill exactly one interval later: float rounding must not refuse it
    assert rl2.check("k", 60 / 7).allowed


def test_refused_requests_do_not_consume():
    rl = RateLimiter(default_rpm=60)
    for _ in range(60):
        rl.check("k", 0.0)
    for _ in range(100):
        assert not rl.check("k", 0.5).allowed
    assert rl.check("k", 1.0).allowed


def test_reset_counts_seconds_until_full():
    rl = RateLimiter(default_rpm=60)
    d = rl.check("k", 0.0)
    assert d.remaining == 59 and d.reset_s == 1
    for _ in range(29):
        d = rl.check("k", 0.0)
    assert d.remaining == 30 and d.reset_s == 30
    d = rl.check("k", 100.0)  # long idle: full again, then one taken
    assert d.remaining == 59 and d.reset_s == 1


def test_keys_are_independent_and_per_key_rpm_overrides_default():
    rl = RateLimiter(default_rpm=2)
    assert rl.check("a", 0).allowed and rl.check("a", 0).allowed
    assert not rl.check("a", 0).allowed
    assert rl.check("b", 0).allowed
    for _ in range(5):
        assert rl.check("c", 0, rpm=5).allowed
    d = rl.check("c", 0, rpm=5)
    assert not d.allowed and d.limit == 5 and d.retry_after_s == 12


def test_lowered_rpm_applies_at_once():
    rl = RateLimiter(default_rpm=100)
    rl.check("k", 0.0)                      # 99 left
    d = rl.check("k", 0.0, rpm=3)            # reload lowered the key to 3 rpm
    assert d.allowed and d.remaining == 2 and d.limit == 3


def test_clock_going_backwards_refills_nothing():
    rl = RateLimiter(default_rpm=1)
    assert rl.check("k", 100.0).allowed
    assert not rl.check("k", 50.0).allowed
    assert not rl.check("k", 100.0).allowed


def test_retain_drops_state_of_removed_keys():
    rl = RateLimiter(default_rpm=1)
    for k in ("a", "b", "c"):
        rl.check(k, 0.0)
    assert len(rl) == 3
    rl.retain({"b"})
    assert len(rl) == 1
    assert not rl.check("b", 0.0).allowed   # b's state kept
    assert rl.check("a", 0.0).allowed        # a starts fresh (if it is ever re-added)


def _admission(rpm: int, per_key: int) -> tuple[Admission, list[float]]:
    """The production seam (limits/admission.py) with auth off and a clock the test moves."""
    now = [1000.0]
    cfg = load_config({"AUTH_ENABLED": "false", "MAX_REQUESTS_PER_MINUTE": str(rpm),
                       "MAX_CONCURRENT_REQUESTS_PER_KEY": str(per_key)})
    return Admission(cfg, None, Metrics(), clock=lambda: now[0]), now


def _admit(adm: Admission) -> tuple[RequestContext, Ticket | GatewayError]:
    ctx = RequestContext("127.0.0.1", "GET", "/v1/models", "r")
    try:
        return ctx, adm.admit(None, SimpleNamespace(auth=Auth.KEY), ctx)
    except GatewayError as exc:
        return ctx, exc


def test_headers():
    """The rate-limit headers carry the decision: limit, remaining and reset on every answer,
    Retry-After only on a refusal."""
    adm, _ = _admission(rpm=10, per_key=100)
    for i in range(10):
        ctx, ticket = _admit(adm)
        assert isinstance(ticket, Ticket)
        assert ctx.response_headers == [("x-ratelimit-limit", "10"),
                                        ("x-ratelimit-remaining", str(9 - i)),
                                        ("x-ratelimit-reset", str(6 * (i + 1)))]
        assert "retry-after" not in dict(ctx.response_headers)
    ctx, refused = _admit(adm)
    assert isinstance(refused, GatewayError) and refused.code == "rate_limit_exceeded"
    assert ctx.response_headers == [("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "0"),
                                    ("x-ratelimit-reset", "60")]
    assert refused.headers == [("retry-after", "6")]


def test_invalid_default():
    with pytest.raises(ValueError):
        RateLimiter(0)


# --- KeyConcurrency ---------------------------------------------------------------------------
def test_key_concurrency_cap_and_release():
    kc = KeyConcurrency(default_cap=2)
    assert kc.try_acquire("a") and kc.try_acquire("a")
    assert not kc.try_acquire("a")
    assert kc.in_flight("a") == 2
    assert kc.try_acquire("b", cap=1) and not kc.try_acquire("b", cap=1)
    kc.release("a")
    assert kc.in_flight("a") == 1 and kc.try_acquire("a")
    kc.release("a"); kc.release("a"); kc.release("a")  # extra release: no negative count
    assert kc.in_flight("a") == 0
    assert kc.try_acquire("a") and kc.try_acquire("a") and not kc.try_acquire("a")
    kc.release("a"); kc.release("a"); kc.release("b")
    assert len(kc) == 0  # no state left for idle keys


def test_key_ticket_is_idempotent_and_a_refusal_holds_nothing():
    adm, now = _admission(rpm=3, per_key=1)
    _, ticket = _admit(adm)
    assert isinstance(ticket, Ticket) and adm.concurrency.in_flight(ANONYMOUS) == 1
    _, refused = _admit(adm)                   # over the per-key cap
    assert isinstance(refused, GatewayError) and refused.code == "concurrency_limit_exceeded"
    assert adm.concurrency.in_flight(ANONYMOUS) == 1
    ticket.release(); ticket.release()
    assert adm.concurrency.in_flight(ANONYMOUS) == 0
    _, ticket = _admit(adm)                    # the third token (the refusal used one)
    ticket.release()
    _, refused = _admit(adm)                   # rate limited: no slot is taken
    assert isinstance(refused, GatewayError) and refused.code == "rate_limit_exceeded"
    assert adm.concurrency.in_flight(ANONYMOUS) == 0 and len(adm.concurrency) == 0
    now[0] += 20.0                             # a token is back: the key is not stuck
    _, ticket = _admit(adm)
    assert isinstance(ticket, Ticket) and adm.concurrency.in_flight(ANONYMOUS) == 1
    ticket.release()
    assert adm.concurrency.in_flight(ANONYMOUS) == 0
