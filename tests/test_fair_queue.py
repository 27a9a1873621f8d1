"""llamagw/limits/fairqueue.py: the pure fair queue (fewest in flight first, round-robin among
equals, FIFO within a key, removal, bound) and FairBackendSlots, the gateway's slots to
llama-server: bounded queue, timeouts, cancellation that never leaks a slot, close, plus fairness."""

from __future__ import annotations

import asyncio
import random
import types

import pytest

from llamagw.limits import fairqueue
from llamagw.limits.fairqueue import (FairBackendSlots, FairQueue, QueueFull, QueueTimeout,
                                      SlotsClosed)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


# --- FairQueue (pure) ---------------------------------------------------------------------------
def drain(q: FairQueue, finish: bool = False) -> list:
    out = []
    while (nxt := q.pop()) is not None:
        out.append(nxt[1])
        if finish:
            q.finish(nxt[0])
    return out


def test_fifo_within_one_key():
    q = FairQueue(10)
    for i in range(5):
        assert q.push("a", i)
    assert len(q) == 5 and q.waiting("a") == 5 and q.keys_waiting == 1
    assert drain(q, finish=True) == [0, 1, 2, 3, 4]
    assert len(q) == 0 and q.keys_waiting == 0


def test_fewest_in_flight_goes_first():
    q = FairQueue(10)
    q.start("a"); q.start("a"); q.start("b")           # a: 2 running, b: 1, c: none
    for item in ("a1", "a2", "a3"):
        q.push("a", item)
    q.push("b", "b1")
    q.push("c", "c1")
    assert q.pop() == ("c", "c1")                      # 0 in flight
    assert q.in_flight("c") == 1
    assert q.pop() == ("b", "b1")                      # b 1 < a 2 (c no longer waits)
    assert q.pop() == ("a", "a1")
    assert q.in_flight("a") == 3 and q.in_flight("b") == 2


def test_round_robin_among_equals():
    q = FairQueue(20)
    for key in ("a", "b", "c"):
        for i in range(3):
            q.push(key, f"{key}{i}")
    # nothing finishes: every pop raises its key's count, so the keys take turns
    assert drain(q) == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_round_robin_when_slots_come_back():
    """Each slot is released before the next pop: all keys stay at 0 in flight, and the turn
    still rotates (least recently served first), instead of the first key draining."""
    q = FairQueue(20)
    for key in ("a", "b"):
        for i in range(3):
            q.push(key, f"{key}{i}")
    assert drain(q, finish=True) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_busy_key_does_not_starve_a_light_one():
    q = FairQueue(100)
    for i in range(50):
        q.push("busy", f"busy{i}")
    q.push("light", "light0")
    q.start("busy")                                    # busy already holds the only slot
    assert q.pop() == ("light", "light0")


def test_remove_a_waiter():
    q = FairQueue(10)
    q.push("a", 1); q.push("a", 2); q.push("b", 3)
    assert q.remove("a", 1)
    assert not q.remove("a", 1)                        # already gone
    assert not q.remove("zzz", 1)
    assert len(q) == 2 and q.waiting("a") == 1
    assert q.remove("b", 3)
    assert q.keys_waiting == 1                         # b's empty group is gone
    assert drain(q) == [2]


def test_bounded():
    q = FairQueue(3)
    assert all(q.push(k, k) for k in "abc")
    assert not q.push("d", "d")
    assert len(q) == 3
    q.pop()
    assert q.push("d", "d")
    assert FairQueue(0).push("a", 1) is False
    with pytest.raises(ValueError):
        FairQueue(-1)


def test_finish_never_goes_negative_and_counts_vanish():
    q = FairQueue(1)
    q.start("a")
    q.finish("a"); q.finish("a"); q.finish("never")
    assert q.in_flight("a") == 0
    assert q._in_flight == {}                          # memory only for keys with work


def test_clear_returns_everyone():
    q = FairQueue(10)
    q.push("a", 1); q.push("b", 2); q.push("a", 3)
    assert sorted(q.clear()) == [("a", 1), ("a", 3), ("b", 2)]
    assert len(q) == 0 and q.pop() is None


