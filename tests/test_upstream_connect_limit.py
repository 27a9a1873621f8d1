"""UpstreamPool: connects in flight are bounded; waiters queue FIFO; the connect deadline covers
the wait; cancelled or timed-out waiters never leak a place."""

from __future__ import annotations

import asyncio

import pytest

from helpers import aio
from llamagw.net import upstream


class GatedPool(upstream.UpstreamPool):
    """_open waits for `gate` and records how many opens ran at once and in which order."""

    def __init__(self, *args, **kwargs):
        super().__init__("127.0.0.1", 9, *args, **kwargs)
        self.gate = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.order: list[int] = []
        self._n = 0

    async def _open(self):
        self._n += 1
        n = self._n
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        self.order.append(n)
        return upstream.UpstreamConnection(self)


@aio
async def test_connects_in_flight_are_bounded_and_waiters_go_fifo():
    pool = GatedPool(5.0, max_connecting=2)
    tasks = [asyncio.create_task(pool.acquire()) for _ in range(6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert pool.running == 2 and pool.connecting == 2 and pool.connect_waiting == 4
    pool.gate.set()
    conns = await asyncio.gather(*tasks)
    assert len(set(map(id, conns))) == 6 and pool.open_count == 6
    assert pool.peak == 2
    assert pool.order == [1, 2, 3, 4, 5, 6]
    assert pool.connecting == 0 and pool.connect_waiting == 0


@aio
async def test_the_deadline_covers_the_wait_and_no_place_leaks():
    pool = GatedPool(0.05, max_connecting=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(*(pool.acquire() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, TimeoutError) for r in results)
    assert loop.time() - t0 < 1.0           # the waiters did not wait 3 x 0.05 s each in turn
    assert pool.connecting == 0 and pool.connect_waiting == 0
    pool.gate.set()
    pool.connect_timeout = 1.0
    assert isinstance(await pool.acquire(), upstream.UpstreamConnection)
    assert pool.connecting == 0


@aio
async def test_a_cancelled_waiter_gives_its_turn_to_the_next():
    pool = GatedPool(5.0, max_connecting=1)
    first = asyncio.create_task(pool.acquire())
    second = asyncio.create_task(pool.acquire())
    third = asyncio.create_task(pool.acquire())
    for _ in range(3):
        await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    pool.gate.set()
    await asyncio.gather(first, third)
    assert pool.order == [1, 2] and pool.connecting == 0 and pool.connect_waiting == 0


@aio
async def test_real_connect_refused_releases_the_place():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                               # nothing listens there now
    pool = upstream.UpstreamPool("127.0.0.1", port, 1.0, max_connecting=1)
    for _ in range(3):
        with pytest.raises(OSError):
            await pool.acquire()
    assert pool.connecting == 0
