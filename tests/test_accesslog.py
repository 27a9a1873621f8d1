"""accesslog.py: fixed fields, JSON lines, size rotation, bounded queue that never blocks,
close() with a deadline, disk errors."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from llamagw.context import RequestContext
from llamagw.observe import accesslog
from llamagw.observe.accesslog import ACCESS_FIELDS, AccessLog


def full_record(i: int = 0) -> dict:
    return {"time": 1700000000.5 + i, "request_id": f"req-{i}", "key_id": "alice",
            "client": "10.0.0.1", "method": "POST", "path": "/v1/chat/completions",
            "status": 200, "bytes_in": 123, "bytes_out": 456, "duration_ms": 12.5,
            "ttfb_ms": 3.25, "stream": True, "prompt_tokens": 10, "completion_tokens": 20,
            "outcome": "ok", "model": "demo"}


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class StalledLog(AccessLog):
    """The writer thread waits for `gate` before it starts: a disk that does not answer."""

    def __init__(self, *args, **kwargs):
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)

    def _run(self):
        self.gate.wait(10)
        super()._run()


def test_writes_one_json_line_per_record_with_fixed_fields(tmp_path):
    path = tmp_path / "logs" / "api_access.log"  # directory created on demand
    alog = AccessLog(str(path), max_bytes=1_000_000, backups=2)
    alog.write(full_record(0))
    alog.write(full_record(1))
    alog.close()
    lines = read_lines(path)
    assert lines == [full_record(0), full_record(1)]
    assert list(lines[0]) == list(ACCESS_FIELDS)  # fixed order
    assert alog.written == 2 and alog.dropped == 0


def test_unknown_fields_non_scalars_and_query_strings_are_dropped(tmp_path):
    path = tmp_path / "a.log"
    alog = AccessLog(str(path), max_bytes=1_000_000, backups=1)
    alog.write({"time": 1.0, "path": "/v1/models?api_key=sk-secret-value-123",
                "body": "the prompt", "messages": [{"role": "user"}], "authorization": "x",
                "outcome": {"nested": "prompt text"}, "client": "1.2.3.4\n{\"forged\":1}",
                "method": "G" * 10_000, "duration_ms": float("nan")})
    alog.close()
    text = path.read_text()
    assert text.count("\n") == 1  # a newline inside a value cannot forge a second line
    (line,) = read_lines(path)
    assert set(line) <= set(ACCESS_FIELDS)
    assert line["path"] == "/v1/models"
    assert "outcome" not in line  # not a scalar
    assert line["client"] == "1.2.3.4\n{\"forged\":1}"
    assert len(line["method"]) == accesslog.MAX_VALUE_CHARS
    assert line["duration_ms"] is None
    for leaked in ("the prompt", "sk-secret-value-123", "role", "nested", "authorization"):
        assert leaked not in text


def test_rotation_by_size_keeps_n_backups(tmp_path):
    path = tmp_path / "api_access.log"
    line_len = len(json.dumps(full_record(0), separators=(",", ":"))) + 1
    max_bytes = line_len * 3 + 10  # three lines per file
    alog = AccessLog(str(path), max_bytes=max_bytes, backups=2)
    for i in range(20):
        alog.write(full_record(i))
    alog.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "api_access.log", "api_access.log.1", "api_access.log.2"]
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size <= max_bytes
    ids = lambda p: [r["request_id"] for r in read_lines(p)]  # noqa: E731
    assert ids(path) == ["req-18", "req-19"]
    assert ids(tmp_path / "api_access.log.1") == ["req-15", "req-16", "req-17"]
    assert ids(tmp_path / "api_access.log.2") == ["req-12", "req-13", "req-14"]


def test_rotation_appends_to_existing_file_size(tmp_path):
    path = tmp_path / "api_access.log"
    path.write_text("x" * 100 + "\n")
    alog = AccessLog(str(path), max_bytes=150, backups=1)
    alog.write(full_record(0))
    alog.close()
    assert (tmp_path / "api_access.log.1").read_text() == "x" * 100 + "\n"
    assert read_lines(path) == [full_record(0)]


def test_zero_backups_starts_over(tmp_path):
    path = tmp_path / "api_access.log"
    line_len = len(json.dumps(full_record(0), separators=(",", ":"))) + 1
    alog = AccessLog(str(path), max_bytes=line_len * 2, backups=0)
    for i in range(5):
        alog.write(full_record(i))
    alog.close()
    assert [p.name for p in tmp_path.iterdir()] == ["api_access.log"]
    assert [r["request_id"] for r in read_lines(path)] == ["req-4"]


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    path = tmp_path / "api_access.log"
    alog = StalledLog(str(path), max_bytes=1_000_000, backups=1, queue_size=3)
    t0 = time.monotonic()
    for i in range(10):
        alog.write(full_record(i))
    assert time.monotonic() - t0 < 0.5  # a stalled writer does not stall the caller
    assert alog.dropped == 7
    alog.gate.set()
    alog.close()
    lines = read_lines(path)
    assert [r.get("request_id") for r in lines[:3]] == ["req-0", "req-1", "req-2"]
    assert lines[3]["outcome"] == "access_log_dropped" and lines[3]["dropped"] == 7


def test_close_respects_its_deadline_when_disk_stalls(tmp_path):
    alog = StalledLog(str(tmp_path / "a.log"), max_bytes=1_000_000, backups=1, queue_size=2)
    alog.write(full_record(0))
    alog.write(full_record(1))
    t0 = time.monotonic()
    alog.close(timeout=0.1)
    assert time.monotonic() - t0 < 1.0
    alog.write(full_record(2))  # after close: dropped, counted
    assert alog.dropped == 1
    alog.gate.set()


def test_close_is_idempotent_and_flushes(tmp_path):
    path = tmp_path / "a.log"
    alog = AccessLog(str(path), max_bytes=1_000_000, backups=1)
    for i in range(100):
        alog.write(full_record(i))
    alog.close()
    alog.close()
    assert len(read_lines(path)) == 100


def test_disk_error_is_counted_and_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    alog = AccessLog(str(blocker / "api_access.log"), max_bytes=1000, backups=1)
    with caplog.at_level("ERROR", logger="gateway.accesslog"):
        alog.write(full_record(0))
        alog.write(full_record(1))
        alog.close()
    assert alog.write_errors == 2 and alog.written == 0
    assert "access log" in caplog.text


def test_invalid_arguments():
    with pytest.raises(ValueError):
        AccessLog("/tmp/x.log", max_bytes=0, backups=1)


def test_records_are_cleaned_in_the_writer_thread_not_the_caller(tmp_path, monkeypatch):
    threads = []
    real = accesslog.clean_record

    def spy(record):
        threads.append(threading.current_thread().name)
        return real(record)

    monkeypatch.setattr(accesslog, "clean_record", spy)
    path = tmp_path / "a.log"
    alog = AccessLog(str(path), max_bytes=1_000_000, backups=1)
    for i in range(3):
        alog.write(full_record(i))
    assert threads == []              # nothing done on the caller's side
    alog.close()
    assert threads == ["access-log"] * 3
    assert read_lines(path) == [full_record(i) for i in range(3)]


def test_lines_reach_the_file_without_close_within_the_flush_interval(tmp_path):
    path = tmp_path / "a.log"
    alog = AccessLog(str(path), max_bytes=1_000_000, backups=1)
    try:
        alog.write(full_record(0))
        deadline = time.monotonic() + accesslog.FLUSH_INTERVAL_S * 20
        while time.monotonic() < deadline and not (path.exists() and path.read_text()):
            time.sleep(0.01)
        assert read_lines(path) == [full_record(0)]
    finally:
        alog.close()


# ---- request(ctx): the gateway's line per request, read from its RequestContext ---------------
def request_context(**changes) -> tuple[float, RequestContext]:
    """(wall clock, context) of full_record(0) with `changes` (the line's field names; the
    durations in ms, as the line has them, kept in seconds by the context)."""
    record = full_record(0)
    record.update(changes)
    ctx = RequestContext(record["client"], record["method"], record["path"],
                         record["request_id"])
    for name in ACCESS_FIELDS[1:]:
        value = record[name]
        if name in ("duration_ms", "ttfb_ms"):
            name = name[:-3]
            if type(value) in (int, float):
                value = value / 1000
        setattr(ctx, name, value)
    return record["time"], ctx


def request_log(path, when: float, **kwargs) -> AccessLog:
    return AccessLog(str(path), max_bytes=1_000_000, backups=1, clock=lambda: when, **kwargs)


def request_values(**changes) -> tuple[float, tuple]:
    """format_request's arguments: what request() queues."""
    when, ctx = request_context(**changes)
    return when, accesslog._context_values(ctx)


