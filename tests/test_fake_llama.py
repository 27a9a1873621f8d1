"""The fake llama-server does what its knobs say: shapes, streams, drops, stalls, keep-alive, CLI."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fakes.fake_llama import FakeLlama, FakeLlamaThread

FAKE_PATH = os.path.join(os.path.dirname(__file__), "fakes", "fake_llama.py")
IO_TIMEOUT = 2.0   # every socket read in these tests has this deadline


# ---- a tiny raw HTTP/1.1 client: sees framing exactly as sent -----------------------------------
class Raw:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def post(self, path: str, body: dict, extra: str = "") -> None:
        data = json.dumps(body).encode()
        self.send(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n%s\r\n" % (path.encode(), len(data), extra.encode())
                  + data)

    def get(self, path: str, extra: str = "") -> None:
        self.send(b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), extra.encode()))

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def until(self, sep: bytes) -> bytes | None:
        while sep not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self):
        raw = self.until(b"\r\n\r\n")
        assert raw is not None, "connection closed before a response head"
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return status, headers

    def json_response(self):
        status, headers = self.head()
        body = self.exactly(int(headers["content-length"]))
        return status, headers, json.loads(body)

    def chunk(self) -> bytes | None:
        """One chunk's payload; b"" for the terminator; None when the connection ended first."""
        line = self.until(b"\r\n")
        if line is None:
            return None
        size = int(line.strip(), 16)
        data = self.exactly(size + 2)
        if data is None:
            return None
        assert data.endswith(b"\r\n")
        if size == 0:
            return b""
        return data[:-2]

    def is_closed(self) -> bool:
        """True when the peer closed (EOF) within IO_TIMEOUT, with nothing more sent."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def events_of(chunks):
    return [json.loads(c[len(b"data: "):]) for c in chunks
            if c.startswith(b"data: {")]


@pytest.fixture
def srv():
    with FakeLlamaThread(keepalive_timeout=0.3) as s:
        yield s


# ---- plain routes --------------------------------------------------------------------------------
def test_get_routes_shapes_on_one_keepalive_connection(srv):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=IO_TIMEOUT)
    c.request("GET", "/health")
    r = c.getresponse()
    assert (r.status, json.loads(r.read())) == (200, {"status": "ok"})
    assert r.getheader("Content-Length") is not None
    c.request("GET", "/v1/models")
    r = c.getresponse()
    assert json.loads(r.read()) == {"object": "list", "data": [
        {"id": "demo", "object": "model", "owned_by": "llamacpp", "created": 0}]}
    c.request("GET", "/props")
    r = c.getresponse()
    assert json.loads(r.read()) == {"private": True}
    c.request("GET", "/slots")
    r = c.getresponse()
    assert json.loads(r.read()) == [{"id": i, "n_ctx": 4096, "is_processing": False}
                                    for i in range(4)]
    c.request("GET", "/nope?x=1")
    r = c.getresponse()
    assert r.status == 404
    assert json.loads(r.read())["error"]["type"] == "not_found_error"
    c.close()
    assert srv.connections_opened == 1
    assert [(q.method, q.path) for q in srv.requests] == [
        ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/props"), ("GET", "/slots"),
        ("GET", "/nope")]
    assert srv.requests[-1].target == "/nope?x=1"
    assert srv.requests[0].header("host") == "127.0.0.1:%d" % srv.port


def test_chat_completion_embeddings_shapes_and_recording(srv):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=IO_TIMEOUT)
    body = {"model": "m1", "messages": [{"role": "user", "content": "hello big world"}],
            "fake": {"events": 3}}
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"Content-Type": "application/json", "X-Test": "A"})
    r = c.getresponse()
    out = json.loads(r.read())
    assert r.status == 200 and r.getheader("Content-Type").startswith("application/json")
    assert out["object"] == "chat.completion" and out["model"] == "m1"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
    assert out["usage"] == {"completion_tokens": 3, "prompt_tokens": 3, "total_tokens": 6}
    assert out["timings"]["predicted_n"] == 3
    rec = srv.requests[-1]
    assert (rec.method, rec.path, rec.json()) == ("POST", "/v1/chat/completions", body)
    assert ("x-test", "A") in rec.headers and rec.body_len == len(rec.body)

    c.request("POST", "/v1/completions", json.dumps({"prompt": "a b"}))
    out = json.loads(c.getresponse().read())
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "".join("tok%d " % i for i in range(5))

    c.request("POST", "/v1/embeddings", json.dumps({"input": "hi"}))
    out = json.loads(c.getresponse().read())
    assert out["object"] == "list" and out["usage"]["prompt_tokens"] == 1
    assert out["data"][0]["object"] == "embedding" and len(out["data"][0]["embedding"]) == 8

    c.request("POST", "/v1/chat/completions", json.dumps({"fake": {"evnets": 3}}))
    r = c.getresponse()
    assert r.status == 400 and b"evnets" in r.read()
    c.request("POST", "/v1/chat/completions", b"{not json")
    r = c.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["type"] == "invalid_request_error"
    c.close()
    assert srv.connections_opened == 1


# ---- streams ---------------------------------------------------------------------------------------
def test_stream_framing_events_arrive_incrementally_with_pings(srv):
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"stream": True, "messages": [],
                                      "fake": {"events": 4, "interval": 0.1, "ping_every": 2}})
    t0 = time.monotonic()
    status, headers = raw.head()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "text/event-stream"
    first = raw.chunk()
    t_first = time.monotonic() - t0
    chunks = [first]
    while (c := raw.chunk()) not in (b"", None):
        chunks.append(c)
    t_all = time.monotonic() - t0
    assert c == b"", "stream ended without the chunked terminator"
    assert t_all >= 0.28 and t_first < t_all - 0.2, (t_first, t_all)
    # each SSE event in its own chunk: 4 content, pings after the 2nd and 4th, usage, [DONE]
    kinds = [b"ping" if ch == b": ping\n\n" else b"done" if ch == b"data: [DONE]\n\n"
             else b"data" for ch in chunks]
    assert kinds == [b"data", b"data", b"ping", b"data", b"data", b"ping", b"data", b"done"]
    evs = events_of(chunks)
    assert [e["choices"][0]["delta"].get("content") for e in evs[:4]] == [
        "tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert all(e["object"] == "chat.completion.chunk" for e in evs)
    assert evs[-1]["choices"][0]["finish_reason"] == "stop"
    assert evs[-1]["usage"]["completion_tokens"] == 4 and "timings" in evs[-1]
    # keep-alive after a complete stream
    raw.get("/health")
    assert raw.json_response()[0] == 200
    raw.close()
    srv.wait_until(lambda: srv.active_connections == 0)
    assert srv.disconnects == 0 and srv.active_streams == 0


def test_completion_stream_uses_text_completion_and_payload_size(srv):
    raw = Raw(srv.port)
    raw.post("/v1/completions", {"stream": True, "prompt": "x",
                                 "fake": {"events": 2, "payload_size": 50}})
    raw.head()
    chunks = []
    while (c := raw.chunk()) not in (b"", None):
        chunks.append(c)
    evs = events_of(chunks)
    assert [e["object"] for e in evs] == ["text_completion"] * 3
    assert [len(e["choices"][0]["text"]) for e in evs[:2]] == [50, 50]
    assert chunks[-1] == b"data: [DONE]\n\n"
    raw.close()


def test_drop_after_closes_without_terminator(srv):
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"stream": True, "fake": {"events": 10, "drop_after": 3}})
    assert raw.head()[0] == 200
    got = [raw.chunk() for _ in range(4)]
    assert [g is not None and g.startswith(b"data: {") for g in got[:3]] == [True] * 3
    assert got[3] is None, "expected EOF without the chunked terminator"
    srv.wait_until(lambda: srv.active_streams == 0)
    assert srv.drops == 1 and srv.disconnects == 0
    raw.close()


def test_stall_keeps_connection_open_and_records_disconnect(srv):
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"stream": True, "fake": {"events": 10, "stall_after": 2}})
    raw.head()
    assert raw.chunk().startswith(b"data: {") and raw.chunk().startswith(b"data: {")
    raw.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        raw.chunk()
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=IO_TIMEOUT)
    c.request("GET", "/slots")
    slots = json.loads(c.getresponse().read())
    assert [s["is_processing"] for s in slots] == [True, False, False, False]
    assert srv.active_streams == 1
    raw.close()
    srv.wait_until(lambda: srv.disconnects == 1 and srv.active_streams == 0)
    c.request("GET", "/slots")
    assert not any(s["is_processing"] for s in json.loads(c.getresponse().read()))
    c.close()


def test_disconnect_during_delay_first_byte_is_recorded(srv):
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"fake": {"delay_first_byte": 1.0}})
    srv.wait_until(lambda: len(srv.requests) == 1)
    raw.close()
    srv.wait_until(lambda: srv.disconnects == 1)
    assert srv.responses == 0


def test_delay_status_close_and_drop_before_head(srv):
    srv.defaults["status"] = 500
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"messages": []})
    status, _, body = raw.json_response()
    assert status == 500 and body["error"]["code"] == 500 and body["error"]["type"] == "server_error"
    raw.post("/v1/chat/completions", {"fake": {"status": None, "delay_first_byte": 0.15}})
    t0 = time.monotonic()
    status, _, body = raw.json_response()
    assert status == 200 and time.monotonic() - t0 >= 0.14
    srv.defaults["status"] = None
    raw.post("/v1/chat/completions", {"fake": {"close_after_response": True}})
    status, headers, _ = raw.json_response()
    assert status == 200 and headers["connection"] == "close"
    assert raw.is_closed()
    raw.close()
    raw = Raw(srv.port)
    raw.post("/v1/chat/completions", {"stream": True, "fake": {"drop_before_head": True}})
    assert raw.is_closed() and raw.buf == b""
    raw.close()
    assert srv.disconnects == 0


def test_loading_answers_503_on_every_route(srv):
    srv.loading = True
    raw = Raw(srv.port)
    for path in ("/health", "/v1/models", "/slots"):
        raw.get(path)
        status, _, body = raw.json_response()
        assert status == 503
        assert body == {"error": {"code": 503, "message": "Loading model",
                                  "type": "unavailable_error"}}
    raw.post("/v1/chat/completions", {"stream": True})
    assert raw.json_response()[0] == 503
    srv.loading = False
    raw.get("/health")
    assert raw.json_response()[0] == 200
    raw.close()


def test_keepalive_timeout_closes_idle_connection(srv):
    raw = Raw(srv.port)
    raw.get("/health")
    t0 = time.monotonic()
    assert raw.json_response()[0] == 200
    assert raw.is_closed()
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.5, elapsed
    raw.close()
    assert srv.disconnects == 0


def test_keepalive_timer_restarts_after_each_response(srv):
    raw = Raw(srv.port)
    for _ in range(4):   # 0.6 s of use in all, never 0.3 s idle: the connection must stay open
        raw.get("/health")
        assert raw.json_response()[0] == 200
        time.sleep(0.15)
    raw.close()
    assert srv.connections_opened == 1


def test_pipelined_chunked_and_expect_continue(srv):
    raw = Raw(srv.port)
    raw.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /props HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.json_response()[2] == {"status": "ok"}
    assert raw.json_response()[2] == {"private": True}
    body = json.dumps({"fake": {"events": 1}}).encode()
    raw.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    status, _, out = raw.json_response()
    assert status == 200 and out["choices"][0]["text"] == "tok0 "
    raw.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body))
    assert raw.head()[0] == 100
    raw.send(body)
    assert raw.json_response()[0] == 200
    raw.close()


def test_http10_closes_after_response(srv):
    raw = Raw(srv.port)
    raw.send(b"GET /health HTTP/1.0\r\n\r\n")
    status, headers, _ = raw.json_response()
    assert status == 200 and headers["connection"] == "close"
    assert raw.is_closed()
    raw.close()


def test_async_api_wait_for_and_stop():
    async def main():
        async with FakeLlama(keepalive_timeout=0.3, n_slots=2) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            data = json.dumps({"stream": True, "fake": {"stall_after": 0}}).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                         % len(data) + data)
            await s.wait_for(lambda: s.active_streams == 1, timeout=1.0)
            assert s.slots == [True, False]
            with pytest.raises(TimeoutError):
                await s.wait_for(lambda: s.disconnects == 1, timeout=0.05)
            writer.close()
            await s.wait_for(lambda: s.disconnects == 1 and s.active_streams == 0, timeout=1.0)
            port = s.port
        # stopped: the port no longer accepts
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    asyncio.run(main())


# ---- CLI mode (stands in for llama-server) --------------------------------------------------------
def _spawn(env_extra, *args):
    env = dict(os.environ, **env_extra)
    return subprocess.Popen([sys.executable, FAKE_PATH, "-m", "/models/x.gguf", "--host",
                             "127.0.0.1", "--port", "0", "-c", "512", "-ngl", "99", "-np", "2",
                             "--metrics", "--flash-attn", "on", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_cli_loads_answers_and_exits_0_on_sigterm():
    p = _spawn({"FAKE_LOAD_SECONDS": "0.3"})
    try:
        line = p.stdout.readline()
        assert "server is listening on http://127.0.0.1:" in line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert _get(port, "/health")[0] == 503
        deadline = time.monotonic() + 2.0
        while _get(port, "/health")[0] != 200:
            assert time.monotonic() < deadline, "still loading after FAKE_LOAD_SECONDS"
            time.sleep(0.05)
        status, body = _get(port, "/v1/models")
        assert json.loads(body)["data"][0]["id"] == "/models/x.gguf"
        assert len(json.loads(_get(port, "/slots")[1])) == 2
        assert _get(port, "/metrics")[0] == 200
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=2.0) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=2.0)
        p.stdout.close()
        p.stderr.close()


@pytest.mark.parametrize("env", [{"FAKE_FAIL_START": "1"}, {"FAKE_EXIT_AFTER": "0.2"}])
def test_cli_failure_knobs_exit_1(env):
    p = _spawn(env)
    try:
        assert p.wait(timeout=3.0) == 1
        assert "FAKE_" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=2.0)
        p.stdout.close()
        p.stderr.close()
