"""The dashboard's live channel: a bounded fan-out of typed events to Server-Sent-Events streams.

Producers (the proxy's request-finished path, the metrics tick, the model router, the log
buffer) call publish(event_type, obj): the object is serialized and framed ONCE, then the same
bytes are appended to each subscriber's queue: O(subscribers), no await, no I/O, never blocks.
With no dashboard open it returns at once (producers may test `hub.active` before building an
expensive object).

Each subscriber (one GET /admin/live) has a bounded queue: past QUEUE_EVENTS events or
QUEUE_BYTES bytes, the oldest are dropped and counted, and the stream gets one
`dropped {"count": n}` event before what follows, so a slow browser loses events, never slows
the proxy, and knows it lost them. At most MAX_SUBSCRIBERS streams at once (subscribe raises
HubFull: the route answers 503).

A subscriber's frames() is an async iterator of SSE bytes ("retry:" first, then the initial
events given to subscribe, e.g. hello and the models snapshot, then live events, batched, and a
": heartbeat" comment after HEARTBEAT_S of silence, which also lets the writer notice a client
that went away). Use it so that the slot is freed on every exit path:

    try:
        sub = hub.subscribe(initial=[("hello", {...}), ("models", snapshot)])
    except livehub.HubFull:
        ... 503
    with sub:                        # close() on exit: the slot is free at once
        async for chunk in sub.frames():
            await write(chunk)       # raises when the client is gone

Threads (the log tail follower) call publish_threadsafe(): a bounded inbox drained on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import threading
from collections.abc import AsyncIterator, Iterable

# --- limits -----------------------------------------------------------------------------------
# 16 dashboards at once: a handful of operators; each stream holds a queue and a socket.
MAX_SUBSCRIBERS = 16
# 1000 events a subscriber: about 15 minutes of 1-Hz metrics, or a burst of ~1000 requests,
# before a stalled browser starts losing the oldest.
QUEUE_EVENTS = 1000
# 4 MiB a subscriber: with events shared between queues, the real cost is far lower; this bounds
# the worst case (16 x 4 MiB) if large events (models snapshots) pile up.
QUEUE_BYTES = 4 * 1024 * 1024
# 256 KiB an event: a models snapshot of router mode's maximum of models is far below; a larger
# one is a bug and is dropped (counted in `oversized`) rather than queued 16 times.
MAX_EVENT_BYTES = 256 * 1024
# 15 s: under every common proxy idle timeout (RunPod's and nginx's default are 60 s or more).
HEARTBEAT_S = 15.0
# 2 s: how long a browser's EventSource waits before reconnecting after the stream ends.
RETRY_MS = 2000
# 10,000 events from threads waiting for the loop: a log storm while the loop is busy drops the
# oldest (counted) instead of growing.
INBOX_EVENTS = 10_000

EVENT_TYPE_RE = re.compile(r"[a-z][a-z_]{0,31}")
HEARTBEAT = b": heartbeat\n\n"


class HubFull(Exception):
    """MAX_SUBSCRIBERS streams are open already."""


def frame(event_type: str, obj: object) -> bytes:
    """One SSE event: `event: <type>\\ndata: <json>\\n\\n` (json.dumps escapes every newline)."""
    if not EVENT_TYPE_RE.fullmatch(event_type):
        raise ValueError(f"bad event type {event_type!r}")
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return b"event: " + event_type.encode() + b"\ndata: " + data.encode("utf-8", "replace") \
        + b"\n\n"


class Subscriber:
    """One open stream's queue. Made by LiveHub.subscribe; owned by the loop."""

    def __init__(self, hub: LiveHub, queue_events: int, queue_bytes: int, heartbeat_s: float):
        self._hub = hub
        self._queue: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._max_events = queue_events
        self._max_bytes = queue_bytes
        self._heartbeat_s = heartbeat_s
        self._wake = asyncio.Event()
        self._pending_drops = 0
        self.dropped = 0          # events this subscriber lost, in all
        self.closed = False

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _put(self, data: bytes) -> None:
        if self.closed:
            return
        self._queue.append(data)
        self._bytes += len(data)
        while len(self._queue) > self._max_events or self._bytes > self._max_bytes:
            self._bytes -= len(self._queue.popleft())
            self.dropped += 1
            self._pending_drops += 1
        self._wake.set()

    def _take(self) -> bytes:
        """Everything queued (and a `dropped` notice first, if events were lost), as one chunk."""
        parts = []
        if self._pending_drops:
            parts.append(frame("dropped", {"count": self._pending_drops}))
            self._pending_drops = 0
        parts.extend(self._queue)
        self._queue.clear()
        self._bytes = 0
        return b"".join(parts)

    async def frames(self) -> AsyncIterator[bytes]:
        """SSE bytes until close() (or the hub's close_all); heartbeats in silences."""
        try:
            yield f"retry: {RETRY_MS}\n\n".encode()
            while not self.closed:
                if self._queue or self._pending_drops:
                    yield self._take()
                    continue
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._heartbeat_s):
                        await self._wake.wait()
                except TimeoutError:
                    if not self.closed:
                        yield HEARTBEAT
        finally:
            self.close()

    def close(self) -> None:
        """End the stream and free its slot (idempotent)."""
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self._bytes = 0
            self._hub._remove(self)
            self._wake.set()


