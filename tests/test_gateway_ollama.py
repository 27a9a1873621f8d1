"""The Ollama API through the gateway, against the fake llama-server: local answers from the GGUF
header, translated inference calls (NDJSON streaming as the fake streams), Ollama-shaped errors,
drops and disconnects, and the access log / metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import gguf
import numpy as np
import pytest

from helpers import ALICE, BOB, IO_TIMEOUT, Stack, aio, eventually, get, post

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
MODEL = "tiny-chat"                 # the file name without .gguf
OLLAMA_MODEL = "tiny-chat:latest"
NDJSON = "application/x-ndjson"
TERMINATOR = b"0\r\n\r\n"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    """A tiny GGUF (header, a few tensors), written once per module with the `gguf` package."""
    path = tmp_path_factory.mktemp("ollama") / f"{MODEL}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_string("general.name", "Tiny Chat")
    w.add_uint32("llama.context_length", 2048)
    w.add_uint32("llama.embedding_length", 16)
    w.add_string("tokenizer.chat_template", TEMPLATE)
    w.add_token_list([f"tok{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", np.zeros((32, 16), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros((16,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@contextlib.asynccontextmanager
async def ollama_stack(tmp_path, model_file, *, knobs: dict | None = None, **kw):
    """Stack with MODEL_PATH set and the catalog loaded (amain does it in a background task).
    `knobs`: the fake's defaults (the Ollama translation drops a request's own "fake" field)."""
    env = {"MODEL_PATH": model_file, **kw.pop("env", {})}
    async with Stack(tmp_path, env=env, **kw) as s:
        await s.gw.catalog.load()
        assert s.gw.catalog.info is not None
        if knobs:
            s.fake.defaults.update(knobs)
        yield s


def ochat(stream: bool | None = None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **extra}
    if stream is not None:
        body["stream"] = stream
    return body


def error_of(r) -> str:
    """Ollama's error shape: exactly {"error": "<non-empty string>"}, JSON content type."""
    assert r.get("content-type").startswith("application/json"), r
    data = r.json()
    assert set(data) == {"error"} and isinstance(data["error"], str) and data["error"], data
    return data["error"]


def ndjson(body: bytes) -> list[dict]:
    assert body.endswith(b"\n"), body[-100:]
    return [json.loads(line) for line in body.split(b"\n") if line]


async def read_chunks(c, limit: float = IO_TIMEOUT) -> tuple[list[tuple[float, bytes]], bool]:
    """Chunked body pieces with their arrival time; (pieces, terminated cleanly)."""
    pieces = []
    while True:
        try:
            size_line = await c.line(limit)
        except asyncio.IncompleteReadError:
            return pieces, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert await c.line(limit) == b"\r\n"
            return pieces, True
        data = await c.exactly(size + 2, limit)
        pieces.append((time.monotonic(), data[:-2]))


def assert_final(line: dict, *, eval_count: int, prompt_count: int, predicted_ms: float):
    assert line["done"] is True and line["done_reason"] == "stop"
    assert line["model"] == MODEL
    assert line["eval_count"] == eval_count and line["prompt_eval_count"] == prompt_count
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert type(line[name]) is int and line[name] >= 0, name
    assert line["eval_duration"] == round(predicted_ms * 1_000_000)       # ms -> ns
    assert line["prompt_eval_duration"] == round(0.1 * prompt_count * 1_000_000)
    assert line["total_duration"] >= line["eval_duration"] + line["prompt_eval_duration"]
    assert line["created_at"].endswith("Z")