def test_random_operations_keep_the_invariants():
    rng = random.Random(7)
    q = FairQueue(40)
    queued: dict[str, list[int]] = {}
    running: dict[str, int] = {}
    n = 0
    for _ in range(5000):
        op = rng.random()
        key = rng.choice("abcde")
        if op < 0.45:
            if q.push(key, n):
                queued.setdefault(key, []).append(n)
            else:
                assert sum(map(len, queued.values())) == 40
            n += 1
        elif op < 0.55 and queued.get(key):
            item = rng.choice(queued[key])
            assert q.remove(key, item)
            queued[key].remove(item)
        elif op < 0.8:
            before = {k: running.get(k, 0) for k, v in queued.items() if v}
            got = q.pop()
            if not before:
                assert got is None
                continue
            k, item = got
            assert before[k] == min(before.values())           # fewest in flight
            assert item == queued[k].pop(0)                    # FIFO within the key
            running[k] = running.get(k, 0) + 1
        elif running.get(key):
            q.finish(key)
            running[key] -= 1
        assert len(q) == sum(map(len, queued.values()))
        for k in "abcde":
            assert q.in_flight(k) == running.get(k, 0)


# --- FairBackendSlots: BackendSlots' semantics ----------------------------------------------------
def test_slots_immediate_then_queue_full():
    async def main():
        slots = FairBackendSlots(max_concurrent=2, max_queue=1)
        s1 = await slots.acquire(1)
        s2 = await slots.acquire(1)
        assert slots.active == 2 and slots.waiting == 0
        waiter = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        with pytest.raises(QueueFull):
            await slots.acquire(5)
        s1.release()
        s3 = await waiter
        assert slots.active == 2 and slots.waiting == 0
        for s in (s2, s3):
            s.release()
        assert slots.active == 0
    run(main())


def test_slots_queue_zero_refuses_at_once():
    async def main():
        slots = FairBackendSlots(1, 0)
        s = await slots.acquire(1)
        with pytest.raises(QueueFull):
            await slots.acquire(1)
        s.release()
    run(main())


def test_slots_timeout_leaves_no_entry():
    async def main():
        slots = FairBackendSlots(1, 4)
        s = await slots.acquire(1, "a")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.02, "b")
        assert loop.time() - t0 < 1.0
        assert slots.waiting == 0 and slots.active == 1 and slots.keys_waiting == 0
        s.release()
        assert slots.active == 0 and slots.in_flight("a") == 0
    run(main())


def test_single_group_is_plain_fifo():
    async def main():
        slots = FairBackendSlots(1, 10)
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
        late = asyncio.create_task(worker(99))     # queues behind the waiters
        await asyncio.gather(*tasks, late)
        assert order == [0, 1, 2, 3, 4, 99]
        assert slots.active == 0 and slots.waiting == 0
    run(main())


def test_release_is_idempotent():
    async def main():
        slots = FairBackendSlots(2, 2)
        a = await slots.acquire(1, "k")
        b = await slots.acquire(1, "k")
        assert slots.in_flight("k") == 2
        a.release(); a.release(); a.release()
        assert slots.active == 1 and slots.in_flight("k") == 1 and a.released
        b.release()
        assert slots.active == 0 and slots.in_flight("k") == 0
    run(main())


def test_release_on_error_and_on_cancel_of_running_holder():
    async def main():
        slots = FairBackendSlots(1, 1)
        with pytest.raises(ValueError):
            async with await slots.acquire(1, "a"):
                raise ValueError("upstream broke")
        assert slots.active == 0
        with slots.try_acquire("a"):                # sync context manager too
            assert slots.active == 1
        assert slots.active == 0

        started = asyncio.Event()

        async def holder():
            async with await slots.acquire(1, "a"):
                started.set()
                await asyncio.sleep(30)

        t = asyncio.create_task(holder())
        await started.wait()
        assert slots.active == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.active == 0 and slots.in_flight("a") == 0
    run(main())


def test_cancelled_waiter_leaves_no_entry():
    async def main():
        slots = FairBackendSlots(1, 2)
        s = await slots.acquire(1, "a")
        t = asyncio.create_task(slots.acquire(5, "b"))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.waiting == 0 and slots.keys_waiting == 0
        s.release()
        assert slots.active == 0
        s2 = await slots.acquire(0.01)
        assert slots.active == 1
        s2.release()
    run(main())


