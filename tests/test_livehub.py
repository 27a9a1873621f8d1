"""llamagw.admin.livehub: SSE framing, fan-out, bounded queues with `dropped`, the subscriber
cap, heartbeats, slots freed on every exit, publish from threads."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from helpers import aio

from llamagw.admin import livehub
from llamagw.admin.livehub import HubFull, LiveHub


def parse(chunk: bytes) -> list[tuple[str, object]]:
    """SSE bytes -> [(event type, data object)]; comments as ("#", text); retry as ("retry", n)."""
    out = []
    for block in chunk.decode().split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            out.append(("#", block[1:].strip()))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        if "retry" in fields:
            out.append(("retry", int(fields["retry"])))
        else:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


async def take(it, n: int = 1, timeout: float = 5.0) -> list[tuple[str, object]]:
    """The next events of an iterator of frames, at least n of them."""
    got = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            got.extend(parse(await anext(it)))
    return got


def test_frame_is_one_sse_event_whatever_the_text():
    data = livehub.frame("log", {"text": "a\nb\r\n\n<img src=x>\u2028"})
    assert data.count(b"\n\n") == 1 and data.endswith(b"\n\n")
    assert data.startswith(b"event: log\ndata: {")
    assert parse(data) == [("log", {"text": "a\nb\r\n\n<img src=x>\u2028"})]
    for bad in ("", "Log", "a b", "x\ndata: 1", "a" * 40):
        with pytest.raises(ValueError):
            livehub.frame(bad, {})


def test_publish_without_subscribers_does_nothing():
    hub = LiveHub()
    assert not hub.active
    assert hub.publish("metrics", {"x": 1}) == 0
    assert hub.published == 0


@aio
async def test_initial_events_then_live_events_to_every_subscriber():
    hub = LiveHub()
    a = hub.subscribe(initial=[("hello", {"key_id": "ops"}), ("models", {"models": []})])
    b = hub.subscribe()
    assert len(hub) == 2 and hub.active
    ia, ib = a.frames(), b.frames()
    assert await take(ia, 3) == [("retry", livehub.RETRY_MS), ("hello", {"key_id": "ops"}),
                                 ("models", {"models": []})]
    assert await take(ib, 1) == [("retry", livehub.RETRY_MS)]
    assert hub.publish("request", {"status": 200}) == 2
    assert await take(ia) == [("request", {"status": 200})]
    assert await take(ib) == [("request", {"status": 200})]
    a.close()
    b.close()
    assert len(hub) == 0


@aio
async def test_a_slow_subscriber_loses_the_oldest_and_is_told():
    hub = LiveHub(queue_events=5)
    slow = hub.subscribe()
    fast = hub.subscribe()
    fi = fast.frames()
    await take(fi)
    for i in range(12):
        hub.publish("request", {"i": i})
        if i % 3 == 0:
            got = await take(fi)
            assert got[-1] == ("request", {"i": i})
    assert fast.dropped == 0
    assert slow.queued == 5 and slow.dropped == 7
    events = await take(slow.frames(), 7)
    assert events == [("retry", livehub.RETRY_MS), ("dropped", {"count": 7})] + \
        [("request", {"i": i}) for i in range(7, 12)]
    # the notice is sent once; later losses are counted afresh
    for i in range(8):
        hub.publish("request", {"i": i})
    assert slow.dropped == 10
    slow.close()
    fast.close()


@aio
async def test_the_queue_is_bounded_in_bytes_too():
    hub = LiveHub(queue_events=1000, queue_bytes=2000)
    sub = hub.subscribe()
    for i in range(50):
        hub.publish("log", {"text": "x" * 200})
    assert sub.queued * 230 <= 2000 + 230
    assert sub.dropped == 50 - sub.queued
    sub.close()


def test_an_oversized_event_is_dropped_not_queued():
    hub = LiveHub()
    sub = hub.subscribe()
    assert hub.publish("log", {"text": "x" * (livehub.MAX_EVENT_BYTES + 1)}) == 0
    assert hub.oversized == 1 and sub.queued == 0
    sub.close()


def test_subscriber_cap():
    hub = LiveHub(max_subscribers=2)
    a, b = hub.subscribe(), hub.subscribe()
    with pytest.raises(HubFull):
        hub.subscribe()
    assert hub.refused == 1
    a.close()
    c = hub.subscribe()                  # a's slot is free at once
    assert len(hub) == 2
    b.close(), c.close()


@aio
async def test_heartbeat_in_silence():
    hub = LiveHub(heartbeat_s=0.05)
    with hub.subscribe() as sub:
        it = sub.frames()
        assert await take(it) == [("retry", livehub.RETRY_MS)]
        assert await take(it) == [("#", "heartbeat")]
        hub.publish("metrics", {"t": 1})
        assert await take(it) == [("metrics", {"t": 1})]


@aio
async def test_close_ends_the_iterator_and_frees_the_slot():
    hub = LiveHub(heartbeat_s=30)
    sub = hub.subscribe()
    seen = []

    async def reader():
        async for chunk in sub.frames():
            seen.append(chunk)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    hub.close_all()
    await asyncio.wait_for(task, 2)
    assert len(hub) == 0 and sub.closed
    assert hub.publish("metrics", {}) == 0


@aio
async def test_a_writer_that_fails_frees_the_slot():
    """The gateway's loop: `with sub: async for chunk in sub.frames(): await write(chunk)`."""
    hub = LiveHub()

    async def write(chunk):
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        with hub.subscribe() as sub:
            async for chunk in sub.frames():
                await write(chunk)
    assert len(hub) == 0


@aio
async def test_a_cancelled_stream_frees_the_slot():
    hub = LiveHub(heartbeat_s=30)

    async def stream():
        with hub.subscribe() as sub:
            async for _ in sub.frames():
                pass

    task = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    assert len(hub) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(hub) == 0


@aio
async def test_publish_threadsafe_reaches_subscribers_in_order():
    hub = LiveHub()
    hub.publish_threadsafe("log", {"text": "no loop yet"})     # no subscriber: ignored
    with hub.subscribe() as sub:
        it = sub.frames()
        await take(it)

        def producer(tag):
            for i in range(200):
                hub.publish_threadsafe("log", {"tag": tag, "i": i})

        threads = [threading.Thread(target=producer, args=(tag,)) for tag in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = await take(it, 400)
        for tag in "ab":
            assert [o["i"] for k, o in got if k == "log" and o["tag"] == tag] == list(range(200))


@aio
async def test_publish_threadsafe_inbox_is_bounded():
    hub = LiveHub(inbox_events=10)
    with hub.subscribe():
        pass
    with hub.subscribe() as sub:
        # the loop is not running the drain until we yield: the inbox fills
        for i in range(25):
            hub.publish_threadsafe("log", {"i": i})
        assert hub.inbox_dropped == 15
        await asyncio.sleep(0.01)
        got = await take(sub.frames(), 11)
        assert [o["i"] for k, o in got if k == "log"] == list(range(15, 25))
