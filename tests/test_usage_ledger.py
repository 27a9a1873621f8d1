"""llamagw/observe/usage.py: the usage ledger.

Schema and migrations (a v1 file migrated forward), batched writes off the caller, the pending
bound, close() flush, SIGTERM flush and kill -9 recovery in a child process, failures (read-only
directory as an unprivileged user, read-only file, full disk, newer schema, corrupt file) counted
as dropped without raising, retention with an injected clock, queries across two worker files,
CSV, tokens_since, time parsing."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from llamagw.observe import usage, usage_query, usage_schema
from llamagw.observe.usage import Ledger, UsageRecord

SCRIPTS = str(Path(__file__).resolve().parents[1] / "scripts")
# Every wait on a child or on the writer has this deadline.
CHILD_TIMEOUT = 20.0
DAY = 86_400
# 2026-05-09 00:00:00 UTC
T0 = 1_778_284_800.0
assert T0 % DAY == 0


def rec(t: float, i: int = 0, key: str = "alice", model: str | None = "m", status: int = 200,
        outcome: str = "ok", prompt: int | None = 3, completion: int | None = 5, **kw):
    return UsageRecord(time=t, request_id=f"r{i}", key_id=key, model=model,
                       route="/v1/chat/completions", status=status, outcome=outcome,
                       prompt_tokens=prompt, completion_tokens=completion, **kw)


def rows(path, sql="SELECT * FROM usage ORDER BY id"):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def count(path) -> int:
    return rows(path, "SELECT COUNT(*) FROM usage")[0][0]


@pytest.fixture
def ledgers():
    """Ledgers made by a test, closed at its end whatever happens."""
    made = []

    def make(path, **kw):
        kw.setdefault("retention_days", None)
        led = Ledger(str(path), **kw)
        made.append(led)
        return led

    yield make
    for led in made:
        led.close(5)


# --- schema and migrations ----------------------------------------------------------------------
def test_fresh_file_schema_version_indexes_and_journal(tmp_path, ledgers):
    path = tmp_path / "usage" / "w1.sqlite"          # the folder is made by the writer
    led = ledgers(path)
    led.record(rec(T0))
    assert led.sync()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == usage.SCHEMA_VERSION == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(usage)")]
    assert cols == ["id", "ts_ms", "request_id", "key_id", "model", "route", "status", "outcome",
                    "prompt_tokens", "completion_tokens", "cached_tokens", "duration_ms",
                    "ttfb_ms", "bytes_in", "bytes_out"]
    # no column for a prompt, a body or a secret
    assert not {"prompt", "messages", "body", "secret", "api_key"} & set(cols)
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(usage)")}
    assert {"usage_ts", "usage_key_ts"} <= indexes
    plan = " ".join(str(r) for r in conn.execute(
        "EXPLAIN QUERY PLAN DELETE FROM usage WHERE ts_ms < 5"))
    assert "usage_ts" in plan                        # retention uses the time index
    conn.close()
    assert led.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"   # left self-contained
    conn.close()
    assert not os.path.exists(str(path) + "-wal")


def test_v1_file_is_migrated_forward(tmp_path, ledgers):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in usage.MIGRATIONS[0]:            # a file written by a v1 build
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO usage (ts_ms, key_id, prompt_tokens, completion_tokens, status,"
                 " outcome) VALUES (?, 'old', 1, 2, 200, 'ok')", (int(T0 * 1000),))
    conn.close()
    led = ledgers(path)
    led.record(rec(T0 + 1, key="new"))
    assert led.sync()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "usage_key_ts" in {r[1] for r in conn.execute("PRAGMA index_list(usage)")}
    assert [r[0] for r in conn.execute("SELECT key_id FROM usage ORDER BY id")] == ["old", "new"]
    conn.close()


def test_migrate_is_idempotent_and_stepwise(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    assert usage.migrate(conn) == 2
    assert usage.migrate(conn) == 2
    conn.execute("PRAGMA user_version = 99")
    with pytest.raises(usage.SchemaError):
        usage.migrate(conn)
    conn.close()


def test_a_failing_migration_step_leaves_the_old_version(tmp_path, monkeypatch):
    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    monkeypatch.setattr(usage_schema, "MIGRATIONS",
                        usage.MIGRATIONS + (("CREATE TABLE usage (x)",),))
    monkeypatch.setattr(usage_schema, "SCHEMA_VERSION", 3)
    with pytest.raises(sqlite3.OperationalError):
        usage.migrate(conn)                          # step 3 fails ...
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2   # ... 1 and 2 stay done
    assert not conn.in_transaction
    conn.close()


def test_newer_schema_is_not_written_but_still_read(tmp_path, ledgers):
    d = tmp_path / "usage"
    d.mkdir()
    path = d / "w1.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    usage.migrate(conn)
    conn.execute("INSERT INTO usage (ts_ms, key_id, prompt_tokens, status, outcome)"
                 " VALUES (?, 'a', 4, 200, 'ok')", (int(T0 * 1000),))
    conn.execute("PRAGMA user_version = 7")          # a later build wrote it
    conn.close()
    led = ledgers(path)
    led.record(rec(T0))
    assert led.sync()
    assert led.dropped == 1 and led.written == 0
    assert "newer" in led.last_error
    assert usage.query(str(d), group="key") == [
        {"key_id": "a", "requests": 1, "prompt_tokens": 4, "completion_tokens": 0, "errors": 0}]


# --- writing ------------------------------------------------------------------------------------
def test_round_trip_of_every_field(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    led = ledgers(path)
    led.record(UsageRecord(time=T0 + 0.1234, request_id="req-1", key_id="alice", model="qwen",
                           route="/v1/chat/completions", status=200, outcome="ok",
                           prompt_tokens=11, completion_tokens=22, cached_tokens=7,
                           duration_ms=123.5, ttfb_ms=45.25, bytes_in=300, bytes_out=4000))
    led.record(rec(T0, 2, model=None, prompt=None, completion=None))
    assert led.sync()
    got = rows(path)
    assert got[0][1:] == (int(T0 * 1000) + 123, "req-1", "alice", "qwen",
                          "/v1/chat/completions", 200, "ok", 11, 22, 7, 123.5, 45.25, 300, 4000)
    assert got[1][4] is None and got[1][8] is None and got[1][9] is None and got[1][12] is None


def test_a_plain_tuple_is_the_same_row(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    led = ledgers(path)
    as_record = UsageRecord(T0, "a", "alice", "qwen", "/r", 200, "ok", 1, 2, 3, 4.0, 5.0, 6, 7)
    as_tuple = (T0, "a", "alice", "qwen", "/r", 200, "ok", 1, 2, 3, 4.0, 5.0, 6, 7)
    assert len(as_tuple) == len(usage.RECORD_FIELDS)
    led.record(as_record)
    led.record(as_tuple)
    led.record((T0, "short"))                        # wrong length: dropped, counted
    assert led.sync()
    first, second = rows(path)
    assert first[1:] == second[1:]
    assert led.written == 2 and led.invalid == 1


def test_text_fields_are_cut_to_their_bounds(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    led = ledgers(path)
    led.record(UsageRecord(T0, "r" * 1000, "k" * 1000, "m" * 100_000, "/" * 1000, 200,
                           "o" * 1000))
    assert led.sync()
    (rid, key, model, route, outcome), = rows(
        path, "SELECT request_id, key_id, model, route, outcome FROM usage")
    assert (len(rid), len(key), len(model), len(route), len(outcome)) == (
        usage.MAX_REQUEST_ID_CHARS, usage.MAX_KEY_ID_CHARS, usage.MAX_MODEL_CHARS,
        usage.MAX_ROUTE_CHARS, usage.MAX_OUTCOME_CHARS)


def test_batches_and_order(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    led = ledgers(path, batch_rows=7)
    for i in range(100):
        led.record(rec(T0 + i, i))
    assert led.sync()
    assert led.written == 100 and led.pending == 0 and led.dropped == 0
    assert [r[0] for r in rows(path, "SELECT request_id FROM usage ORDER BY id")] == \
        [f"r{i}" for i in range(100)]


def test_record_touches_no_disk_and_the_writer_flushes_on_its_own(tmp_path, ledgers):
    path = tmp_path / "sub" / "w.sqlite"
    led = ledgers(path, flush_interval=0.05)
    assert not path.parent.exists() or not path.exists()
    led.record(rec(T0))
    deadline = time.monotonic() + CHILD_TIMEOUT
    while led.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert led.written == 1 and count(path) == 1     # no sync, no close: the interval did it


def test_pending_is_bounded_and_drops_are_counted(tmp_path, ledgers):
    drops = []
    led = ledgers(tmp_path / "w.sqlite", flush_interval=1.0, max_pending=5,
                  on_drop=drops.append)
    for i in range(12):                              # the writer sleeps for 1 s: nothing drains
        led.record(rec(T0, i))
    assert led.pending == 5 and led.dropped == 7 and drops == [1] * 7
    assert led.close()
    assert led.written == 5
    led.record(rec(T0))                              # after close: dropped, no exception
    assert led.dropped == 8


def test_close_flushes_everything_pending(tmp_path):
    path = tmp_path / "w.sqlite"
    led = Ledger(str(path), flush_interval=1.0, retention_days=None)
    for i in range(2500):
        led.record(rec(T0, i))
    assert led.written == 0
    assert led.close(CHILD_TIMEOUT) is True
    assert led.written == 2500 and count(path) == 2500 and led.closed
    assert led.close() is True                       # twice is fine


def test_malformed_records_are_dropped_alone(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    led = ledgers(path)
    led.record(rec(T0, 1))
    led.record(UsageRecord(T0, "bad-key", None, "m", "/r", 200, "ok"))      # key_id NOT NULL
    led.record(UsageRecord(T0, "bad-type", "a", {"x": 1}, "/r", 200, "ok"))  # a dict
    led.record("not a record")
    led.record(rec(T0, 2, prompt=1 << 70))                                  # too big an int
    led.record(rec(T0, 3))
    assert led.sync()
    assert led.written == 2 and led.invalid == 4 and led.dropped == 4
    assert [r[0] for r in rows(path, "SELECT request_id FROM usage")] == ["r1", "r3"]


def test_corrupt_file_is_moved_aside_and_a_new_one_started(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    path.write_bytes(b"this is not a sqlite file at all" * 200)
    led = ledgers(path)
    led.record(rec(T0))
    assert led.sync()
    assert led.written == 1 and count(path) == 1
    aside = [p for p in os.listdir(tmp_path) if ".corrupt-" in p]
    assert len(aside) == 1 and not aside[0].endswith(".sqlite")   # queries do not read it


# --- failures: counted, logged at a bounded rate, never raised ---------------------------------
def test_full_disk_drops_rows_logs_once_and_keeps_going(tmp_path, caplog):
    def small_disk(path):
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA max_page_count = 30")   # 120 KB: a disk that fills up
        return conn

    caplog.set_level(logging.ERROR, logger="gateway.usage")
    path = tmp_path / "w.sqlite"
    led = Ledger(str(path), connect=small_disk, retention_days=None, batch_rows=20,
                 log_interval=3600)
    total = 0
    for _ in range(5):
        for i in range(400):
            led.record(rec(T0, total, model="x" * 200))
            total += 1
        led.sync()
    assert led.close(CHILD_TIMEOUT)
    assert led.dropped > 0 and led.written > 0
    assert led.written + led.dropped == total == count(path) + led.dropped
    assert "full" in led.last_error
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(lines) <= 2                      # the first failure, and the count at close


def test_read_only_file_drops_rows_without_raising(tmp_path, ledgers):
    path = tmp_path / "w.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    usage.migrate(conn)
    conn.close()

    def read_only(p):
        return sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)

    led = ledgers(path, connect=read_only, journal_mode="delete")
    for i in range(10):
        led.record(rec(T0, i))
    assert led.sync()
    assert led.dropped == 10 and led.written == 0
    assert "readonly" in led.last_error.replace("-", "").replace(" ", "")


NOBODY = 65534


def _python_for(kw: dict) -> str:
    """An interpreter the unprivileged user can run (a venv's may sit under root's home)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3"),
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for exe in filter(None, candidates):
        try:
            probe = subprocess.run([exe, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                   capture_output=True, timeout=CHILD_TIMEOUT, **kw)
        except OSError:
            continue
        if probe.returncode == 0:
            return exe
    raise AssertionError(f"no Python runnable as uid {NOBODY} among {candidates}")


def _world_readable_tmpdir() -> str:
    d = tempfile.mkdtemp(prefix="usage-ro-")
    os.chmod(d, 0o755)
    return d


def test_read_only_directory_as_an_unprivileged_user():
    """A real read-only directory: the child runs as `nobody` when the tests run as root (root
    ignores directory permissions). Rows are dropped and counted, record() never raises, the
    process keeps serving, one log line says so."""
    base = _world_readable_tmpdir()
    ro = os.path.join(base, "usage")
    os.mkdir(ro)
    os.chmod(ro, 0o555)
    child = textwrap.dedent("""
        import logging, sys, time
        sys.path.insert(0, sys.argv[1])
        logging.basicConfig(level=logging.ERROR)
        from llamagw.observe.usage import Ledger, UsageRecord
        led = Ledger(sys.argv[2], retention_days=None)
        for i in range(50):
            led.record(UsageRecord(time.time(), str(i), "k", "m", "/r", 200, "ok", 1, 2))
        assert led.sync(10)
        for i in range(50):
            led.record(UsageRecord(time.time(), str(i), "k", "m", "/r", 200, "ok", 1, 2))
        ok = led.close(10)
        print("RESULT", led.written, led.dropped, ok, flush=True)
    """)
    kw = {}
    python = sys.executable
    if os.geteuid() == 0:
        kw = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        python = _python_for(kw)
    try:
        proc = subprocess.run([python, "-c", child, SCRIPTS,
                               os.path.join(ro, "w1.sqlite")],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, **kw)
        assert proc.returncode == 0, proc.stderr
        assert "RESULT 0 100 True" in proc.stdout
        assert "Traceback" not in proc.stderr
        assert "dropped" in proc.stderr and "w1.sqlite" in proc.stderr
        assert os.listdir(ro) == []
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# --- crash safety in a child process ------------------------------------------------------------
def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), SCRIPTS, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reap(proc: subprocess.Popen) -> None:
    """Kill the child if it still runs, wait for it and close its pipes."""
    proc.kill()
    proc.communicate(timeout=CHILD_TIMEOUT)


