"""llamagw/limits/budget.py: tpm (sliding minute of 1-s buckets) and tpd (UTC day) per key,
with an injected clock: admission while under budget, Retry-After until enough frees, headers,
seed at start, bounded state."""

from __future__ import annotations

import math

import pytest

from llamagw.limits import budget as budget_mod
from llamagw.limits.budget import (NO_LIMITS, UNLIMITED, TokenBudget, TokenDecision,
                                   TokenLimits)

DAY = 86_400
# 2026-05-09 12:00:00 UTC: a wall-clock time well inside a UTC day.
NOON = 1_778_328_000.0
assert NOON % DAY == 12 * 3600


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(t: float = NOON):
    clock = Clock(t)
    return TokenBudget(clock), clock


def test_no_limits_is_unlimited_and_has_no_headers():
    b, _ = make()
    b.charge("a", 10**9)
    for limits in (None, NO_LIMITS, TokenLimits(None, None)):
        d = b.check("a", limits)
        assert d is UNLIMITED and d.allowed and d.headers() == []


def test_tpm_admits_while_under_then_refuses():
    b, clock = make()
    limits = TokenLimits(tpm=1000)
    d = b.check("a", limits)
    assert d == TokenDecision(True, 0, 1000, 1000, "minute")
    assert d.headers() == [("x-ratelimit-limit-tokens", "1000"),
                           ("x-ratelimit-remaining-tokens", "1000")]
    b.charge("a", 999)
    d = b.check("a", limits)
    assert d.allowed and d.remaining == 1           # under budget: admitted
    b.charge("a", 500)                              # a request may overshoot ...
    d = b.check("a", limits)
    assert not d.allowed and d.remaining == 0       # ... then the key waits
    assert d.retry_after_s == 60                    # everything was charged this second
    assert ("retry-after", "60") in d.headers()
    assert b.check("b", limits).allowed             # other keys are not affected


def test_tpm_is_a_sliding_window_of_one_second_buckets():
    b, clock = make(NOON + 0.5)
    limits = TokenLimits(tpm=100)
    b.charge("a", 60)                   # second 0
    clock.t = NOON + 20.2
    b.charge("a", 40)                   # second 20: now at the limit
    d = b.check("a", limits)
    assert not d.allowed
    # under again once second 0's 60 tokens leave the window: at NOON + 60
    assert d.retry_after_s == math.ceil(NOON + 60 - clock.t) == 40
    clock.t = NOON + 59.9
    assert not b.check("a", limits).allowed
    clock.t = NOON + 60.0
    d = b.check("a", limits)
    assert d.allowed and d.remaining == 60
    assert b.used("a") == (40, 100)
    clock.t = NOON + 80.0
    assert b.used("a") == (0, 100)                  # all gone from the minute, not the day


def test_retry_after_counts_only_what_must_expire():
    b, clock = make(NOON)
    limits = TokenLimits(tpm=100)
    for s, tokens in ((0, 10), (10, 10), (30, 90)):
        clock.t = NOON + s
        b.charge("a", tokens)
    clock.t = NOON + 40.5
    d = b.check("a", limits)
    # 110 used; expiring second 0 (10) leaves 100, not under; second 10 too -> 90 < 100 at +70
    assert not d.allowed and d.retry_after_s == math.ceil(NOON + 70 - clock.t) == 30
    clock.t = NOON + 70
    assert b.check("a", limits).allowed


def test_large_gap_empties_the_ring_and_clock_going_back_is_harmless():
    b, clock = make()
    b.charge("a", 500)
    clock.t += 3600
    assert b.used("a") == (0, 500)
    b.charge("a", 5)
    clock.t -= 30                                   # a small step back: nothing expires
    b.charge("a", 5)
    assert b.used("a") == (10, 510)
    clock.t -= 1800                                 # half an hour back: re-anchored there,
    assert b.used("a") == (10, 510)                 # nothing un-charged ...
    b.charge("a", 5)                                # ... and new charges still count
    assert b.used("a") == (15, 515)
    clock.t += 60
    assert b.used("a") == (0, 515)


def test_old_charge_counts_for_the_day_only():
    b, clock = make()
    b.charge("a", 7, at=NOON - 120)                 # ended two minutes ago
    assert b.used("a") == (0, 7)
    b.charge("a", 3, at=NOON - DAY)                 # yesterday: nothing
    assert b.used("a") == (0, 7)


