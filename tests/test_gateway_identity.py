"""Per-key rules through the gateway: authentication, rate and concurrency limits, the global
queue, key release on every exit path, hot reload, the access log, /metrics, CORS, and no secret
in any log."""

from __future__ import annotations

import logging
import os
import time

from helpers import (ALICE, BOB, CAROL, KEY_FILE, Stack, aio, chat, eventually, get, post,
                      write_key_file)


# RFC 6750 3 / 3.1: a Bearer challenge carries at least one auth-param (the realm); an error
# code only when a token was presented (and found invalid), none when the request had none.
CHALLENGES = {
    "missing_api_key": 'Bearer realm="api"',
    "invalid_api_key": 'Bearer realm="api", error="invalid_token", '
                       'error_description="Invalid API key"',
}


async def _unauthorized(s: Stack, data: bytes, code: str, challenge: str | None = None):
    r = await s.one(data)
    assert r.status == 401, r
    assert r.get("www-authenticate") == (challenge or CHALLENGES[code])
    err = r.error()
    assert err["type"] == "authentication_error" and err["code"] == code
    return r


@aio
async def test_missing_wrong_and_query_keys_are_401(tmp_path):
    async with Stack(tmp_path) as s:
        await _unauthorized(s, post("/v1/chat/completions", chat(), key=None), "missing_api_key")
        await _unauthorized(s, post("/v1/chat/completions", chat(), key="sk-not-a-key-0000000000"),
                            "invalid_api_key")
        await _unauthorized(s, get("/v1/models?api_key=" + ALICE, key=None), "missing_api_key")
        await _unauthorized(s, get("/v1/models", key=None,
                                   extra=b"Authorization: Basic " + ALICE.encode() + b"\r\n")
                            .replace(b"Basic", b"Bearer").replace(ALICE.encode(), b"x" * 20),
                            "invalid_api_key")
        # another scheme is no credential for us: 401 with the challenge, no error code
        await _unauthorized(s, get("/v1/models", key=None,
                                   extra=b"Authorization: Basic YWxpY2U6c2VjcmV0\r\n"),
                            "missing_api_key")
        assert s.fake.requests == []


@aio
async def test_accepted_key_forms(tmp_path):
    async with Stack(tmp_path) as s:
        for header in (b"Authorization: Bearer ", b"authorization: bearer ",
                       b"AUTHORIZATION: BEARER ", b"X-Api-Key: ", b"x-api-key: "):
            r = await s.one(get("/v1/models", key=None, extra=header + ALICE.encode() + b"\r\n"))
            assert r.status == 200, (header, r)
        assert len(s.fake.requests) == 5


@aio
async def test_two_authorization_headers_400(tmp_path):
    async with Stack(tmp_path) as s:
        r = await s.one(get("/v1/models", extra=b"Authorization: Bearer " + BOB.encode()
                            + b"\r\n"))
        assert r.status == 400 and r.error()["code"] == "duplicate_authorization"
        r = await s.one(get("/v1/models", extra=b"X-Api-Key: " + BOB.encode() + b"\r\n"))
        assert r.status == 400 and r.error()["code"] == "conflicting_authorization"
        r = await s.one(get("/v1/models", key=None, extra=b"Authorization: Bearer a,b=c\r\n"))
        assert r.status == 400 and r.error()["code"] == "invalid_authorization"
        assert r.get("www-authenticate").startswith('Bearer realm="api", error="invalid_request"')
        assert s.fake.requests == []


@aio
async def test_ambiguous_credentials_close_the_connection(tmp_path):
    """A request with two credentials is refused and the connection closed, as the README's
    table of refusals says: the request pipelined behind it is not answered."""
    async with Stack(tmp_path) as s:
        for extra in (b"Authorization: Bearer " + BOB.encode() + b"\r\n",
                      b"X-Api-Key: " + BOB.encode() + b"\r\n"):
            c = await s.client()
            await c.send(get("/v1/models", extra=extra) + get("/ping", key=None))
            r = await c.response()
            assert r.status == 400 and r.get("connection") == "close"
            assert await c.closed()
        assert s.fake.requests == []


@aio
async def test_rate_limit_per_key(tmp_path):
    async with Stack(tmp_path) as s:
        for i in range(3):
            r = await s.one(get("/v1/models", key=BOB))
            assert r.status == 200
            assert r.get("x-ratelimit-limit") == "3"
            assert r.get("x-ratelimit-remaining") == str(2 - i)
        r = await s.one(get("/v1/models", key=BOB))
        assert r.status == 429 and r.error()["code"] == "rate_limit_exceeded"
        assert r.error()["type"] == "rate_limit_error"
        retry = r.get("retry-after")
        assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 20
        assert r.get("x-ratelimit-limit") == "3" and r.get("x-ratelimit-remaining") == "0"
        assert int(r.get("x-ratelimit-reset")) >= 1
        assert len(s.fake.requests) == 3
        # another key is not affected
        assert (await s.one(get("/v1/models", key=ALICE))).status == 200


