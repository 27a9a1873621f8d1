"""Hostile JSON bodies against the real llama-server (issue 25): a body nested 200,000 objects deep
(1.2 MB) killed llama-server with SIGSEGV through any valid key. The gateway now refuses it (400)
before llama-server sees it, and llama-server keeps serving, the same process, never restarted."""

from __future__ import annotations

import json

from e2e_stack import request
from e2e_stack import make_stack  # noqa: F401 (fixtures)

CRASH_DEPTH = 200_000
# MAX_JSON_DEPTH (jsonguard): a body this deep is legitimate and reaches llama-server.
LIMIT = 100


def crash_body(depth: int = CRASH_DEPTH) -> bytes:
    return (b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"x":'
            + b'{"a":' * depth + b"1" + b"}" * depth + b"}")


def test_a_body_200000_deep_is_refused_and_llama_server_keeps_serving(make_stack):
    s = make_stack().start()
    s.wait_health(200)
    pid = s.pid("llama-server")
    status, _, body = request(s.port, "/v1/chat/completions", "POST", crash_body(), s.auth())
    assert status == 400, body[:300]
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "json_too_deep"

    # Ollama's shape on its routes; 1,000 arrays deep got an empty reply there.
    deep = (b'{"model":"x","messages":[],"x":' + b"[" * 1000 + b"]" * 1000 + b"}")
    status, _, body = request(s.port, "/api/chat", "POST", deep, s.auth())
    assert status == 400 and "deeper than" in json.loads(body)["error"], body[:300]

    # At the limit: llama-server gets it and answers as usual.
    status, _, body = request(s.port, "/v1/chat/completions", "POST",
                              crash_body(LIMIT - 1), s.auth())
    assert status == 200, body[:300]

    # The same llama-server serves a normal chat, healthy, never restarted.
    status, _, body = s.chat(max_tokens=4)
    assert status == 200, body[:300]
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert s.pid("llama-server") == pid and s.health() == 200
    assert "restart" not in s.output().lower()
    assert s.stop() == 0
