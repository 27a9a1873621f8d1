"""The benchmark's C tools (tests/bench/replayfake.c, sseload.c) and the recording between them:
cases (a) and (b) are measured with these, so what they send and count is pinned here against
the Python fake."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "bench"))
sys.path.insert(0, str(HERE / "fakes"))

import run_bench  # noqa: E402
from fake_llama import FakeLlamaThread  # noqa: E402

STREAM_BODY = dict(run_bench.SMALL_BODY, stream=True, fake={"events": 7, "interval": 0})
# Deadline for one tool run or one socket read in these tests.
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-tools")
    return {"replayfake": run_bench.build_c_tool(run_bench.REPLAYFAKE_SRC, out),
            "sseload": run_bench.build_c_tool(run_bench.SSELOAD_SRC, out)}


@pytest.fixture(scope="module")
def fake():
    with FakeLlamaThread() as srv:
        yield srv


def _replay(tools, tmp_path, pieces, *pace):
    data = tmp_path / "pieces.bin"
    run_bench.write_pieces(data, pieces)
    port, sock = run_bench.free_port(), str(tmp_path / "replay.sock")
    proc = subprocess.Popen([str(tools["replayfake"]), "--pieces", str(data), "--port", str(port),
                             "--unix", sock, *pace], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    line = proc.stdout.readline()   # printed once both listeners are up
    assert b"listening" in line, line
    return proc, port, sock


def _stop(proc):
    proc.terminate()
    assert proc.wait(TIMEOUT) == 0   # SIGTERM ends its loop cleanly


def _read_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        piece = s.recv(n - len(buf))
        assert piece, f"closed after {len(buf)} of {n} bytes"
        buf += piece
    return buf


def _sseload(tools, tmp_path, where, body, **kw):
    req = tmp_path / "req.bin"
    data = json.dumps(body).encode()
    req.write_bytes(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(data), data))
    argv = [str(tools["sseload"]), *(["--unix", where] if isinstance(where, str)
                                      else ["--port", str(where)]), "--request", str(req)]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_record_cuts_a_stream_into_head_chunks_and_the_last_chunk_marker(fake):
    pieces = run_bench.record_answer(fake.port, STREAM_BODY)
    assert pieces[0].startswith(b"HTTP/1.1 200 OK\r\n") and pieces[0].endswith(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in pieces[0].lower()
    assert pieces[-1] == b"0\r\n\r\n"
    for chunk in pieces[1:-1]:   # each one chunk: "<hex size>\r\n<size bytes>\r\n"
        size, _, rest = chunk.partition(b"\r\n")
        assert len(rest) == int(size, 16) + 2 and rest.endswith(b"\r\n")
    body = b"".join(c.partition(b"\r\n")[2][:-2] for c in pieces[1:-1])
    events = body.split(b"\n\n")
    assert len(events) == 7 + 2 + 1 and events[-1] == b""   # 7 content events, usage, [DONE]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert b'"usage"' in events[-3] and events[-2] == b"data: [DONE]"
    assert body.endswith(b"data: [DONE]\n\n")


def test_record_keeps_a_json_reply_whole(fake):
    pieces = run_bench.record_answer(fake.port, run_bench.SMALL_BODY)
    assert len(pieces) == 1
    head, _, body = pieces[0].partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(body) in head.lower()
    assert json.loads(body)["object"] == "chat.completion"


def test_replayfake_answers_every_post_with_the_recorded_bytes_keep_alive_and_pipelined(
        tools, tmp_path, fake):
    pieces = run_bench.record_answer(fake.port, run_bench.SMALL_BODY)
    proc, port, sock = _replay(tools, tmp_path, pieces)
    try:
        body = b'{"x": 1}'
        post = b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)
        for where in (port, sock):
            with run_bench.connect(where, TIMEOUT) as s:
                s.sendall(post)
                assert _read_exactly(s, len(pieces[0])) == pieces[0]
                s.sendall(post * 3)   # pipelined: three answers, in order, same connection
                assert _read_exactly(s, 3 * len(pieces[0])) == pieces[0] * 3
        status, health = run_bench.http_request(port, "GET", "/health")
        assert (status, json.loads(health)) == (200, {"status": "ok"})
        with run_bench.connect(port, TIMEOUT) as s:   # Connection: close is honoured
            s.sendall(post.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
            assert _read_exactly(s, len(pieces[0])) == pieces[0]
            assert s.recv(1) == b""
    finally:
        _stop(proc)


def test_replayfake_closes_on_what_it_cannot_frame(tools, tmp_path, fake):
    proc, port, _sock = _replay(tools, tmp_path, [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    try:
        with run_bench.connect(port, TIMEOUT) as s:
            s.sendall(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            assert s.recv(100) == b""
    finally:
        _stop(proc)


def test_sseload_counts_every_event_of_every_stream_through_replayfake(tools, tmp_path, fake):
    pieces = run_bench.record_answer(fake.port, STREAM_BODY)
    events = b"".join(pieces).count(b"data: ")
    proc, port, sock = _replay(tools, tmp_path, pieces)
    try:
        for where in (port, sock):
            r = _sseload(tools, tmp_path, where, STREAM_BODY, connections=4,
                         requests_per_conn=3)
            assert (r["failed"], r["error_count"], r["errors"]) == (0, 0, {})
            assert len(r["records"]) == 12 and len(r["connect_times"]) == 4
            for sent, ttfb, first_event, end, status, n in r["records"]:
                assert (status, n) == (200, events)
                assert 0 <= sent and 0 < ttfb <= first_event <= end < TIMEOUT
            assert r["wall"] > 0 and r["cpu_s"] >= 0
    finally:
        _stop(proc)


def test_sseload_runs_for_its_duration_on_keep_alive(tools, tmp_path, fake):
    proc, port, _sock = _replay(tools, tmp_path, run_bench.record_answer(fake.port, STREAM_BODY))
    try:
        t = time.monotonic()
        r = _sseload(tools, tmp_path, port, STREAM_BODY, connections=2, duration=0.3)
        assert 0.3 <= time.monotonic() - t < TIMEOUT
        assert r["failed"] == 0 and len(r["records"]) > 2 and len(r["connect_times"]) == 2
        # none started late: each decided and stamped before the deadline (sseload), printed to
        # the microsecond (so one at 0.2999996 reads 0.3)
        assert max(rec[0] for rec in r["records"]) <= 0.3 <= r["wall"]
    finally:
        _stop(proc)


def test_sseload_ends_a_content_length_reply_and_reports_a_non_200(tools, tmp_path, fake):
    r = _sseload(tools, tmp_path, fake.port, dict(run_bench.SMALL_BODY, fake={"status": 503}),
                 connections=1, requests_per_conn=2)
    assert [rec[4] for rec in r["records"]] == [503, 503]
    assert r["errors"] == {"HTTP 503": 2} and r["failed"] == 0


def test_sseload_counts_a_stream_cut_short_as_failed(tools, tmp_path, fake):
    body = dict(run_bench.SMALL_BODY, stream=True, fake={"events": 5, "drop_after": 2})
    r = _sseload(tools, tmp_path, fake.port, body, connections=1, requests_per_conn=1)
    assert r["failed"] == 1 and r["records"] == []
    assert r["errors"] == {"connection lost mid-response": 1}


def test_replayfake_paces_a_stream_on_the_python_fakes_schedule(tools, tmp_path, fake):
    # 4 content events 0.1 s apart: head and event 0 at once, event i at start + i * 0.1, the
    # usage event, [DONE] and the last-chunk marker right after event 3 (as the Python fake)
    body = dict(run_bench.SMALL_BODY, stream=True, fake={"events": 4, "interval": 0.1})
    pieces = run_bench.record_answer(fake.port, body)
    assert len(pieces) == 1 + 4 + 3
    proc, port, _sock = _replay(tools, tmp_path, pieces, "--interval", "0.1", "--events", "4")
    try:
        with run_bench.connect(port, TIMEOUT) as s:
            data = json.dumps(body).encode()
            t0 = time.monotonic()
            s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            arrived = []
            for piece in pieces:
                assert _read_exactly(s, len(piece)) == piece
                arrived.append(time.monotonic() - t0)
        # never early; late by less than an interval (the next event's due time)
        assert arrived[1] < 0.1                        # the first event at once
        for i in (2, 3, 4):                            # event i - 1, due at (i - 1) * 0.1 s
            assert (i - 1) * 0.1 <= arrived[i] < (i - 1) * 0.1 + 0.1
        assert arrived[-1] - arrived[4] < 0.1          # the end follows the last event
        # many streams at once keep the schedule; sseload sees the whole stream each time
        r = _sseload(tools, tmp_path, port, body, connections=50, requests_per_conn=2)
        assert r["failed"] == 0 and len(r["records"]) == 100
        assert all(0.3 <= rec[3] < 0.6 and rec[5] == 4 + 2 for rec in r["records"])
    finally:
        _stop(proc)


def test_sseload_opens_many_connections_a_few_at_a_time_and_reads_meanwhile(tools, tmp_path,
                                                                           fake):
    # 300 streams of 3 events 0.1 s apart, at most 8 connects in progress, a replayfake of 2
    # threads: every stream is whole, each connection timed once, and the last ones start
    # while the first still run
    body = dict(run_bench.SMALL_BODY, stream=True, fake={"events": 3, "interval": 0.1})
    proc, port, _sock = _replay(tools, tmp_path, run_bench.record_answer(fake.port, body),
                                "--interval", "0.1", "--events", "3", "--threads", "2")
    try:
        r = _sseload(tools, tmp_path, port, body, connections=300, requests_per_conn=1,
                     connect_parallel=8)
        assert (r["failed"], r["error_count"]) == (0, 0)
        assert len(r["records"]) == 300 and len(r["connect_times"]) == 300
        assert all(rec[4] == 200 and rec[5] == 3 + 2 and 0.2 <= rec[3] < 1.0
                   for rec in r["records"])
        assert max(rec[0] for rec in r["records"]) < min(rec[0] + rec[3] for rec in r["records"])
    finally:
        _stop(proc)


def test_sseload_counts_a_refused_connect_as_failed(tools, tmp_path):
    r = _sseload(tools, tmp_path, run_bench.free_port(), STREAM_BODY, connections=3,
                 requests_per_conn=1)
    assert (r["failed"], r["records"], r["connect_times"]) == (3, [], [])
    assert r["errors"] == {"connect: Connection refused": 3}


def test_replayfake_catches_up_byte_exact_when_behind_its_schedule(tools, tmp_path, fake):
    # the fake stopped for 0.35 s mid-stream: when it runs again, the writes then due go out
    # at once and together (one sendmsg), the rest on schedule; the same bytes, in order
    body = dict(run_bench.SMALL_BODY, stream=True, fake={"events": 8, "interval": 0.05})
    pieces = run_bench.record_answer(fake.port, body)
    proc, port, _sock = _replay(tools, tmp_path, pieces, "--interval", "0.05", "--events", "8")
    try:
        with run_bench.connect(port, TIMEOUT) as s:
            data = json.dumps(body).encode()
            s.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            assert _read_exactly(s, len(pieces[0]) + len(pieces[1])) == pieces[0] + pieces[1]
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.35)
            t = time.monotonic()
            proc.send_signal(signal.SIGCONT)
            rest = b"".join(pieces[2:])
            assert _read_exactly(s, len(rest)) == rest
            assert time.monotonic() - t < 0.3   # the late writes did not wait their turn
    finally:
        _stop(proc)


def _pyrelay(tmp_path, unix_path):
    port = run_bench.free_port()
    proc = subprocess.Popen([sys.executable, str(run_bench.PYRELAY), "--port", str(port),
                             "--unix", unix_path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    line = proc.stdout.readline()   # printed once it listens
    assert b"relaying" in line, line
    return proc, port


def test_pyrelay_passes_bytes_both_ways_and_ends_with_the_upstream(tools, tmp_path, fake):
    pieces = run_bench.record_answer(fake.port, run_bench.SMALL_BODY)
    fake_proc, _port, sock = _replay(tools, tmp_path, pieces)
    relay, port = _pyrelay(tmp_path, sock)
    try:
        body = b'{"x": 1}'
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body), body)
        with run_bench.connect(port, TIMEOUT) as a, run_bench.connect(port, TIMEOUT) as b:
            for s in (a, b, a):      # two clients, each on its own upstream connection
                s.sendall(post)
                assert _read_exactly(s, len(pieces[0])) == pieces[0]
            b.sendall(post * 3)      # pipelined bytes go through as they are
            assert _read_exactly(b, 3 * len(pieces[0])) == pieces[0] * 3
            # The upstream closes after a Connection: close answer: so does the relay.
            a.sendall(post.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n"))
            assert _read_exactly(a, len(pieces[0])) == pieces[0]
            assert a.recv(1) == b""
            b.sendall(post)          # the other client's pair is untouched
            assert _read_exactly(b, len(pieces[0])) == pieces[0]
    finally:
        relay.terminate()
        relay.wait(TIMEOUT)
        _stop(fake_proc)


def test_pyrelay_drops_a_client_whose_upstream_cannot_be_reached(tmp_path):
    relay, port = _pyrelay(tmp_path, str(tmp_path / "nobody.sock"))
    try:
        with run_bench.connect(port, TIMEOUT) as s:
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass                 # aborted: a reset is as good as a close here
        assert relay.poll() is None  # and the relay goes on
    finally:
        relay.terminate()
        relay.wait(TIMEOUT)
