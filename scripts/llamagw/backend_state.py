"""The backend state: what the supervisor says of llama-server, read by the gateway and the health
server. The one statement of that contract; entrypoint.sh writes the file.

The file is Config.health_file ($RUN_DIR/health): one word and a newline, replaced atomically
(a temporary file renamed over it), so that a reader never sees it empty or half-written. Its
life: starting -> ready -> (starting while llama-server restarts) -> ... -> failed | stopping.

    starting   llama-server is loading or restarting (health 204; API calls 503 + Retry-After)
    ready      llama-server answers (health 200 once the gateway port accepts too)
    failed     the supervisor gave up restarting (health 503; the platform replaces the worker)
    stopping   SIGTERM: draining (health 503)

A reader takes anything else (unreadable, half a word, another word) as `starting`: the safe
answer, since the next write comes soon. A missing file is the caller's choice (`missing`): the
health server reads it as `starting` (the supervisor writes the file before it starts the health
server), the gateway as UNKNOWN: no supervisor (a llama-server started by hand), and requests go
through.

Imported by the health server: standard library only, nothing heavy.
"""

from __future__ import annotations

import enum
import time


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    UNKNOWN = "unknown"         # no state file: no supervisor (never written to the file)


# The words entrypoint.sh writes.
WRITTEN = {s.value: s for s in (State.STARTING, State.READY, State.FAILED, State.STOPPING)}
# States in which the gateway sends requests on to llama-server.
TAKES_REQUESTS = frozenset({State.READY, State.UNKNOWN})
# The file holds one short word; a read never takes more.
MAX_STATE_BYTES = 64
# How long the gateway trusts a state it read (seconds): requests share one read.
STATE_FILE_TTL = 0.5


def read_state(path: str, missing: State = State.STARTING) -> State:
    """The state in the file at `path` now: `missing` when there is no file, STARTING when it
    cannot be read or holds no known word."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES)
    except FileNotFoundError:
        return missing
    except OSError:
        return State.STARTING
    return WRITTEN.get(raw.strip().decode("ascii", "replace"), State.STARTING)


class BackendState:
    """The gateway's reader: read_state with a missing file as UNKNOWN, a read trusted for `ttl`
    (get), and a re-read at once wherever a cached state would refuse a request (serving) or
    the caller has reason to doubt it (refresh: llama-server refused a connection)."""

    def __init__(self, path: str, clock=time.monotonic, ttl: float = STATE_FILE_TTL):
        self.path = path
        self.clock = clock
        self.ttl = ttl
        self._value = State.UNKNOWN
        self._read_at = -1e9

    def get(self) -> State:
        """The state, read at most once per `ttl`."""
        now = self.clock()
        if now - self._read_at >= self.ttl:
            self._read_at = now
            self._value = read_state(self.path, State.UNKNOWN)
        return self._value

    def refresh(self) -> State:
        """The state read now, whatever the cached value's age (one read per call)."""
        self._read_at = -1e9
        return self.get()

    def serving(self) -> State:
        """The state to admit a request by. A cached state that takes requests is trusted for
        `ttl`; one that refuses is re-read first, so the first request after the supervisor
        writes `ready` goes through. That is one small read per refused request, which the
        gateway's admission bounds."""
        state = self.get()
        if state in TAKES_REQUESTS:
            return state
        return self.refresh()
