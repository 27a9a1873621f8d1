"""Access log: one JSON line per request, written off the event loop, rotated by size.

request(ctx) and write(record) never block and do almost nothing on the event loop: they append
a record to a bounded deque without waking anyone. request() takes the line of one finished
request from its RequestContext itself: the wall clock and the context's values, read in one
call (_context_values) into a tuple, which the writer formats with one template
(format_request, ~2 us) instead of a cleaned dict through json (~8 us); both hold the GIL the
event loop needs, so the writer's cost is the loop's cost. This is the hot path, tuned by
measurement (tests/bench/hotpath.py). write() takes any other record: a dict the caller no longer
touches, of which only the ACCESS_FIELDS are kept (anything else, such as a body, is dropped).

A daemon thread wakes every FLUSH_INTERVAL_S, serializes, appends and rotates (api_access.log ->
.1 -> ... -> .N). When the deque is full (the disk is slower than the traffic) the record is
dropped and counted in `dropped`; the count also goes into the log as an
{"outcome": "access_log_dropped", "dropped": n} line once the writer catches up. close() wakes
the writer and flushes with a deadline.

What is never logged: secrets and prompts (no such field exists), and the query string of `path`
(a client may put a key there; the gateway never reads it, and the log does not keep it).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from json.encoder import encode_basestring_ascii as _quote

ACCESS_FIELDS = (
    "time", "request_id", "key_id", "client", "method", "path", "status", "bytes_in",
    "bytes_out", "duration_ms", "ttfb_ms", "stream", "prompt_tokens", "completion_tokens",
    "outcome", "model",
)
# A request's line: `time` is the wall clock when it ended; every other field is the
# RequestContext attribute of the same name, but the durations, which the context keeps in
# seconds (the line has milliseconds).
_IN_SECONDS = {"duration_ms": "duration", "ttfb_ms": "ttfb"}


def _tuple_getter(names: tuple[str, ...]):
    """A function of `obj` returning (obj.a, obj.b, ...) for `names`. Generated, as dataclasses
    generates __init__: the interpreter's specialized attribute loads took 108 ns for the 14
    fields, operator.attrgetter's generic lookups 218 ns (measured, Python 3.11)."""
    return eval("lambda obj: (" + "".join(f"obj.{name}, " for name in names) + ")")


# A finished request's values, read on the event loop in one call (request()).
_context_values = _tuple_getter(tuple(_IN_SECONDS.get(name, name)
                                      for name in ACCESS_FIELDS[1:]))

# 10,000 lines of ~300 bytes = ~3 MB of memory at most while the disk stalls.
DEFAULT_QUEUE_SIZE = 10_000
# 2 KiB per string value: a path is capped far below that by the HTTP parser; anything longer
# is not worth a log line's worth of disk.
MAX_VALUE_CHARS = 2048
# Lines written per batch before a flush: bounds the time a batch holds the file.
BATCH_LINES = 512
# How often the writer thread wakes to write what was queued: one wake per 0.1 s instead of one
# per record (a wake per record was a futex storm and GIL contention on the event loop at
# thousands of requests/s); a line reaches the disk at most ~0.1 s late. close() wakes it at once.
FLUSH_INTERVAL_S = 0.1

_SCALARS = (str, int, float, bool, type(None))
# One encoder for every dict record: json.dumps() with arguments builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
# A tuple record: the line of one request, ACCESS_FIELDS in order. Strings go through json's C
# quoting (escapes, ASCII only), numbers through %-formatting checked for type and finiteness.
_REQUEST_TEMPLATE = "{" + ",".join(
    f'"{name}":%s' for name in ACCESS_FIELDS) + "}\n"
# A finite float's magnitude is below this; NaN fails every comparison.
_FINITE = 1e300
# Memos of quoted string fields (_quoted), paths apart (their query string is cut). Bounded in
# count and in the length of what they keep (a path may be 8 KiB): past either, values are
# quoted each time (many distinct client addresses, long or random paths).
_QUOTED: dict[str, str] = {}
_QUOTED_PATHS: dict[str, str] = {}
_QUOTED_MAX = 4096
_QUOTED_MEMO_LEN = 256

