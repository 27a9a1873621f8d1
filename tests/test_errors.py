"""errors.py: one family of errors, one renderer, a body per envelope (OpenAI, Ollama, admin)."""

from __future__ import annotations

import json

import pytest

from llamagw.api import ollama
from llamagw.errors import (Envelope, GatewayError, OllamaError, ProtocolError, not_found,
                            render)


@pytest.mark.parametrize("envelope", [Envelope.OPENAI, Envelope.ADMIN])
def test_openai_and_admin_bodies_nest_message_type_and_code(envelope):
    err = GatewayError(429, "slow down", "rate_limit_exceeded")
    assert json.loads(render(err, envelope)) == {"error": {
        "message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}


def test_an_ollama_body_is_the_message_alone():
    err = GatewayError(401, "Missing API key", "missing_api_key")
    assert render(err, Envelope.OLLAMA) == b'{"error":"Missing API key"}'


def test_bodies_are_ascii_json_whatever_the_message():
    # U+2028 / U+0085 end lines for str.splitlines(); a lone surrogate cannot be UTF-8
    err = GatewayError(404, "model 'a\u2028b\x85\ud800' not found", "not_found")
    for envelope in Envelope:
        body = render(err, envelope)
        assert body.isascii() and len(body.splitlines()) == 1
        assert err.message in json.dumps(json.loads(body), ensure_ascii=False)


def test_body_without_an_envelope_is_the_errors_own_shape():
    assert json.loads(not_found().body())["error"]["code"] == "not_found"
    assert json.loads(ProtocolError("bad", 400).body())["error"]["type"] == \
        "invalid_request_error"
    assert OllamaError(503, "Loading model").body() == b'{"error":"Loading model"}'
    err = OllamaError(404, "model 'x' not found")
    assert json.loads(err.body(Envelope.OPENAI))["error"]["code"] == "not_found"


def test_ollama_errors_are_gateway_errors_with_a_code():
    with pytest.raises(GatewayError) as info:
        ollama.parse_json_body(b"[1]")
    err = info.value
    assert isinstance(err, OllamaError)
    assert (err.status, err.code, err.close) == (400, "invalid_request", False)
    assert ollama.not_supported("/api/pull").code == "not_supported"
    assert OllamaError(599, "odd").code == "ollama_error"
    assert OllamaError(404, "gone", "model_not_found").code == "model_not_found"
