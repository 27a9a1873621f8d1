"""Reading the usage ledger: queries added up over every worker's file, CSV, time parsing.

ledger_files(path, since) lists the files to read (one file, or every *.sqlite of a folder not
written since long before `since`; at most MAX_QUERY_FILES); each is opened read-only
(query_only, QUERY_BUSY_TIMEOUT_S), and one that cannot be read is skipped, logged and reported
to on_skip. query() sums requests, tokens and errors per key, model, hour or day; tokens_since()
gives each key's tokens (the token budget's seed at start); to_csv() writes query() rows as
RFC 4180 CSV, formula-looking cells quoted; parse_time() reads "7d", an epoch or ISO-8601. All
synchronous and reading files: call them from a thread (asyncio.to_thread), never on the event
loop.
"""

from __future__ import annotations

import csv
import datetime as _dt
import glob
import io
import logging
import math
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping

from llamagw.observe.usage_schema import FILE_SUFFIX

log = logging.getLogger("gateway.usage")

# Readers wait at most this for a writer's commit (rollback journal) before skipping a file.
QUERY_BUSY_TIMEOUT_S = 1.0

# A query reads at most this many worker files (one per host name that ever ran; files whose
# last write is older than `since` are skipped without being opened).
MAX_QUERY_FILES = 4_096
# A file whose last write is older than `since` by more than this is not opened: its mtime is
# set by the file server, whose clock may differ from the workers' (network volume).
MTIME_SLACK_S = 3_600.0

GROUPS = ("key", "model", "hour", "day")
COUNT_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors")
# Output field that carries each group's value.
GROUP_FIELD = {"key": "key_id", "model": "model", "hour": "hour", "day": "day"}

_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000


def _connect_ro(path: str) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=QUERY_BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


def ledger_files(path: str, since: float | None = None) -> list[str]:
    """The ledger files a reader should open: `path` itself when it is a file, else every
    *.sqlite in that folder, skipping files whose last write (main file or -wal) is older than
    `since` by MTIME_SLACK_S (they cannot hold a later row). At most MAX_QUERY_FILES (the most
    recently written), in name order."""
    if os.path.isfile(path):
        return [path]
    found = []
    for name in glob.glob(os.path.join(glob.escape(path), "*" + FILE_SUFFIX)):
        try:
            mtime = os.stat(name).st_mtime
        except OSError:
            continue
        try:
            mtime = max(mtime, os.stat(name + "-wal").st_mtime)
        except OSError:
            pass
        if since is not None and mtime < since - MTIME_SLACK_S:
            continue
        found.append((mtime, name))
    found.sort(reverse=True)
    if len(found) > MAX_QUERY_FILES:
        log.warning("usage: %d ledger files in %s; reading the %d most recent", len(found), path,
                    MAX_QUERY_FILES)
    return sorted(name for _, name in found[:MAX_QUERY_FILES])


def _where(since: float | None, until: float | None, key_id: str | None,
           model: str | None) -> tuple[str, list]:
    clauses, args = [], []
    if since is not None:
        clauses.append("ts_ms >= ?")
        args.append(int(math.floor(since * 1000)))
    if until is not None:
        clauses.append("ts_ms < ?")
        args.append(int(math.floor(until * 1000)))
    if key_id is not None:
        clauses.append("key_id = ?")
        args.append(key_id)
    if model is not None:
        clauses.append("model = ?")
        args.append(model)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


_GROUP_SQL = {
    "key": "key_id",
    "model": "COALESCE(model, '')",
    "hour": f"(ts_ms / {_MS_PER_HOUR}) * {_MS_PER_HOUR}",
    "day": f"(ts_ms / {_MS_PER_DAY}) * {_MS_PER_DAY}",
}


def _read_file(path: str, sql: str, args: list,
               on_skip: Callable[[str, Exception], None] | None) -> list[tuple]:
    try:
        conn = _connect_ro(path)
    except sqlite3.Error as exc:
        _skipped(path, exc, on_skip)
        return []
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            return []                     # created but never migrated: nothing in it
        return conn.execute(sql, args).fetchall()
    except sqlite3.Error as exc:
        _skipped(path, exc, on_skip)
        return []
    finally:
        conn.close()


def _skipped(path: str, exc: Exception, on_skip) -> None:
    log.warning("usage: skipped %s: %s", path, exc)
    if on_skip is not None:
        on_skip(path, exc)


