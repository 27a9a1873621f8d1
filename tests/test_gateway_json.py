"""JSON bodies the gateway refuses before llama-server sees them (jsonguard), on every JSON route,
both ways a request is served; and a handler that fails unexpectedly still answers (500)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from helpers import CAROL, Stack, aio, chat, eventually, post
from llamagw.api import routes
from llamagw.net import relay as proxy
from llamagw.wire.jsonguard import MAX_JSON_DEPTH
from test_gateway_ollama import MODEL, error_of, model_file, ollama_stack  # noqa: F401

OPENAI_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
                 "/detokenize"]
OLLAMA_ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"]
# The bodies: 200,000 objects deep (it killed llama-server), 1,000 arrays deep (it got
# the Ollama routes an empty reply).
CRASH_DEPTH = 200_000
OLLAMA_DEPTH = 1_000
# Room for the 1.2 MB body (the tests' default limit is 100 kB).
BIG_ENV = {"MAX_REQUEST_BODY_SIZE": "4000000"}


def crash_body() -> bytes:
    return (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"x":'
            + b'{"a":' * CRASH_DEPTH + b"1" + b"}" * CRASH_DEPTH + b"}")


def deep_arrays(depth: int) -> bytes:
    return (b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"hi"}],'
            b'"prompt":"hi","input":"hi","x":' + b"[" * depth + b"]" * depth + b"}")


BAD = {   # name: (body, OpenAI error code)
    "crash": (crash_body(), "json_too_deep"),
    "over_limit": (b'{"x":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}",
                   "json_too_deep"),
    "invalid": (b'{"messages": [', "invalid_json"),
    "empty": (b"", "invalid_json"),
    "not_utf8": (b'{"prompt":"\xff\xfe"}', "invalid_json"),
    "lone_surrogate": (b'{"prompt":"\\ud800"}', "invalid_json"),
    "nan": (b'{"temperature":NaN}', "invalid_json"),
    "array": (b'[{"role":"user","content":"hi"}]', "json_not_object"),
    "number": (b"4", "json_not_object"),
}


def free(s: Stack, key: str = "alice") -> bool:
    return (s.gw.admission.slots.active == 0 and s.gw.in_flight == 0
            and s.gw.admission.concurrency.in_flight(key) == 0)


async def _send(c, raw: bytes, split: bool) -> None:
    """In one write (the callback path) or with its last bytes 50 ms later (the task)."""
    if not split:
        await c.send(raw)
        return
    await c.send(raw[:-3])
    await asyncio.sleep(0.05)
    await c.send(raw[-3:])


@pytest.mark.parametrize("split", [False, True], ids=["callback", "task"])
@pytest.mark.parametrize("path", OPENAI_ROUTES)
@aio
async def test_openai_routes_refuse_bad_json_before_llama_server(tmp_path, path, split):
    async with Stack(tmp_path, BIG_ENV, access_log=True) as s:
        c = await s.client()
        for name, (body, code) in BAD.items():
            await _send(c, post(path, body), split)
            r = await c.response()
            assert r.status == 400, (name, r)
            err = r.error()
            assert err["type"] == "invalid_request_error" and err["code"] == code, (name, err)
            assert r.get("connection") is None            # the body was read: kept alive
            assert r.get("x-ratelimit-limit")              # admitted first (key, rate)
            await eventually(lambda: free(s), 1.0)
        assert s.fake.requests_total == 0
        # the same connection goes on serving
        r = await c.request(post(path, {"messages": [{"role": "user", "content": "hi"}],
                                        "prompt": "hi", "input": "hi", "content": "hi",
                                        "tokens": [1]}))
        assert r.status in (200, 404), r           # the fake has no /tokenize: its own 404
        assert s.fake.requests_total == 1
        records = s.access_records()
        assert [(x["status"], x["outcome"]) for x in records[:len(BAD)]] == \
            [(400, code) for _body, code in BAD.values()]


@aio
async def test_a_key_at_its_concurrency_cap_gets_429_not_a_json_verdict(tmp_path):
    """Admission comes first (key, rate, concurrency), then the body: a refused body costs the
    key nothing afterwards, and a key over its cap is told so whatever its body."""
    async with Stack(tmp_path) as s:
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", b"[1]", key=CAROL))
        assert r.status == 400 and r.error()["code"] == "json_not_object"
        await eventually(lambda: free(s, "carol"), 1.0)
        stream = await s.client()                    # carol's one slot, held by a stream
        await stream.send(post("/v1/chat/completions", chat(stream=True, events=50,
                                                           interval=0.05), key=CAROL))
        await s.fake.wait_for(lambda: s.fake.active_streams == 1, 2.0)
        r = await c.request(post("/v1/chat/completions", b"[1]", key=CAROL))
        assert r.status == 429
        stream.abort()
        await eventually(lambda: free(s, "carol"), 2.0)
        assert s.fake.requests_total == 1


@aio
async def test_expect_100_continue_gets_the_400_after_the_body(tmp_path):
    async with Stack(tmp_path) as s:
        c = await s.client()
        body = b'{"x":' + b"[" * 200 + b"]" * 200 + b"}"
        raw = post("/v1/completions", body, extra=b"Expect: 100-continue\r\n")
        head, _, data = raw.partition(b"\r\n\r\n")
        await c.send(head + b"\r\n\r\n")
        assert (await c.head())[0] == 100
        r = await c.request(data)
        assert r.status == 400 and r.error()["code"] == "json_too_deep"
        assert s.fake.requests_total == 0 and free(s)


@pytest.mark.parametrize("path", OLLAMA_ROUTES)
@aio
async def test_ollama_routes_answer_a_deeply_nested_body_with_400(tmp_path, model_file, path,
                                                                  caplog):
    async with ollama_stack(tmp_path, model_file, env=BIG_ENV) as s:
        c = await s.client()
        for body in (deep_arrays(OLLAMA_DEPTH), crash_body(), deep_arrays(MAX_JSON_DEPTH)):
            r = await c.request(post(path, body))
            assert r.status == 400, r
            assert "deeper than" in error_of(r)
            await eventually(lambda: free(s), 1.0)
        for body, _code in BAD.values():
            r = await c.request(post(path, body))
            assert r.status == 400, (body[:40], r)
            error_of(r)
        assert s.fake.requests_total == 0
        assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
        # within the limit: served as before
        r = await c.request(post(path, deep_arrays(MAX_JSON_DEPTH - 1)))
        assert r.status == 200, r


@aio
async def test_model_management_routes_stay_501_whatever_the_body(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        r = await s.one(post("/api/push", deep_arrays(OLLAMA_DEPTH)))
        assert r.status == 501 and error_of(r)


# ------------------------------------------------------------------ unexpected exceptions
def _boom(*_args, **_kw):
    raise RuntimeError("boom")


async def _boom_async(*_args, **_kw):
    raise RuntimeError("boom")


def _failures(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("split", [False, True], ids=["callback", "task"])
@aio
async def test_an_unexpected_error_on_the_proxy_path_is_a_500_logged_once(tmp_path, monkeypatch,
                                                                          caplog, split):
    async with Stack(tmp_path, access_log=True) as s:
        c = await s.client()
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        monkeypatch.setattr(proxy, "start", _boom)
        monkeypatch.setattr(proxy, "forward", _boom_async)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway"):
            await _send(c, post("/v1/chat/completions", chat()), split)
            r = await c.response()
            assert r.status == 500, r
            err = r.error()
            assert err["type"] == "server_error" and err["code"] == "internal_error"
            assert "boom" not in err["message"]               # no internals to the client
            assert r.get("connection") == "close" and await c.closed()
            await eventually(lambda: free(s), 1.0)
        assert len(_failures(caplog)) == 1 and "boom" in caplog.text
        assert s.access_records()[-1]["status"] == 500


@pytest.mark.parametrize("path", ["/api/chat", "/api/show"])   # inference, local
@aio
async def test_an_unexpected_error_in_an_ollama_handler_is_an_ollama_500(tmp_path, model_file,
                                                                         monkeypatch, caplog,
                                                                         path):
    async with ollama_stack(tmp_path, model_file) as s:
        route = routes.ROUTES[("POST", path)]
        monkeypatch.setitem(routes.ROUTES, route.key,
                            dataclasses.replace(route, handler=_boom_async))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway"):
            c = await s.client()
            r = await c.request(post(path, {"model": MODEL, "messages": [], "stream": False}))
            assert r.status == 500, r
            assert error_of(r) and "boom" not in r.body.decode()
            assert await c.closed()
            await eventually(lambda: free(s), 1.0)
        assert len(_failures(caplog)) == 1
        assert s.fake.requests_total == 0


@aio
async def test_an_unexpected_error_answers_each_pipelined_request_once(tmp_path, monkeypatch):
    """The 500 closes the connection: the requests behind it get no answer, not a wrong one."""
    async with Stack(tmp_path) as s:
        c = await s.client()
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        monkeypatch.setattr(proxy, "start", _boom)
        await c.send(post("/v1/chat/completions", chat()) * 3)
        r = await c.response()
        assert r.status == 500
        assert await c.closed()
        await eventually(lambda: free(s), 1.0)
