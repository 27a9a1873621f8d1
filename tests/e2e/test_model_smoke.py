"""The real llama-server on the demo model: it loads, answers chat (plain and streamed) and the
model file is reproducible. Run by `make test-e2e`, which sets LLAMA_SERVER_BIN and DEMO_MODEL;
without them the cached llama-server and data/models/demo-tiny-llama.gguf are used."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import llama_bin
from e2e_stack import demo_model, server_bin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# Loading the 5 MB demo model takes ~0.2 s on a 2-core CPU box; a slow CI runner gets 60 s.
STARTUP_DEADLINE_S = 60.0
# One request to the tiny model takes milliseconds; 30 s means something is broken.
REQUEST_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAX_MODEL_BYTES = 20 * 1024 * 1024  # the demo model must stay small enough to generate anywhere
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A llama-server on an OS-chosen port; yields its base URL once /health says ok."""
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [server_bin(), "-m", str(demo_model()), "--host", "127.0.0.1", "--port", "0",
           "-c", "2048", "-ngl", "0", "-np", "2", "--metrics"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        base = None
        while time.monotonic() < deadline and proc.poll() is None:
            if base is None:
                m = LISTENING.search(log_path.read_bytes())
                base = f"http://127.0.0.1:{int(m.group(1))}" if m else None
            if base is not None:
                try:
                    if get(base + "/health")[0] == 200:
                        break
                except OSError:
                    pass
            time.sleep(0.05)
        else:
            tail = log_path.read_bytes()[-3000:].decode(errors="replace")
            pytest.fail(f"llama-server not healthy within {STARTUP_DEADLINE_S}s "
                        f"(exit {proc.poll()}):\n{tail}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(url: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return resp.status, dict(resp.headers), resp.read()


CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}


def test_health_and_model_listing(server):
    status, body = get(server + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, body = get(server + "/v1/models")
    assert status == 200
    meta = json.loads(body)["data"][0]["meta"]
    assert meta["n_vocab"] == 32000 and meta["n_embd"] == 64


def test_chat_completion_returns_text(server):
    status, _, raw = post(server + "/v1/chat/completions", CHAT)
    assert status == 200
    body = json.loads(raw)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    # greedy decoding on a fixed model is reproducible: gateway tests can rely on it
    assert json.loads(post(server + "/v1/chat/completions", CHAT)[2])["choices"] == body["choices"]


def test_chat_stream_events_end_with_usage_then_done(server):
    status, headers, raw = post(server + "/v1/chat/completions",
                                {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] >= 1 and "timings" in usage_chunk
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    plain = json.loads(post(server + "/v1/chat/completions", CHAT)[2])
    assert text == plain["choices"][0]["message"]["content"]


def test_demo_model_is_reproducible_and_small(tmp_path):
    vocab = llama_bin.cached_vocab(llama_bin.default_cache_dir())
    assert vocab.is_file(), f"{vocab}: missing; run `make model`"
    digests = []
    for name in ("a.gguf", "b.gguf"):
        out = tmp_path / name
        subprocess.run([sys.executable, str(REPO / "tests/tools/make_model.py"), "--out", str(out),
                        "--vocab", str(vocab)], check=True, timeout=120, capture_output=True)
        assert out.stat().st_size < MAX_MODEL_BYTES
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
