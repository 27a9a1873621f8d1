"""Ollama's JSON out and its errors, shared by the Ollama translations (pure, no I/O).

OllamaError(status, message) is every refusal the Ollama routes answer, in Ollama's shape
{"error": message} (error_body); upstream_error() turns llama-server's OpenAI-shaped error into
one, parse_json_body() refuses a body that is not a JSON object (400), not_supported() answers
the model-management endpoints (501). dumps() writes every Ollama JSON document: compact UTF-8,
U+2028, U+2029 and U+0085 escaped so no line splitter breaks an NDJSON line (see
api/ollama.py). rfc3339_ns() and the small type checks are shared by the other modules.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from llamagw.errors import OllamaError  # one error family (errors.py); re-exported here

# Model-management endpoints: the container owns the model, these answer 501.
NOT_SUPPORTED = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
NOT_SUPPORTED_PREFIXES = ("/api/blobs/",)


def error_body(message: str) -> bytes:
    return dumps({"error": message})


def not_supported(path: str) -> OllamaError | None:
    """The 501 for model-management endpoints, or None when `path` is not one of them."""
    if path in NOT_SUPPORTED or path.startswith(NOT_SUPPORTED_PREFIXES):
        return OllamaError(501, f"{path} is not supported: models are managed by the container "
                                "(the served model is chosen when the container starts)")
    return None


def parse_json_body(raw: bytes) -> dict:
    """A request body as a JSON object, or OllamaError(400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OllamaError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "request body must be a JSON object")
    return body


def upstream_error(status: int, raw: bytes) -> OllamaError:
    """llama-server's error answer ({"error": {"message": ...}}) in Ollama's shape."""
    message = ""
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        message = _error_message(parsed.get("error"))
    if not message:
        message = raw.decode("utf-8", errors="replace").strip()[:1000] or f"upstream status {status}"
    return OllamaError(status if 400 <= status <= 599 else 502, message)


def rfc3339_ns(ns: int) -> str:
    """Nanoseconds since the epoch -> "2026-11-22T03:19:18.123456789Z"."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + \
        f".{ns % 1_000_000_000:09d}Z"


def dumps(obj: Any) -> bytes:
    """Every JSON document the Ollama routes send: compact UTF-8, one line whatever a client
    splits lines on (see the module docstring: line breaks inside JSON strings)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    if text.isascii():              # the common case: nothing to escape, nothing to check
        return text.encode()
    # A raw line break can only be inside a string (JSON writes none between tokens), where
    # its \u escape means the same character; a backslash before it is always an escaped one.
    text = (text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (valid JSON input "\ud800", echoed in a message) has no UTF-8
        # form: the whole document \u-escaped instead, still valid JSON.
        return json.dumps(obj, separators=(",", ":")).encode()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _error_message(err: Any) -> str:
    if isinstance(err, str):
        return err
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return ""