def test_tpd_is_the_utc_day_with_retry_until_midnight():
    b, clock = make()
    limits = TokenLimits(tpd=1000)
    b.charge("a", 1000)
    d = b.check("a", limits)
    assert not d.allowed and d.window == "day" and d.limit == 1000 and d.remaining == 0
    assert d.retry_after_s == 12 * 3600             # from noon to the next 00:00 UTC
    clock.t = NOON + 12 * 3600 - 0.5
    assert b.check("a", limits).retry_after_s == 1  # ceil, at least 1
    clock.t = NOON + 12 * 3600                      # midnight UTC: a new day
    d = b.check("a", limits)
    assert d.allowed and d.remaining == 1000
    assert b.day_start() == NOON + 12 * 3600


def test_both_limits_binding_window_and_longest_wait():
    b, clock = make()
    limits = TokenLimits(tpm=100, tpd=150)
    b.charge("a", 60)
    d = b.check("a", limits)
    assert d.allowed and (d.limit, d.remaining, d.window) == (100, 40, "minute")
    clock.t += 61
    b.charge("a", 80)                               # minute 80/100, day 140/150
    d = b.check("a", limits)
    assert d.allowed and (d.limit, d.remaining, d.window) == (150, 10, "day")
    b.charge("a", 30)                               # minute 110, day 170: both spent
    d = b.check("a", limits)
    assert not d.allowed
    assert d.retry_after_s == math.ceil((math.floor(NOON / DAY) + 1) * DAY - clock.t)
    assert d.headers()[-1] == ("retry-after", str(d.retry_after_s))


def test_minute_spent_but_day_not():
    b, clock = make()
    b.charge("a", 100)
    d = b.check("a", TokenLimits(tpm=100, tpd=10_000))
    assert not d.allowed and d.retry_after_s == 60 and d.window == "minute"


def test_seed_restores_the_day_after_a_restart():
    b, clock = make()
    b.seed({"a": 900, "b": 10})
    assert b.used("a") == (0, 900)
    d = b.check("a", TokenLimits(tpd=1000))
    assert d.allowed and d.remaining == 100
    b.charge("a", 100)
    assert not b.check("a", TokenLimits(tpd=1000)).allowed
    b.seed({"a": 5}, minute_tokens={"a": 50})       # replaces the day, adds to the minute
    assert b.used("a") == (150, 5)
    clock.t += 61
    assert b.used("a") == (0, 5)


def test_check_never_charges_and_unknown_keys_cost_no_state():
    b, _ = make()
    for _ in range(100):
        assert b.check("ghost", TokenLimits(tpm=1, tpd=1)).allowed
    assert len(b) == 0
    b.charge("a", 0)
    b.charge("a", -5)
    b.charge("a", None)
    assert len(b) == 0


def test_retain_and_the_key_bound(monkeypatch):
    b, _ = make()
    for k in "abc":
        b.charge(k, 1)
    b.retain(["a"])
    assert len(b) == 1 and b.used("b") == (0, 0)
    monkeypatch.setattr(budget_mod, "MAX_TRACKED_KEYS", 2)
    b.charge("b", 1)
    b.charge("c", 1)                                # past the bound: not tracked, counted
    assert len(b) == 2 and b.untracked == 1
    b.seed({"d": 5})
    assert b.untracked == 2


def test_state_per_key_is_fixed_whatever_the_rate():
    b, clock = make()
    for i in range(10_000):
        clock.t = NOON + i * 0.01
        b.charge("a", 1)
    usage = b._keys["a"]
    assert len(usage.ring) == 60 and usage.minute == 6000 and usage.day_tokens == 10_000


def test_zero_limit_refuses_without_state():
    b, _ = make()
    d = b.check("a", TokenLimits(tpm=0))
    assert not d.allowed and d.retry_after_s == 60


@pytest.mark.parametrize("tpm", [1, 7, 1000])
def test_randomized_window_matches_a_brute_force_sum(tpm):
    import random
    rng = random.Random(tpm)
    b, clock = make()
    events = []
    t = NOON
    for _ in range(400):
        t += rng.random() * 3
        clock.t = t
        if rng.random() < 0.6:
            n = rng.randint(1, 2 * tpm)
            b.charge("a", n)
            events.append((int(t), n))
        used = sum(n for s, n in events if s > int(t) - 60)
        d = b.check("a", TokenLimits(tpm=tpm))
        assert d.allowed == (used < tpm)
        assert d.remaining == max(0, tpm - used)
        if not d.allowed:
            # brute force: the first whole second at which the sum drops under tpm
            m = int(t) + 1
            while sum(n for s, n in events if s > m - 60) >= tpm:
                m += 1
            assert d.retry_after_s == max(1, math.ceil(m - t))