def iso_utc(epoch_s: float) -> str:
    """2026-05-09T13:00:00Z (whole seconds; milliseconds when there are any)."""
    when = _dt.datetime.fromtimestamp(epoch_s, _dt.timezone.utc)
    text = when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def query(usage_dir: str, *, since: float | None = None, until: float | None = None,
          group: str = "key", key_id: str | None = None, model: str | None = None,
          on_skip: Callable[[str, Exception], None] | None = None) -> list[dict]:
    """Usage per group, added up over every worker's file under `usage_dir` (or one file).

    since / until: epoch seconds, [since, until). group: key | model | hour | day. Each row:
    the group's field (key_id, model, hour as ISO-8601 UTC, day as YYYY-MM-DD) then requests,
    prompt_tokens, completion_tokens, errors (status >= 400, or an outcome other than "ok":
    cut streams, timeouts). Ordered by the group's value. A file that cannot be read is skipped
    (logged, and on_skip(path, exc))."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}")
    where, args = _where(since, until, key_id, model)
    sql = (f"SELECT {_GROUP_SQL[group]} AS g, COUNT(*), COALESCE(SUM(prompt_tokens), 0),"
           " COALESCE(SUM(completion_tokens), 0),"
           " SUM(CASE WHEN status >= 400 OR outcome IS NOT 'ok' THEN 1 ELSE 0 END)"
           f" FROM usage{where} GROUP BY g")
    totals: dict = {}
    for path in ledger_files(usage_dir, since):
        for g, requests, prompt, completion, errors in _read_file(path, sql, args, on_skip):
            acc = totals.get(g)
            if acc is None:
                totals[g] = [requests, prompt, completion, errors]
            else:
                acc[0] += requests
                acc[1] += prompt
                acc[2] += completion
                acc[3] += errors
    field = GROUP_FIELD[group]
    rows = []
    for g in sorted(totals, key=lambda v: (v is None, v)):
        if group == "hour":
            value = iso_utc(g / 1000)
        elif group == "day":
            value = iso_utc(g / 1000)[:10]
        else:
            value = g
        requests, prompt, completion, errors = totals[g]
        rows.append({field: value, "requests": int(requests), "prompt_tokens": int(prompt),
                     "completion_tokens": int(completion), "errors": int(errors)})
    return rows


def tokens_since(path: str, since: float, until: float | None = None,
                 on_skip: Callable[[str, Exception], None] | None = None) -> dict[str, int]:
    """{key_id: prompt + completion tokens} of rows in [since, until), from one ledger file or
    every file in a folder. At start: seed a TokenBudget with this worker's own file since the
    UTC day began (TokenBudget.day_start()) -- the budget is per worker, so its own file."""
    where, args = _where(since, until, None, None)
    sql = ("SELECT key_id, COALESCE(SUM(prompt_tokens), 0) + COALESCE(SUM(completion_tokens), 0)"
           f" FROM usage{where} GROUP BY key_id")
    out: dict[str, int] = {}
    for name in ledger_files(path, since):
        for key_id, tokens in _read_file(name, sql, args, on_skip):
            out[key_id] = out.get(key_id, 0) + int(tokens)
    return out


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def to_csv(rows: Iterable[Mapping], group: str | None = None) -> str:
    """query() rows as CSV (RFC 4180, CRLF), header first. `group` names the columns when there
    are no rows. A text cell that a spreadsheet would run as a formula (=, +, -, @ first: a model
    name is the client's text) is prefixed with a single quote."""
    rows = list(rows)
    if rows:
        columns = list(rows[0].keys())
    elif group is not None:
        columns = [GROUP_FIELD[group], *COUNT_FIELDS]
    else:
        columns = list(COUNT_FIELDS)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for name in columns:
            value = row.get(name)
            if isinstance(value, str) and value.startswith(_FORMULA_START):
                value = "'" + value
            out.append("" if value is None else value)
        writer.writerow(out)
    return buf.getvalue()


_RELATIVE = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Epoch seconds from a query parameter or CLI flag: "7d" / "24h" / "30m" / "90s" / "2w"
    (that long before `now`), epoch seconds ("1715260800"), an ISO date ("2026-05-09", UTC
    midnight) or date-time ("2026-05-09T13:00:00Z"; no zone means UTC). ValueError otherwise."""
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        base = time.time() if now is None else now
        return base - int(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"not a time: {text!r}")
        return value
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 7d, 24h, an epoch or ISO-8601)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()
