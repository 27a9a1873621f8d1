"""Health endpoints and the backend state file, graceful shutdown in-process, and the gateway as a
real process (SIGTERM -> exit 0, bad config -> exit 2)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import Stack, aio, chat, eventually, get, post
from llamagw import app as gateway

GATEWAY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "scripts", "gateway.py")


def _write_state(s: Stack, word: str | None) -> None:
    path = s.config.health_file
    if word is None:
        if os.path.exists(path):
            os.unlink(path)
    else:
        with open(path, "w") as f:
            f.write(word + "\n")
    s.gw.backend._read_at = -1e9      # skip the state file cache (STATE_FILE_TTL)


@aio
async def test_ping_and_health_without_key(tmp_path):
    async with Stack(tmp_path) as s:
        r = await s.one(get("/ping", key=None))
        assert r.status == 200 and r.json() == {"status": "ok"}
        r = await s.one(get("/health", key=None))
        assert r.status == 200
        body = r.json()
        assert body["backend"] == "unknown" and body["status"] == "ok"
        assert body["in_flight"] == 1        # this request
        assert body["queue"] == 0 and body["uptime_s"] >= 0
        _write_state(s, "starting")
        body = (await s.one(get("/health", key=None))).json()
        assert body["backend"] == "starting" and body["status"] == "starting"
        assert s.fake.requests == []


@pytest.mark.parametrize("state,retry_after", [("starting", "5"), ("failed", "30"),
                                               ("stopping", "5"), ("garbage", "5")])
@aio
async def test_backend_not_ready_answers_503_without_contacting_it(tmp_path, state, retry_after):
    async with Stack(tmp_path) as s:
        _write_state(s, state)
        started = time.monotonic()
        r = await s.one(post("/v1/chat/completions", chat()))
        assert time.monotonic() - started < 0.3
        assert r.status == 503 and r.get("retry-after") == retry_after
        assert r.error()["type"] == "service_unavailable"
        r = await s.one(get("/v1/models"))
        assert r.status == 503
        assert s.fake.requests == [] and s.fake.connections_opened == 0


@pytest.mark.parametrize("state", ["ready", None])
@aio
async def test_backend_ready_or_unknown_is_proxied(tmp_path, state):
    async with Stack(tmp_path) as s:
        _write_state(s, state)
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 200 and len(s.fake.requests) == 1


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("now,code,retry_after", [
    ("starting", "backend_starting", "5"),   # the supervisor has noticed the death
    ("failed", "backend_failed", "30"),      # ... and given up
    ("ready", "backend_starting", "5"),      # not yet noticed: it restarts every dead one
])
@aio
async def test_refused_connection_is_answered_from_the_state_file_read_at_once(
        tmp_path, unix, now, code, retry_after):
    # llama-server just died: its port refuses (its socket file is gone) while the gateway
    # still holds `ready`, read less than STATE_FILE_TTL ago.
    env = {"BACKEND_SOCKET": str(tmp_path / "gone.sock")} if unix else {}
    async with Stack(tmp_path, env, start_fake=False, backend_port=_closed_port()) as s:
        _write_state(s, "ready")
        assert s.gw.backend.get() == "ready"           # cached now
        with open(s.config.health_file, "w") as f:     # the supervisor's next word
            f.write(now + "\n")
        started = time.monotonic()
        for path in ("/v1/chat/completions", "/api/chat"):
            r = await s.one(post(path, chat()))
            assert r.status == 503 and r.get("retry-after") == retry_after, r
            if path == "/api/chat":
                assert set(r.json()) == {"error"}
            else:
                assert r.error()["code"] == code
        assert time.monotonic() - started < 0.3


@aio
async def test_first_request_after_the_backend_is_ready_again_goes_through(tmp_path):
    # The gateway refused a request while `starting` (and holds that word); the supervisor
    # writes `ready`: the next request is not refused from the cache.
    async with Stack(tmp_path) as s:
        _write_state(s, "starting")
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 503 and r.error()["code"] == "backend_starting"
        with open(s.config.health_file, "w") as f:
            f.write("ready\n")
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 200, r


@aio
async def test_refused_connection_without_a_supervisor_is_502(tmp_path):
    # No state file: nobody restarts llama-server, so no Retry-After promise.
    async with Stack(tmp_path, start_fake=False, backend_port=_closed_port()) as s:
        _write_state(s, None)
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 502 and r.error()["code"] == "upstream_unavailable"
        assert r.get("retry-after") is None


# ---------------- graceful shutdown ----------------

@aio
async def test_shutdown_refuses_new_and_closes_idle_connections(tmp_path):
    async with Stack(tmp_path) as s:
        idle = await s.client()
        assert (await idle.request(get("/ping", key=None))).status == 200
        fresh = await s.client()                   # connected, nothing sent yet
        task = asyncio.ensure_future(s.gw.shutdown(1.0))
        started = time.monotonic()
        assert await idle.closed(0.5)
        assert await fresh.closed(0.5)
        assert time.monotonic() - started < 0.3
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", s.port), 1.0)
        await asyncio.wait_for(task, 2.0)


@aio
async def test_shutdown_lets_a_stream_finish_then_closes(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=6, interval=0.1)))
        slow = await s.client()
        await slow.send(post("/v1/chat/completions", chat(delay_first_byte=0.3)))
        await c.head()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        task = asyncio.ensure_future(s.gw.shutdown(2.0))
        # the request still waiting for llama-server gets its answer with Connection: close
        r = await slow.response()
        assert r.status == 200 and r.get("connection") == "close"
        assert await slow.closed(1.0)
        # the stream runs to its end (terminator included), then the connection closes
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(c.reader.read(65536), 2.0)
            assert data, "closed before the stream ended"
            rest += data
        assert b"[DONE]" in rest
        assert await c.closed(1.0)
        await asyncio.wait_for(task, 3.0)
        assert time.monotonic() - started < 1.5
        assert s.fake.disconnects == 0


@aio
async def test_shutdown_answers_queued_requests_backend_stopping_at_once(tmp_path):
    async with Stack(tmp_path, {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "4",
                                "QUEUE_TIMEOUT": "5", "GRACEFUL_TIMEOUT": "2"}) as s:
        running = await s.client()
        await running.send(post("/v1/chat/completions",
                                chat(stream=True, events=8, interval=0.05)))
        await running.head()
        queued = await s.client()
        await queued.send(post("/v1/chat/completions", chat()))
        ollama_queued = await s.client()      # an Ollama route: its own error shape
        await ollama_queued.send(post("/api/chat", {"model": "x", "stream": False,
                                                    "messages": [{"role": "user",
                                                                  "content": "hi"}]}))
        await eventually(lambda: s.gw.admission.slots.waiting == 2, 1.0)
        started = time.monotonic()
        task = asyncio.ensure_future(s.gw.shutdown())
        r = await queued.response()
        assert time.monotonic() - started < 0.3            # at once, not after the queue wait
        assert r.status == 503 and r.error()["code"] == "backend_stopping", r
        assert r.get("retry-after") == "5" and r.get("connection") == "close"
        r = await ollama_queued.response()
        assert r.status == 503 and r.get("retry-after") == "5"
        assert set(r.json()) == {"error"} and "stopping" in r.json()["error"]
        assert await queued.closed(1.0) and await ollama_queued.closed(1.0)
        await asyncio.wait_for(task, 3.0)                  # the running stream finished
        assert len(s.fake.requests) == 1


@pytest.mark.parametrize("split", [True, False], ids=["task", "callbacks"])
@aio
async def test_shutdown_cuts_a_stream_longer_than_the_grace(tmp_path, split):
    """Both ways a request is served: by the connection's task (its body arrives after its
    head) and on the callback path (the whole request at once and a pooled llama-server
    connection: no task)."""
    async with Stack(tmp_path, {"GRACEFUL_TIMEOUT": "0.4"}, access_log=True) as s:
        assert (await s.one(post("/v1/chat/completions", chat()))).status == 200   # pool warm
        c = await s.client()
        raw = post("/v1/chat/completions", chat(stream=True, events=100, interval=0.05))
        if split:
            await c.send(raw[:-3])
            await asyncio.sleep(0.05)
            raw = raw[-3:]
        await c.send(raw)
        await c.head()
        (conn,) = s.gw.connections
        assert (conn.task is None) == (not split)
        started = time.monotonic()
        await asyncio.wait_for(s.gw.shutdown(), 3.0)
        elapsed = time.monotonic() - started
        assert 0.35 <= elapsed < 1.5
        data = b""
        try:
            while True:
                more = await asyncio.wait_for(c.reader.read(65536), 1.0)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
        assert not data.endswith(b"0\r\n\r\n")
        # everything is released by the time shutdown returns, whichever path served it
        assert s.gw.connections == set()
        assert s.gw.admission.slots.active == 0 and s.gw.in_flight == 0
        assert s.gw.admission.concurrency.in_flight("alice") == 0
        await s.fake.wait_for(lambda: s.fake.disconnects == 1, 1.0)
        assert s.access_records()[-1]["outcome"] == "cancelled"


# ---------------- the real process ----------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME")}
    env.update({"HOST": "127.0.0.1", "PORT": str(_free_port()), "PORT_HEALTH": str(_free_port()),
                "PORT_BACKEND": str(_free_port()), "DATA_DIR": str(tmp_path / "data"),
                "RUN_DIR": str(tmp_path / "run"), "AUTH_ENABLED": "false",
                "GRACEFUL_TIMEOUT": "1"})
    env.update(extra)
    return env


def test_process_sigterm_exits_0(tmp_path):
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, GATEWAY], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                with socket.create_connection(("127.0.0.1", int(env["PORT"])), timeout=0.5) as sk:
                    sk.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    sk.settimeout(2)
                    assert sk.recv(100).startswith(b"HTTP/1.1 200")
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "gateway did not start listening"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert b"gateway stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_process_bad_config_exits_2_naming_the_variable(tmp_path):
    env = _env(tmp_path, PORT="abc")
    proc = subprocess.run([sys.executable, GATEWAY], env=env, capture_output=True, timeout=10)
    assert proc.returncode == 2
    assert b"PORT" in proc.stderr and b"abc" in proc.stderr


def test_process_unsafe_key_file_exits_2(tmp_path):
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("alice:sk-alice-0123456789abcdef\n")
    os.chmod(keyfile, 0o644)
    env = _env(tmp_path, AUTH_ENABLED="true", AUTH_KEYS_FILE=str(keyfile))
    proc = subprocess.run([sys.executable, GATEWAY], env=env, capture_output=True, timeout=10)
    assert proc.returncode == 2, proc.stderr
    assert b"sk-alice" not in proc.stderr


GC_PROBE = """
import gc, os, signal, socket, sys, threading, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from llamagw import app as gateway
before = (gc.get_threshold()[0], gc.get_freeze_count())
def probe():
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.2)
    print(*before, gc.get_threshold()[0], gc.get_freeze_count(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=probe, daemon=True).start()
sys.exit(gateway.main())
"""


def test_process_freezes_startup_objects_and_collects_less_often(tmp_path):
    # Per-connection reference cycles (asyncio transports) made the default gen-0 threshold
    # collect every few connections; the running gateway raises it and freezes what start-up made.
    proc = subprocess.run([sys.executable, "-c", GC_PROBE, GATEWAY], env=_env(tmp_path),
                          capture_output=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    gen0_before, frozen_before, gen0_after, frozen_after = map(int, proc.stdout.split())
    assert (gen0_before, frozen_before) == (700, 0)
    assert gen0_after == gateway.GC_GEN0_THRESHOLD
    assert frozen_after > 10_000       # modules, config, keys: every object start-up left