log = logging.getLogger("gateway.accesslog")


def clean_record(record: dict) -> dict:
    """Only the fixed fields, in a fixed order, scalar values, no query string."""
    out = {}
    for name in ACCESS_FIELDS:
        if name not in record:
            continue
        value = record[name]
        if not isinstance(value, _SCALARS):
            continue  # a dict or list here would be a body by mistake: drop it
        if isinstance(value, float) and (value != value or value in (float("inf"), -float("inf"))):
            value = None
        if isinstance(value, str):
            if name == "path":
                value = value.split("?", 1)[0]
            value = value[:MAX_VALUE_CHARS]
        out[name] = value
    return out


def _ms(seconds) -> str:
    """Seconds as milliseconds (rounded to the microsecond), or null."""
    if seconds is None:
        return "null"
    if type(seconds) not in (int, float):
        raise ValueError("not a number")
    ms = seconds * 1000
    if not -_FINITE < ms < _FINITE:
        raise ValueError("not a finite number")
    return "%.3f" % ms


def _count(value) -> str:
    if value is None:
        return "null"
    if type(value) is not int:
        raise ValueError("not an int")
    return "%d" % value


def _quoted(value: str, memo: dict[str, str]) -> str:
    """A string field as JSON (capped), memoized: key ids, client addresses, methods, paths and
    outcomes repeat from line to line."""
    quoted = memo.get(value)
    if quoted is None:
        cut = value.split("?", 1)[0] if memo is _QUOTED_PATHS else value
        quoted = _quote(cut[:MAX_VALUE_CHARS])
        if len(memo) < _QUOTED_MAX and len(value) <= _QUOTED_MEMO_LEN:
            memo[value] = quoted
    return quoted


def format_request(when: float, values: tuple) -> str:
    """One JSON line from the wall-clock time and a request's values as _context_values reads
    them (ACCESS_FIELDS after `time`, in order; durations in seconds). ValueError/TypeError when
    a value has an unexpected type (the caller then takes the general path, request_dict)."""
    (request_id, key_id, client, method, path, status, bytes_in, bytes_out, duration,
     ttfb, stream, prompt_tokens, completion_tokens, outcome, model) = values
    if type(when) is not float or not 0.0 <= when < _FINITE:
        raise ValueError("time")
    if type(status) is not int or type(bytes_in) is not int or type(bytes_out) is not int:
        raise ValueError("status/bytes")
    if type(stream) is not bool:
        raise ValueError("stream")
    if type(key_id) is not str or type(client) is not str or type(method) is not str \
            or type(path) is not str or type(outcome) is not str:
        raise TypeError("string fields")
    q = _QUOTED.get          # a quoted string is never empty: `or` means "not memoized yet"
    return _REQUEST_TEMPLATE % (
        "%.6f" % when, _quote(request_id[:MAX_VALUE_CHARS]),
        q(key_id) or _quoted(key_id, _QUOTED), q(client) or _quoted(client, _QUOTED),
        q(method) or _quoted(method, _QUOTED),
        _QUOTED_PATHS.get(path) or _quoted(path, _QUOTED_PATHS),
        "%d" % status, "%d" % bytes_in, "%d" % bytes_out, _ms(duration), _ms(ttfb),
        "true" if stream else "false", _count(prompt_tokens), _count(completion_tokens),
        q(outcome) or _quoted(outcome, _QUOTED),
        "null" if model is None else q(model) or _quoted(model, _QUOTED))


def request_dict(when, values: tuple) -> dict:
    """A request's record as a dict of ACCESS_FIELDS (durations in ms), for clean_record."""
    record = dict(zip(ACCESS_FIELDS, (when, *values)))
    for name in _IN_SECONDS:
        value = record[name]
        if type(value) in (int, float):
            record[name] = value * 1000
    return record