def _read_line(proc: subprocess.Popen, prefix: str) -> str:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    raise AssertionError(f"no {prefix!r} from the child: {err}")


def _integrity_ok(path: str) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_sigterm_flushes_pending_rows(tmp_path):
    path = str(tmp_path / "w.sqlite")
    proc = _spawn("""
        import signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from llamagw.observe.usage import Ledger, UsageRecord
        led = Ledger(sys.argv[2], flush_interval=1.0, retention_days=None)
        def term(*_):
            ok = led.close(10)
            print("CLOSED", ok, led.written, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        for i in range(3000):
            led.record(UsageRecord(time.time(), str(i), "k", "m", "/r", 200, "ok", 1, 2))
        print("READY", led.written, flush=True)
        while True:
            time.sleep(1)
    """, path)
    try:
        assert _read_line(proc, "READY") == "READY 0\n"   # nothing written yet: all pending
        proc.send_signal(signal.SIGTERM)
        assert _read_line(proc, "CLOSED") == "CLOSED True 3000\n"
        assert proc.wait(CHILD_TIMEOUT) == 0
    finally:
        _reap(proc)
    _integrity_ok(path)
    assert count(path) == 3000
    assert not os.path.exists(path + "-wal")


def test_kill_9_under_load_loses_at_most_the_last_second(tmp_path):
    """2,000 rows/s into the ledger, SIGKILL at a random moment: the file opens cleanly, rows are
    a gapless prefix of what was recorded, and the newest is less than a second older than the
    kill."""
    path = str(tmp_path / "w.sqlite")
    proc = _spawn("""
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from llamagw.observe.usage import Ledger, UsageRecord
        led = Ledger(sys.argv[2], retention_days=None)
        print("GO", flush=True)
        i = 0
        while True:
            for _ in range(20):
                led.record(UsageRecord(time.time(), str(i), "k", "m", "/r", 200, "ok", 1, 2))
                i += 1
            time.sleep(0.01)
    """, path)
    try:
        _read_line(proc, "GO")
        time.sleep(1.2 + random.random())
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(CHILD_TIMEOUT)
    finally:
        _reap(proc)
    _integrity_ok(path)
    ids = [int(r[0]) for r in rows(path, "SELECT request_id FROM usage ORDER BY id")]
    assert len(ids) > 1000
    assert ids == list(range(len(ids)))              # a prefix, no hole
    newest = rows(path, "SELECT MAX(ts_ms) FROM usage")[0][0] / 1000
    assert killed_at - newest < 1.0, killed_at - newest
    # readers work on the crashed file (WAL and -shm left behind)
    assert usage.tokens_since(path, 0) == {"k": 3 * len(ids)}


