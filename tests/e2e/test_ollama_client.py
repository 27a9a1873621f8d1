"""The official `ollama` Python client through the gateway, against the real llama-server.

The demo model has random weights: these tests check shapes, types and framing, never text.
(`format` with a JSON schema makes this model's llama-server fail to build its samplers for a
chat, so structured output is covered by the unit tests of the mapping; a raw generate, which
passes the schema as /v1/completions' own json_schema field, works and forces exact text.)
"""

from __future__ import annotations

import json
import math
import os

import ollama
import pytest
from e2e_stack import stack  # noqa: F401 (fixtures)

# Short answers keep the module fast; the model generates up to this many tokens.
OPTIONS = {"num_predict": 8, "temperature": 0}
# Per request deadline (the tiny model answers in milliseconds; a loaded runner is slower).
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model(stack) -> str:
    return os.path.basename(str(stack.model)).removesuffix(".gguf")


@pytest.fixture(scope="module")
def client(stack):
    return ollama.Client(host=stack.base_url, timeout=TIMEOUT_S,
                         headers={"Authorization": f"Bearer {stack.key}"})


def _check_final(resp) -> None:
    assert resp.done is True and resp.done_reason in ("stop", "length")
    assert isinstance(resp.eval_count, int) and 1 <= resp.eval_count <= OPTIONS["num_predict"]
    assert isinstance(resp.prompt_eval_count, int) and resp.prompt_eval_count >= 1
    # nanoseconds: even the tiny model takes more than a microsecond per token
    assert isinstance(resp.eval_duration, int) and resp.eval_duration > 1000
    assert resp.total_duration >= resp.eval_duration + resp.prompt_eval_duration


def test_chat(client, model):
    resp = client.chat(model=model, messages=[{"role": "user", "content": "Hello"}],
                       options=OPTIONS)
    assert resp.message.role == "assistant" and isinstance(resp.message.content, str)
    assert resp.model.startswith(model)
    _check_final(resp)


def test_streaming_chat(client, model):
    chunks = list(client.chat(model=model, messages=[{"role": "user", "content": "Count"}],
                              options=OPTIONS, stream=True))
    assert len(chunks) >= 3
    assert all(c.done is False for c in chunks[:-1])
    assert all(isinstance(c.message.content, str) for c in chunks)
    assert sum(1 for c in chunks[:-1] if c.message.content) >= 2
    _check_final(chunks[-1])


def test_generate(client, model):
    resp = client.generate(model=model, prompt="Once upon a time", options=OPTIONS)
    assert isinstance(resp.response, str)
    _check_final(resp)
    chunks = list(client.generate(model=model, prompt="Once upon a time", options=OPTIONS,
                                  stream=True, raw=True))
    assert chunks[-1].done is True and all(c.done is False for c in chunks[:-1])
    assert all(isinstance(c.response, str) for c in chunks)


def test_list_show_ps(client, model, stack):
    listed = client.list().models
    (m,) = [x for x in listed if x.model == f"{model}:latest"]
    assert m.size == os.path.getsize(stack.model)
    assert m.digest and len(m.digest) == 64
    assert m.details.format == "gguf" and m.details.family
    assert m.details.quantization_level and m.details.parameter_size
    assert m.modified_at is not None

    shown = client.show(model)
    info = shown.modelinfo
    arch = info["general.architecture"]
    assert isinstance(info[f"{arch}.context_length"], int) and info[f"{arch}.context_length"] > 0
    assert shown.details.family == arch
    assert "completion" in shown.capabilities or "embedding" in shown.capabilities

    running = client.ps().models
    assert [r.model for r in running] == [f"{model}:latest"]
    assert running[0].size == m.size and running[0].expires_at is not None


def test_embed(client, model):
    resp = client.embed(model=model, input=["hello world", "goodbye"])
    assert len(resp.embeddings) == 2
    dim = len(resp.embeddings[0])
    assert dim > 1 and all(len(v) == dim for v in resp.embeddings)
    assert all(isinstance(x, float) and math.isfinite(x) for v in resp.embeddings for x in v)
    legacy = client.embeddings(model=model, prompt="hello world")
    assert len(legacy.embedding) == dim


def test_errors_reach_the_client_as_response_errors(stack, client, model):
    anonymous = ollama.Client(host=stack.base_url, timeout=TIMEOUT_S)
    with pytest.raises(ollama.ResponseError) as err:
        anonymous.chat(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 401 and "key" in err.value.error.lower()
    with pytest.raises(ollama.ResponseError) as err:
        anonymous.list()
    assert err.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="not-served:7b", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 404 and "not-served:7b" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull(model)                  # pulling takes an admin key (and router mode)
    assert err.value.status_code == 403 and "admin" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.push(model)                  # the container's models are never pushed
    assert err.value.status_code == 501


# Line breaks inside JSON strings. The `ollama` client reads NDJSON with httpx's iter_lines, which
# splits on everything str.splitlines() does: U+2028, U+2029 and U+0085 too. Raw in a line, they
# cut it and the client fails with JSONDecodeError mid-stream.
LINE_BREAKS = "\u2028\u2029\x85"
# A JSON schema with one possible value makes llama-server's grammar write exactly that string:
# each of them, whatever the weights (raw generate: /v1/completions' own json_schema field).
FORCED = {"type": "string", "enum": ["a\u2028b\u2029c\x85d"]}
# Free generation over many seeds. The demo model emits U+2028 about once in 4,500 tokens
# (measured: seeds 10, 15, 16 and 18 of these at 600 tokens, on the pinned build); ~0.45 s each.
SEEDS = range(24)
SEED_TOKENS = 600


def test_line_breaks_forced_by_a_schema_reach_the_client_whole(client, model):
    for stream in (True, False):
        resp = client.generate(model=model, prompt="Hello", raw=True, format=FORCED,
                               options={"num_predict": 30, "seed": 1}, stream=stream)
        parts = list(resp) if stream else [resp]
        assert parts[-1].done is True
        assert "".join(p.response for p in parts) == json.dumps(FORCED["enum"][0],
                                                                ensure_ascii=False)


def test_chat_streams_over_many_seeds_parse_line_by_line(client, model):
    carried = []
    for seed in SEEDS:
        chunks = list(client.chat(model=model, messages=[{"role": "user", "content": "Hello"}],
                                  options={"num_predict": SEED_TOKENS, "seed": seed},
                                  stream=True))
        assert chunks[-1].done is True and all(c.done is False for c in chunks[:-1]), seed
        assert 1 <= chunks[-1].eval_count <= SEED_TOKENS, seed
        text = "".join(c.message.content for c in chunks)
        if any(ch in text for ch in LINE_BREAKS):
            carried.append(seed)
    print(f"seeds whose answer carried a line break character: {carried}")
