"""The proxy through the gateway: route allowlist, the rebuilt upstream request, the keep-alive pool
(stale connections), upstream errors, and SSE streaming with backpressure and disconnects."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from helpers import ALICE, IO_TIMEOUT, Stack, aio, chat, eventually, get, post

ALLOWED = [
    (b"POST", "/v1/chat/completions"), (b"POST", "/v1/completions"),
    (b"POST", "/v1/embeddings"), (b"GET", "/v1/models"), (b"POST", "/tokenize"),
    (b"POST", "/detokenize"),
]


def _req(method: bytes, path: str) -> bytes:
    if method == b"POST":
        return post(path, {"prompt": "hi", "input": "hi", "content": "hi"})
    return get(path, method=method)


@aio
async def test_allowlisted_routes_reach_the_fake(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        for method, path in ALLOWED:
            r = await c.request(_req(method, path))
            assert r.status in (200, 404), r      # the fake has no /tokenize: its own 404
            assert s.fake.requests[-1].path == path and s.fake.requests[-1].method == method.decode()
        r = await c.request(post("/v1/chat/completions?x=1&api_key=zzz", chat()))
        assert r.status == 200
        assert s.fake.requests[-1].target == "/v1/chat/completions"   # query dropped
        assert len(s.fake.requests) == len(ALLOWED) + 1


UNKNOWN = ["/slots", "/props", "/lora-adapters", "/v1/models/", "//v1/models", "/v1/../slots",
           "/%761/models", "/slots/0?action=erase", "/chat/completions", "/completions",
           "/v1/health", "/models"]


@aio
async def test_unknown_routes_404_and_never_reach_the_fake(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        for path in UNKNOWN:
            for method in (b"GET", b"POST"):
                r = await s.one(_req(method, path))
                assert r.status == 404, (method, path, r)
                assert r.error()["type"] == "not_found_error"
        # /metrics is the gateway's own, never llama-server's
        r = await c.request(get("/metrics", key=None))
        assert r.status == 200 and b"llamacpp:" not in r.body
        assert s.fake.requests == []


@aio
async def test_wrong_method_405_with_allow(tmp_path):
    async with Stack(tmp_path) as s:
        r = await s.one(get("/v1/chat/completions"))
        assert r.status == 405 and r.get("allow") == "POST"
        r.error()
        r = await s.one(post("/v1/models", {}))
        assert r.status == 405 and r.get("allow") == "GET, HEAD"
        r = await s.one(get("/v1/models", method=b"DELETE"))
        assert r.status == 405
        assert s.fake.requests == []


@aio
async def test_upstream_request_is_rebuilt(tmp_path):
    async with Stack(tmp_path) as s:
        extra = (b"Connection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                 b"Trailer: X-T\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eHg6eXk=\r\n"
                 b"X-Hop: secret-hop\r\nX-Api-Key: sk-alice-0123456789abcdef\r\n"
                 b"X-Conversation-Id: conv-1\r\nX-Forwarded-For: 6.6.6.6\r\n"
                 b"X-Forwarded-Host: evil\r\nCookie: a=b\r\nUser-Agent: test-agent/1\r\n"
                 b"Accept: application/json\r\nX-Request-Id: my-req.id:1\r\n")
        r = await s.one(post("/v1/chat/completions", chat(), extra=extra))
        assert r.status == 200, r
        assert r.get("x-request-id") == "my-req.id:1"
        rec = s.fake.requests[-1]
        names = {n for n, _ in rec.headers}
        for gone in ("connection", "keep-alive", "te", "trailer", "upgrade",
                     "proxy-authorization", "x-hop", "authorization", "x-api-key",
                     "x-conversation-id", "x-forwarded-host", "cookie", "origin"):
            assert gone not in names, gone
        assert rec.headers.count(("x-forwarded-for", "127.0.0.1")) == 1
        assert [v for n, v in rec.headers if n == "x-forwarded-for"] == ["127.0.0.1"]
        assert rec.header("x-request-id") == "my-req.id:1"
        assert rec.header("user-agent") == "test-agent/1"
        assert rec.header("content-type") == "application/json"
        assert rec.header("host") == f"127.0.0.1:{s.fake.port}"
        # response side: llama-server's banner and keep-alive parameters stay behind
        assert r.get("server") is None and r.get("keep-alive") is None

        # no client id: one is generated, returned and forwarded; a malformed one is replaced
        r = await s.one(post("/v1/chat/completions", chat()))
        rid = r.get("x-request-id")
        assert rid and len(rid) >= 16 and s.fake.requests[-1].header("x-request-id") == rid
        r = await s.one(post("/v1/chat/completions", chat(),
                             extra=b"X-Request-Id: bad id\"<script>\r\n"))
        rid = r.get("x-request-id")
        assert rid and " " not in rid and "<" not in rid
        assert s.fake.requests[-1].header("x-request-id") == rid


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_pool_reuses_one_upstream_connection(tmp_path, unix):
    async with Stack(tmp_path, backend_unix=unix) as s:
        for i in range(5):
            c = await s.client()     # several client connections, one upstream connection
            assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
            assert (await c.request(get("/v1/models"))).status == 200
            c.close()
        assert s.fake.connections_opened == 1
        assert s.gw.pool.idle_count == 1


@aio
async def test_stale_pooled_connection_is_not_used(tmp_path):
    async with Stack(tmp_path, fake_kw={"keepalive_timeout": 0.2}) as s:
        c = await s.client()
        assert (await c.request(get("/v1/models"))).status == 200
        await asyncio.sleep(0.4)     # the fake closed the idle upstream connection
        r = await c.request(post("/v1/chat/completions", chat()))
        assert r.status == 200
        assert s.fake.connections_opened == 2
        # the same with the idle TTL out of the way
        s.gw.pool.idle_ttl = 1e9
        await asyncio.sleep(0.4)
        r = await c.request(post("/v1/chat/completions", chat()))
        assert r.status == 200
        assert s.fake.connections_opened == 3


class OneShotUpstream:
    """Answers the first request on each connection (keep-alive), then closes the connection
    without a byte when the second request arrives: a pooled connection that went stale at the
    moment it was reused, the race that the idle TTL cannot prevent."""

    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.server = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]) \
                if b"content-length:" in head.lower() else 0
            await reader.readexactly(n)
            self.requests += 1
            body = b'{"ok":true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        writer.transport.abort()

    async def stop(self):
        self.server.close()


@aio
async def test_reused_connection_dying_unanswered_is_retried_on_a_fresh_one(tmp_path):
    up = OneShotUpstream()
    port = await up.start()
    try:
        async with Stack(tmp_path, start_fake=False, backend_port=port) as s:
            s.gw.pool.idle_ttl = 1e9
            c = await s.client()
            for _ in range(3):
                r = await c.request(post("/v1/chat/completions", chat()))
                assert r.status == 200 and r.json() == {"ok": True}, r
            assert up.requests == 3 and up.connections == 3
    finally:
        await up.stop()


@aio
async def test_nothing_listening_is_502(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with Stack(tmp_path, start_fake=False, backend_port=port) as s:
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 502 and r.error()["code"] == "upstream_unavailable"
        assert r.error()["type"] == "upstream_error"


@aio
async def test_slow_first_byte_is_504(tmp_path):
    async with Stack(tmp_path, {"REQUEST_TIMEOUT": "0.3"}) as s:
        c = await s.client()
        started = time.monotonic()
        r = await c.request(post("/v1/chat/completions", chat(delay_first_byte=1.0)))
        assert r.status == 504 and r.error()["code"] == "upstream_timeout"
        assert time.monotonic() - started < 0.8
        await s.fake.wait_for(lambda: s.fake.disconnects == 1, 1.0)
        # the connection stays usable, the timed-out upstream socket is not reused
        assert (await c.request(get("/v1/models"))).status == 200
        assert s.fake.connections_opened == 2


@aio
async def test_connect_timeout_is_504(tmp_path):
    # A listener that never accepts, with its accept queue filled: further SYNs are dropped
    # (Linux, tcp_abort_on_overflow=0), so a connect hangs like one to a wedged llama-server.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    try:
        await asyncio.sleep(0.05)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
            hangs = False
        except (TimeoutError, OSError):
            hangs = True
        probe.close()
        if not hangs:
            pytest.skip("this kernel completes connects beyond the accept queue")
        async with Stack(tmp_path, {"BACKEND_CONNECT_TIMEOUT": "0.3"}, start_fake=False,
                         backend_port=port) as s:
            started = time.monotonic()
            r = await s.one(post("/v1/chat/completions", chat()))
            assert r.status == 504 and r.error()["code"] == "upstream_connect_timeout"
            assert 0.25 <= time.monotonic() - started < 1.0
    finally:
        for f in fillers:
            f.close()
        lsock.close()


@aio
async def test_loading_backend_is_503_with_retry_after(tmp_path):
    async with Stack(tmp_path) as s:
        s.fake.loading = True
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", chat()))
        assert r.status == 503 and r.get("retry-after") == "5"
        assert r.error()["code"] == "model_loading"
        assert r.get("connection") is None     # the client connection stays usable
        s.fake.loading = False
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        assert s.fake.connections_opened == 1


@aio
async def test_upstream_error_status_relayed(tmp_path):
    async with Stack(tmp_path) as s:
        r = await s.one(post("/v1/chat/completions", chat(status=400)))
        assert r.status == 400 and r.json()["error"]["message"] == "fake error 400"
        r = await s.one(post("/v1/chat/completions", chat(status=500)))
        assert r.status == 500


# ---------------- streaming ----------------

@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_sse_events_relayed_as_they_come(tmp_path, unix):
    async with Stack(tmp_path, backend_unix=unix) as s:
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=5, interval=0.1,
                                                      ping_every=2)))
        status, headers, _ = await c.head()
        hdr = dict(headers)
        assert status == 200 and hdr["content-type"].startswith("text/event-stream")
        assert hdr["cache-control"] == "no-cache" and hdr["x-accel-buffering"] == "no"
        assert hdr["transfer-encoding"] == "chunked"
        arrivals = []
        events = []
        started = time.monotonic()
        while True:
            size = int((await c.line()).strip(), 16)
            if size == 0:
                await c.line()
                break
            data = (await c.exactly(size + 2))[:-2]
            arrivals.append(time.monotonic() - started)
            events.append(data)
        contents = [e for e in events if e.startswith(b"data: {")]
        assert len(contents) == 6
        assert events.count(b": ping\n\n") >= 2
        assert events[-1] == b"data: [DONE]\n\n"
        assert arrivals[-1] - arrivals[0] >= 0.35     # spread out, not buffered to the end
        assert arrivals[0] < 0.1
        r = await c.request(get("/v1/models"))        # connection reusable after the stream
        assert r.status == 200


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_slow_reader_backpressure_bounds_memory(tmp_path, unix):
    async with Stack(tmp_path, {"CLIENT_WRITE_TIMEOUT": "3", "STREAM_IDLE_TIMEOUT": "5"},
                     backend_unix=unix) as s:
        c = await s.client(rcvbuf=8192)
        c.reader._limit = 8192
        await c.send(post("/v1/chat/completions",
                          chat(stream=True, events=160, payload_size=32768)))
        status, _, _ = await c.head()
        assert status == 200
        conn = next(iter(s.gw.connections))
        fake_conn = next(iter(s.fake._conns))
        max_buf = 0
        fake_paused = False
        got = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            max_buf = max(max_buf, conn.transport.get_write_buffer_size())
            fake_paused = fake_paused or fake_conn.write_paused
            try:
                data = await asyncio.wait_for(c.reader.read(8192), 0.002)
            except TimeoutError:
                continue
            if not data:
                break
            got += len(data)
            if data.endswith(b"0\r\n\r\n") and b"[DONE]" in data:
                break
        assert got > 160 * 32768
        assert fake_paused, "the fake's writes never backed up: nothing slowed llama-server"
        # one high-water mark (64 KiB) plus at most one upstream read and one event
        assert max_buf < 512 * 1024, max_buf


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_client_disconnect_mid_stream_closes_upstream(tmp_path, unix):
    async with Stack(tmp_path, backend_unix=unix) as s:
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=50, interval=0.05)))
        await c.head()
        await c.line()
        c.abort()
        t0 = time.monotonic()
        await s.fake.wait_for(lambda: s.fake.disconnects == 1, 0.5)
        assert time.monotonic() - t0 < 0.5
        assert s.fake.active_streams == 0 and not any(s.fake.slots)
        c = await s.client()
        assert (await c.request(get("/v1/models"))).status == 200
        assert s.fake.connections_opened == 2       # the cut connection was not pooled


async def _events_until(c, last: bytes) -> list[bytes]:
    """Read chunked SSE events until one equals `last`; the chunk after it is not read."""
    events = []
    while not events or events[-1] != last:
        size = int((await c.line()).strip(), 16)
        assert size, "the stream ended before the awaited event"
        events.append((await c.exactly(size + 2))[:-2])
    return events


@aio
async def test_client_hanging_up_after_done_counts_as_delivered(tmp_path):
    """The OpenAI SDK stops at `data: [DONE]` and may close before llama-server's closing chunk:
    that stream was delivered (outcome ok, tokens counted). A hang-up before [DONE] is still
    client_closed. Either way the upstream connection is closed at once."""
    async with Stack(tmp_path, access_log=True) as s:
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=4, end_delay=2.0),
                          extra=b"X-Request-Id: after-done\r\n"))
        assert (await c.head())[0] == 200
        events = await _events_until(c, b"data: [DONE]\n\n")
        assert len(events) == 6                   # 4 tokens, the final chunk, [DONE]
        c.abort()
        await s.fake.wait_for(lambda: s.fake.disconnects == 1, 1.0)

        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=4, interval=0.2),
                          extra=b"X-Request-Id: before-done\r\n"))
        assert (await c.head())[0] == 200
        await c.line()
        c.abort()
        await s.fake.wait_for(lambda: s.fake.disconnects == 2, 1.0)
        await eventually(lambda: s.gw.in_flight == 0)
        records = {r["request_id"]: r for r in s.access_records()}
    done, cut = records["after-done"], records["before-done"]
    assert done["outcome"] == "ok" and done["status"] == 200 and done["stream"] is True
    assert done["completion_tokens"] == 4 and done["prompt_tokens"] >= 1
    assert cut["outcome"] == "client_closed"


@aio
async def test_upstream_drop_mid_stream_sends_error_event_without_terminator(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", chat(stream=True, events=10,
                                                              drop_after=3)))
        assert r.status == 200
        assert not r.complete
        assert not r.raw.endswith(b"0\r\n\r\n")
        events = [e for e in r.body.split(b"\n\n") if e]
        assert len(events) == 4
        last = json.loads(events[-1][len(b"data: "):])
        assert last["error"]["code"] == "upstream_closed"
        assert await c.closed(1.0)


def _upstream_errors(text: str) -> dict[str, int]:
    """gateway_upstream_errors_total samples of a Prometheus scrape: {kind: count}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("gateway_upstream_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            assert labels.startswith('gateway_upstream_errors_total{kind="'), line
            out[labels[len('gateway_upstream_errors_total{kind="'):-2]] = int(value)
    return out


@aio
async def test_answers_cut_by_llama_server_count_as_upstream_errors(tmp_path):
    async with Stack(tmp_path, {"STREAM_IDLE_TIMEOUT": "0.3"}) as s:
        async def errors() -> dict[str, int]:
            r = await s.one(get("/metrics"))
            assert r.status == 200
            return _upstream_errors(r.body.decode())

        # before the head: a 502, counted as it always was
        r = await s.one(post("/v1/chat/completions", chat(drop_before_head=True)))
        assert r.status == 502 and r.error()["code"] == "upstream_closed"
        assert await errors() == {"upstream_closed": 1}
        # a stream llama-server dies in the middle of
        r = await s.one(post("/v1/chat/completions", chat(stream=True, events=10, drop_after=3)))
        assert r.status == 200 and not r.complete
        assert await errors() == {"upstream_closed": 2}
        # a whole answer cut after its head (Content-Length) was relayed
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(drop_after=1)))
        status, headers, _ = await c.head()
        assert status == 200 and int(dict(headers)["content-length"]) > 0
        with pytest.raises(asyncio.IncompleteReadError):
            await c.exactly(int(dict(headers)["content-length"]))
        assert await errors() == {"upstream_closed": 3}
        # a stream llama-server stops sending in: cut at STREAM_IDLE_TIMEOUT
        r = await s.one(post("/v1/chat/completions", chat(stream=True, events=10, stall_after=2)))
        assert r.status == 200 and not r.complete
        assert await errors() == {"upstream_closed": 3, "upstream_timeout": 1}
        # answers that finish count nothing
        for stream in (True, False):
            r = await s.one(post("/v1/chat/completions", chat(stream=stream)))
            assert r.status == 200 and r.complete
        assert await errors() == {"upstream_closed": 3, "upstream_timeout": 1}


