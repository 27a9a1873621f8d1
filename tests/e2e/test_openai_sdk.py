"""The official OpenAI SDK and curl, through the gateway, against the real llama-server.

The demo model has random weights: these tests check shapes, framing and behaviour, never text.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time

import openai
import pytest
from e2e_stack import stack  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.key, max_retries=0,
                         timeout=60)


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model="demo-tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage.completion_tokens >= 1
    assert resp.usage.prompt_tokens >= 1


def test_streaming_chat_arrives_chunk_by_chunk(client):
    stream = client.chat.completions.create(
        model="demo-tiny-llama", messages=[{"role": "user", "content": "Count"}], max_tokens=48,
        temperature=0, stream=True, stream_options={"include_usage": True})
    arrivals = []
    usage = None
    with stream:
        for chunk in stream:
            arrivals.append(time.monotonic())
            if chunk.usage is not None:
                usage = chunk.usage
    # One SSE event per generated token, each parsed by the SDK as it came.
    assert len(arrivals) >= 10
    assert arrivals[0] < arrivals[-1]
    assert usage is not None and usage.completion_tokens >= 1


def test_stream_tokens_are_accounted_without_include_usage(client, stack):
    stream = client.chat.completions.create(
        model="demo-tiny-llama", messages=[{"role": "user", "content": "Count"}], max_tokens=12,
        temperature=0, stream=True, extra_headers={"X-Request-Id": "e2e-usage-probe"})
    chunks = list(stream)
    assert all(c.choices for c in chunks)        # no usage-only chunk forced on the client
    log = stack.data / "logs" / "api_access.log"
    deadline = time.monotonic() + 5
    record = None
    while record is None and time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []   # written by a thread
        for line in lines:
            rec = json.loads(line)
            if rec.get("request_id") == "e2e-usage-probe":
                record = rec
        time.sleep(0.05)
    assert record is not None
    assert record["key_id"] == "e2e" and record["stream"] is True and record["outcome"] == "ok"
    assert record["prompt_tokens"] >= 1 and 1 <= record["completion_tokens"] <= 12


def test_completions(client):
    resp = client.completions.create(model="demo-tiny-llama", prompt="Once upon a time",
                                     max_tokens=8, temperature=0)
    assert isinstance(resp.choices[0].text, str)
    assert resp.usage.completion_tokens >= 1


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["demo-tiny-llama"]


def test_embeddings(client):
    resp = client.embeddings.create(model="demo-tiny-llama", input=["hello", "world"])
    assert len(resp.data) == 2
    vec = resp.data[0].embedding
    assert len(vec) > 8 and all(isinstance(x, float) for x in vec)


def test_wrong_key_is_authentication_error(stack):
    bad = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="sk-not-a-real-key-000000000",
                        max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_private_llama_server_routes_stay_private(stack):
    for path in ("/slots", "/props", "/lora-adapters", "/v1/../slots", "/slots?id=0"):
        out = subprocess.run(["curl", "-s", "--path-as-is", "-o", "/dev/null", "-w",
                              "%{http_code}", "-H", f"Authorization: Bearer {stack.key}",
                              stack.base_url + path],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout == "404", path
    # /metrics is the gateway's own, never llama-server's
    out = subprocess.run(["curl", "-s", stack.base_url + "/metrics"], capture_output=True,
                         text=True, timeout=30)
    assert "gateway_requests_total" in out.stdout
    assert "llamacpp:" not in out.stdout


def test_curl_as_in_the_readme(stack):
    # The line a user pastes: Authorization header, JSON body, nothing else.
    cmd = (f"curl -s {stack.base_url}/v1/chat/completions "
           f"-H 'Authorization: Bearer {stack.key}' -H 'Content-Type: application/json' "
           """-d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8}'""")
    out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_curl_streaming_with_no_buffering(stack):
    cmd = ["curl", "-sN", "-D", "-", stack.base_url + "/v1/chat/completions",
           "-H", f"Authorization: Bearer {stack.key}", "-H", "Content-Type: application/json",
           "-d", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                             "stream": True})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    head, _, body = out.stdout.partition("\n\n")   # text mode turned CRLF into LF
    assert "cache-control: no-cache" in head.lower()
    assert "x-accel-buffering: no" in head.lower()
    events = [ln for ln in body.split("\n") if ln.startswith("data: ")]
    assert events and events[-1] == "data: [DONE]", out.stdout
    assert len(events) >= 3


def test_stream_with_raw_line_break_characters(client):
    # llama-server writes U+2028, U+2029 and U+0085 raw in its JSON; the relay passes the bytes
    # and SSE ends lines at CR and LF only, so the SDK reads them whole. A one-value JSON schema
    # makes llama-server's grammar write exactly them.
    text = "a\u2028b\u2029c\x85d"
    stream = client.completions.create(
        model="demo-tiny-llama", prompt="Hello", max_tokens=30, seed=1, stream=True,
        extra_body={"json_schema": {"type": "string", "enum": [text]}})
    got = "".join(c.choices[0].text for c in stream if c.choices)
    assert got == json.dumps(text, ensure_ascii=False)