def test_grant_and_cancel_in_the_same_instant_does_not_leak():
    async def main():
        slots = FairBackendSlots(1, 2)
        s = await slots.acquire(1, "a")
        t = asyncio.create_task(slots.acquire(5, "b"))
        await asyncio.sleep(0)
        s.release()   # granted to t, which has not resumed ...
        t.cancel()    # ... and is cancelled in the same instant
        with pytest.raises(asyncio.CancelledError):
            await t
        assert slots.active == 0 and slots.waiting == 0
        assert slots.in_flight("a") == 0 and slots.in_flight("b") == 0
        a = await slots.acquire(0.01)
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.01)
        a.release()
        assert slots.active == 0
    run(main())


def test_grant_and_cancel_passes_slot_to_next_waiter():
    async def main():
        slots = FairBackendSlots(1, 3)
        s = await slots.acquire(1, "a")
        t1 = asyncio.create_task(slots.acquire(5, "b"))
        t2 = asyncio.create_task(slots.acquire(5, "c"))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        s.release()
        t1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t1
        s2 = await asyncio.wait_for(t2, 1)
        assert slots.active == 1 and slots.waiting == 0 and s2.key_id == "c"
        assert slots.in_flight("b") == 0
        s2.release()
        assert slots.active == 0
    run(main())


def test_cancelled_but_not_yet_removed_waiter_is_skipped():
    """task.cancel() cancels the waiter's future at once; a release before the task runs its
    cleanup must skip that future (and undo its in-flight count), not grant it."""
    async def main():
        slots = FairBackendSlots(1, 3)
        s = await slots.acquire(1, "a")
        t1 = asyncio.create_task(slots.acquire(5, "b"))
        t2 = asyncio.create_task(slots.acquire(5, "c"))
        await asyncio.sleep(0)
        t1.cancel()                      # b's future is cancelled, its entry still queued
        s.release()                      # must go to c
        with pytest.raises(asyncio.CancelledError):
            await t1
        s2 = await asyncio.wait_for(t2, 1)
        assert s2.key_id == "c" and slots.in_flight("b") == 0 and slots.waiting == 0
        s2.release()
        assert slots.active == 0
    run(main())


def test_many_random_cancellations_never_leak():
    async def main():
        slots = FairBackendSlots(3, 20)
        done = 0

        async def user(n):
            nonlocal done
            try:
                async with await slots.acquire(2, f"k{n % 4}"):
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
        assert all(slots.in_flight(f"k{i}") == 0 for i in range(4))
        assert done > 0
        held = [await slots.acquire(0.01) for _ in range(3)]
        with pytest.raises(QueueTimeout):
            await slots.acquire(0.01)
        for h in held:
            h.release()
    run(main())


def test_close_turns_away_waiters_and_new_acquires():
    async def main():
        slots = FairBackendSlots(1, 3)
        s = await slots.acquire(1, "a")
        waiters = [asyncio.create_task(slots.acquire(5, k)) for k in ("b", "c")]
        await asyncio.sleep(0)
        slots.close()
        for w in waiters:
            with pytest.raises(SlotsClosed):
                await w
        assert slots.waiting == 0
        with pytest.raises(QueueFull):               # SlotsClosed is a QueueFull
            await slots.acquire(1)
        s.release()
        assert slots.active == 0
    run(main())


def test_try_acquire_takes_a_free_slot_but_never_overtakes_the_queue():
    async def main():
        slots = FairBackendSlots(1, 2)
        first = slots.try_acquire("a")
        assert first is not None and slots.active == 1
        assert slots.try_acquire("b") is None
        waiter = asyncio.create_task(slots.acquire(5, "b"))
        await asyncio.sleep(0)
        first.release()
        assert slots.try_acquire("c") is None        # the slot went to the waiter
        second = await waiter
        assert slots.active == 1 and slots.waiting == 0
        second.release()
        assert slots.active == 0
        slots.close()
        with pytest.raises(SlotsClosed):
            slots.try_acquire()
    run(main())


