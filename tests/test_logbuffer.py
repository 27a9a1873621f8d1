"""llamagw.observe.logbuffer: redaction, the bounded ring, the logging handler, the file
follower (backfill, growth, partial lines, rotation by symlink, truncation, its thread)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from llamagw.observe import logbuffer
from llamagw.observe.logbuffer import BufferHandler, LogBuffer, LogFollower

SECRET = "sk-Q0bXr4nd0mS3cr3tV4lu3abcdefghijklmnopqrstu"


@pytest.mark.parametrize("line", [
    f"Authorization: Bearer {SECRET}",
    f"authorization: bearer abc.DEF-123_~+/==",
    f"x-api-key: {SECRET}",
    f'{{"api_key": "{SECRET}"}}',
    f"key {SECRET} refused",
    f"api-key=hunter2hunter2 other=1",
    f"password=correct-horse-battery",
    f"access_token: eyJhbGciOi.J9.x",
    f"Basic dXNlcjpwYXNz",
])
def test_redact_masks_secrets(line):
    out = logbuffer.redact(line)
    for secret in (SECRET, "abc.DEF-123", "hunter2", "correct-horse", "eyJhbGciOi",
                   "dXNlcjpwYXNz"):
        assert secret not in out
    assert "***" in out


@pytest.mark.parametrize("line", [
    "print_info: BOS token        = 1 '<s>'",
    "slot update_slots: id  0 | task 3 | n_tokens = 512",
    "GET /v1/models 200 key=alice",
    "task-12 done",
])
def test_redact_leaves_ordinary_lines(line):
    assert logbuffer.redact(line) == line


def test_clean_strips_ansi_and_controls_and_bounds_length():
    assert logbuffer.clean("\x1b[31mred\x1b[0m\tx\x00y\x07") == "red\txy"
    long = logbuffer.clean("a" * 100_000)
    assert len(long) == logbuffer.MAX_LINE_CHARS and long.endswith("\u2026")
    assert logbuffer.clean("<img src=x onerror=alert(1)>") == "<img src=x onerror=alert(1)>"


def test_ring_is_bounded_and_tail_filters():
    buf = LogBuffer(capacity=10, clock=lambda: 5.0)
    for i in range(25):
        buf.append("gateway" if i % 2 else "llama", "info", f"line {i}")
    assert len(buf) == 10
    assert [e["text"] for e in buf.tail(3)] == ["line 22", "line 23", "line 24"]
    assert [e["text"] for e in buf.tail(100, source="gateway")] == \
        [f"line {i}" for i in (15, 17, 19, 21, 23)]
    assert buf.tail(0) == []
    e = buf.tail(1)[0]
    assert e == {"t": 5.0, "source": "llama", "level": "info", "text": "line 24"}
    e["text"] = "changed"                      # a copy: the ring is not changed through it
    assert buf.tail(1)[0]["text"] == "line 24"


def test_append_redacts_and_tells_listeners():
    buf = LogBuffer()
    seen = []
    buf.add_listener(seen.append)
    buf.add_listener(lambda e: 1 / 0)          # a broken listener breaks nothing
    entry = buf.append("llama", "loud", f"got {SECRET}")
    assert SECRET not in entry["text"] and entry["level"] == "info"
    assert seen == [entry]
    for _ in range(logbuffer.MAX_LISTENERS - 2):
        buf.add_listener(print)
    with pytest.raises(RuntimeError):
        buf.add_listener(print)


def test_buffer_handler_keeps_gateway_records():
    buf = LogBuffer()
    logger = logging.getLogger("test.logbuffer.handler")
    logger.propagate = False
    handler = BufferHandler(buf)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("not kept: below the handler's level")
        logger.warning("client %s sent Bearer %s", "1.2.3.4", SECRET)
        logger.error("boom")
    finally:
        logger.removeHandler(handler)
    lines = buf.tail()
    assert [(e["source"], e["level"]) for e in lines] == [("gateway", "warning"),
                                                          ("gateway", "error")]
    assert lines[0]["text"].startswith("test.logbuffer.handler client 1.2.3.4 sent Bearer ")
    assert SECRET not in lines[0]["text"]


def test_guess_level():
    assert logbuffer.guess_level("srv  load_model: failed to load model") == "error"
    assert logbuffer.guess_level("E some llama error") == "error"
    assert logbuffer.guess_level("W warning: low memory") == "warning"
    assert logbuffer.guess_level("main: server is listening") == "info"


def write(path, text, mode="a"):
    with open(path, mode, encoding="utf-8") as fh:
        fh.write(text)


def texts(buf, source=None):
    return [e["text"] for e in buf.tail(2000, source=source)]


def test_follower_reads_new_lines_and_waits_for_partial_ones(tmp_path):
    path = tmp_path / "server.log"
    buf = LogBuffer()
    follower = LogFollower(buf, {"llama": str(path)})
    assert follower.poll_once() == 0               # no file yet: fine
    write(path, "one\ntwo\nthr")
    assert follower.poll_once() == 2
    write(path, "ee\n\n   \nfour\n")
    assert follower.poll_once() == 2               # blank lines are not kept
    assert texts(buf) == ["one", "two", "three", "four"]
    assert {e["source"] for e in buf.tail()} == {"llama"}
    assert follower.poll_once() == 0


def test_follower_backfills_only_the_end_of_a_big_file(tmp_path):
    path = tmp_path / "boot.log"
    write(path, "".join(f"old line {i:05d}\n" for i in range(10_000)))   # ~170 KB
    buf = LogBuffer(capacity=10_000)
    LogFollower(buf, {"boot": str(path)}, backfill_bytes=1000).poll_once()
    got = texts(buf)
    assert got[-1] == "old line 09999"
    assert 50 <= len(got) <= 1000 // 15
    assert all(t.startswith("old line ") and len(t) == 14 for t in got)   # no half line


def test_follower_follows_the_latest_symlink_and_truncation(tmp_path):
    a, b, link = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "latest.txt"
    write(a, "a1\n")
    os.symlink("a.log", link)
    buf = LogBuffer()
    follower = LogFollower(buf, {"llama": str(link)})
    follower.poll_once()
    write(b, "b1\nb2\n")
    os.remove(link)
    os.symlink("b.log", link)                      # llama-server restarted: a new file
    follower.poll_once()
    assert texts(buf) == ["a1", "b1", "b2"]
    write(b, "c1\n", mode="w")                      # truncated and rewritten
    follower.poll_once()
    assert texts(buf) == ["a1", "b1", "b2", "c1"]


def test_follower_reads_a_storm_in_bounded_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(logbuffer, "MAX_READ_BYTES", 1000)
    path = tmp_path / "x.log"
    write(path, "")
    buf = LogBuffer(capacity=10_000)
    follower = LogFollower(buf, {"llama": str(path)})
    follower.poll_once()
    write(path, "".join(f"line {i:04d}\n" for i in range(500)))          # 5500 bytes
    counts = [follower.poll_once() for _ in range(8)]
    assert max(counts) <= 100 and sum(counts) == 500
    assert texts(buf) == [f"line {i:04d}" for i in range(500)]


def test_follower_thread_appends_and_stops(tmp_path):
    path = tmp_path / "x.log"
    write(path, "")
    buf = LogBuffer()
    follower = LogFollower(buf, {"boot": str(path)}, interval_s=0.02)
    follower.start()
    try:
        write(path, f"hello Bearer {SECRET}\n")
        deadline = time.monotonic() + 5
        while not buf.tail() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        follower.stop()
    assert texts(buf) == ["hello Bearer ***"]
    assert not follower._thread.is_alive()


def test_default_sources(tmp_path):
    (tmp_path / "llama-cpu").mkdir()
    sources = logbuffer.default_sources(str(tmp_path))
    assert sources == {"boot": str(tmp_path / "_boot" / "latest.txt"),
                       "llama": str(tmp_path / "llama-gpu" / "latest.txt")}
    write(tmp_path / "llama-cpu" / "latest.txt", "")
    assert logbuffer.default_sources(str(tmp_path))["llama"] == \
        str(tmp_path / "llama-cpu" / "latest.txt")
