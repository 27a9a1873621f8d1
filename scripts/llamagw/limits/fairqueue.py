"""Fair sharing of llama-server's slots between keys.

FairQueue is the pure part: waiters grouped by key, requests in flight counted by key. When a
slot frees, pop() picks the waiting key with the fewest requests in flight; among keys with
equally few, the one served least recently (round-robin); within a key, the oldest waiter (FIFO).
"Served" counts every start, a slot taken without waiting (start()) as well as one handed to a
waiter (pop()), and a key with nothing running or waiting has no history (it counts as never
served). So one busy key with fifty queued requests cannot starve a key that sends one: when the
busy key's running request ends, both keys have none running and the light key, served less
recently, goes next; and it goes next at once whenever it has fewer requests running.

  push     O(1)                  remove (a waiter gone)   O(waiters of that key)
  pop      O(keys waiting)       start / finish           O(1)
Keys waiting are at most min(max_size, keys in the key file). Total waiters are bounded by
max_size (push refuses past it); counts exist only for keys with a request in flight or waiting.

FairBackendSlots is the asyncio face the gateway uses for llama-server's slots (one per model in
router mode: app.Gateway.new_slots): `active`, `waiting`, `try_acquire(key_id)`,
`await acquire(timeout, key_id)`, `close()`, slots with an idempotent release() that are (async)
context managers. A released slot passes straight to the chosen waiter so nobody overtakes the
queue; a waiter that times out or is cancelled leaves no entry; a slot granted in the same instant
as the waiter's cancellation is handed on, never leaked; close() turns every waiter and later
acquire away. Without a key_id every request is in one group: plain FIFO. errors=: the module
whose QueueFull / QueueTimeout / SlotsClosed the callers catch (limits/ratelimit.py).
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Hashable

# The group of requests that name no key: with only this key the queue is plain FIFO.
DEFAULT_KEY = ""


class QueueFull(Exception):
    """No room in the wait queue: refuse at once (503)."""


class QueueTimeout(Exception):
    """Waited the whole timeout without getting a slot (503)."""


class SlotsClosed(QueueFull):
    """Shutting down: waiters are turned away and no new slot is granted."""


class FairQueue:
    """Waiters by key and requests in flight by key; no asyncio, no clock."""

    def __init__(self, max_size: int):
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        # Keys with at least one waiter, in the order they began waiting (the last tie-break).
        self._waiting: dict[Hashable, collections.deque] = {}
        self._in_flight: dict[Hashable, int] = {}
        # The serial of each key's latest start (start() or pop()): the smaller, the less
        # recently served. Only for keys with a request running or waiting (bounded like them).
        self._served: dict[Hashable, int] = {}
        self._serial = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def keys_waiting(self) -> int:
        return len(self._waiting)

    def waiting(self, key: Hashable) -> int:
        queue = self._waiting.get(key)
        return len(queue) if queue is not None else 0

    def in_flight(self, key: Hashable) -> int:
        return self._in_flight.get(key, 0)

    def push(self, key: Hashable, item) -> bool:
        """Queue `item` behind key's other waiters; False when max_size are already waiting."""
        if self._size >= self.max_size:
            return False
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = collections.deque()
        queue.append(item)
        self._size += 1
        return True

    def remove(self, key: Hashable, item) -> bool:
        """Take a waiter out (it gave up); False when it is not queued (already popped)."""
        queue = self._waiting.get(key)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        self._size -= 1
        if not queue:
            del self._waiting[key]
            if key not in self._in_flight:
                self._served.pop(key, None)
        return True

    def pop(self):
        """The next waiter as (key, item), counted as in flight for its key; None when nobody
        waits. The key with the fewest in flight wins; ties go to the least recently served,
        then to the one waiting longest."""
        if not self._size:
            return None
        in_flight = self._in_flight
        served = self._served
        best_key, best = None, None
        for key in self._waiting:
            rank = (in_flight.get(key, 0), served.get(key, 0))
            if best is None or rank < best:
                best_key, best = key, rank
                if rank == (0, 0):
                    break                 # nothing running, never served: nobody comes first
        queue = self._waiting[best_key]
        item = queue.popleft()
        self._size -= 1
        if not queue:
            del self._waiting[best_key]
        in_flight[best_key] = best[0] + 1
        self._serial += 1
        served[best_key] = self._serial
        return best_key, item

    def start(self, key: Hashable) -> None:
        """A request of `key` went in flight without waiting."""
        in_flight = self._in_flight
        in_flight[key] = in_flight.get(key, 0) + 1
        self._serial = serial = self._serial + 1
        self._served[key] = serial

    def finish(self, key: Hashable) -> None:
        """A request of `key` left (finished, or granted to a waiter that was gone). Extra
        finishes are ignored: the count never goes negative."""
        n = self._in_flight.get(key, 0)
        if n <= 1:
            self._in_flight.pop(key, None)
            if key not in self._waiting:
                self._served.pop(key, None)
        else:
            self._in_flight[key] = n - 1

    def clear(self) -> list:
        """Every waiter as (key, item), in queue order per key; the queue is left empty."""
        out = [(key, item) for key, queue in self._waiting.items() for item in queue]
        self._waiting.clear()
        self._size = 0
        self._served = {k: v for k, v in self._served.items() if k in self._in_flight}
        return out


