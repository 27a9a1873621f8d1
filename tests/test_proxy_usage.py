"""Token accounting and the end of a stream, read from the end of a relayed SSE stream (pure
observe/tokens.py)."""

import pytest

from llamagw.observe.tokens import sse_finished, usage_from_sse_tail


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
