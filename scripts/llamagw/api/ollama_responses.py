"""llama-server's whole (non-streamed) answers -> Ollama's answers (pure, no I/O).

chat_response() turns a chat.completion / text_completion into /api/chat's or /api/generate's
single JSON answer (message, thinking, tool calls with their arguments parsed into objects, done
reason, token counts and durations in nanoseconds); embed_response() turns /v1/embeddings into
/api/embed or the legacy /api/embeddings (truncated and re-normalized to `dimensions`). Anything
malformed from upstream is OllamaError(502). The tool-call, done-reason and metrics helpers are
shared with the streaming translation (api/ollama_stream.py). Times are injectable.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from llamagw.api.ollama_common import (
    OllamaError, _error_message, _is_int, _is_number, rfc3339_ns,
)

# OpenAI finish_reason -> Ollama done_reason. Ollama reports "stop" after tool calls.
DONE_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "stop",
    "function_call": "stop",
}


def chat_response(openai: dict, model_name: str, kind: str, started_ns: int,
                  *, now_ns: int | None = None) -> dict:
    """A non-streamed chat.completion / text_completion -> Ollama's single JSON answer."""
    now = time.time_ns() if now_ns is None else now_ns
    if not isinstance(openai, dict):
        raise OllamaError(502, "upstream answered with something other than a JSON object")
    if "error" in openai:
        raise OllamaError(502, _error_message(openai["error"]) or "upstream error")
    choices = openai.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise OllamaError(502, "upstream response has no choices")
    choice = choices[0]
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content") or ""
        thinking = message.get("reasoning_content") or ""
        raw_calls = message.get("tool_calls") or []
    else:
        content = choice.get("text") or ""
        thinking = ""
        raw_calls = []
    tool_calls = []
    for i, call in enumerate(raw_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise OllamaError(502, "upstream returned a malformed tool call")
        fn = call["function"]
        try:
            tool_calls.append(_ollama_tool_call(i, call.get("id"), fn.get("name") or "",
                                                fn.get("arguments")))
        except ValueError as e:
            raise OllamaError(502, str(e)) from None
    out = answer_piece(model_name, now, kind, content, thinking)
    if tool_calls and kind == "chat":    # generate has no tools: they are dropped, as before
        out["message"]["tool_calls"] = tool_calls
    out["done"] = True
    out["done_reason"] = _done_reason(choice.get("finish_reason"))
    out.update(_metrics(openai.get("usage"), openai.get("timings"), started_ns, now))
    return out


def answer_piece(model_name: str, now_ns: int, kind: str, text: str, thinking: str) -> dict:
    """The shape of an answer or a streamed piece of one, before "done": chat puts the text in
    "message" (role, content, thinking), generate in "response" (and "thinking")."""
    out: dict[str, Any] = {"model": model_name, "created_at": rfc3339_ns(now_ns)}
    if kind == "chat":
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            msg["thinking"] = thinking
        out["message"] = msg
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    return out


def embed_response(openai: dict, model_name: str, legacy: bool, *,
                   started_ns: int | None = None, now_ns: int | None = None,
                   dimensions: int | None = None) -> dict:
    """/v1/embeddings answer -> /api/embed ({"embeddings": [[...]], ...}) or legacy
    /api/embeddings ({"embedding": [...]}). `dimensions` truncates and re-normalizes as Ollama."""
    data = openai.get("data") if isinstance(openai, dict) else None
    if not isinstance(data, list):
        raise OllamaError(502, "upstream embeddings answer has no data")
    vectors = []
    for item in sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0):
        vec = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vec, list) or not all(_is_number(x) for x in vec):
            raise OllamaError(502, "upstream returned an embedding that is not a list of numbers")
        if dimensions is not None and 0 < dimensions < len(vec):
            vec = _normalize(vec[:dimensions])
        vectors.append(vec)
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    now = time.time_ns() if now_ns is None else now_ns
    usage = openai.get("usage") if isinstance(openai.get("usage"), dict) else {}
    out: dict[str, Any] = {"model": model_name, "embeddings": vectors}
    if started_ns is not None:
        out["total_duration"] = max(0, now - started_ns)
        out["load_duration"] = 0
    prompt_tokens = usage.get("prompt_tokens")
    if _is_int(prompt_tokens):
        out["prompt_eval_count"] = prompt_tokens
    return out


def _ollama_tool_call(index: int, call_id: Any, name: str, arguments: Any) -> dict:
    if isinstance(arguments, dict):
        args = arguments
    else:
        text = arguments if isinstance(arguments, str) else ""
        try:
            args = json.loads(text) if text.strip() else {}
        except ValueError:
            raise ValueError(f"tool call {name or index!r}: arguments are not valid JSON") \
                from None
        except RecursionError:      # the model wrote arguments nested past Python's stack
            raise ValueError(f"tool call {name or index!r}: arguments are nested too deeply") \
                from None
        if not isinstance(args, dict):
            raise ValueError(f"tool call {name or index!r}: arguments are not a JSON object")
    call: dict[str, Any] = {}
    if isinstance(call_id, str) and call_id:
        call["id"] = call_id
    call["function"] = {"index": index, "name": name, "arguments": args}
    return call


def _done_reason(finish_reason: Any) -> str:
    if not isinstance(finish_reason, str) or not finish_reason:
        return "stop"
    return DONE_REASONS.get(finish_reason, finish_reason)


def _ms_to_ns(ms: Any) -> int:
    return int(round(ms * 1_000_000)) if _is_number(ms) and ms > 0 else 0


def _metrics(usage: Any, timings: Any, started_ns: int, now_ns: int) -> dict:
    usage = usage if isinstance(usage, dict) else {}
    timings = timings if isinstance(timings, dict) else {}
    prompt_ns = _ms_to_ns(timings.get("prompt_ms"))
    eval_ns = _ms_to_ns(timings.get("predicted_ms"))
    prompt_count = usage.get("prompt_tokens")
    if not _is_int(prompt_count):
        prompt_count = sum(v for v in (timings.get("prompt_n"), timings.get("cache_n"))
                           if _is_int(v))
    eval_count = usage.get("completion_tokens")
    if not _is_int(eval_count):
        eval_count = timings.get("predicted_n") if _is_int(timings.get("predicted_n")) else 0
    return {
        "total_duration": max(now_ns - started_ns, prompt_ns + eval_ns, 0),
        "load_duration": 0,
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }


def _normalize(vec: list) -> list:
    norm = math.sqrt(sum(x * x for x in vec))
    return [x / norm for x in vec] if norm > 0 else vec
