"""What the gateway says when llama-server's answer goes wrong (net/relay.py decides when).

A stream cut mid-body ends with one of the two last SSE events below. An error answer (4xx/5xx,
not a stream) goes on only if it is a JSON object, as llama-server's are; llama-server's router
answers a non-streamed request whose model instance died with a 500 whose body is raw
`proxy error: ...` text under a JSON content type (ROUTER-MODE.md section 4): that, and any other
body that is no JSON object, becomes the gateway's own 502 in the route's envelope.
"""

from __future__ import annotations

import json

from llamagw.errors import GatewayError, error_body

# An error answer is held whole before it goes on; llama-server's are a few hundred bytes: one
# past this is not one of its error objects.
ERROR_BODY_LIMIT = 64 * 1024
# What llama-server's router writes, as raw text, when the instance behind a proxied answer
# dies or is killed mid-answer: inside a 200 stream (then a clean end, no [DONE]) or as the
# whole body of a 500.
ROUTER_CUT_MARKER = b"proxy error: "

UPSTREAM_CLOSED_EVENT = (b"data: " + error_body(
    "llama-server closed the stream before it was complete", "upstream_error",
    "upstream_closed") + b"\n\n")
# After raw text the router may have appended (no line end): blank lines end it first.
ROUTER_CUT_EVENT = (b"\n\ndata: " + error_body(
    "llama-server stopped the model before the stream was complete", "upstream_error",
    "upstream_cut") + b"\n\n")


def closed_without_answer() -> GatewayError:
    return GatewayError(502, "llama-server closed the connection without answering",
                        "upstream_closed")


def error_answer_problem(body: bytes, status: int, router: bool) -> GatewayError | None:
    """None when an error answer's body (b"" when it passed ERROR_BODY_LIMIT) is a JSON object
    and goes on as it is; else the 502 that replaces it."""
    try:
        if isinstance(json.loads(body), dict):
            return None
    except (ValueError, UnicodeDecodeError):
        pass
    if router and body.startswith(ROUTER_CUT_MARKER):
        return GatewayError(502, "llama-server stopped the model before the answer was complete",
                            "upstream_cut")
    return GatewayError(502, f"llama-server answered {status} without a JSON error object",
                        "bad_upstream_response")