@aio
async def test_openai_sdk_reads_raw_line_break_characters_in_sse(tmp_path):
    # llama-server writes U+2028, U+2029 and U+0085 raw inside its JSON (as the fake does). The
    # relay passes bytes unchanged; SSE ends lines at CR and LF only, and the OpenAI SDK splits
    # bytes, not str (bytes.splitlines() knows no other line ends), so nothing needs escaping.
    import openai
    texts = ["a\u2028b ", "c\u2029d ", "e\x85f ", "plain "]
    async with Stack(tmp_path) as s:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=ALICE,
                                    max_retries=0, timeout=IO_TIMEOUT)
        try:
            stream = await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], stream=True,
                extra_body={"fake": {"events": len(texts), "texts": texts}})
            got = [ch.choices[0].delta.content async for ch in stream
                   if ch.choices and ch.choices[0].delta.content]
        finally:
            await client.close()
        assert got == texts


@aio
async def test_stream_idle_timeout_cuts_a_stalled_stream(tmp_path):
    async with Stack(tmp_path, {"STREAM_IDLE_TIMEOUT": "0.3"}) as s:
        c = await s.client()
        started = time.monotonic()
        r = await c.request(post("/v1/chat/completions", chat(stream=True, events=10,
                                                              stall_after=2)))
        assert r.status == 200 and not r.complete
        assert 0.25 <= time.monotonic() - started < 1.0
        assert await c.closed(1.0)
        await s.fake.wait_for(lambda: s.fake.disconnects == 1, 1.0)


