"""Token accounting and the end of a stream, read from the end of a relayed SSE stream (pure
observe/tokens.py)."""

import pytest

from llamagw.observe.tokens import model_of, sse_finished, usage_counts, usage_from_sse_tail


def test_usage_chunk_wins():
    tail = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4},'
            b'"timings":{"prompt_n":9,"predicted_n":9}}\n\ndata: [DONE]\n\n')
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 3, "completion_tokens": 4}


def test_timings_when_the_client_did_not_ask_for_usage():
    # llama-server's final chunk without stream_options.include_usage: timings only
    tail = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[{"finish_reason":"stop","delta":{}}],'
            b'"timings":{"prompt_n":5,"predicted_n":7}}\n\ndata: [DONE]\n\n')
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 5, "completion_tokens": 7}


def test_nothing_to_count():
    assert usage_from_sse_tail(b'data: {"choices":[]}\n\ndata: [DONE]\n\n') is None
    assert usage_from_sse_tail(b'data: {"usage": broken\n\n') is None


def test_counts_quoted_inside_a_streamed_token_are_not_the_streams():
    # a token whose text spells a usage or timings object: escaped quotes, not a key
    tail = (b'data: {"choices":[{"delta":{"content":"\\"usage\\":{\\"prompt_tokens\\":99}'
            b' \\"timings\\":{\\"prompt_n\\":99} \xc3\xa9"}}]}\n\n'
            b'data: {"choices":[{"finish_reason":"stop","delta":{}}],'
            b'"timings":{"prompt_n":5,"predicted_n":7}}\n\ndata: [DONE]\n\n')
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 5, "completion_tokens": 7}
    # only the quoted ones: nothing to count
    assert usage_from_sse_tail(tail[:tail.index(b"data: {\"choices\":[{\"finish")]) is None


def test_a_broken_usage_object_falls_back_to_timings():
    tail = (b'data: {"choices":[],"usage":{"prompt_tokens":3,,},'
            b'"timings":{"prompt_n":5,"predicted_n":7}}\n\n')
    assert usage_from_sse_tail(tail) == {"prompt_tokens": 5, "completion_tokens": 7}


def test_usage_of_a_json_answer_is_parsed_alone():
    from llamagw.observe.tokens import usage_from_body
    body = (b'{"choices":[{"message":{"content":"a \\"usage\\":{\\"prompt_tokens\\":99}"}}],'
            b'"timings":{"prompt_n":3},"usage" : {"prompt_tokens":3,"completion_tokens":4,'
            b'"prompt_tokens_details":{"cached_tokens":0}}}')
    assert usage_from_body(body) == {"prompt_tokens": 3, "completion_tokens": 4,
                                      "prompt_tokens_details": {"cached_tokens": 0}}


def test_usage_inside_a_string_only_is_not_usage():
    from llamagw.observe.tokens import usage_from_body
    assert usage_from_body(b'{"c":"\\"usage\\":{\\"prompt_tokens\\":9}"}') is None
    assert usage_from_body(b'{"c":"x\\"usage":1}') is None
    assert usage_from_body(b'{"usage":{broken') is None
    assert usage_from_body(b'{"usage":[1]}') is None
    assert usage_from_body(b'{"usage":{"prompt_tokens":"\xff"}}') is None   # not UTF-8
    assert usage_from_body(b'') is None


@pytest.mark.parametrize("tail,finished", [
    (b'data: {"x":1}\n\ndata: [DONE]\n\n', True),
    (b"data:[DONE]\r\n\r\n", True),
    (b"data: [DONE]", True),
    (b'data: [DONE]\n\ndata: {"x":1}\n\n', False),       # more came after it
    (b'data: {"content":"data: [DONE]"}\n\n', False),   # only quoted inside an event
    (b"data: [DONE]x\n\n", False),
    (b"", False),
])
def test_sse_finished_sees_only_a_final_done_event(tail, finished):
    assert sse_finished(bytearray(tail)) is finished


# --- cached tokens, the model answered (issue 28) ------------------------------------------------
def test_timings_count_the_cached_prompt_tokens_too():
    # llama-server's timings.prompt_n leaves out the cache_n tokens it reused; usage counts both
    tail = (b'data: {"choices":[{"finish_reason":"stop","delta":{}}],'
            b'"timings":{"cache_n":32,"prompt_n":1,"predicted_n":3}}\n\ndata: [DONE]\n\n')
    usage = usage_from_sse_tail(tail)
    assert usage_counts(usage) == (33, 3, 32)
    # an older llama-server without cache_n: prompt_n as it is, cached unknown
    old = b'data: {"timings":{"prompt_n":5,"predicted_n":7}}\n\n'
    assert usage_counts(usage_from_sse_tail(old)) == (5, 7, None)


@pytest.mark.parametrize("usage,counts", [
    ({"prompt_tokens": 33, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 32}},
     (33, 5, 32)),
    ({"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 2}, (3, 4, 2)),
    ({"prompt_tokens": 3}, (3, None, None)),
    ({"prompt_tokens": -1, "completion_tokens": "4", "prompt_tokens_details": None},
     (None, None, None)),
    ({"prompt_tokens": True, "completion_tokens": 2.0}, (None, None, None)),
    ([1, 2], (None, None, None)),
    (None, (None, None, None)),
])
def test_usage_counts_take_whole_numbers_only(usage, counts):
    assert usage_counts(usage) == counts


@pytest.mark.parametrize("data,model", [
    (b'{"choices":[],"created":1,"model":"qwen2.5-0.5b","object":"chat.completion"}',
     "qwen2.5-0.5b"),
    (b'{"model" : "spaced", "x": 1}', "spaced"),
    (b'{"model":"caf\\u00e9 \\"q\\""}', 'caf\u00e9 "q"'),
    (b'{"model":"caf\xc3\xa9"}', "caf\u00e9"),
    # a generated token that spells a model key: escaped quotes, not a key
    (b'{"model":"real","choices":[{"delta":{"content":"\\"model\\":\\"fake\\""}}]}', "real"),
    (b'{"choices":[{"delta":{"content":"\\"model\\":\\"fake\\""}}]}', None),
    (b'data: {"model":"first"}\n\ndata: {"model":"last"}\n\n', "last"),
    (b'{"model":""}', None),
    (b'{"model":null}', None),
    (b'{"model":"\xff"}', None),                       # not UTF-8
    (b'{"model":"' + b"m" * 2000 + b'"}', None),       # longer than MAX_MODEL_BYTES
    (b'{"model":"unterminated', None),
    (b"", None),
])
def test_the_model_answered_is_the_last_model_key(data, model):
    assert model_of(data) == model
