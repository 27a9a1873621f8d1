"""Token budgets per key: tpm (tokens per minute) and tpd (tokens per day), prompt + completion.

Pure and synchronous, one event loop, the clock injected (wall-clock epoch seconds: the day is a
UTC day). The gateway calls check() when a request arrives and charge() when it ends:

    decision = budget.check(key_id, TokenLimits(tpm=..., tpd=...))
    headers += decision.headers()          # X-RateLimit-Limit-Tokens / -Remaining-Tokens
    if not decision.allowed: 429 with decision.retry_after_s
    ... the request runs ...
    budget.charge(key_id, prompt + completion)     # a cut stream: what was generated

Admission rule: a request is admitted while the key is UNDER its budget (used < limit), counted
from finished requests only. So requests that start while the key is under budget all run, and a
key can overshoot by what its requests in flight generate (bounded by its concurrency cap times
the request size); the next requests are refused until enough budget frees. The gateway cannot
know a request's size before it runs, so no reservation is made.

Windows:
- minute: a sliding window of the last 60 whole seconds, kept as 60 per-second buckets per key
  (a ring: fixed memory whatever the request rate). Tokens charged during second s count until
  second s + 60 begins. Retry-After: seconds until enough buckets expire for the key to be under
  the limit again.
- day: the UTC calendar day (00:00 UTC to 00:00 UTC), not a rolling 24 h. Chosen because it is
  what the ledger's group=day reports (an operator can check a refusal against /admin/usage), it
  is what "the day's usage" survives a restart as (seed() from the ledger since day_start()), and
  it is one counter per key. Its cost: a key can spend tpd just before midnight and tpd again just
  after. Retry-After: seconds until the next UTC midnight.

Headers (on every keyed response of a key with a token limit): X-RateLimit-Limit-Tokens and
X-RateLimit-Remaining-Tokens of the window with the fewest tokens left (the binding one), the
remaining count as of admission (before this request's own tokens). A refusal adds Retry-After:
the longest wait over the windows that are spent (all of them must free). Keys without tpm/tpd get
no headers and cost one dict lookup.

Memory: per key charged, one small object with a 60-int ring, only for keys the caller charges
(known keys after authentication); retain() drops keys removed by a reload, and at most
MAX_TRACKED_KEYS keys are tracked (a key file of 1 MiB holds ~5,000 keys).

A clock that steps backwards expires nothing and never un-charges; past the window's length the
ring is re-anchored at the new time (what it held expires within the next minute). A day that
steps backwards keeps the later day's count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

# The minute window: 60 one-second buckets.
WINDOW_S = 60
SECONDS_PER_DAY = 86_400
# At most this many keys have state: keys.py's 1 MiB key file holds ~5,000; this is a backstop
# against a caller that charges client-chosen ids (the rest are not tracked, and counted).
MAX_TRACKED_KEYS = 100_000


class TokenLimits(NamedTuple):
    """A key's token limits from the key file (tpm=N tpd=N); None: no such limit."""
    tpm: int | None = None
    tpd: int | None = None


NO_LIMITS = TokenLimits()


class TokenDecision:
    """One check's outcome. limit / remaining are those of the binding window (None when the
    key has no token limit); retry_after_s is 0 when allowed, else whole seconds >= 1."""

    __slots__ = ("allowed", "retry_after_s", "limit", "remaining", "window")

    def __init__(self, allowed: bool, retry_after_s: int, limit: int | None,
                 remaining: int | None, window: str | None):
        self.allowed = allowed
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.remaining = remaining
        self.window = window          # "minute", "day" or None

    def __eq__(self, other) -> bool:
        if not isinstance(other, TokenDecision):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return "TokenDecision(%s)" % ", ".join(f"{n}={getattr(self, n)!r}"
                                               for n in self.__slots__)

    def headers(self) -> list[tuple[str, str]]:
        """x-ratelimit-limit-tokens / x-ratelimit-remaining-tokens (none without a limit), and
        retry-after on refusal."""
        if self.limit is None:
            return []
        out = [("x-ratelimit-limit-tokens", str(self.limit)),
               ("x-ratelimit-remaining-tokens", str(self.remaining))]
        if not self.allowed:
            out.append(("retry-after", str(self.retry_after_s)))
        return out


UNLIMITED = TokenDecision(True, 0, None, None, None)


class _Usage:
    """One key: the minute ring and the day's count."""
    __slots__ = ("ring", "sec", "minute", "day", "day_tokens")

    def __init__(self, sec: int, day: int):
        self.ring = [0] * WINDOW_S    # ring[s % 60]: tokens charged during second s
        self.sec = sec                # the newest second the ring holds
        self.minute = 0               # sum of the ring
        self.day = day                # UTC day number (epoch // 86400) of day_tokens
        self.day_tokens = 0

    def advance(self, sec: int) -> None:
        """Move the ring to second `sec`: buckets older than the window are emptied."""
        gap = sec - self.sec
        if gap <= 0:
            if gap <= -WINDOW_S:      # the clock stepped back past the window: re-anchor
                self.sec = sec        # there; what was counted expires within a minute
            return                    # same second, or a small step back: nothing expires
        ring = self.ring
        if gap >= WINDOW_S:
            if self.minute:
                ring[:] = [0] * WINDOW_S
                self.minute = 0
        elif self.minute:
            for s in range(self.sec + 1, sec + 1):
                i = s % WINDOW_S
                if ring[i]:
                    self.minute -= ring[i]
                    ring[i] = 0
        self.sec = sec

    def roll_day(self, day: int) -> None:
        if day > self.day:
            self.day = day
            self.day_tokens = 0

    def minute_retry(self, limit: int, now: float) -> int:
        """Seconds until the window's sum is under `limit`, nothing more being charged."""
        used = self.minute
        freed = 0
        ring = self.ring
        for s in range(self.sec - WINDOW_S + 1, self.sec + 1):
            freed += ring[s % WINDOW_S]
            if used - freed < limit:
                return max(1, math.ceil(s + WINDOW_S - now))
        return WINDOW_S               # unreachable: once all expire, used is 0 < limit