class LiveHub:
    """Fan-out of typed events to at most max_subscribers bounded queues."""

    def __init__(self, *, max_subscribers: int = MAX_SUBSCRIBERS,
                 queue_events: int = QUEUE_EVENTS, queue_bytes: int = QUEUE_BYTES,
                 heartbeat_s: float = HEARTBEAT_S, inbox_events: int = INBOX_EVENTS):
        self.max_subscribers = max_subscribers
        self._queue_events = queue_events
        self._queue_bytes = queue_bytes
        self._heartbeat_s = heartbeat_s
        self._subs: list[Subscriber] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[tuple[str, object]] = collections.deque()
        self._inbox_max = inbox_events
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
        self.published = 0        # events framed and queued (to at least one subscriber)
        self.oversized = 0        # events over MAX_EVENT_BYTES, dropped
        self.inbox_dropped = 0    # events from threads lost in a full inbox
        self.refused = 0          # subscribe() calls refused (HubFull)

    @property
    def active(self) -> bool:
        """A dashboard is listening (producers may skip building events otherwise)."""
        return bool(self._subs)

    def __len__(self) -> int:
        return len(self._subs)

    def stats(self) -> dict:
        return {"subscribers": len(self._subs), "published": self.published,
                "dropped": sum(s.dropped for s in self._subs), "oversized": self.oversized,
                "inbox_dropped": self.inbox_dropped, "refused": self.refused}

    def subscribe(self, initial: Iterable[tuple[str, object]] = ()) -> Subscriber:
        """A new stream whose first events are `initial`; HubFull past max_subscribers.
        Call on the event loop (binds the hub to it for publish_threadsafe)."""
        if len(self._subs) >= self.max_subscribers:
            self.refused += 1
            raise HubFull(f"{self.max_subscribers} live dashboards are open already")
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        sub = Subscriber(self, self._queue_events, self._queue_bytes, self._heartbeat_s)
        for event_type, obj in initial:
            sub._put(frame(event_type, obj))
        self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscriber) -> None:
        try:
            self._subs.remove(sub)
        except ValueError:
            pass

    def publish(self, event_type: str, obj: object) -> int:
        """Queue one event for every subscriber (on the loop); return how many got it."""
        subs = self._subs
        if not subs:
            return 0
        data = frame(event_type, obj)
        if len(data) > MAX_EVENT_BYTES:
            self.oversized += 1
            return 0
        for sub in subs:
            sub._put(data)
        self.published += 1
        return len(subs)

    def publish_threadsafe(self, event_type: str, obj: object) -> None:
        """publish() from another thread: into a bounded inbox, drained on the loop."""
        loop = self._loop
        if loop is None or not self._subs:
            return
        with self._inbox_lock:
            if len(self._inbox) >= self._inbox_max:
                self._inbox.popleft()
                self.inbox_dropped += 1
            self._inbox.append((event_type, obj))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain_inbox)
        except RuntimeError:          # the loop is closed: the process is stopping
            with self._inbox_lock:
                self._inbox.clear()
                self._drain_scheduled = False

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._drain_scheduled = False
        for event_type, obj in items:
            self.publish(event_type, obj)

    def close_all(self) -> None:
        """End every stream (shutdown; tests that check the browser reconnects)."""
        for sub in list(self._subs):
            sub.close()