@aio
async def test_key_concurrency_refuses_at_once(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=20, interval=0.05),
                          key=CAROL))
        await c.head()
        started = time.monotonic()
        r = await s.one(get("/v1/models", key=CAROL))
        assert time.monotonic() - started < 0.2
        assert r.status == 429 and r.error()["code"] == "concurrency_limit_exceeded"
        assert r.get("retry-after") == "1"
        assert (await s.one(get("/v1/models", key=ALICE))).status == 200
        c.abort()
        await eventually(lambda: s.gw.admission.concurrency.in_flight("carol") == 0)
        assert (await s.one(get("/v1/models", key=CAROL))).status == 200


def _clean(s: Stack) -> bool:
    return (s.gw.admission.concurrency.in_flight("carol") == 0
            and s.gw.admission.slots.active == 0 and s.gw.in_flight == 0)


@aio
async def test_key_never_stuck(tmp_path):
    async with Stack(tmp_path, {"REQUEST_TIMEOUT": "0.3"}) as s:
        conc = s.gw.admission.concurrency
        # success
        assert (await s.one(post("/v1/chat/completions", chat(), key=CAROL))).status == 200
        assert _clean(s)
        # upstream error before the head (502)
        r = await s.one(post("/v1/chat/completions", chat(drop_before_head=True), key=CAROL))
        assert r.status == 502 and r.error()["code"] == "upstream_closed"
        assert _clean(s)
        # 504
        r = await s.one(post("/v1/chat/completions", chat(delay_first_byte=1), key=CAROL))
        assert r.status == 504
        assert _clean(s)
        # client disconnect mid-stream
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=50, interval=0.05),
                          key=CAROL))
        await c.head()
        assert conc.in_flight("carol") == 1 and s.gw.admission.slots.active == 1
        c.abort()
        await eventually(lambda: _clean(s), 1.0)
        # upstream drop mid-stream
        r = await s.one(post("/v1/chat/completions", chat(stream=True, drop_after=2), key=CAROL))
        assert r.status == 200 and not r.complete
        await eventually(lambda: _clean(s), 1.0)
        # a client that goes away while queued for the body
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(), key=CAROL)[:-5])
        await eventually(lambda: conc.in_flight("carol") == 1, 1.0)
        c.abort()
        await eventually(lambda: _clean(s), 1.0)
        # cancellation by shutdown mid-stream
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=100, interval=0.05),
                          key=CAROL))
        await c.head()
        await s.gw.shutdown(0.1)
        assert _clean(s)
        await s.fake.wait_for(lambda: s.fake.active_streams == 0, 1.0)


@aio
async def test_global_limit_queue_full_and_queue_wait(tmp_path):
    async with Stack(tmp_path, {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "1",
                                "QUEUE_TIMEOUT": "2"}) as s:
        first = await s.client()
        await first.send(post("/v1/chat/completions", chat(stream=True, events=4, interval=0.1)))
        await first.head()
        queued = await s.client()
        await queued.send(post("/v1/chat/completions", chat()))
        await eventually(lambda: s.gw.admission.slots.waiting == 1, 1.0)
        started = time.monotonic()
        r = await s.one(post("/v1/chat/completions", chat(), key=BOB))
        assert time.monotonic() - started < 0.2
        assert r.status == 503 and r.error()["code"] == "queue_full"
        assert r.get("retry-after") == "2"
        body = (await s.one(get("/health", key=None))).json()
        assert body["queue"] == 1 and body["backend_active"] == 1
        r = await queued.response()
        assert r.status == 200
        assert s.fake.requests[-1].json()["messages"][0]["content"] == "hello there"
        first.abort()


@aio
async def test_queue_timeout_503(tmp_path):
    async with Stack(tmp_path, {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "4",
                                "QUEUE_TIMEOUT": "0.3"}) as s:
        first = await s.client()
        await first.send(post("/v1/chat/completions", chat(stream=True, events=30, interval=0.05)))
        await first.head()
        started = time.monotonic()
        r = await s.one(post("/v1/chat/completions", chat()))
        assert 0.25 <= time.monotonic() - started < 0.8
        assert r.status == 503 and r.error()["code"] == "queue_timeout"
        assert r.get("retry-after") == "2"
        assert s.gw.admission.slots.waiting == 0
        assert s.gw.admission.concurrency.in_flight("alice") == 1   # only the stream
        first.abort()