def day_number(now: float) -> int:
    return int(now // SECONDS_PER_DAY)


class TokenBudget:
    """tpm / tpd per key_id; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._keys: dict[str, _Usage] = {}
        self.untracked = 0            # charges refused for want of room (MAX_TRACKED_KEYS)

    def _state(self, key_id: str, now: float) -> _Usage | None:
        usage = self._keys.get(key_id)
        if usage is None:
            if len(self._keys) >= MAX_TRACKED_KEYS:
                return None
            usage = self._keys[key_id] = _Usage(int(now), day_number(now))
        return usage

    def check(self, key_id: str, limits: TokenLimits | None,
              now: float | None = None) -> TokenDecision:
        """May key_id start a request now? Never charges anything."""
        if limits is None or (limits.tpm is None and limits.tpd is None):
            return UNLIMITED
        if now is None:
            now = self.clock()
        usage = self._keys.get(key_id)
        minute_used = day_used = 0
        if usage is not None:
            usage.advance(int(now))
            usage.roll_day(day_number(now))
            minute_used = usage.minute
            day_used = usage.day_tokens
        allowed = True
        retry = 0
        best: tuple[int, int, str] | None = None      # (remaining, limit, window)
        tpm, tpd = limits.tpm, limits.tpd
        if tpm is not None:
            remaining = max(0, tpm - minute_used)
            best = (remaining, tpm, "minute")
            if minute_used >= tpm:
                allowed = False
                wait = usage.minute_retry(tpm, now) if usage is not None else WINDOW_S
                retry = max(retry, wait)
        if tpd is not None:
            remaining = max(0, tpd - day_used)
            if best is None or remaining < best[0]:
                best = (remaining, tpd, "day")
            if day_used >= tpd:
                allowed = False
                next_day = (day_number(now) + 1) * SECONDS_PER_DAY
                retry = max(retry, max(1, math.ceil(next_day - now)))
        return TokenDecision(allowed, retry, best[1], best[0], best[2])

    def charge(self, key_id: str, tokens: int, at: float | None = None) -> None:
        """Count `tokens` (prompt + completion) of a request that ended at `at` (default now).
        A charge older than the minute window counts for its day only; one of an earlier UTC
        day counts for nothing."""
        if tokens is None or tokens <= 0:
            return
        now = self.clock()
        at = now if at is None else at
        usage = self._state(key_id, now)
        if usage is None:
            self.untracked += 1
            return
        tokens = int(tokens)
        usage.advance(int(now))
        sec = min(int(at), usage.sec)                  # a charge from the future: now
        if sec > usage.sec - WINDOW_S:                 # inside the minute window
            usage.ring[sec % WINDOW_S] += tokens
            usage.minute += tokens
        usage.roll_day(day_number(now))
        if day_number(at) >= usage.day:
            usage.day_tokens += tokens

    def seed(self, day_tokens: Mapping[str, int],
             minute_tokens: Mapping[str, int] | None = None, at: float | None = None) -> None:
        """At start: each key's tokens so far today (usage.tokens_since(own ledger file,
        day_start())), replacing what is counted. minute_tokens (optional, tokens_since of the
        last 60 s) are put in the current second, so they count for a whole minute from now."""
        now = self.clock() if at is None else at
        day = day_number(now)
        for key_id, tokens in day_tokens.items():
            usage = self._state(key_id, now)
            if usage is None:
                self.untracked += 1
                continue
            usage.roll_day(day)
            usage.day_tokens = max(0, int(tokens))
        for key_id, tokens in (minute_tokens or {}).items():
            usage = self._state(key_id, now)
            if usage is not None and tokens > 0:
                usage.advance(int(now))
                usage.ring[int(now) % WINDOW_S] += int(tokens)
                usage.minute += int(tokens)

    def used(self, key_id: str, now: float | None = None) -> tuple[int, int]:
        """(tokens in the minute window, tokens today) of key_id."""
        usage = self._keys.get(key_id)
        if usage is None:
            return 0, 0
        now = self.clock() if now is None else now
        usage.advance(int(now))
        usage.roll_day(day_number(now))
        return usage.minute, usage.day_tokens

    def day_start(self, now: float | None = None) -> float:
        """Epoch seconds of this UTC day's 00:00 (the `since` of the seed query)."""
        now = self.clock() if now is None else now
        return float(day_number(now) * SECONDS_PER_DAY)

    def retain(self, key_ids: Iterable[str]) -> None:
        """Keep state only for these key_ids (call after a key reload)."""
        keep = set(key_ids)
        for key_id in [k for k in self._keys if k not in keep]:
            del self._keys[key_id]

    def __len__(self) -> int:
        return len(self._keys)
