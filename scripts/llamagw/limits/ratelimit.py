"""Per-key limits and the global queue to llama-server.

- RateLimiter: requests per minute per key_id, a token bucket. Pure: the clock is an argument and
  check() tests and consumes in one synchronous call (no await between the check and the use).
- KeyConcurrency: requests in flight per key_id, answered at once (no waiting).
- QueueFull, QueueTimeout, SlotsClosed: how a wait for llama-server's slots ends without one
  (the slots themselves: limits/fairqueue.py, fair between keys, FIFO within a key).

Token bucket semantics (what the headers mean):
  The bucket holds `limit` = rpm tokens and refills continuously at rpm/60 tokens per second, so a
  burst of rpm requests passes at once and after that one request every 60/rpm seconds.
  X-RateLimit-Limit      rpm
  X-RateLimit-Remaining  whole tokens left after this request
  X-RateLimit-Reset      seconds (ceil) until the bucket is full again
  Retry-After            on refusal: seconds (ceil, >= 1) until one token is there
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SECONDS_PER_MINUTE = 60.0
# Float refills accumulate rounding error: 60/7 s of refill may yield 0.9999999999 tokens.
# Anything within this of a whole token counts as the token (1e-9 of a request is nothing).
TOKEN_EPSILON = 1e-9


class RateDecision:
    """One check's outcome (made once per request: a plain slotted class, ~4x cheaper to build
    than a frozen dataclass)."""

    __slots__ = ("allowed", "limit", "remaining", "reset_s", "retry_after_s")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_s: int,
                 retry_after_s: int):
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s
        self.retry_after_s = retry_after_s   # 0 when allowed

    def __eq__(self, other) -> bool:
        if not isinstance(other, RateDecision):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return "RateDecision(%s)" % ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token bucket per key_id. State exists only for key_ids the caller checks (known keys, after
    authentication); retain() drops the state of keys removed by a reload."""

    def __init__(self, default_rpm: int):
        if default_rpm < 1:
            raise ValueError("default_rpm must be >= 1")
        self.default_rpm = default_rpm
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key_id: str, now: float, rpm: int | None = None) -> RateDecision:
        """Take one token for key_id if there is one. `now` is a monotonic time in seconds."""
        limit = rpm if rpm is not None and rpm >= 1 else self.default_rpm
        rate = limit / SECONDS_PER_MINUTE
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(float(limit), now)
        elapsed = now - bucket.stamp
        tokens = bucket.tokens
        if elapsed > 0.0:                      # a clock step backwards refills nothing
            tokens += elapsed * rate
        if tokens > limit:                     # also shrinks at once when a reload lowers rpm
            tokens = float(limit)
        bucket.stamp = now
        if tokens + TOKEN_EPSILON >= 1.0:
            tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            allowed, retry_after = True, 0
        else:
            allowed = False
            retry_after = max(1, math.ceil((1.0 - tokens) / rate - TOKEN_EPSILON))
        bucket.tokens = tokens
        missing = limit - tokens
        reset = 0 if missing <= TOKEN_EPSILON else max(1, math.ceil(missing / rate
                                                                     - TOKEN_EPSILON))
        remaining = int(tokens + TOKEN_EPSILON)    # floor of a non-negative number
        return RateDecision(allowed, limit, remaining, reset, retry_after)

    def last_seen(self, key_id: str) -> float | None:
        """The `now` of the key's latest check (its last request, allowed or not), or None."""
        bucket = self._buckets.get(key_id)
        return None if bucket is None else bucket.stamp

    def retain(self, key_ids: Iterable[str]) -> None:
        """Keep state only for these key_ids (call after a key reload)."""
        keep = set(key_ids)
        for key_id in [k for k in self._buckets if k not in keep]:
            del self._buckets[key_id]

    def __len__(self) -> int:
        return len(self._buckets)


class KeyConcurrency:
    """Requests in flight per key_id. A counter exists only while a key has requests in flight,
    so memory is bounded by the requests in flight."""

    def __init__(self, default_cap: int):
        if default_cap < 1:
            raise ValueError("default_cap must be >= 1")
        self.default_cap = default_cap
        self._counts: dict[str, int] = {}

    def try_acquire(self, key_id: str, cap: int | None = None) -> bool:
        limit = cap if cap is not None and cap >= 1 else self.default_cap
        count = self._counts.get(key_id, 0)
        if count >= limit:
            return False
        self._counts[key_id] = count + 1
        return True

    def release(self, key_id: str) -> None:
        """Give back one request of key_id. Releasing more than was acquired is ignored (the
        counter never goes negative); limits/admission.py's Ticket is the idempotent handle."""
        count = self._counts.get(key_id, 0)
        if count <= 1:
            self._counts.pop(key_id, None)
        else:
            self._counts[key_id] = count - 1

    def in_flight(self, key_id: str) -> int:
        return self._counts.get(key_id, 0)

    def __len__(self) -> int:
        return len(self._counts)


class QueueFull(Exception):
    """No room in the wait queue: refuse at once (503)."""


class QueueTimeout(Exception):
    """Waited the whole timeout without getting a slot (503)."""


class SlotsClosed(QueueFull):
    """Shutting down: waiters are turned away and no new slot is granted."""
