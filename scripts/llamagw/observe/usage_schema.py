"""What a usage ledger file is: the row, the SQLite schema and its migrations, the file's path.

UsageRecord is one finished keyed request (RECORD_FIELDS: its fields in row order; _values()
takes a UsageRecord or the cheaper plain tuple of the same values). _INSERT writes one row, with
every text field cut in SQL to its MAX_*_CHARS bound. The schema is versioned with PRAGMA
user_version: MIGRATIONS[n] takes a file from version n to n+1, and migrate(conn) runs the steps
one transaction each; a file newer than SCHEMA_VERSION is a SchemaError. usage_path(data_dir)
is this worker's file, $DATA_DIR/usage/<host>.sqlite (usage_dir: the folder readers add up).
The rules (one writer per file, migrations only add) are in observe/usage.py's docstring.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import socket
import sqlite3

# Text fields are cut in SQL to these lengths: a request id is <= 128 characters (the gateway's
# X-Request-Id rule), key ids <= 64 (keys.KEY_ID_RE), the rest is client- or route-chosen text
# whose length must not be the client's to choose.
MAX_REQUEST_ID_CHARS = 128
MAX_KEY_ID_CHARS = 64
MAX_MODEL_CHARS = 256
MAX_ROUTE_CHARS = 128
MAX_OUTCOME_CHARS = 64

# Length of a sanitized host name in a file name.
MAX_HOST_CHARS = 128

FILE_SUFFIX = ".sqlite"


@dataclasses.dataclass(slots=True)
class UsageRecord:
    """One finished keyed request. Build it once, hand it to Ledger.record(), never touch it
    again. `time` is epoch seconds (time.time()) at the end of the request; *_ms are
    milliseconds; token counts are None when llama-server did not report them."""
    time: float
    request_id: str
    key_id: str
    model: str | None
    route: str
    status: int
    outcome: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    duration_ms: float = 0.0
    ttfb_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))
# A record's values in RECORD_FIELDS order, in C (the writer thread's per-row cost under the GIL).
_ROW = operator.attrgetter(*RECORD_FIELDS)


def _values(rec) -> tuple:
    """The row of a UsageRecord, or of a plain tuple of its values in RECORD_FIELDS order (the
    hot-path form: a 14-field dataclass costs ~0.8 us to build, a tuple ~0.1 us)."""
    return rec if rec.__class__ is tuple else _ROW(rec)


# MIGRATIONS[n]: the statements that take a file from user_version n to n + 1. Only add.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # v1: the table and the time index (retention and every time-bounded query use it).
    ("""CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts_ms INTEGER NOT NULL,
            request_id TEXT,
            key_id TEXT NOT NULL,
            model TEXT,
            route TEXT,
            status INTEGER,
            outcome TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            duration_ms REAL,
            ttfb_ms REAL,
            bytes_in INTEGER,
            bytes_out INTEGER)""",
     "CREATE INDEX usage_ts ON usage (ts_ms)"),
    # v2: per-key time index, for the budget seed at start (tokens_since) and ?key_id= queries.
    # Kept as its own step so the migration path is exercised by every v1 file (and the tests).
    ("CREATE INDEX usage_key_ts ON usage (key_id, ts_ms)",),
)
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = (
    "INSERT INTO usage (ts_ms, request_id, key_id, model, route, status, outcome, prompt_tokens,"
    " completion_tokens, cached_tokens, duration_ms, ttfb_ms, bytes_in, bytes_out) VALUES ("
    f"CAST(round(?1 * 1000) AS INTEGER), substr(?2, 1, {MAX_REQUEST_ID_CHARS}),"
    f" substr(?3, 1, {MAX_KEY_ID_CHARS}), substr(?4, 1, {MAX_MODEL_CHARS}),"
    f" substr(?5, 1, {MAX_ROUTE_CHARS}), ?6, substr(?7, 1, {MAX_OUTCOME_CHARS}),"
    " ?8, ?9, ?10, ?11, ?12, ?13, ?14)")

# Errors that mean "this record is malformed" (a caller's bug), not "the disk failed": the batch
# is retried row by row and only the bad rows are dropped.
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                sqlite3.DataError, TypeError, ValueError, OverflowError, AttributeError)


class SchemaError(Exception):
    """The file's schema is newer than this build (or not a usage ledger)."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring `conn`'s file to SCHEMA_VERSION, one transaction per step (the version is read
    again inside each, under the write lock); return the version. `conn` must be in autocommit
    mode (isolation_level=None). SchemaError when the file is newer than this build."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(f"schema version {version} is newer than this build's "
                                  f"{SCHEMA_VERSION}")
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass



_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def usage_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "usage")


def usage_path(data_dir: str, host: str | None = None) -> str:
    """$DATA_DIR/usage/<host>.sqlite, host = this machine's name made file-name safe."""
    name = _HOST_UNSAFE.sub("_", host if host is not None else socket.gethostname())
    name = name.strip(".")[:MAX_HOST_CHARS] or "worker"
    return os.path.join(usage_dir(data_dir), name + FILE_SUFFIX)
