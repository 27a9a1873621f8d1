"""net/answers.py: which error answers from llama-server go on as they are, and what replaces
the others."""

from __future__ import annotations

import pytest

from llamagw.net import answers


@pytest.mark.parametrize("body", [b'{"error": {"message": "bad", "code": 400}}', b'{}',
                                  b' {"error": "x"} \n'])
def test_a_json_object_goes_on(body):
    assert answers.error_answer_problem(body, 400, router=True) is None
    assert answers.error_answer_problem(body, 500, router=False) is None


def test_the_routers_raw_text_is_a_cut_only_in_router_mode():
    body = b"proxy error: Failed to read connection"
    exc = answers.error_answer_problem(body, 500, router=True)
    assert (exc.status, exc.code) == (502, "upstream_cut")
    exc = answers.error_answer_problem(body, 500, router=False)
    assert (exc.status, exc.code) == (502, "bad_upstream_response")
    assert "500" in exc.message


@pytest.mark.parametrize("body", [b"", b"Internal Server Error", b"[1, 2]", b'"text"',
                                  b'{"error": ', b"\xff\xfe{}", b"null"])
def test_anything_else_is_a_502_bad_upstream_response(body):
    exc = answers.error_answer_problem(body, 404, router=True)
    assert (exc.status, exc.code) == (502, "bad_upstream_response")
