"""Token accounting reads the end of a relayed SSE stream (pure part of proxy.py)."""

from proxy import _usage_from_sse_tail


def test_usage_chunk_wins():
    tail = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4},'
            b'"timings":{"prompt_n":9,"predicted_n":9}}\n\ndata: [DONE]\n\n')
    assert _usage_from_sse_tail(tail) == {"prompt_tokens": 3, "completion_tokens": 4}


def test_timings_when_the_client_did_not_ask_for_usage():
    # llama-server's final chunk without stream_options.include_usage: timings only
    tail = (b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
            b'data: {"choices":[{"finish_reason":"stop","delta":{}}],'
            b'"timings":{"prompt_n":5,"predicted_n":7}}\n\ndata: [DONE]\n\n')
    assert _usage_from_sse_tail(tail) == {"prompt_tokens": 5, "completion_tokens": 7}


def test_nothing_to_count():
    assert _usage_from_sse_tail(b'data: {"choices":[]}\n\ndata: [DONE]\n\n') is None
    assert _usage_from_sse_tail(b'data: {"usage": broken\n\n') is None