def test_kill_9_in_the_middle_of_a_batch(tmp_path):
    """The writer is stopped between executemany and COMMIT of its third batch (big enough to
    spill uncommitted pages into the WAL) and killed there: the file opens with integrity ok,
    holds exactly the two committed batches, and a new Ledger goes on writing to it."""
    path = str(tmp_path / "w.sqlite")
    proc = _spawn("""
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from llamagw.observe.usage import Ledger, UsageRecord
        commits = 0
        class Stalling(Ledger):
            def _commit(self, conn):
                global commits
                commits += 1
                if commits == 3:
                    print("MID", self.written, flush=True)
                    time.sleep(60)
                super()._commit(conn)
        led = Stalling(sys.argv[2], batch_rows=40_000, max_pending=200_000, flush_interval=1.0,
                       retention_days=None)
        for i in range(120_000):
            led.record(UsageRecord(time.time(), str(i), "k", "m" * 200, "/r", 200, "ok", 1, 2))
        led.sync(0)
        while True:
            time.sleep(1)
    """, path)
    try:
        line = _read_line(proc, "MID")
        proc.send_signal(signal.SIGKILL)
        proc.wait(CHILD_TIMEOUT)
    finally:
        _reap(proc)
    committed = int(line.split()[1])
    assert committed == 80_000
    assert os.path.getsize(path + "-wal") > 4 << 20  # the open transaction had spilled
    _integrity_ok(path)
    assert count(path) == committed
    led = Ledger(path, retention_days=None)
    led.record(rec(T0, 1))
    assert led.close(CHILD_TIMEOUT)
    _integrity_ok(path)
    assert count(path) == committed + 1