def _line(record) -> str:
    """A queued record as one line: a request's (time, values) by the template, dicts cleaned."""
    if type(record) is tuple:
        when, values = record
        try:
            return format_request(when, values)
        except (ValueError, TypeError, AttributeError):
            record = request_dict(when, values)
    return _ENCODER.encode(clean_record(record)) + "\n"


class AccessLog:
    def __init__(self, path: str, *, max_bytes: int, backups: int,
                 queue_size: int = DEFAULT_QUEUE_SIZE, clock=time.time):
        if max_bytes < 1 or backups < 0 or queue_size < 1:
            raise ValueError("max_bytes and queue_size must be >= 1, backups >= 0")
        self.path = path
        self.clock = clock        # the wall clock of a request's `time`
        self.max_bytes = max_bytes
        self.backups = backups
        self.dropped = 0          # records refused because the queue was full (or after close)
        self.write_errors = 0     # records lost to disk errors
        self.written = 0
        self._queue_size = queue_size
        # Raw records from the event loop; deque append/popleft are atomic, so no lock is taken.
        self._pending: collections.deque[dict | tuple] = collections.deque()
        self._closing = threading.Event()
        self._closed = False
        self._reported_dropped = 0
        self._fh = None
        self._size = 0
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    # -- caller side (event loop) --------------------------------------------------------------
    def request(self, ctx) -> None:
        """Queue the line of one finished request, read from its RequestContext now (the
        context may change or go after); never blocks, wakes no thread."""
        if self._closed or len(self._pending) >= self._queue_size:
            self.dropped += 1
            return
        self._pending.append((self.clock(), _context_values(ctx)))

    def write(self, record: dict) -> None:
        """Queue one record; never blocks, wakes no thread. Its unknown fields are dropped (by
        the writer). The caller must not change it afterwards."""
        if self._closed or len(self._pending) >= self._queue_size:
            self.dropped += 1
            return
        self._pending.append(record)

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued and stop, waiting at most `timeout` seconds."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            log.warning("access log: writer did not finish within %.1f s; %d line(s) may be lost",
                        timeout, len(self._pending))

    # -- writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        pending = self._pending
        while True:
            stop = self._closing.wait(FLUSH_INTERVAL_S)
            while pending:
                batch = []
                while pending and len(batch) < BATCH_LINES:
                    record = pending.popleft()
                    try:
                        batch.append(_line(record))
                    except Exception:      # not a dict: a caller's bug; never kill the writer
                        self.write_errors += 1
                self._write_batch(batch)
            if self.dropped != self._reported_dropped:
                self._write_batch([])
            if stop:
                break
        self._close_file()

    def _write_batch(self, lines: list[str]) -> None:
        """Append formatted lines (and a dropped-records line when records were dropped)."""
        dropped = self.dropped
        if dropped != self._reported_dropped:
            lines.append(json.dumps({"time": time.time(), "outcome": "access_log_dropped",
                                     "dropped": dropped}, separators=(",", ":")) + "\n")
            self._reported_dropped = dropped
        if lines and self._fh is not None:
            # The whole batch in one write when it fits before the rotation size.
            data = "".join(lines).encode("ascii")
            if self._size + len(data) <= self.max_bytes:
                try:
                    self._fh.write(data)
                    self._size += len(data)
                    self.written += len(lines)
                    lines = []
                except OSError:
                    self._close_file()      # the lines are retried one by one below
        for line in lines:
            data = line.encode("ascii")
            try:
                self._ensure_room(len(data))
                self._fh.write(data)
                self._size += len(data)
                self.written += 1
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors in (1, 10, 100) or self.write_errors % 1000 == 0:
                    log.error("access log %s: %s (%d line(s) lost so far)", self.path, exc,
                              self.write_errors)
                self._close_file()
        try:
            if self._fh is not None:
                self._fh.flush()
        except OSError:
            self._close_file()

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fh = open(self.path, "ab", buffering=65536)
        self._size = os.fstat(self._fh.fileno()).st_size

    def _ensure_room(self, nbytes: int) -> None:
        if self._fh is None:
            self._open()
        if self._size > 0 and self._size + nbytes > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._close_file()
        if self.backups == 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _close_file(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
