"""Exceptions that carry their HTTP response, and the one renderer of the JSON error bodies.

One family: GatewayError(status, message, code) and its subclasses. Its body is rendered in the
envelope of the route that failed (api/routes.Route.envelope; render()):
- OpenAI and admin: {"error": {"message", "type", "code"}}, `type` from the status through
  ERROR_TYPES, `code` a short machine-readable reason;
- Ollama: {"error": "message"} (the status says the rest).
The transport never knows an API's shape: it asks render() for the route's envelope.
"""

from __future__ import annotations

import enum
import json

# ---- Retry-After (whole seconds) ---------------------------------------------------------------
# Every 503 and 429 the gateway sends says when to come back. The rate limit's and the token
# budget's are computed from their buckets (limits/ratelimit.py, limits/budget.py); these are the
# fixed ones, all of them, each with its reason (README "Gateway behaviour" lists them).
# backend_starting / backend_stopping: llama-server is (re)starting, which takes seconds; a
# stopping worker is taken off the load balancer, so a retry lands on another one.
RETRY_AFTER_STARTING = 5
# backend_failed: the supervisor gave up; the platform replaces the worker, which takes longer.
RETRY_AFTER_FAILED = 30
# model_loading: llama-server said "Loading model"; a small model loads in well under a second,
# a big one in tens of seconds, and each retry waits again.
RETRY_AFTER_LOADING = 5
# concurrency_limit_exceeded: a key's slot frees when one of its own requests ends.
RETRY_AFTER_CONCURRENCY = 1
# queue_full / queue_timeout: the backend slots were all busy for QUEUE_TIMEOUT (or the queue was
# full): longer than a per-key wait, shorter than a restart.
RETRY_AFTER_QUEUE = 2
# too_many_connections (over MAX_CONNECTIONS): connections close all the time; try again soon.
RETRY_AFTER_CONNECTIONS = 1
# usage_busy / usage_timeout (GET /admin/usage): the threads reading the ledger files free when
# their reads end, seconds at most; a query that timed out needs a shorter span anyway.
RETRY_AFTER_USAGE = 2
# too_many_dashboards (GET /admin/live past its cap): a slot frees when a dashboard's tab closes
# or signs out; the page's reconnect backoff starts about there.
RETRY_AFTER_DASHBOARDS = 5

class Envelope(enum.Enum):
    """The shape of a route's error bodies: the API its clients speak."""
    OPENAI = "openai"    # {"error": {"message", "type", "code"}}
    OLLAMA = "ollama"    # {"error": "message"}
    ADMIN = "admin"      # {"error": {"message", "type", "code"}}, as OpenAI's


# status -> OpenAI error "type". Reviewed at a glance; anything missing falls back by class.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    501: "not_implemented_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
    505: "invalid_request_error",
}

REASONS: dict[int, str] = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    417: "Expectation Failed", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def error_type_for_status(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class GatewayError(Exception):
    """An error with its response: status, OpenAI-shaped body, extra headers, close or not."""

    def __init__(self, status: int, message: str, code: str, *,
                 headers: list[tuple[str, str]] | None = None, close: bool = False,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = list(headers or ())
        self.close = close
        self.error_type = error_type or error_type_for_status(status)

    # The envelope of body() without a route (a protocol error, a library's own answer).
    default_envelope = Envelope.OPENAI

    def body(self, envelope: Envelope | None = None) -> bytes:
        return render(self, envelope or self.default_envelope)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r}, {self.code!r})"


class ProtocolError(GatewayError):
    """The client broke HTTP/1.1. Always answered, then the connection is closed."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request"):
        super().__init__(status, message, code, close=True)


# OllamaError's code when the translation names none: its reason by status.
OLLAMA_CODES: dict[int, str] = {
    400: "invalid_request",
    404: "not_found",
    501: "not_supported",
    502: "bad_upstream_response",
}


class OllamaError(GatewayError):
    """Raised by the Ollama translation (api/ollama.py) and handlers. Answered like any
    GatewayError in its route's envelope (Ollama's); body() alone gives Ollama's shape too."""

    default_envelope = Envelope.OLLAMA

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(status, message, code or OLLAMA_CODES.get(status, "ollama_error"))


def render(err: GatewayError, envelope: Envelope) -> bytes:
    """The body of `err` in `envelope`: the one renderer of every JSON error the gateway sends."""
    if envelope is Envelope.OLLAMA:
        return json.dumps({"error": err.message}, separators=(",", ":")).encode()
    return error_body(err.message, err.error_type, err.code)


def error_body(message: str, error_type: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}},
                      separators=(",", ":")).encode()


def not_found() -> GatewayError:
    return GatewayError(404, "Not found: this path is not served by the gateway", "not_found")