# --- retention ----------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_retention_deletes_old_rows_daily_with_the_injected_clock(tmp_path, monkeypatch):
    monkeypatch.setattr(usage, "RETENTION_CHUNK_ROWS", 10)    # several chunks per run
    clock = Clock(T0)
    path = tmp_path / "w.sqlite"
    led = Ledger(str(path), clock=clock, retention_days=90)
    try:
        for i in range(35):
            led.record(rec(T0 - 100 * DAY + i, i))          # past retention
        led.record(rec(T0 - 89.5 * DAY, 100))               # 89.5 days old: kept today
        led.record(rec(T0 - DAY, 101))
        assert led.sync()                                   # rows in, then retention
        assert led.retention_deleted == 35
        assert [r[0] for r in rows(path, "SELECT request_id FROM usage ORDER BY id")] == \
            ["r100", "r101"]
        clock.t = T0 + 0.4 * DAY                            # not a day later: no run
        assert led.sync()
        assert count(path) == 2
        clock.t = T0 + DAY                                  # a day later: runs again
        assert led.sync()
        assert led.retention_deleted == 36
        assert [r[0] for r in rows(path, "SELECT request_id FROM usage")] == ["r101"]
    finally:
        assert led.close()


def test_bad_arguments(tmp_path):
    for kw in ({"flush_interval": 0}, {"flush_interval": 1.5}, {"max_pending": 0},
               {"batch_rows": 0}, {"retention_days": 0}, {"journal_mode": "wal; DROP"}):
        with pytest.raises(ValueError):
            Ledger(str(tmp_path / "x.sqlite"), **kw)


