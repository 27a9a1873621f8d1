"""Ollama <-> OpenAI translations, proven with paired fixtures in tests/data/ollama/.

Each fixture file is data: an input and the exact expected output. The tests load every file
of a kind and assert equality; durations are deterministic through an injected clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamagw.api import ollama as oa
from llamagw.api import ollama_requests, ollama_stream
from llamagw.models.gguf import ArraySummary, ModelInfo

DATA = Path(__file__).parent / "data" / "ollama"


def fixtures(prefix: str) -> list[Path]:
    found = sorted(DATA.glob(f"{prefix}*.json"))
    assert found, f"no fixtures {prefix}*.json in {DATA}"
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def fake_clock(start_ns: int, step_ns: int):
    """Returns start_ns on the first call, then start_ns + k*step_ns on the k-th next call."""
    state = {"n": 0}

    def clock() -> int:
        value = start_ns + state["n"] * step_ns
        state["n"] += 1
        return value
    return clock


REQUEST_FUNCS = {
    "chat": lambda body, name: oa.chat_request(body, name),
    "generate": lambda body, name: oa.generate_request(body, name),
    "embed": lambda body, name: oa.embed_request(body, name),
    "embeddings": lambda body, name: oa.embed_request(body, name, legacy=True),
}


# --- paired fixtures --------------------------------------------------------------------------

@pytest.mark.parametrize("path", fixtures("request_"), ids=lambda p: p.stem)
def test_request_fixture(path):
    fx = load(path)
    result = REQUEST_FUNCS[fx["endpoint"]](fx["ollama"], fx["model_name"])
    if "load" in fx:
        assert result == oa.ModelLoad(**fx["load"])
        answer = oa.load_response(result, fx["model_name"], now_ns=1_800_000_000_000_000_000)
        assert answer == fx["response"]
    else:
        assert result == fx["openai"]
        assert oa.upstream_path(result) == fx["path"]


@pytest.mark.parametrize("path", fixtures("stream_"), ids=lambda p: p.stem)
def test_stream_fixture(path):
    fx = load(path)
    stream = oa.ChatStream(fx["model_name"], fx["kind"],
                           clock_ns=fake_clock(fx["clock"]["start_ns"], fx["clock"]["step_ns"]))
    raw_lines: list[bytes] = []
    for event in fx["events"]:
        raw_lines += stream.feed_event(event.encode())
    if fx["finish"]:
        raw_lines += stream.finish()
    for line in raw_lines:
        assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    assert [json.loads(line) for line in raw_lines] == fx["lines"]
    # After the final line nothing more comes out.
    assert stream.done
    assert stream.feed_event(b"[DONE]") == [] and stream.finish() == []


@pytest.mark.parametrize("path", fixtures("response_"), ids=lambda p: p.stem)
def test_response_fixture(path):
    fx = load(path)
    out = oa.chat_response(fx["openai"], fx["model_name"], fx["kind"], fx["started_ns"],
                           now_ns=fx["now_ns"])
    assert out == fx["ollama"]


@pytest.mark.parametrize("path", fixtures("embed_response_"), ids=lambda p: p.stem)
def test_embed_response_fixture(path):
    fx = load(path)
    out = oa.embed_response(fx["openai"], fx["model_name"], fx["legacy"],
                            started_ns=fx["started_ns"], now_ns=fx["now_ns"],
                            dimensions=fx["dimensions"])
    assert out == fx["ollama"]


# --- streaming details ------------------------------------------------------------------------

def test_stream_event_split_bytes_and_whitespace_tolerated():
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    event = b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}'
    lines = stream.feed_event(b"  " + event + b"\r\n")
    assert [json.loads(line)["message"]["content"] for line in lines] == ["x"]


def test_stream_done_without_finish_reason_still_ends_with_stop():
    stream = oa.ChatStream("m", "generate", clock_ns=fake_clock(0, 10))
    lines = stream.feed_event(b"[DONE]")
    final = json.loads(lines[-1])
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["response"] == "" and final["total_duration"] == 10


def test_stream_non_json_event_is_an_error_line():
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    assert stream.feed_event(b"not json") == [b'{"error":"upstream sent an event that is not JSON"}\n']
    assert stream.feed_event(b"[DONE]") == []


def test_stream_error_line_ends_the_stream():
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    assert stream.error_line("upstream timed out") == b'{"error":"upstream timed out"}\n'
    assert stream.finish() == []


def test_stream_tool_call_arguments_are_bounded(monkeypatch):
    monkeypatch.setattr(ollama_stream, "MAX_TOOL_ARGUMENT_BYTES", 10)
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    ev = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": "0123456789"}'}}]}}]}
    lines = stream.feed_event(json.dumps(ev).encode())
    assert len(lines) == 1 and "exceed" in json.loads(lines[0])["error"]
    assert stream.done


def test_tool_call_arguments_nested_past_the_stack_are_an_error_not_a_crash():
    """A model can write arguments nested deeper than json.loads can recurse: the answer is an
    error (a 502 whole, an error line in a stream), never a RecursionError in a callback."""
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(oa.OllamaError) as err:
        oa.chat_response({"choices": [{"message": {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}]},
            "finish_reason": "tool_calls"}]}, "m", "chat", 0, now_ns=1)
    assert err.value.status == 502 and "nested too deeply" in str(err.value)
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    ev = {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "c", "function": {"name": "f", "arguments": deep}}]},
        "finish_reason": "tool_calls"}]}
    lines = stream.feed_event(json.dumps(ev).encode())
    assert "nested too deeply" in json.loads(lines[-1])["error"]


def test_stream_tool_call_count_is_bounded(monkeypatch):
    monkeypatch.setattr(ollama_stream, "MAX_TOOL_CALLS", 2)
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    lines = []
    for i in range(3):
        ev = {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": i, "id": f"c{i}", "function": {"name": "f", "arguments": "{}"}}]}}]}
        lines += stream.feed_event(json.dumps(ev).encode())
    assert "more than 2 tool calls" in json.loads(lines[-1])["error"]


def test_stream_output_is_compact_utf8():
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    ev = {"choices": [{"index": 0, "delta": {"content": "caf\u00e9"}}]}
    (line,) = stream.feed_event(json.dumps(ev).encode())
    assert "café".encode() in line and b": " not in line


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"])
def test_stream_line_breaks_in_strings_are_escaped(char):
    # str.splitlines() ends a line at each of them (the `ollama` client splits NDJSON so).
    stream = oa.ChatStream("m", "chat", clock_ns=fake_clock(0, 1))
    text = f"a{char}b\\{char}<&>"            # a backslash right before one, too
    ev = {"choices": [{"index": 0, "delta": {"content": text}}]}
    (line,) = stream.feed_event(json.dumps(ev, ensure_ascii=False).encode())
    assert char.encode() not in line and b"<&>" in line
    (one,) = line.decode().splitlines()
    assert json.loads(one)["message"]["content"] == text
    assert oa.error_body(text) == b'{"error":"a\\u%04xb\\\\\\u%04x<&>"}' % (ord(char), ord(char))


def test_lone_surrogate_is_escaped_not_an_encoding_error():
    body = oa.error_body("model 'x\ud800' not found")
    assert body == b'{"error":"model \'x\\ud800\' not found"}'
    assert json.loads(body)["error"] == "model 'x\ud800' not found"


def test_chat_stream_rejects_unknown_kind():
    with pytest.raises(ValueError):
        oa.ChatStream("m", "embed")


# --- request validation: 400 ------------------------------------------------------------------

BAD_CHAT = [
    ({"messages": [{"role": "user", "content": "x"}]}, "model is required"),
    ({"model": "m", "messages": "hi"}, "messages must be a list"),
    ({"model": "m", "messages": ["hi"]}, "messages[0] must be an object"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["@@@@"]}]},
     "images[0]: not base64"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["AAAAAAAA"]}]},
     "not a PNG, JPEG"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x", "images": ["AAAA"]}]},
     "only supported on user messages"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "function.name is required"),
    ({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": [1]}}]}]}, "arguments must be an object"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "stream must be a boolean"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "format": "xml"},
     "format must be"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "think": "extreme"},
     "think must be"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "options": []},
     "options must be an object"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "options": {"temperature": "hot"}}, "option temperature must be a number"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "options": {"top_k": 1.5}}, "option top_k must be an integer"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "options": {"seed": True}}, "option seed must be an integer"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "options": {"stop": [1]}}, "option stop must be a list of strings"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools[0].function.name is required"),
]


@pytest.mark.parametrize("body,fragment", BAD_CHAT)
def test_chat_request_rejects(body, fragment):
    with pytest.raises(oa.OllamaError) as exc:
        oa.chat_request(body, "m")
    assert exc.value.status == 400
    assert fragment in exc.value.message
    assert json.loads(exc.value.body()) == {"error": exc.value.message}


BAD_GENERATE = [
    ({"model": "m", "prompt": 5}, "prompt must be a string"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": "x", "raw": "yes"}, "raw must be a boolean"),
    ({"model": "m", "prompt": "x", "raw": True, "images": ["iVBORw0KGgoAAAAN"]}, "raw: true"),
    ({"model": "m", "prompt": "x", "system": ["a"]}, "system must be a string"),
    ({"model": "m", "prompt": "x", "options": {"num_predict": "many"}}, "num_predict"),
    ({"model": "m", "prompt": "x", "images": "iVBOR"}, "images must be a list"),
]


@pytest.mark.parametrize("body,fragment", BAD_GENERATE)
def test_generate_request_rejects(body, fragment):
    with pytest.raises(oa.OllamaError) as exc:
        oa.generate_request(body, "m")
    assert exc.value.status == 400 and fragment in exc.value.message


@pytest.mark.parametrize("body,legacy,fragment", [
    ({"model": "m", "input": 3}, False, "input must be a string or a list"),
    ({"model": "m", "input": ["a", 3]}, False, "input[1] must be a string"),
    ({"model": "m", "input": "a", "dimensions": 0}, False, "dimensions"),
    ({"model": "m", "prompt": ["a"]}, True, "prompt must be a string"),
    ({"input": "a"}, False, "model is required"),
])
def test_embed_request_rejects(body, legacy, fragment):
    with pytest.raises(oa.OllamaError) as exc:
        oa.embed_request(body, "m", legacy=legacy)
    assert exc.value.status == 400 and fragment in exc.value.message


def test_embed_request_input_count_is_bounded(monkeypatch):
    monkeypatch.setattr(ollama_requests, "MAX_EMBED_INPUTS", 3)
    oa.embed_request({"model": "m", "input": ["a"] * 3}, "m")
    with pytest.raises(oa.OllamaError) as exc:
        oa.embed_request({"model": "m", "input": ["a"] * 4}, "m")
    assert exc.value.status == 400 and "limit is 3" in exc.value.message


@pytest.mark.parametrize("keep_alive,reason", [
    (0, "unload"), ("0", "unload"), ("0s", "unload"), (0.0, "unload"),
    ("5m", "load"), (-1, "load"), (None, "load"),
])
def test_load_reason_from_keep_alive(keep_alive, reason):
    body = {"model": "m", "messages": []}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    assert oa.chat_request(body, "m") == oa.ModelLoad("chat", reason)


def test_parse_json_body():
    assert oa.parse_json_body(b'{"model":"m"}') == {"model": "m"}
    for raw, fragment in ((b"{nope", "invalid JSON"), (b"[1]", "must be a JSON object"),
                          (b"\xff\xfe", "invalid JSON")):
        with pytest.raises(oa.OllamaError) as exc:
            oa.parse_json_body(raw)
        assert exc.value.status == 400 and fragment in exc.value.message


# --- upstream answers -------------------------------------------------------------------------

def test_upstream_error_translation():
    err = oa.upstream_error(400, b'{"error":{"code":400,"message":"bad schema","type":"invalid_request_error"}}')
    assert (err.status, err.message) == (400, "bad schema")
    err = oa.upstream_error(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')
    assert (err.status, err.body()) == (503, b'{"error":"Loading model"}')
    err = oa.upstream_error(500, b"plain text failure")
    assert (err.status, err.message) == (500, "plain text failure")
    assert oa.upstream_error(200, b"").status == 502


@pytest.mark.parametrize("openai,fragment", [
    ({"choices": []}, "no choices"),
    ({"error": {"message": "boom"}}, "boom"),
    ({"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}}]},
     "not a JSON object"),
    ({"choices": [{"message": {"tool_calls": ["x"]}}]}, "malformed tool call"),
])
def test_chat_response_bad_upstream_is_502(openai, fragment):
    with pytest.raises(oa.OllamaError) as exc:
        oa.chat_response(openai, "m", "chat", 0, now_ns=1)
    assert exc.value.status == 502 and fragment in exc.value.message


def test_embed_response_rejects_token_level_embeddings():
    with pytest.raises(oa.OllamaError) as exc:
        oa.embed_response({"data": [{"index": 0, "embedding": [[0.1], [0.2]]}]}, "m", False)
    assert exc.value.status == 502


# --- 501 and fixed answers --------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/pull", "/api/push", "/api/create", "/api/copy",
                                  "/api/delete", "/api/blobs/sha256:abc"])
def test_model_management_is_501(path):
    err = oa.not_supported(path)
    assert err is not None and err.status == 501
    assert "managed by the container" in json.loads(err.body())["error"]


@pytest.mark.parametrize("path", ["/api/chat", "/api/tags", "/api/pulls", "/api/blobs"])
def test_other_paths_are_not_501(path):
    assert oa.not_supported(path) is None


def test_version_and_root():
    version = oa.version_response()["version"]
    assert [int(x) for x in version.split(".")] >= [0, 9, 0]
    assert oa.ROOT_TEXT == "Ollama is running"
    assert oa.NDJSON_CONTENT_TYPE == "application/x-ndjson"


def test_rfc3339_ns():
    assert oa.rfc3339_ns(1_800_000_000_000_000_007) == "2027-01-15T08:00:00.000000007Z"
    assert oa.rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"


def test_model_names():
    assert oa.ollama_name("tiny") == "tiny:latest"
    assert oa.ollama_name("org/tiny:q4") == "org/tiny:q4"
    assert oa.ollama_name("host:5000/tiny") == "host:5000/tiny:latest"
    assert oa.matches_model("tiny:latest", "tiny") and oa.matches_model("tiny", "tiny:latest")
    assert not oa.matches_model("other", "tiny") and not oa.matches_model(None, "tiny")


# --- listings from ModelInfo ------------------------------------------------------------------

def make_info(tmp_path, **over) -> ModelInfo:
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF-not-really")
    fields = dict(
        name="tiny", path=str(f), size_bytes=15, modified_at=1_800_000_000.5,
        family="llama", parameter_count=1_200_000, parameter_size="1.20M",
        quantization_level="Q8_0", context_length=2048, embedding_length=64,
        template="{% if tools %}...{% endif %}<think>x</think>",
        metadata={"general.architecture": "llama", "llama.context_length": 2048,
                  "general.license": "mit",
                  "tokenizer.ggml.tokens": ArraySummary("string", 32000),
                  "tokenizer.chat_template": "{% if tools %}...{% endif %}<think>x</think>"},
        tensor_count=3, gguf_version=3)
    fields.update(over)
    return ModelInfo(**fields)


EXPECTED_DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                    "parameter_size": "1.20M", "quantization_level": "Q8_0"}


def test_tags_response(tmp_path):
    import hashlib
    info = make_info(tmp_path)
    digest = hashlib.sha256(b"GGUF-not-really").hexdigest()
    assert oa.tags_response([info]) == {"models": [{
        "name": "tiny:latest", "model": "tiny:latest",
        "modified_at": "2027-01-15T08:00:00.500000000Z", "size": 15, "digest": digest,
        "details": EXPECTED_DETAILS}]}


def test_show_response(tmp_path):
    info = make_info(tmp_path)
    show = oa.show_response(info)
    assert show["details"] == EXPECTED_DETAILS
    assert show["template"] == info.template
    assert show["capabilities"] == ["completion", "tools", "thinking"]
    assert show["license"] == "mit"
    assert show["model_info"] == {"general.architecture": "llama", "llama.context_length": 2048,
                                  "general.license": "mit", "tokenizer.ggml.tokens": [],
                                  "general.parameter_count": 1_200_000}
    assert oa.show_response(info, vision=True)["capabilities"][-1] == "vision"


def test_capabilities_embedding_and_plain(tmp_path):
    emb = make_info(tmp_path, template="", metadata={"bert.pooling_type": 1}, family="bert")
    assert oa.capabilities(emb) == ["embedding"]
    plain = make_info(tmp_path, template="{{ messages }}", metadata={})
    assert oa.capabilities(plain) == ["completion"]


def test_ps_response(tmp_path):
    info = make_info(tmp_path)
    (model,) = oa.ps_response([info], context_length=4096)["models"]
    assert model["name"] == "tiny:latest" and model["size"] == 15 and model["size_vram"] == 15
    assert model["context_length"] == 4096 and model["expires_at"] == oa.NEVER_EXPIRES
    assert model["details"] == EXPECTED_DETAILS
    (model,) = oa.ps_response([info])["models"]
    assert model["context_length"] == 2048


def test_responses_parse_with_the_ollama_client_types():
    """The official client's pydantic types accept our shapes (catches wrong field types)."""
    from ollama._types import ChatResponse, EmbedResponse, GenerateResponse
    chat = load(DATA / "response_chat_tool_calls.json")["ollama"]
    parsed = ChatResponse.model_validate(chat)
    assert parsed.message.tool_calls[0].function.arguments == {"city": "Tokyo", "days": [1, 2]}
    for line in load(DATA / "stream_generate_chat_thinking.json")["lines"]:
        GenerateResponse.model_validate(line)
    EmbedResponse.model_validate(load(DATA / "embed_response_dimensions.json")["ollama"])