# ------------------------------------------------------------------ local answers
@aio
async def test_root_and_version_are_open_and_local(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        c = await s.client()
        r = await c.request(get("/", key=None))
        assert r.status == 200 and r.body == b"Ollama is running"
        assert r.get("content-type").startswith("text/plain")
        r = await c.request(get("/", key=None, method=b"HEAD"), head_request=True)
        assert r.status == 200 and r.get("content-length") == str(len(b"Ollama is running"))
        r = await c.request(get("/api/version", key=None))    # same connection: HEAD had no body
        assert r.status == 200 and isinstance(r.json()["version"], str)
        assert s.fake.requests == []


@aio
async def test_tags_show_ps_describe_the_gguf(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        c = await s.client()
        r = await c.request(get("/api/tags"))
        assert r.status == 200, r
        (m,) = r.json()["models"]
        assert m["name"] == m["model"] == OLLAMA_MODEL
        assert m["size"] == os.path.getsize(model_file)
        assert m["digest"] == s.gw.catalog.info.digest and len(m["digest"]) == 64
        assert m["details"]["format"] == "gguf" and m["details"]["family"] == "llama"
        assert m["details"]["quantization_level"] == "Q8_0"

        for name in (MODEL, OLLAMA_MODEL):
            r = await c.request(post("/api/show", {"model": name}))
            assert r.status == 200, r
            shown = r.json()
            assert shown["model_info"]["llama.context_length"] == 2048
            assert shown["model_info"]["general.architecture"] == "llama"
            assert shown["template"] == TEMPLATE and "completion" in shown["capabilities"]
        r = await c.request(post("/api/show", {"model": "llama3:8b"}))
        assert r.status == 404 and "llama3:8b" in error_of(r)
        r = await c.request(post("/api/show", b"{not json"))
        assert r.status == 400 and error_of(r)

        r = await c.request(get("/api/ps"))
        assert r.status == 200
        (p,) = r.json()["models"]
        assert p["name"] == OLLAMA_MODEL and p["context_length"] == 2048
        # a failed backend: nothing is loaded
        with open(s.config.health_file, "w") as f:
            f.write("failed\n")
        s.gw.backend._read_at = -1e9
        r = await c.request(get("/api/ps"))
        assert r.status == 200 and r.json() == {"models": []}
        assert s.fake.requests == []


@aio
async def test_tags_without_a_readable_model_is_an_empty_list(tmp_path):
    async with Stack(tmp_path, env={"MODEL_PATH": str(tmp_path / "missing.gguf")}) as s:
        await s.gw.catalog.load()                 # logs a warning, does not raise
        r = await s.one(get("/api/tags"))
        assert r.status == 200 and r.json() == {"models": []}
        r = await s.one(post("/api/show", {"model": "missing"}))
        assert r.status == 404 and error_of(r)


# ------------------------------------------------------------------ inference
@aio
async def test_chat_stream_ndjson_lines_arrive_as_streamed(tmp_path, model_file):
    interval, events = 0.08, 4
    async with ollama_stack(tmp_path, model_file,
                            knobs={"events": events, "interval": interval}) as s:
        c = await s.client()
        await c.send(post("/api/chat", ochat(options={"num_predict": 16, "temperature": 0.5})))
        status, headers, _ = await c.head()
        hdr = dict(headers)
        assert status == 200 and hdr["content-type"] == NDJSON
        assert hdr["transfer-encoding"] == "chunked" and "content-length" not in hdr
        assert hdr["cache-control"] == "no-cache"
        pieces, clean = await read_chunks(c)
        assert clean
        lines = ndjson(b"".join(p for _, p in pieces))
        # one chunk per line, each written when its SSE event arrived (not buffered)
        assert len(pieces) == len(lines) == events + 1
        span = pieces[events - 1][0] - pieces[0][0]
        assert span >= (events - 1) * interval * 0.7, span
        assert [ln["message"]["content"] for ln in lines[:-1]] == \
            [f"tok{i} " for i in range(events)]
        assert all(ln["done"] is False and ln["message"]["role"] == "assistant"
                   for ln in lines[:-1])
        assert_final(lines[-1], eval_count=events, prompt_count=2,
                     predicted_ms=interval * events * 1000)
        assert lines[-1]["message"] == {"role": "assistant", "content": ""}

        sent = s.fake.requests[-1]
        assert sent.path == "/v1/chat/completions"
        assert sent.json() == {"model": MODEL, "messages": [{"role": "user",
                                                             "content": "hello there"}],
                               "stream": True, "stream_options": {"include_usage": True},
                               "max_tokens": 16, "temperature": 0.5}
        assert sent.header("authorization") is None
        # the connection stays usable after a streamed answer
        r = await c.request(get("/api/version"))
        assert r.status == 200


@aio
async def test_chat_without_stream_is_one_json_object(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        r = await s.one(post("/api/chat", ochat(stream=False)))
        assert r.status == 200, r
        assert r.get("content-type").startswith("application/json")
        assert r.get("content-length") == str(len(r.body)) and r.get("x-request-id")
        out = r.json()
        assert out["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}
        assert_final(out, eval_count=5, prompt_count=2, predicted_ms=0.5)
        assert s.fake.requests[-1].json()["stream"] is False


@aio
async def test_generate_streamed_and_not(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, knobs={"events": 3}) as s:
        c = await s.client()
        r = await c.request(post("/api/generate", {"model": MODEL, "prompt": "why is the sky",
                                                   "system": "be brief"}))
        assert r.status == 200 and r.get("content-type") == NDJSON and r.complete
        lines = ndjson(r.body)
        assert [ln["response"] for ln in lines[:-1]] == ["tok0 ", "tok1 ", "tok2 "]
        assert_final(lines[-1], eval_count=3, prompt_count=6, predicted_ms=0.3)
        sent = s.fake.requests[-1]           # templated: a chat call with system + user
        assert sent.path == "/v1/chat/completions"
        assert sent.json()["messages"] == [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "why is the sky"}]

        r = await c.request(post("/api/generate", {"model": OLLAMA_MODEL, "prompt": "a b c",
                                                   "raw": True, "stream": False}))
        assert r.status == 200, r
        out = r.json()
        assert out["response"] == "tok0 tok1 tok2 " and "message" not in out
        assert_final(out, eval_count=3, prompt_count=3, predicted_ms=0.3)
        sent = s.fake.requests[-1]           # raw: the prompt untouched, /v1/completions
        assert sent.path == "/v1/completions" and sent.json()["prompt"] == "a b c"

        # an empty prompt is Ollama's "load the model": answered without llama-server
        n = len(s.fake.requests)
        r = await c.request(post("/api/generate", {"model": MODEL}))
        assert r.status == 200 and r.json()["done_reason"] == "load"
        assert len(s.fake.requests) == n


@aio
async def test_embed_and_legacy_embeddings(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        c = await s.client()
        r = await c.request(post("/api/embed", {"model": MODEL, "input": ["one", "two words"]}))
        assert r.status == 200, r
        out = r.json()
        assert out["model"] == MODEL and len(out["embeddings"]) == 2
        assert all(len(v) == 8 and all(isinstance(x, float) for x in v)
                   for v in out["embeddings"])
        assert out["embeddings"][0] != out["embeddings"][1]
        assert out["prompt_eval_count"] == 3 and type(out["total_duration"]) is int
        sent = s.fake.requests[-1]
        assert sent.path == "/v1/embeddings" and sent.json()["input"] == ["one", "two words"]

        r = await c.request(post("/api/embeddings", {"model": MODEL, "prompt": "one"}))
        assert r.status == 200, r
        assert set(r.json()) == {"embedding"} and len(r.json()["embedding"]) == 8
        assert s.fake.requests[-1].json()["input"] == "one"


# ------------------------------------------------------------------ errors
@aio
async def test_auth_and_rate_limit_errors_are_ollama_shaped(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        for req in (post("/api/chat", ochat(), key=None), get("/api/tags", key=None),
                    post("/api/chat", ochat(), key="sk-wrong-0123456789abcdef")):
            r = await s.one(req)
            assert r.status == 401 and r.get("www-authenticate").startswith("Bearer realm="), r
            assert "key" in error_of(r).lower()
        c = await s.client()
        for _ in range(3):                   # bob: rpm=3
            assert (await c.request(get("/api/tags", key=BOB))).status == 200
        r = await c.request(post("/api/chat", ochat(), key=BOB))
        assert r.status == 429 and int(r.get("retry-after")) >= 1
        assert "rate limit" in error_of(r).lower()
        assert s.fake.requests == []


@aio
async def test_request_errors_never_reach_llama_server(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file) as s:
        c = await s.client()
        r = await c.request(post("/api/chat", ochat(model="llama3:8b")))
        assert r.status == 404 and "llama3:8b" in error_of(r)
        r = await c.request(post("/api/embed", {"model": "other", "input": "x"}))
        assert r.status == 404 and error_of(r)
        for bad in (b"{not json", b"[1, 2]", json.dumps(ochat(stream="yes")).encode(),
                    json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()):
            r = await c.request(post("/api/chat", bad))
            assert r.status == 400, (bad, r)
            error_of(r)
        # (/api/pull and /api/delete: admin keys, router mode; tests/test_models_pull.py)
        for method, path in (("POST", "/api/push"), ("POST", "/api/create"),
                             ("POST", "/api/copy")):
            data = json.dumps({"model": MODEL}).encode()
            r = await c.request(post(path, data).replace(b"POST", method.encode(), 1))
            assert r.status == 501, (path, r)
            assert path in error_of(r)
        assert s.fake.requests == []


@aio
async def test_upstream_error_status_is_relayed_as_ollama_error(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, knobs={"status": 400}) as s:
        c = await s.client()
        for body in (ochat(), ochat(stream=False)):
            r = await c.request(post("/api/chat", body))
            assert r.status == 400, r
            assert r.get("content-length") == str(len(r.body))
            assert error_of(r) == "fake error 400"
        r = await c.request(post("/api/embed", {"model": MODEL, "input": "x"}))
        assert r.status == 400 and error_of(r) == "fake error 400"
        s.fake.defaults["status"] = 500
        r = await c.request(post("/api/generate", {"model": MODEL, "prompt": "x"}))
        assert r.status == 500 and error_of(r) == "fake error 500"
        # llama-server still loading: our 503 with Retry-After, in Ollama's shape
        s.fake.defaults["status"] = None
        s.fake.loading = True
        r = await c.request(post("/api/chat", ochat()))
        assert r.status == 503 and r.get("retry-after") and error_of(r)
        s.fake.loading = False
        # llama-server gone before answering: 502
        s.fake.defaults["drop_before_head"] = True
        r = await s.one(post("/api/chat", ochat()))
        assert r.status == 502 and error_of(r)


@aio
async def test_upstream_drop_mid_stream_ends_with_an_error_line(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, knobs={"events": 5, "drop_after": 2}) as s:
        c = await s.client()
        await c.send(post("/api/chat", ochat()))
        status, _, _ = await c.head()
        assert status == 200
        pieces, clean = await read_chunks(c)
        assert not clean                    # closed without the chunked terminator
        lines = ndjson(b"".join(p for _, p in pieces))
        assert [ln["message"]["content"] for ln in lines[:2]] == ["tok0 ", "tok1 "]
        assert len(lines) == 3 and set(lines[2]) == {"error"} and lines[2]["error"]
        assert await c.closed()

        # non-streamed: the half-sent body becomes a 502 error object
        r = await s.one(post("/api/chat", ochat(stream=False)))
        assert r.status == 502 and error_of(r)
        # both are llama-server failures, the cut stream included
        assert json.loads(s.gw.metrics.render_json())["upstream_errors"] == {"upstream_closed": 2}


@aio
async def test_client_disconnect_mid_stream_reaches_llama_server(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, access_log=True,
                            knobs={"events": 200, "interval": 0.02}) as s:
        c = await s.client()
        await c.send(post("/api/chat", ochat()))
        status, _, _ = await c.head()
        assert status == 200
        size = int((await c.line()).split(b";")[0], 16)
        first = json.loads(await c.exactly(size + 2))
        assert first["done"] is False
        c.abort()
        await s.fake.wait_for(lambda: s.fake.disconnects == 1)
        await s.fake.wait_for(lambda: s.fake.active_streams == 0)   # generation cancelled
        await eventually(lambda: s.gw.in_flight == 0)
        recs = s.access_records()
        assert recs[-1]["outcome"] == "client_closed" and recs[-1]["path"] == "/api/chat"


@aio
async def test_access_log_and_metrics_count_the_ollama_route(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, access_log=True, knobs={"events": 3}) as s:
        c = await s.client()
        assert (await c.request(post("/api/chat", ochat()))).status == 200
        assert (await c.request(post("/api/chat", ochat(stream=False)))).status == 200
        assert (await c.request(get("/api/tags"))).status == 200
        # refused before its body is read: that connection closes, so a fresh one
        assert (await s.one(post("/api/chat", ochat(), key=None))).status == 401
        m = json.loads(s.gw.metrics.render_json())
        counts = {(x["route"], x["status"], x["key_id"]): x["count"] for x in m["requests"]}
        assert counts[("ollama_chat", "200", "alice")] == 2
        assert counts[("ollama_chat", "401", "-")] == 1
        assert counts[("ollama_tags", "200", "alice")] == 1
        assert m["tokens"]["alice"] == {"prompt": 4, "completion": 6}   # usage of both chats
        recs = [x for x in s.access_records() if x.get("path") == "/api/chat"]
        assert [(x["status"], x["stream"], x["outcome"]) for x in recs] == \
            [(200, True, "ok"), (200, False, "ok"), (401, False, "missing_api_key")]
        assert recs[0]["completion_tokens"] == 3 and recs[0]["bytes_out"] > 0
        assert recs[1]["completion_tokens"] == 3 and recs[1]["key_id"] == "alice"


@aio
async def test_upstream_silent_mid_stream_ends_with_an_error_line(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, env={"STREAM_IDLE_TIMEOUT": "0.3"},
                            knobs={"events": 5, "stall_after": 2}) as s:
        c = await s.client()
        await c.send(post("/api/chat", ochat()))
        assert (await c.head())[0] == 200
        pieces, clean = await read_chunks(c)
        assert not clean
        lines = ndjson(b"".join(p for _, p in pieces))
        assert len(lines) == 3 and lines[2] == {"error": "llama-server sent nothing for 0.3 s"}
        await s.fake.wait_for(lambda: s.fake.disconnects == 1)   # upstream socket closed


def test_cut_after_the_done_line_adds_nothing():
    from llamagw.api import ollama as ollama_api
    from llamagw.api import ollama_handlers as ollama_routes
    stream = ollama_routes._NdjsonStream(ollama_api.ChatStream(MODEL, "chat"))
    stream.head(200)
    out = stream.feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
                      b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
                      b"data: [DONE]\n\n")
    assert [json.loads(x)["done"] for x in out.splitlines()] == [False, True]
    assert stream.cut() == b"" and stream.finish() == b""
    cut_early = ollama_routes._NdjsonStream(ollama_api.ChatStream(MODEL, "chat"))
    cut_early.head(200)
    assert json.loads(cut_early.cut("gone")) == {"error": "gone"}


@aio
async def test_tags_answer_while_the_digest_is_computed_off_the_loop(tmp_path, model_file,
                                                                     monkeypatch):
    import threading

    from llamagw.models import gguf as gguf_meta
    release = threading.Event()
    real = gguf_meta.file_digest

    def slow_digest(path):
        assert threading.current_thread() is not threading.main_thread()
        assert release.wait(IO_TIMEOUT)
        return real(path)

    monkeypatch.setattr(gguf_meta, "file_digest", slow_digest)
    async with Stack(tmp_path, env={"MODEL_PATH": model_file}) as s:
        catalog = s.gw.catalog
        loading = asyncio.create_task(catalog.load())
        await eventually(lambda: catalog.info is not None)
        r = await s.one(get("/api/tags"))             # the loop is free while hashing
        assert r.status == 200 and r.json()["models"][0]["digest"] == ""
        release.set()
        await asyncio.wait_for(loading, IO_TIMEOUT)
        r = await s.one(get("/api/tags"))
        assert r.json()["models"][0]["digest"] == real(model_file)


@aio
async def test_without_model_path_any_name_is_served(tmp_path):
    async with Stack(tmp_path, env={"MODEL_PATH": ""}) as s:
        await s.gw.catalog.load()
        c = await s.client()
        assert (await c.request(get("/api/tags"))).json() == {"models": []}
        r = await c.request(post("/api/chat", ochat(stream=False, model="llama3.2")))
        assert r.status == 200 and r.json()["model"] == "llama3.2"
        assert s.fake.requests[-1].json()["model"] == "llama3.2"


@aio
async def test_http10_client_gets_a_close_delimited_stream(tmp_path, model_file):
    async with ollama_stack(tmp_path, model_file, knobs={"events": 2}) as s:
        c = await s.client()
        r = await c.request(post("/api/generate", {"model": MODEL, "prompt": "hi"},
                                 version=b"HTTP/1.0"))
        assert r.status == 200 and r.get("transfer-encoding") is None
        assert r.get("content-type") == NDJSON
        lines = ndjson(r.body)
        assert [ln["done"] for ln in lines] == [False, False, True]
        assert await c.closed()


# ------------------------------------------------------------------ line breaks inside JSON
# Characters that JSON leaves unescaped but str.splitlines() (and so httpx's iter_lines, which the
# `ollama` client reads NDJSON with) takes for line ends. A model emits them (a tokenizer's byte
# pieces), and the client then splits a line in two and fails with JSONDecodeError mid-stream.
LINE_BREAK_TEXTS = ["a\u2028b ", "c\u2029d ", "e\x85f ", "<&> ", "\u00e9\u4e16 "]
RAW_LINE_BREAKS = ("\u2028".encode(), "\u2029".encode(), "\x85".encode())


def _no_raw_line_breaks(data: bytes) -> None:
    for raw in RAW_LINE_BREAKS:
        assert raw not in data, (raw, data)


@aio
async def test_line_break_characters_in_tokens_are_escaped_in_every_answer(tmp_path, model_file):
    texts = LINE_BREAK_TEXTS
    whole = "".join(texts)
    async with ollama_stack(tmp_path, model_file,
                            knobs={"events": len(texts), "texts": texts}) as s:
        c = await s.client()
        for path, field in (("/api/chat", None), ("/api/generate", "response")):
            body = ochat() if field is None else {"model": MODEL, "prompt": "hi"}
            r = await c.request(post(path, body))
            assert r.status == 200 and r.complete, r
            _no_raw_line_breaks(r.body)
            assert "\u00e9\u4e16".encode() in r.body    # other text stays UTF-8, unescaped
            assert b"<&>" in r.body                       # not HTML-escaped (see ollama_api)
            lines = r.body.decode().splitlines()          # as a line-splitting client reads
            parsed = [json.loads(line) for line in lines]
            got = [p["message"]["content"] if field is None else p[field] for p in parsed]
            assert got[:-1] == texts and parsed[-1]["done"] is True
            # not streamed: one JSON object, also safe to read line by line
            r = await c.request(post(path, {**body, "stream": False}))
            assert r.status == 200, r
            _no_raw_line_breaks(r.body)
            (line,) = r.body.decode().splitlines()
            out = json.loads(line)
            assert (out["message"]["content"] if field is None else out[field]) == whole


@aio
async def test_official_client_reads_streams_with_line_break_characters(tmp_path, model_file):
    import ollama
    texts = LINE_BREAK_TEXTS
    async with ollama_stack(tmp_path, model_file,
                            knobs={"events": len(texts), "texts": texts}) as s:
        client = ollama.AsyncClient(host=f"http://127.0.0.1:{s.port}", timeout=IO_TIMEOUT,
                                    headers={"Authorization": f"Bearer {ALICE}"})
        parts = [p async for p in await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)]
        assert [p.message.content for p in parts[:-1]] == texts and parts[-1].done
        parts = [p async for p in await client.generate(model=MODEL, prompt="hi", stream=True)]
        assert [p.response for p in parts[:-1]] == texts and parts[-1].done
        resp = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert resp.message.content == "".join(texts)


@aio
async def test_lone_surrogate_in_the_request_gets_an_ollama_error_not_a_dropped_connection(
        tmp_path, model_file):
    # "\ud800" is JSON text for a lone surrogate, which cannot be encoded as UTF-8 (echoed in an
    # error message it once dropped the connection); the body check refuses it in Ollama's shape.
    async with ollama_stack(tmp_path, model_file) as s:
        raw = b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
        r = await s.one(post("/api/chat", raw))
        assert r.status == 400 and "surrogate" in error_of(r)
        assert s.fake.requests == []