class FairSlot:
    """A running request at llama-server. release() is idempotent; use it in `finally` or as
    `async with await slots.acquire(t, key_id):`."""
    __slots__ = ("_owner", "key_id", "_released")

    def __init__(self, owner: "FairBackendSlots", key_id: Hashable):
        self._owner = owner
        self.key_id = key_id
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release_one(self.key_id)

    def __enter__(self) -> "FairSlot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self) -> "FairSlot":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class FairBackendSlots:
    """At most max_concurrent requests at llama-server, at most max_queue waiting (each for at
    most its timeout), a freed slot going to the fairest waiter (see the module docstring)."""

    def __init__(self, max_concurrent: int, max_queue: int, *, errors=None):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        errors = errors if errors is not None else sys.modules[__name__]
        self._full = errors.QueueFull
        self._timeout = errors.QueueTimeout
        self._closed_exc = errors.SlotsClosed
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._active = 0
        self._queue = FairQueue(max_queue)
        self._closed = False

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def keys_waiting(self) -> int:
        return self._queue.keys_waiting

    def in_flight(self, key_id: Hashable = DEFAULT_KEY) -> int:
        """Slots key_id holds now."""
        return self._queue.in_flight(key_id)

    def try_acquire(self, key_id: Hashable = DEFAULT_KEY) -> FairSlot | None:
        """A slot now if one is free and nobody waits (no await); None otherwise. Raises
        SlotsClosed at shutdown."""
        if self._closed:
            raise self._closed_exc("shutting down")
        queue = self._queue
        if self._active < self.max_concurrent and not queue._size:   # (every request: no len())
            self._active += 1
            queue.start(key_id)
            return FairSlot(self, key_id)
        return None

    async def acquire(self, timeout: float, key_id: Hashable = DEFAULT_KEY) -> FairSlot:
        """A slot now, or after waiting at most `timeout` seconds for one.
        Raises QueueFull (queue full, or SlotsClosed at shutdown) or QueueTimeout."""
        slot = self.try_acquire(key_id)
        if slot is not None:
            return slot
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        if not self._queue.push(key_id, fut):
            raise self._full(f"{self.max_queue} requests already waiting")
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().release()    # granted as we were cancelled: hand it on
            else:
                fut.cancel()
                self._queue.remove(key_id, fut)
            if isinstance(exc, TimeoutError):
                raise self._timeout(f"no backend slot within {timeout:g} s") from None
            raise

    def _release_one(self, key_id: Hashable) -> None:
        queue = self._queue
        queue.finish(key_id)
        if not queue._size:               # nobody waits (the common case): the slot is free
            if self._active > 0:
                self._active -= 1
            return
        while True:
            nxt = queue.pop()
            if nxt is None:
                self._active = max(0, self._active - 1)
                return
            key, fut = nxt
            if not fut.done():
                fut.set_result(FairSlot(self, key))   # the slot moves on; active stays
                return
            queue.finish(key)             # a waiter cancelled but not yet removed

    def close(self) -> None:
        """Shutdown: turn away every waiter (SlotsClosed) and all later acquires. Running slots
        stay counted until their holders release them."""
        self._closed = True
        for _key, fut in self._queue.clear():
            if not fut.done():
                fut.set_exception(self._closed_exc("shutting down"))