@aio
async def test_hot_reload(tmp_path, caplog):
    async with Stack(tmp_path) as s:
        path = s.config.auth_keys_file
        assert (await s.one(get("/v1/models", key=BOB))).status == 200
        write_key_file(path, KEY_FILE.replace(f"bob:{BOB} rpm=3\n", ""))
        assert s.gw.reload_keys() is True
        await _unauthorized(s, get("/v1/models", key=BOB), "invalid_api_key")
        assert (await s.one(get("/v1/models", key=ALICE))).status == 200
        # a malformed file: the keys in force stay
        write_key_file(path, "this is not a key line\n")
        os.utime(path, (time.time() + 5, time.time() + 5))
        with caplog.at_level(logging.ERROR):
            assert s.gw.reload_keys(time.monotonic() + 100) is False
        assert "reload failed" in caplog.text
        assert (await s.one(get("/v1/models", key=ALICE))).status == 200
        await _unauthorized(s, get("/v1/models", key=BOB), "invalid_api_key")
        # a new key works once written
        write_key_file(path, KEY_FILE)
        os.utime(path, (time.time() + 10, time.time() + 10))
        assert s.gw.reload_keys(time.monotonic() + 200) is True
        assert (await s.one(get("/v1/models", key=BOB))).status == 200


@aio
async def test_access_log_lines(tmp_path):
    async with Stack(tmp_path, access_log=True) as s:
        r = await s.one(post("/v1/chat/completions", chat(events=4),
                             extra=b"X-Request-Id: req-nonstream\r\n"))
        assert r.status == 200
        r = await s.one(post("/v1/chat/completions", chat(stream=True, events=7),
                             extra=b"X-Request-Id: req-stream\r\n"))
        assert r.status == 200 and r.complete
        await _unauthorized(s, get("/v1/models", key=None), "missing_api_key")
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=50, interval=0.05),
                          extra=b"X-Request-Id: req-gone\r\n"))
        await c.head()
        c.abort()
        await eventually(lambda: s.gw.in_flight == 0, 1.0)
        recs = s.access_records()
        assert len(recs) == 4
        by_id = {r.get("request_id"): r for r in recs}
        ns = by_id["req-nonstream"]
        for field in ("time", "request_id", "key_id", "client", "method", "path", "status",
                      "bytes_in", "bytes_out", "duration_ms", "ttfb_ms", "stream",
                      "prompt_tokens", "completion_tokens", "outcome"):
            assert field in ns, field
        assert ns["key_id"] == "alice" and ns["status"] == 200 and ns["outcome"] == "ok"
        assert ns["path"] == "/v1/chat/completions" and ns["client"] == "127.0.0.1"
        assert ns["prompt_tokens"] == 2 and ns["completion_tokens"] == 4
        assert ns["stream"] is False and ns["bytes_in"] > 0 and ns["bytes_out"] > 0
        st = by_id["req-stream"]
        assert st["stream"] is True and st["completion_tokens"] == 7 and st["prompt_tokens"] == 2
        gone = by_id["req-gone"]
        assert gone["outcome"] == "client_closed" and gone["status"] == 200
        unauth = [r for r in recs if r["status"] == 401]
        assert len(unauth) == 1 and unauth[0]["outcome"] == "missing_api_key"


@aio
async def test_metrics_text_json_and_key(tmp_path):
    async with Stack(tmp_path) as s:
        await s.one(post("/v1/chat/completions", chat(events=3)))
        r = await s.one(get("/metrics", key=None))
        assert r.status == 200 and r.get("content-type").startswith("text/plain")
        assert b"# TYPE" in r.body and b"alice" in r.body
        r = await s.one(get("/metrics", key=None, extra=b"Accept: application/json\r\n"))
        assert r.status == 200 and r.get("content-type") == "application/json"
        assert isinstance(r.json(), dict)
    async with Stack(tmp_path / "b", {"METRICS_KEY": "metrics-secret-123"}) as s:
        await _unauthorized(s, get("/metrics", key=None), "invalid_metrics_key",
                            'Bearer realm="metrics"')
        await _unauthorized(s, get("/metrics", key=ALICE), "invalid_metrics_key",
                            'Bearer realm="metrics", error="invalid_token", '
                            'error_description="Invalid metrics key"')
        r = await s.one(get("/metrics", key="metrics-secret-123"))
        assert r.status == 200


@aio
async def test_cors_off_by_default(tmp_path):
    async with Stack(tmp_path) as s:
        origin = b"Origin: https://a.example\r\n"
        r = await s.one(post("/v1/chat/completions", chat(), extra=origin))
        assert r.status == 200
        assert not any(n.startswith("access-control-") for n, _ in r.headers), r.headers
        r = await s.one(get("/v1/models", key=None, method=b"OPTIONS",
                            extra=origin + b"Access-Control-Request-Method: GET\r\n"))
        assert not any(n.startswith("access-control-") for n, _ in r.headers), r.headers
        assert s.fake.requests[0].header("origin") is None