def test_request_lines_equal_the_dict_path(tmp_path):
    path = tmp_path / "a.log"
    when, ctx = request_context()
    alog = request_log(path, when)
    alog.request(ctx)
    alog.request(request_context(ttfb_ms=None, prompt_tokens=None, completion_tokens=None,
                                 stream=False, duration_ms=0.0004)[1])
    alog.close()
    lines = read_lines(path)
    assert lines[0] == full_record(0)
    assert list(lines[0]) == list(ACCESS_FIELDS)
    assert lines[1]["ttfb_ms"] is None and lines[1]["prompt_tokens"] is None
    assert lines[1]["stream"] is False and lines[1]["duration_ms"] == 0.0   # ms to the us
    assert alog.written == 2


def test_request_line_bytes(tmp_path):
    """The line, byte for byte: field order, number formats (time to the us, ms to the us)."""
    path = tmp_path / "a.log"
    when, ctx = request_context()
    ctx.duration, ctx.ttfb = 0.0123456, None
    alog = request_log(path, when)
    alog.request(ctx)
    alog.close()
    assert path.read_bytes() == (
        b'{"time":1700000000.500000,"request_id":"req-0","key_id":"alice","client":"10.0.0.1",'
        b'"method":"POST","path":"/v1/chat/completions","status":200,"bytes_in":123,'
        b'"bytes_out":456,"duration_ms":12.346,"ttfb_ms":null,"stream":true,"prompt_tokens":10,'
        b'"completion_tokens":20,"outcome":"ok","model":"demo"}\n')