def test_errors_namespace_makes_it_a_drop_in():
    """errors=: raise the exception classes the gateway's callers catch (ratelimit's)."""
    class Full(Exception): pass
    class Timeout(Exception): pass
    class Closed(Full): pass
    ns = types.SimpleNamespace(QueueFull=Full, QueueTimeout=Timeout, SlotsClosed=Closed)

    async def main():
        slots = FairBackendSlots(1, 0, errors=ns)
        s = slots.try_acquire()
        with pytest.raises(Full):
            await slots.acquire(1)
        slots2 = FairBackendSlots(1, 1, errors=ns)
        s2 = await slots2.acquire(1)
        with pytest.raises(Timeout):
            await slots2.acquire(0.01)
        slots.close()
        with pytest.raises(Closed):
            slots.try_acquire()
        s.release(); s2.release()
    run(main())
    assert fairqueue.FairBackendSlots(1, 1)._full is QueueFull


def test_bad_arguments():
    with pytest.raises(ValueError):
        FairBackendSlots(0, 1)
    with pytest.raises(ValueError):
        FairBackendSlots(1, -1)


# --- fairness through the asyncio face ----------------------------------------------------------
def test_busy_key_queue_does_not_starve_a_later_key():
    """One slot held by the busy key, which queues 50 more; then a light key queues 1: when the
    busy key's request ends, the light request is served next (strict FIFO would put it last;
    taking turns from the first waiter would put it second), then the busy key's in order."""
    async def main():
        slots = FairBackendSlots(1, 100)
        hold = await slots.acquire(1, "busy")
        order = []

        async def worker(key, n):
            async with await slots.acquire(5, key):
                order.append(f"{key}{n}")
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(worker("busy", n)) for n in range(50)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(worker("light", 0)))
        await asyncio.sleep(0)
        assert slots.waiting == 51 and slots.keys_waiting == 2
        hold.release()
        await asyncio.gather(*tasks)
        assert order == ["light0"] + [f"busy{n}" for n in range(50)]
        assert slots.active == 0 and slots._queue._served == {}
    run(main())


def test_a_start_without_waiting_counts_as_served():
    q = FairQueue(10)
    q.start("busy")                                    # took the free slot, no wait
    q.push("busy", "b1")
    q.push("light", "l1")
    q.finish("busy")                                   # both run none now
    assert q.pop() == ("light", "l1")                  # light was served less recently
    assert q.pop() == ("busy", "b1")


def test_history_is_kept_only_for_keys_with_work():
    q = FairQueue(10)
    q.start("a"); q.push("b", 1); q.push("c", 2)
    assert q.remove("c", 2)
    q.finish("a")
    assert q._served == {}                             # a: nothing left; b: never served
    assert q.pop() == ("b", 1)
    assert set(q._served) == {"b"}
    q.finish("b")
    assert q._served == {}
    q.start("x"); q.push("y", 3)
    q.clear()
    assert set(q._served) == {"x"}                     # x still runs


def test_freed_slot_goes_to_the_key_with_fewer_running():
    async def main():
        slots = FairBackendSlots(2, 20)
        a1 = await slots.acquire(1, "a")
        a2 = await slots.acquire(1, "a")
        wa = asyncio.create_task(slots.acquire(5, "a"))      # a queued first ...
        await asyncio.sleep(0)
        wb = asyncio.create_task(slots.acquire(5, "b"))      # ... b later
        await asyncio.sleep(0)
        a1.release()                 # a still runs 1, b runs 0: b gets it
        b = await asyncio.wait_for(wb, 1)
        assert b.key_id == "b" and not wa.done()
        a2.release()                 # a runs 0, b runs 1: now a
        a3 = await asyncio.wait_for(wa, 1)
        assert slots.in_flight("a") == 1 and slots.in_flight("b") == 1
        a3.release(); b.release()
        assert slots.active == 0
    run(main())


def test_three_keys_share_in_turn_under_load():
    """Three keys each keep 10 requests queued on 2 slots: the service alternates, so after any
    prefix of the grants no key is more than a couple ahead of another."""
    async def main():
        slots = FairBackendSlots(2, 100)
        order = []

        async def worker(key):
            async with await slots.acquire(5, key):
                order.append(key)
                await asyncio.sleep(0.001)

        holders = [await slots.acquire(1, "x") for _ in range(2)]
        tasks = [asyncio.create_task(worker(k)) for k in "abc" for _ in range(10)]
        await asyncio.sleep(0)
        for h in holders:
            h.release()
        await asyncio.gather(*tasks)
        assert len(order) == 30
        for i in range(1, 31):
            counts = [order[:i].count(k) for k in "abc"]
            assert max(counts) - min(counts) <= 2, (i, order)
    run(main())
