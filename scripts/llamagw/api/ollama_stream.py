"""One streamed llama-server answer (SSE events) -> Ollama's NDJSON lines (pure, no I/O).

ChatStream(model, kind, clock_ns) is fed each SSE `data:` payload (feed_event) and returns the
NDJSON lines to write (Content-Type NDJSON_CONTENT_TYPE): one line per content / thinking piece,
tool calls accumulated per index and emitted whole, then the final done line with the metrics;
finish() when upstream ends, error_line() for an error. After an error line or the done line the
stream is over (done) and further input gives nothing. Tool calls are bounded in count
(MAX_TOOL_CALLS) and argument bytes (MAX_TOOL_ARGUMENT_BYTES): past them, an error line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from llamagw.api.ollama_common import _error_message, _is_int, dumps, error_body, rfc3339_ns
from llamagw.api.ollama_responses import _done_reason, _metrics, _ollama_tool_call, answer_piece

NDJSON_CONTENT_TYPE = "application/x-ndjson"

# Tool calls in one response: llama-server's parsers emit a handful; 128 is generous.
MAX_TOOL_CALLS = 128
# Accumulated tool-call argument text of one streamed response. RunPod caps a response at
# 30 MB; arguments are a small part of any real answer, 4 MiB is far beyond them.
MAX_TOOL_ARGUMENT_BYTES = 4 * 1024 * 1024


class ChatStream:
    """Stateful translator of one streamed llama-server answer into Ollama NDJSON lines."""

    def __init__(self, model_name: str, kind: str = "chat",
                 clock_ns: Callable[[], int] = time.time_ns):
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
        self.model_name = model_name
        self.kind = kind
        self.clock_ns = clock_ns
        self.started_ns = clock_ns()
        self.done = False                 # final line (done or error) sent
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.timings: dict | None = None
        self._calls: dict[int, dict[str, Any]] = {}   # index -> {"id", "name", "args": [str]}
        self._emitted: set[int] = set()
        self._arg_bytes = 0

    # -- input --
    def feed_event(self, data: bytes) -> list[bytes]:
        """One SSE data payload (without "data: " and the newline) -> NDJSON lines to send."""
        if self.done:
            return []
        data = data.strip()
        if data == b"[DONE]":
            return self._final()
        try:
            event = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return [self.error_line("upstream sent an event that is not JSON")]
        if not isinstance(event, dict):
            return [self.error_line("upstream sent an event that is not a JSON object")]
        if "error" in event:
            return [self.error_line(_error_message(event["error"]) or "upstream error")]
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        out: list[bytes] = []
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            out.extend(self._choice(choice))
            if self.done:
                break
        return out

    def finish(self) -> list[bytes]:
        """Upstream ended: the final line if not yet sent (an error line if it ended early)."""
        if self.done:
            return []
        if self.finish_reason is None:
            return [self.error_line("upstream closed the stream before the answer finished")]
        return self._final()

    def error_line(self, message: str) -> bytes:
        """{"error": message} as an NDJSON line; the stream is over after it."""
        self.done = True
        return error_body(message) + b"\n"

    # -- internals --
    def _choice(self, choice: dict) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or ""
            tool_deltas = delta.get("tool_calls") or ()
        else:
            text = choice.get("text") or ""
            thinking = ""
            tool_deltas = ()
        if text or thinking:
            out.append(self._line(self._piece(text, thinking)))
        for tc in tool_deltas:
            out.extend(self._tool_delta(tc))
            if self.done:
                return out
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reason = reason
            out.extend(self._flush_calls(None))
        return out

    def _piece(self, text: str, thinking: str) -> dict:
        obj = answer_piece(self.model_name, self.clock_ns(), self.kind, text, thinking)
        obj["done"] = False
        return obj

    def _tool_delta(self, tc: Any) -> list[bytes]:
        if not isinstance(tc, dict):
            return [self.error_line("upstream sent a malformed tool call")]
        index = tc.get("index", len(self._calls))
        if not _is_int(index) or index < 0:
            return [self.error_line("upstream sent a tool call without a valid index")]
        out: list[bytes] = []
        if index not in self._calls:
            if len(self._calls) >= MAX_TOOL_CALLS:
                return [self.error_line(f"more than {MAX_TOOL_CALLS} tool calls in one answer")]
            # A new index: the calls before it are complete.
            out.extend(self._flush_calls(index))
            if self.done:
                return out
            self._calls[index] = {"id": None, "name": "", "args": []}
        entry = self._calls[index]
        if index in self._emitted:
            return [self.error_line(f"upstream continued tool call {index} after it ended")]
        if isinstance(tc.get("id"), str) and tc["id"]:
            entry["id"] = tc["id"]
        fn = tc.get("function")
        if isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                entry["name"] += fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                self._arg_bytes += len(args.encode())
                if self._arg_bytes > MAX_TOOL_ARGUMENT_BYTES:
                    return out + [self.error_line(
                        f"tool call arguments exceed {MAX_TOOL_ARGUMENT_BYTES} bytes")]
                entry["args"].append(args)
            elif isinstance(args, dict):
                entry["args"] = [json.dumps(args)]
        return out

    def _flush_calls(self, before: int | None) -> list[bytes]:
        """Emit the calls not yet emitted (all of them, or those with index < before)."""
        ready = sorted(i for i in self._calls if i not in self._emitted
                       and (before is None or i < before))
        if not ready:
            return []
        calls = []
        for i in ready:
            entry = self._calls[i]
            try:
                calls.append(_ollama_tool_call(i, entry["id"], entry["name"],
                                               "".join(entry["args"])))
            except ValueError as e:
                return [self.error_line(str(e))]
            self._emitted.add(i)
        if self.kind != "chat":
            return []       # generate has no tools; nothing to show
        return [self._line({"model": self.model_name,
                            "created_at": rfc3339_ns(self.clock_ns()),
                            "message": {"role": "assistant", "content": "", "tool_calls": calls},
                            "done": False})]

    def _final(self) -> list[bytes]:
        out = self._flush_calls(None)
        if self.done:
            return out
        now = self.clock_ns()
        obj: dict[str, Any] = {"model": self.model_name, "created_at": rfc3339_ns(now)}
        if self.kind == "chat":
            obj["message"] = {"role": "assistant", "content": ""}
        else:
            obj["response"] = ""
        obj["done"] = True
        obj["done_reason"] = _done_reason(self.finish_reason)
        obj.update(_metrics(self.usage, self.timings, self.started_ns, now))
        self.done = True
        out.append(self._line(obj))
        return out

    @staticmethod
    def _line(obj: dict) -> bytes:
        return dumps(obj) + b"\n"