@aio
async def test_cors_allowlist(tmp_path):
    async with Stack(tmp_path, {"CORS_ORIGINS": "https://a.example"}) as s:
        pre = (b"Origin: https://a.example\r\nAccess-Control-Request-Method: POST\r\n"
               b"Access-Control-Request-Headers: authorization, content-type\r\n")
        c = await s.client()
        r = await c.request(get("/v1/chat/completions", key=None, method=b"OPTIONS", extra=pre))
        assert r.status == 204
        assert r.get("access-control-allow-origin") == "https://a.example"
        assert "POST" in r.get("access-control-allow-methods")
        assert "authorization" in r.get("access-control-allow-headers")
        r = await c.request(post("/v1/chat/completions", chat(),
                                 extra=b"Origin: https://a.example\r\n"))
        assert r.status == 200 and r.get("access-control-allow-origin") == "https://a.example"
        assert "x-request-id" in r.get("access-control-expose-headers")
        # errors carry CORS headers too, so a browser can read them
        r = await c.request(get("/v1/models", key=None, extra=b"Origin: https://a.example\r\n"))
        assert r.status == 401 and r.get("access-control-allow-origin") == "https://a.example"
        for evil in (b"https://b.example", b"https://a.example.evil", b"null"):
            r = await s.one(get("/v1/chat/completions", key=None, method=b"OPTIONS",
                                extra=pre.replace(b"https://a.example", evil)))
            assert r.status == 204
            assert r.get("access-control-allow-origin") is None
            assert r.get("access-control-allow-methods") is None
            r = await s.one(get("/v1/models", extra=b"Origin: " + evil + b"\r\n"))
            assert r.status == 200 and r.get("access-control-allow-origin") is None
            assert evil not in r.raw
        # a preflight never reaches llama-server (which reflects any Origin)
        assert all(rec.method != "OPTIONS" for rec in s.fake.requests)


@aio
async def test_no_secret_in_any_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-secret-7777777777"
    metrics_key = "metrics-secret-4242424242"
    async with Stack(tmp_path, {"METRICS_KEY": metrics_key}, access_log=True) as s:
        await s.one(post("/v1/chat/completions", chat()))
        await s.one(post("/v1/chat/completions", chat(stream=True), key=BOB))
        await s.one(get("/v1/models?api_key=" + CAROL, key=None))
        await s.one(get("/v1/models", key=None, extra=b"X-Api-Key: " + CAROL.encode() + b"\r\n"))
        await s.one(get("/v1/models", key=wrong))
        await s.one(get("/v1/models", key=ALICE, extra=b"X-Api-Key: " + wrong.encode() + b"\r\n"))
        await s.one(get("/v1/models", key=ALICE, extra=b"Authorization: Bearer " + BOB.encode()
                        + b"\r\n"))
        await s.one(get("/metrics", key=metrics_key))
        await s.one(get("/metrics", key=wrong))
        await s.one(get("/v1/slots?api_key=" + wrong, key=None))
        write_key_file(s.config.auth_keys_file, "bad line " + wrong + "\n")
        s.gw.reload_keys()
        s.access_records()
        with open(s.config.access_log_path) as f:
            recs_text = f.read()
        assert recs_text.count("\n") == 10
    logged = caplog.text + recs_text
    for secret in (ALICE, BOB, CAROL, wrong, metrics_key):
        assert secret not in logged, secret


@aio
async def test_client_gone_while_queued_leaves_the_queue(tmp_path):
    async with Stack(tmp_path, {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "4",
                                "QUEUE_TIMEOUT": "3"}, access_log=True) as s:
        busy = await s.client()
        await busy.send(post("/v1/chat/completions", chat(stream=True, events=12, interval=0.05)))
        await busy.head()
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(), key=CAROL))
        await eventually(lambda: s.gw.admission.slots.waiting == 1, 1.0)
        c.abort()
        await eventually(lambda: s.gw.admission.slots.waiting == 0, 0.5)
        assert s.gw.admission.concurrency.in_flight("carol") == 0
        assert s.fake.requests_total == 1 and s.gw.admission.slots.active == 1
        await s.fake.wait_for(lambda: s.fake.responses == 1, 2.0)   # the stream ends
        await eventually(lambda: s.gw.admission.slots.active == 0 and s.gw.in_flight == 0, 1.0)
        assert len(s.fake.requests) == 1                       # the gone one never went there
        recs = s.access_records()
        assert [x["outcome"] for x in recs if x.get("key_id") == "carol"] == ["client_closed"]
