"""Usage ledger: one SQLite row per finished keyed request, written off the event loop.

Who used what. Each worker appends to its own file, $DATA_DIR/usage/<host>.sqlite (usage_path):
DATA_DIR may be a network volume that many workers share, and SQLite wants one writer per file.
Readers (query, tokens_since, the admin route, `keys.py usage`) open every *.sqlite in that folder
read-only and add the results up.

What a row holds (UsageRecord): time (epoch seconds at the end of the request), request id,
key_id, model, route, status, outcome, prompt / completion / cached tokens (None when unknown),
duration and time to first byte in ms, bytes in and out. Never a prompt, never a secret: no such
field exists. Text fields are cut to a bound in SQL (MAX_*_CHARS) so a client-chosen model name
cannot grow a row.

Caller side (the event loop): Ledger.record(rec) appends to a deque, O(1), no lock, no wake, no
disk; rec is a UsageRecord or, cheaper to build, a plain tuple of the same values in
RECORD_FIELDS order (a malformed one is dropped and counted by the writer, never raised). Past
max_pending rows waiting (the disk is slower than the traffic, or failing) the row is dropped
and counted. Construction touches no disk either: the writer thread creates the folder
and opens the file.

Writer thread: wakes every flush_interval (<= 1 s), drains the deque in transactions of at most
batch_rows rows (executemany), applies retention once a day, and reports drops. So after kill -9
at most the rows of the last flush interval (and of a batch being written) are lost, and the file
opens cleanly: SQLite's journal rolls back a half-written transaction. close() (SIGTERM) writes
everything pending before it returns.

Journal: WAL with synchronous=NORMAL. WAL because the writer appends to the log and readers
(queries from any worker) read a snapshot without blocking it, and a commit is one sequential
write; NORMAL because in WAL mode it fsyncs at checkpoints, not at every commit, and is still safe
against a process crash (kill -9 loses nothing committed: the pages are in the OS cache) and never
corrupts the file; only an OS crash or power cut can lose the last commits, which for a usage
ledger is the same loss as the flush interval. FULL would fsync every batch, which on a network
volume costs tens of ms per second for nothing a crashed worker needs. At close() the file is
switched back to journal_mode=DELETE, so a stopped worker's file is one self-contained file that a
read-only reader (another host, a read-only mount, an operator without write access) can open
without creating -wal/-shm files next to it. WAL needs shared memory between the writer and its
readers: a reader on ANOTHER host of a network volume reads a live worker's file without that
coordination (SQLite's documented limit); pass journal_mode="delete" for such deployments (readers
then take a shared lock for the few ms of a query and the writer waits up to BUSY_TIMEOUT_S).

Failures (disk full, read-only, locked past the busy timeout, I/O error): never raised to the
caller. The failed batch is dropped and counted, the connection is closed and reopened after a
backoff (REOPEN_BACKOFF_*), requests go on being served. `dropped` counts every row lost (queue
full, write failure, a malformed record, record() after close()); on_drop(n) is called with each
loss (from the thread that saw it); the log gets one line at once and then at most one line per
log_interval with the count. A file SQLite calls corrupt or not a database is renamed aside
(<name>.corrupt-<epoch>) and a fresh one started, so one bad file never stops the ledger.

Schema: versioned with PRAGMA user_version; MIGRATIONS[n] takes a file from version n to n+1 in
one transaction (with the version bump). Migrations only add (tables, columns, indexes), so a
reader of an older build can still read a newer file's columns it knows. A file newer than this
build (user_version > SCHEMA_VERSION) is not written (rows dropped and logged) and is still read
by queries. To add v3: append a tuple of statements to MIGRATIONS; nothing else changes.

Retention: rows older than retention_days (default RETENTION_DAYS) are deleted by the writer when
it first opens the file and then every RETENTION_INTERVAL_S of the injected clock, in
transactions of RETENTION_CHUNK_ROWS rows (index on time) with pending rows written between
chunks, so a large first cleanup never stalls the ledger.

Queries (query, tokens_since, to_csv, parse_time) are synchronous and read files: call them from a
thread (asyncio.to_thread) in the gateway, never on the event loop.

Layout: this module holds the writer (Ledger) and its limits; observe/usage_schema.py the row,
the schema, migrations and paths; observe/usage_query.py the readers (query, tokens_since,
to_csv, parse_time). Their public names are importable from here.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable

from llamagw.observe.usage_query import (
    COUNT_FIELDS, GROUP_FIELD, GROUPS, MAX_QUERY_FILES, MTIME_SLACK_S, QUERY_BUSY_TIMEOUT_S,
    iso_utc, ledger_files, parse_time, query, to_csv, tokens_since,
)
from llamagw.observe.usage_schema import (
    _DATA_ERRORS, _INSERT, FILE_SUFFIX, MAX_HOST_CHARS, MAX_KEY_ID_CHARS, MAX_MODEL_CHARS,
    MAX_OUTCOME_CHARS, MAX_REQUEST_ID_CHARS, MAX_ROUTE_CHARS, MIGRATIONS, RECORD_FIELDS,
    SCHEMA_VERSION, SchemaError, UsageRecord, _rollback, _values, migrate, usage_dir, usage_path,
)

__all__ = [
    "Ledger", "FLUSH_INTERVAL_S", "MAX_FLUSH_INTERVAL_S", "MAX_PENDING", "BATCH_ROWS",
    "RETENTION_DAYS", "RETENTION_INTERVAL_S", "RETENTION_RETRY_S", "RETENTION_CHUNK_ROWS",
    "BUSY_TIMEOUT_S", "REOPEN_BACKOFF_INITIAL_S", "REOPEN_BACKOFF_MAX_S", "LOG_INTERVAL_S",
    "JOURNAL_SIZE_LIMIT_BYTES",
    "COUNT_FIELDS", "GROUP_FIELD", "GROUPS", "MAX_QUERY_FILES", "MTIME_SLACK_S",
    "QUERY_BUSY_TIMEOUT_S", "iso_utc", "ledger_files", "parse_time", "query", "to_csv",
    "tokens_since",
    "FILE_SUFFIX", "MAX_HOST_CHARS", "MAX_KEY_ID_CHARS", "MAX_MODEL_CHARS", "MAX_OUTCOME_CHARS",
    "MAX_REQUEST_ID_CHARS", "MAX_ROUTE_CHARS", "MIGRATIONS", "RECORD_FIELDS", "SCHEMA_VERSION",
    "SchemaError", "UsageRecord", "migrate", "usage_dir", "usage_path",
]

log = logging.getLogger("gateway.usage")

# The writer wakes this often: the rows of one interval are what kill -9 may lose (the issue
# allows one second). 0.25 s: four small transactions a second, each a few ms at 2,000 req/s.
FLUSH_INTERVAL_S = 0.25
# Upper bound on flush_interval: the "at most the last second lost".
MAX_FLUSH_INTERVAL_S = 1.0
# Rows waiting for the writer. 20,000 = 10 s of the 2,000 req/s bench rate, ~4 MB of records:
# enough to ride out a slow disk or a reopen backoff, small enough to never matter for memory.
MAX_PENDING = 20_000
# Rows per transaction: bounds how long one commit holds the file's write lock and the GIL
# hand-offs of one executemany (~5 ms per 1,000 rows).
BATCH_ROWS = 1_000
# Default retention (the USAGE_RETENTION_DAYS default).
RETENTION_DAYS = 90
# Retention runs once a day (on the injected clock), at first open and then every 24 h.
RETENTION_INTERVAL_S = 86_400.0
# A failed retention (locked, disk error) is tried again after an hour, not a day.
RETENTION_RETRY_S = 3_600.0
# Rows deleted per retention transaction: a first cleanup of millions of rows must not hold the
# write lock (and keep new rows waiting) for seconds.
RETENTION_CHUNK_ROWS = 5_000
# SQLite busy timeout: the writer is the file's only writer, so only a reader's lock (rollback
# journal) or a checkpoint can make it wait; a query takes milliseconds.
BUSY_TIMEOUT_S = 2.0

# After a failed open or write the writer waits before trying the file again: from 1 s doubling
# to 30 s, so a read-only or full disk costs one failed attempt per 30 s, not 4 per second.
REOPEN_BACKOFF_INITIAL_S = 1.0
REOPEN_BACKOFF_MAX_S = 30.0
# One log line at once, then at most one per minute while rows keep being dropped.
LOG_INTERVAL_S = 60.0
# The -wal file is truncated back to this after a checkpoint (it otherwise keeps its peak size).
JOURNAL_SIZE_LIMIT_BYTES = 4 << 20


def _default_connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)


class Ledger:
    """Batched, bounded, never-blocking usage writer for one file (see the module docstring).

    record() is meant for one thread (the event loop), and close() for that same thread (the
    SIGTERM path), so that no row slips in after the writer's last pass uncounted; the rest may
    be called from any thread. `dropped` and `written` may be read at any time (a metric reads
    them when scraped)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time,
                 flush_interval: float = FLUSH_INTERVAL_S, max_pending: int = MAX_PENDING,
                 batch_rows: int = BATCH_ROWS, retention_days: float | None = RETENTION_DAYS,
                 journal_mode: str = "wal", on_drop: Callable[[int], None] | None = None,
                 log_interval: float = LOG_INTERVAL_S,
                 connect: Callable[[str], sqlite3.Connection] | None = None):
        if not 0.0 < flush_interval <= MAX_FLUSH_INTERVAL_S:
            raise ValueError(f"flush_interval must be in (0, {MAX_FLUSH_INTERVAL_S:g}] s")
        if max_pending < 1 or batch_rows < 1:
            raise ValueError("max_pending and batch_rows must be >= 1")
        if retention_days is not None and retention_days <= 0:
            raise ValueError("retention_days must be > 0 (or None to keep everything)")
        if journal_mode.lower() not in ("wal", "delete", "truncate", "persist"):
            raise ValueError("journal_mode must be wal, delete, truncate or persist")
        self.path = path
        self.clock = clock
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.batch_rows = batch_rows
        self.retention_days = retention_days
        self.journal_mode = journal_mode.lower()
        self.on_drop = on_drop
        self.log_interval = log_interval
        self._connect = connect or _default_connect
        # Counters. Each is written by one thread only (no lost updates without a lock).
        self._dropped_caller = 0      # caller thread: queue full, or record() after close()
        self._dropped_writer = 0      # writer thread: failed batches, malformed records
        self.written = 0              # rows committed
        self.invalid = 0              # malformed records dropped (part of dropped)
        self.retention_deleted = 0    # rows deleted by retention
        self.write_failures = 0       # failed opens / batches / retention runs
        self.writer_cpu_s = 0.0       # writer thread CPU time (bench: its cost per row)
        self.last_error: str | None = None
        # State.
        self._pending: collections.deque[UsageRecord] = collections.deque()
        self._closed = False          # no more record(); set by close()
        self._stopping = False        # the writer's last pass
        self._wake = threading.Event()
        self._cv = threading.Condition()
        self._pass_started = 0
        self._pass_done = 0
        self._conn: sqlite3.Connection | None = None
        self._retry_at = 0.0          # monotonic time before which no open is tried
        self._backoff = 0.0
        self._next_retention: float | None = None   # clock() time; None: at first open
        self._logged_dropped = 0
        self._next_log = 0.0
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------------
    def record(self, rec: UsageRecord | tuple) -> None:
        """Queue one row: a UsageRecord, or a tuple of its values in RECORD_FIELDS order (the
        cheaper form for the gateway's per-request call). O(1), never blocks, never raises,
        touches no disk. The caller must not change it afterwards."""
        if self._closed or len(self._pending) >= self.max_pending:
            self._dropped_caller += 1
            hook = self.on_drop
            if hook is not None:
                try:
                    hook(1)
                except Exception:
                    pass
            return
        self._pending.append(rec)

    @property
    def dropped(self) -> int:
        """Rows lost in all: queue full, write failures, malformed records, after close."""
        return self._dropped_caller + self._dropped_writer

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait for a writer pass that began after this call: every row recorded before it is
        then written or dropped (or, while the file is failing and the writer backs off, still
        pending). True if such a pass ended within `timeout`. For tests, and for an admin query
        that must see this worker's latest rows (call it from a thread: it waits)."""
        with self._cv:
            target = self._pass_started + 1
            self._wake.set()
            return self._cv.wait_for(lambda: self._pass_done >= target
                                     or not self._thread.is_alive(), timeout) \
                and self._pass_done >= target

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is pending and stop (SIGTERM). True when everything was written or
        accounted for within `timeout`; later record() calls are dropped and counted."""
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            log.warning("usage ledger %s: writer did not finish within %.1f s; %d row(s) "
                        "pending", self.path, timeout, len(self._pending))
            return False
        return not self._pending

    def stats(self) -> dict:
        return {"written": self.written, "dropped": self.dropped, "pending": self.pending,
                "invalid": self.invalid, "retention_deleted": self.retention_deleted,
                "write_failures": self.write_failures, "last_error": self.last_error}

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stopping
            with self._cv:
                self._pass_started += 1
                started = self._pass_started
            cpu0 = time.thread_time()
            try:
                self._pass(stopping)
            except Exception:             # a bug here must not kill the writer
                log.exception("usage ledger %s: writer pass failed", self.path)
                self._close_conn()
            self.writer_cpu_s += time.thread_time() - cpu0
            with self._cv:
                self._pass_done = started
                self._cv.notify_all()
            if stopping:
                break
        self._shutdown()
        with self._cv:
            self._cv.notify_all()

    def _pass(self, final: bool) -> None:
        pending = self._pending
        due = not final and self._retention_due()
        if pending or due:
            if self._ensure_open(force=final):   # at close: one more try, backoff or not
                self._drain()
                if due and self._conn is not None:
                    self._retention()
                    self._drain()
        if final and pending:             # the file is unavailable at close: count them
            self._drop_writer(self._take_all(), self.last_error or "file unavailable at close")
        self._report_drops(force=final)

    def _take_all(self) -> int:
        n = 0
        pending = self._pending
        while pending:
            pending.popleft()
            n += 1
        return n

    def _drain(self) -> None:
        pending = self._pending
        size = self.batch_rows
        while pending and self._conn is not None:
            batch = [pending.popleft() for _ in range(min(size, len(pending)))]
            self._write_batch(batch)

    def _write_batch(self, batch: list) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                conn.executemany(_INSERT, map(_values, batch))
                written = len(batch)
            except _DATA_ERRORS:
                _rollback(conn)
                conn.execute("BEGIN")
                written = self._write_rows(conn, batch)
            self._commit(conn)
            self.written += written
        except (sqlite3.Error, OSError) as exc:
            _rollback(conn)
            self._fail(exc, "write")
            self._drop_writer(len(batch), f"write failed: {exc}")

    def _write_rows(self, conn: sqlite3.Connection, batch: list) -> int:
        """Row by row after a malformed record spoiled a batch: keep the good rows."""
        written = 0
        for rec in batch:
            try:
                conn.execute(_INSERT, _values(rec))
                written += 1
            except _DATA_ERRORS:
                self.invalid += 1
                self._drop_writer(1, "malformed record")
        return written

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _retention_due(self) -> bool:
        if self.retention_days is None:
            return False
        return self._next_retention is None or self.clock() >= self._next_retention

    def _retention(self) -> None:
        now = self.clock()
        cutoff_ms = int((now - self.retention_days * 86_400.0) * 1000)
        conn = self._conn
        try:
            while True:
                conn.execute("BEGIN")
                cur = conn.execute(
                    "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts_ms < ? "
                    "LIMIT ?)", (cutoff_ms, RETENTION_CHUNK_ROWS))
                deleted = cur.rowcount
                self._commit(conn)
                self.retention_deleted += max(0, deleted)
                if deleted < RETENTION_CHUNK_ROWS:
                    break
                self._drain()             # new rows go in between chunks
                conn = self._conn
                if conn is None:
                    return
            self._next_retention = now + RETENTION_INTERVAL_S
        except (sqlite3.Error, OSError) as exc:
            _rollback(conn)
            self._fail(exc, "retention")
            self._next_retention = now + RETENTION_RETRY_S

    def _ensure_open(self, force: bool = False) -> bool:
        if self._conn is not None:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            self._conn = self._open()
            self._backoff = 0.0
            return True
        except (sqlite3.Error, OSError, SchemaError) as exc:
            self._fail(exc, "open")
            if pending := self._take_all():
                self._drop_writer(pending, f"cannot open the file: {exc}")
            return False

    def _open(self) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        try:
            return self._open_file()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise
            aside = f"{self.path}.corrupt-{int(time.time())}"
            log.error("usage ledger %s: %s; moved aside to %s, starting a new file",
                      self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            return self._open_file()

    def _open_file(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        try:
            mode = conn.execute(f"PRAGMA journal_mode = {self.journal_mode}").fetchone()[0]
            if str(mode).lower() != self.journal_mode:
                log.warning("usage ledger %s: journal_mode %s refused, using %s", self.path,
                            self.journal_mode, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES:d}")
            migrate(conn)
            return conn
        except BaseException:
            conn.close()
            raise

    def _fail(self, exc: BaseException, what: str) -> None:
        self.write_failures += 1
        self.last_error = f"{what}: {exc}"
        self._close_conn()
        self._backoff = min(REOPEN_BACKOFF_MAX_S,
                            max(REOPEN_BACKOFF_INITIAL_S, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff

    def _drop_writer(self, n: int, why: str) -> None:
        self._dropped_writer += n
        self.last_error = why
        hook = self.on_drop
        if hook is not None:
            try:
                hook(n)
            except Exception:
                pass

    def _report_drops(self, force: bool = False) -> None:
        """One log line at once, then at most one per log_interval while rows are dropped, and
        the count at close."""
        total = self.dropped
        if total == self._logged_dropped:
            return
        now = time.monotonic()
        if now < self._next_log and not force:
            return
        log.error("usage ledger %s: %d row(s) dropped (%d in all); last error: %s", self.path,
                  total - self._logged_dropped, total, self.last_error or "queue full")
        self._logged_dropped = total
        self._next_log = now + self.log_interval

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _shutdown(self) -> None:
        """Leave a stopped worker's file as one self-contained file (see the module docstring)."""
        conn = self._conn
        if conn is not None and self.journal_mode == "wal":
            try:
                conn.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.Error:
                pass                      # a reader holds it: the file stays in WAL, still fine
        self._close_conn()