# --- queries ------------------------------------------------------------------------------------
def _workload(seed: int, n: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = T0 + rng.uniform(-DAY, 2 * DAY)                  # over three UTC days
        status = rng.choice([200, 200, 200, 429, 500])
        outcome = "ok" if status == 200 and rng.random() < 0.9 else (
            "client_closed" if status == 200 else "error")
        out.append(rec(t, seed * 100_000 + i, key=rng.choice(["alice", "bob", "carol"]),
                       model=rng.choice(["qwen", "=HYPERLINK()", None]), status=status,
                       outcome=outcome, prompt=rng.choice([None, rng.randint(0, 500)]),
                       completion=rng.randint(0, 900)))
    return out


def _expected(records, group, since=None, until=None, key_id=None, model=None):
    out: dict = {}
    for r in records:
        ms = int(round(r.time * 1000))
        if since is not None and ms < since * 1000 or until is not None and ms >= until * 1000:
            continue
        if key_id is not None and r.key_id != key_id or model is not None and r.model != model:
            continue
        g = {"key": r.key_id, "model": r.model or "",
             "hour": usage.iso_utc(ms // 3_600_000 * 3600),
             "day": usage.iso_utc(ms // 86_400_000 * 86_400)[:10]}[group]
        acc = out.setdefault(g, [0, 0, 0, 0])
        acc[0] += 1
        acc[1] += r.prompt_tokens or 0
        acc[2] += r.completion_tokens or 0
        acc[3] += r.status >= 400 or r.outcome != "ok"
    field = usage.GROUP_FIELD[group]
    return [{field: g, "requests": a[0], "prompt_tokens": a[1], "completion_tokens": a[2],
             "errors": a[3]} for g, a in sorted(out.items())]


@pytest.fixture
def two_workers(tmp_path):
    """Two worker files: w1 closed (rollback journal), w2 still open (WAL); plus a stray file
    that is not a database, an empty one, and a non-.sqlite file."""
    d = tmp_path / "usage"
    recs1, recs2 = _workload(1, 700), _workload(2, 500)
    w1 = Ledger(str(d / "w1.sqlite"), retention_days=None)
    w2 = Ledger(str(d / "w2.sqlite"), retention_days=None)
    for r in recs1:
        w1.record(r)
    for r in recs2:
        w2.record(r)
    assert w1.close() and w2.sync()
    (d / "junk.sqlite").write_bytes(b"garbage" * 1000)
    sqlite3.connect(d / "empty.sqlite").close()
    (d / "notes.txt").write_text("not a ledger")
    yield str(d), recs1 + recs2
    w2.close()


@pytest.mark.parametrize("group", usage.GROUPS)
def test_query_adds_up_both_worker_files(two_workers, group):
    d, records = two_workers
    skipped = []
    got = usage.query(d, group=group, on_skip=lambda p, e: skipped.append(os.path.basename(p)))
    assert got == _expected(records, group)
    assert skipped == ["junk.sqlite"]
    assert sum(r["requests"] for r in got) == 1200


@pytest.mark.parametrize("flt", [
    {"since": T0, "until": T0 + DAY},
    {"since": T0 + 3600.5},
    {"until": T0},
    {"key_id": "bob"},
    {"model": "qwen", "key_id": "alice"},
    {"key_id": "nobody"},
])
def test_query_filters(two_workers, flt):
    d, records = two_workers
    for group in ("key", "day", "hour"):
        assert usage.query(d, group=group, **flt) == _expected(records, group, **flt)


def test_query_row_shapes_and_bad_group(two_workers):
    d, _ = two_workers
    hour = usage.query(d, group="hour", since=T0, until=T0 + 3600)
    assert list(hour[0]) == ["hour", "requests", "prompt_tokens", "completion_tokens", "errors"]
    assert hour[0]["hour"] == "2026-05-09T00:00:00Z"
    day = usage.query(d, group="day")
    assert [r["day"] for r in day] == ["2026-05-08", "2026-05-09", "2026-05-10"]
    with pytest.raises(ValueError):
        usage.query(d, group="week")
    assert usage.query(str(Path(d) / "missing"), group="key") == []


def test_query_opens_files_read_only(two_workers):
    d, _ = two_workers
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for p in os.listdir(d)}
    usage.query(d, group="key")
    usage.tokens_since(d, 0)
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for p in os.listdir(d)
             if p in before}
    assert after == before


def test_query_skips_files_not_written_since(tmp_path):
    d = tmp_path / "usage"
    led = Ledger(str(d / "w1.sqlite"), retention_days=None)
    led.record(rec(T0))
    assert led.close()
    old = time.time() - 10 * DAY
    os.utime(d / "w1.sqlite", (old, old))
    seen = []
    orig = usage_query._read_file
    try:
        usage_query._read_file = lambda p, *a: seen.append(p) or orig(p, *a)
        usage.query(str(d), since=time.time() - DAY)
        assert seen == []                            # not even opened
        usage.query(str(d), since=old - DAY)
        assert len(seen) == 1
    finally:
        usage_query._read_file = orig


def test_tokens_since_per_key_from_a_file_or_a_folder(two_workers):
    d, records = two_workers
    since = T0 + DAY / 2
    want: dict = {}
    for r in records:
        if round(r.time * 1000) >= since * 1000:
            want[r.key_id] = want.get(r.key_id, 0) + (r.prompt_tokens or 0) + r.completion_tokens
    assert usage.tokens_since(d, since) == want
    one = usage.tokens_since(os.path.join(d, "w1.sqlite"), since)
    assert set(one) <= set(want) and all(one[k] <= want[k] for k in one)


def test_csv(two_workers):
    d, records = two_workers
    got = usage.query(d, group="model")
    text = usage.to_csv(got)
    assert text.startswith("model,requests,prompt_tokens,completion_tokens,errors\r\n")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(got)
    by_model = {r["model"]: r for r in parsed}
    assert "'=HYPERLINK()" in by_model                # a formula is defused
    assert by_model["qwen"]["requests"] == str(
        next(r for r in got if r["model"] == "qwen")["requests"])
    assert usage.to_csv([], group="day") == "day,requests,prompt_tokens,completion_tokens," \
                                            "errors\r\n"


# --- helpers ------------------------------------------------------------------------------------
def test_usage_path_is_per_host_and_file_name_safe(tmp_path):
    assert usage.usage_path("/data", "worker-1") == "/data/usage/worker-1.sqlite"
    assert usage.usage_path("/data", "../../etc/x y") == "/data/usage/_.._etc_x_y.sqlite"
    assert usage.usage_path("/data", "..") == "/data/usage/worker.sqlite"
    assert usage.usage_path("/data").startswith("/data/usage/")


def test_parse_time_and_iso():
    now = T0 + 3600
    assert usage.parse_time("7d", now=now) == now - 7 * DAY
    assert usage.parse_time("24h", now=now) == now - DAY
    assert usage.parse_time("30m", now=now) == now - 1800
    assert usage.parse_time("2w", now=now) == now - 14 * DAY
    assert usage.parse_time(str(int(T0))) == T0
    assert usage.parse_time("2026-05-09") == T0
    assert usage.parse_time("2026-05-09T01:00:00Z") == T0 + 3600
    assert usage.parse_time("2026-05-09T03:00:00+02:00") == T0 + 3600
    for bad in ("", "yesterday", "-5", "nan", "inf", "7y", "2026-13-01"):
        with pytest.raises(ValueError):
            usage.parse_time(bad)
    assert usage.iso_utc(T0) == "2026-05-09T00:00:00Z"
    assert usage.iso_utc(T0 + 0.25) == "2026-05-09T00:00:00.250Z"
