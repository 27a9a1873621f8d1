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
from llamagw.limits.ratelimit import (BackendSlots, KeyConcurrency, QueueFull, QueueTimeout,
                                      RateLimiter, SlotsClosed)
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


# --- BackendSlots -----------------------------------------------------------------------------
def test_slots_immediate_then_queue_full():
    async def main():
        slots = BackendSlots(max_concurrent=2, max_queue=1)
        s1 = await slots.acquire(1)
        s2 = await slots.acquire(1)
        assert slots.active == 2 and slots.waiting == 0
        waiter = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        with pytest.raises(QueueFull):
            await slots.acquire(5)  # refused at once
        s1.release()
        s3 = await waiter
        assert slots.active == 2 and slots.waiting == 0
        for s in (s2, s3):
            s.release()
        assert slots.active == 0
    run(main())


def test_slots_queue_zero_refuses_at_once():
    async def main():
        slots = BackendSlots(1, 0)
        s = await slots.acquire(1)
        with pytest.raises(QueueFull):
            await slots.acquire(1)
        s.release()
    run(main())


def test_slots_timeout_leaves_no_entry():
    async def main():
        slots = BackendSlots(1, 4)
        s = await slots.acquire(1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.02)
        assert loop.time() - t0 < 1.0
        assert slots.waiting == 0 and slots.active == 1
        s.release()
        assert slots.active == 0
    run(main())


def test_slots_fifo_order():
    async def main():
        slots = BackendSlots(1, 10)
        first = await slots.acquire(1)
        order = []

        async def worker(n):
            async with await slots.acquire(5):
                order.append(n)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(worker(n)) for n in range(5)]
        await asyncio.sleep(0)
        assert slots.waiting == 5
        first.release()
        # a newcomer must queue behind the waiters, not take the freed slot
        late = asyncio.create_task(worker(99))
        await asyncio.gather(*tasks, late)
        assert order == [0, 1, 2, 3, 4, 99]
        assert slots.active == 0 and slots.waiting == 0
    run(main())


def test_release_is_idempotent():
    async def main():
        slots = BackendSlots(2, 2)
        a = await slots.acquire(1)
        b = await slots.acquire(1)
        a.release(); a.release(); a.release()
        assert slots.active == 1
        b.release()
        assert slots.active == 0
    run(main())


def test_release_on_error_and_on_cancel_of_running_holder():
    async def main():
        slots = BackendSlots(1, 1)
        with pytest.raises(ValueError):
            async with await slots.acquire(1):
                raise ValueError("upstream broke")
        assert slots.active == 0

        started = asyncio.Event()

        async def holder():
            async with await slots.acquire(1):
                started.set()
                await asyncio.sleep(30)

        t = asyncio.create_task(holder())
        await started.wait()
        assert slots.active == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.active == 0
    run(main())


def test_cancelled_waiter_leaves_no_entry():
    async def main():
        slots = BackendSlots(1, 2)
        s = await slots.acquire(1)
        t = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.waiting == 0
        s.release()
        assert slots.active == 0
        s2 = await slots.acquire(0.01)
        assert slots.active == 1
        s2.release()
    run(main())


def test_grant_and_cancel_in_the_same_instant_does_not_leak():
    """release() grants the slot to the waiter's future, and the waiter is cancelled before it
    runs again: the waiter must hand the slot back, not keep it and not lose it."""
    async def main():
        slots = BackendSlots(1, 2)
        s = await slots.acquire(1)
        t = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        s.release()   # slot granted to t (t has not resumed yet)
        t.cancel()    # ... and t is cancelled at the same time
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.active == 0 and slots.waiting == 0
        a = await slots.acquire(0.01)  # the slot is really free
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.01)   # and counted once: max_concurrent still holds
        a.release()
        assert slots.active == 0
    run(main())


def test_grant_and_cancel_passes_slot_to_next_waiter():
    async def main():
        slots = BackendSlots(1, 3)
        s = await slots.acquire(1)
        t1 = asyncio.create_task(slots.acquire(5))
        t2 = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        s.release()
        t1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t1
        s2 = await asyncio.wait_for(t2, 1)
        assert slots.active == 1 and slots.waiting == 0
        s2.release()
        assert slots.active == 0
    run(main())


def test_many_random_cancellations_never_leak():
    async def main():
        slots = BackendSlots(3, 20)
        done = 0

        async def user(n):
            nonlocal done
            try:
                async with await slots.acquire(2):
                    await asyncio.sleep(0)
                    done += 1
            except QueueFull:
                pass

        tasks = [asyncio.create_task(user(n)) for n in range(40)]
        for i in range(6):
            await asyncio.sleep(0)
            for t in tasks[i::7]:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert slots.active == 0 and slots.waiting == 0
        assert done > 0
        held = [await slots.acquire(0.01) for _ in range(3)]
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.01)
        for h in held:
            h.release()
    run(main())


def test_close_turns_away_waiters_and_new_acquires():
    async def main():
        slots = BackendSlots(1, 3)
        s = await slots.acquire(1)
        waiters = [asyncio.create_task(slots.acquire(5)) for _ in range(2)]
        await asyncio.sleep(0)
        slots.close()
        for w in waiters:
            with pytest.raises(SlotsClosed):
                await w
        assert slots.waiting == 0
        with pytest.raises(QueueFull):  # SlotsClosed is a QueueFull
            await slots.acquire(1)
        s.release()
        assert slots.active == 0
    run(main())


def test_try_acquire_takes_a_free_slot_but_never_overtakes_the_queue():
    async def main():
        slots = BackendSlots(1, 2)
        first = slots.try_acquire()
        assert first is not None and slots.active == 1
        assert slots.try_acquire() is None            # full: the caller must queue
        waiter = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        first.release()                               # the slot passes to the waiter ...
        assert slots.try_acquire() is None            # ... not to a newcomer
        second = await waiter
        assert slots.active == 1 and slots.waiting == 0
        second.release()
        assert slots.active == 0
        slots.close()
        with pytest.raises(SlotsClosed):
            slots.try_acquire()
    run(main())