def test_request_line_without_a_model_says_null(tmp_path):
    path = tmp_path / "a.log"
    when, ctx = request_context()
    ctx.model = None                     # a request that named no model (/health, /metrics)
    alog = request_log(path, when)
    alog.request(ctx)
    alog.close()
    assert path.read_bytes().endswith(b'"outcome":"ok","model":null}\n')


def test_request_reads_the_context_when_called(tmp_path):
    """The context may change (or be reused) once the request is logged: the line keeps what it
    said then, and nothing is formatted on the caller's side."""
    path = tmp_path / "a.log"
    when, ctx = request_context()
    alog = StalledLog(str(path), max_bytes=1_000_000, backups=1, clock=lambda: when)
    alog.request(ctx)
    ctx.status, ctx.outcome, ctx.bytes_out = 500, "error", 0
    alog.gate.set()
    alog.close()
    assert read_lines(path) == [full_record(0)]


def test_format_request_escapes_strings_and_strips_the_query():
    line = accesslog.format_request(*request_values(
        client='1.2.3.4\n{"forged":1}', path="/v1/models?api_key=sk-secret-value-123",
        key_id="k\u00e9y", method="G" * 10_000))
    assert line.endswith("}\n") and line.count("\n") == 1 and line.isascii()
    record = json.loads(line)
    assert record["client"] == '1.2.3.4\n{"forged":1}'
    assert record["path"] == "/v1/models" and "sk-secret" not in line
    assert record["key_id"] == "k\u00e9y"
    assert record["method"] == "G" * accesslog.MAX_VALUE_CHARS


def test_format_request_memo_keeps_each_field_its_own_rules(monkeypatch):
    """Repeated strings come from a memo: the same text stays whole as a key id and loses its
    query string as a path, however often it repeats; past the memo's bound, still right."""
    for _ in range(3):
        record = json.loads(accesslog.format_request(*request_values(
            key_id="a?b", client="a?b", outcome="a?b", path="a?b")))
        assert (record["key_id"], record["client"], record["outcome"], record["path"]) == \
            ("a?b", "a?b", "a?b", "a")
    monkeypatch.setattr(accesslog, "_QUOTED_MAX", len(accesslog._QUOTED))
    for i in range(3):
        record = json.loads(accesslog.format_request(*request_values(client=f"10.0.0.{i}\n")))
        assert record["client"] == f"10.0.0.{i}\n"
    assert "10.0.0.0\n" not in accesslog._QUOTED


def test_format_request_memo_keeps_no_long_strings():
    """A long path (up to the 8 KiB target limit) is quoted each time, not remembered: random
    long paths cannot grow the memo to megabytes."""
    long_path = "/" + "x" * 8000
    for _ in range(2):
        record = json.loads(accesslog.format_request(*request_values(path=long_path)))
        assert record["path"] == long_path[:accesslog.MAX_VALUE_CHARS]
    assert long_path not in accesslog._QUOTED_PATHS
    assert all(len(k) <= accesslog._QUOTED_MEMO_LEN
               for memo in (accesslog._QUOTED, accesslog._QUOTED_PATHS) for k in memo)


@pytest.mark.parametrize("changes", [
    {"duration_ms": float("nan")}, {"ttfb_ms": float("inf")}, {"status": "200"},
    {"prompt_tokens": 1.5}, {"stream": 1}, {"time": None}, {"path": None},
])
def test_request_with_a_bad_value_falls_back_to_the_cleaned_dict(tmp_path, changes):
    with pytest.raises((ValueError, TypeError, AttributeError)):
        accesslog.format_request(*request_values(**changes))
    path = tmp_path / "a.log"
    when, ctx = request_context(**changes)
    alog = request_log(path, when)
    alog.request(ctx)
    alog.close()
    (record,) = read_lines(path)          # still one valid JSON line
    assert record["request_id"] == "req-0" and alog.write_errors == 0
    for name, value in changes.items():
        if isinstance(value, float) and not math.isfinite(value):
            assert record[name] is None   # non-finite floats become null
        elif value is None:
            assert record.get(name) is None
        else:
            assert record[name] == value  # kept as given, by json


def test_request_is_bounded_like_write(tmp_path):
    alog = StalledLog(str(tmp_path / "a.log"), max_bytes=1_000_000, backups=1, queue_size=2)
    for _ in range(5):
        alog.request(request_context()[1])
    assert alog.dropped == 3
    alog.gate.set()
    alog.close()