@aio
async def test_exchange_deadlines_share_the_connection_timer_with_keepalive(tmp_path):
    # The keep-alive timer (0.2 s) fires during each stream; the exchange's deadlines (first
    # byte 0.6 s, idle 0.4 s) must neither fire early nor be lost, on a reused connection too.
    env = {"KEEPALIVE_TIMEOUT": "0.2", "REQUEST_TIMEOUT": "0.6", "STREAM_IDLE_TIMEOUT": "0.4"}
    async with Stack(tmp_path, env) as s:
        c = await s.client()
        # 8 events 0.1 s apart: 0.8 s in all, longer than every timeout, never idle 0.4 s
        r = await c.request(post("/v1/chat/completions", chat(stream=True, events=8,
                                                              interval=0.1)))
        assert r.status == 200 and r.complete
        # first byte after 0.45 s: inside REQUEST_TIMEOUT although past the idle timeout
        r = await c.request(post("/v1/chat/completions", chat(delay_first_byte=0.45)))
        assert r.status == 200 and r.complete
        # same connection: a stall after 2 events is cut by the idle deadline (0.4 s)
        started = time.monotonic()
        r = await c.request(post("/v1/chat/completions", chat(stream=True, events=10,
                                                              stall_after=2)))
        assert r.status == 200 and not r.complete
        assert 0.35 <= time.monotonic() - started < 1.5
        assert await c.closed(1.0)
        # a new connection: no first byte within 0.6 s is a 504
        c = await s.client()
        started = time.monotonic()
        r = await c.request(post("/v1/chat/completions", chat(delay_first_byte=2)))
        assert r.status == 504
        assert 0.55 <= time.monotonic() - started < 1.5
