"""Ollama's REST API as pure translations to and from llama-server's OpenAI-compatible API.

No sockets, no asyncio: the gateway parses the request, calls a *_request function, sends the
result upstream (to upstream_path(body)), and turns the answer back with chat_response /
embed_response, or, when streaming, feeds each SSE `data:` payload to a ChatStream and writes
the NDJSON lines it returns (Content-Type NDJSON_CONTENT_TYPE).

Public API (all pure; times injectable):
    OllamaError(status, message) .body(); error_body(msg); dumps(obj); parse_json_body(raw);
    upstream_error(status, raw); not_supported(path) -> OllamaError(501) | None
    chat_request(body, model) / generate_request(body, model) / embed_request(body, model,
        legacy=) -> OpenAI body | ModelLoad;  upstream_path(openai_body); wants_stream(body)
    load_response(marker, model, now_ns); chat_response(openai, model, kind, started_ns,
        now_ns=); embed_response(openai, model, legacy, started_ns=, now_ns=, dimensions=)
    ChatStream(model, kind, clock_ns).feed_event(data) / .finish() / .error_line(msg)
    version_response(); tags_response(infos); show_response(info, vision=);
    ps_response(infos, context_length=, size_vram=); capabilities(info); ollama_name(name);
    matches_model(requested, name); rfc3339_ns(ns); ROOT_TEXT; NDJSON_CONTENT_TYPE

Decisions (documented here because clients will notice them):
- /api/chat -> POST /v1/chat/completions. Images (base64, as Ollama sends them) become
  OpenAI `image_url` content parts with a data: URI, on user messages only; llama-server
  answers with an error when it runs without a multimodal projector, and that error is relayed.
- /api/generate -> /v1/chat/completions with [system?, user(prompt, images)] so the GGUF's
  chat template applies (as Ollama templates the prompt); with "raw": true -> /v1/completions
  with the prompt untouched. The Ollama `template` field (a Go template) and `context`
  (deprecated token list) are ignored: llama-server applies the GGUF's Jinja template.
  `suffix` (fill-in-the-middle) is refused with 400.
- An empty prompt (generate), empty messages (chat) or empty input (embed) is Ollama's "load
  the model" request: the *_request function returns a ModelLoad marker and the caller answers
  load_response(...) without calling upstream (done_reason "load", or "unload" when
  keep_alive is 0: the model stays loaded anyway, it is managed by the container).
- options: temperature, top_p, top_k, min_p, typical_p, seed, repeat_penalty, repeat_last_n,
  presence_penalty, frequency_penalty, mirostat(_tau/_eta), num_keep (n_keep), stop and
  num_predict (max_tokens; negative = unlimited) are forwarded. num_ctx and the load-time
  options (num_gpu, num_thread, num_batch, use_mmap, ...) cannot change per request on a
  running llama-server and are ignored, as are unknown options (Ollama ignores them too).
- format "json" -> response_format {"type":"json_object"}; a schema object ->
  {"type":"json_schema","json_schema":{"schema": ...}} (raw generate: llama-server's own
  `json_schema` field).
- think: true/false -> chat_template_kwargs.enable_thinking (false also sends
  reasoning_effort "none"); a level ("low", "medium", "high", "max") -> reasoning_effort.
  reasoning_content from llama-server becomes message.thinking (generate: "thinking").
- Tool calls: llama-server streams them as deltas with string fragments of arguments; ChatStream
  accumulates them per index and emits each call whole, arguments parsed into a JSON object,
  when the next index starts or the choice finishes. Arguments that are not a JSON object end
  the stream with an NDJSON error line (non-streamed: OllamaError 502).
- Output JSON (NDJSON lines and whole answers) is UTF-8 with U+2028, U+2029 and U+0085 written
  as \\u escapes: JSON allows them raw, but str.splitlines(), and so httpx's iter_lines that the
  official `ollama` Python client reads NDJSON with, splits lines on them, and a model does emit
  them. (Ollama's Go encoder escapes U+2028 and U+2029 but not U+0085, which breaks that
  client the same way.) Go also escapes <, > and & (as \\u003c ...) for HTML embedding; that is
  not done here: they end no line for any splitter, every JSON reader decodes both forms alike,
  and code in answers (`a && b`, `<div>`) would grow sixfold for no reader's benefit.
- keep_alive is accepted and ignored (except for the load/unload answer above).
- Durations are nanoseconds: prompt_eval_duration and eval_duration from llama-server's
  timings (prompt_ms, predicted_ms); total_duration is the wall time seen by the gateway (never
  less than their sum); load_duration is 0 (the model is loaded before the gateway serves).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from llamagw.errors import OllamaError
from llamagw.models.gguf import ArraySummary, ModelInfo, rfc3339

# --- constants and limits ---------------------------------------------------------------------
NDJSON_CONTENT_TYPE = "application/x-ndjson"
ROOT_TEXT = "Ollama is running"   # GET/HEAD / answer, text/plain, as Ollama's server.
# The version we claim: recent enough for client feature gates (tools, thinking, structured
# outputs all exist since Ollama 0.9); clients compare it, they never call Ollama's own code.
OLLAMA_COMPAT_VERSION = "0.13.0"
# /api/ps expires_at: Ollama with keep_alive -1 shows a date ~292 years ahead (MaxInt64 ns).
NEVER_EXPIRES = "2318-01-01T00:00:00Z"

# Tool calls in one response: llama-server's parsers emit a handful; 128 is generous.
MAX_TOOL_CALLS = 128
# Accumulated tool-call argument text of one streamed response. RunPod caps a response at
# 30 MB; arguments are a small part of any real answer, 4 MiB is far beyond them.
MAX_TOOL_ARGUMENT_BYTES = 4 * 1024 * 1024
# Inputs of one /api/embed request: OpenAI's documented maximum for /v1/embeddings.
MAX_EMBED_INPUTS = 2048
# Base64 characters decoded to sniff an image's format (a multiple of 4; 24 bytes of header).
IMAGE_SNIFF_CHARS = 32

ROLES = ("system", "user", "assistant", "tool")
THINK_LEVELS = ("low", "medium", "high", "max")

# Ollama option -> (llama-server field, kind). Kinds: "number" (int or float), "int".
OPTION_MAP: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "number"),
    "top_p": ("top_p", "number"),
    "top_k": ("top_k", "int"),
    "min_p": ("min_p", "number"),
    "typical_p": ("typical_p", "number"),
    "seed": ("seed", "int"),
    "repeat_penalty": ("repeat_penalty", "number"),
    "repeat_last_n": ("repeat_last_n", "int"),
    "presence_penalty": ("presence_penalty", "number"),
    "frequency_penalty": ("frequency_penalty", "number"),
    "mirostat": ("mirostat", "int"),
    "mirostat_tau": ("mirostat_tau", "number"),
    "mirostat_eta": ("mirostat_eta", "number"),
    "num_keep": ("n_keep", "int"),
}

# OpenAI finish_reason -> Ollama done_reason. Ollama reports "stop" after tool calls.
DONE_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "stop",
    "function_call": "stop",
}

# Model-management endpoints: the container owns the model, these answer 501.
NOT_SUPPORTED = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
NOT_SUPPORTED_PREFIXES = ("/api/blobs/",)

# First bytes -> MIME type for images sent as bare base64 (Ollama's format).
IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)

UPSTREAM_CHAT = "/v1/chat/completions"
UPSTREAM_COMPLETIONS = "/v1/completions"
UPSTREAM_EMBEDDINGS = "/v1/embeddings"


# --- errors -----------------------------------------------------------------------------------

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


# --- load marker ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelLoad:
    """Returned instead of an upstream body for Ollama's "load the model" requests."""
    kind: str          # "chat", "generate", "embed" or "embeddings"
    done_reason: str   # "load" or "unload"


def load_response(marker: ModelLoad, model_name: str, now_ns: int | None = None) -> dict:
    now = time.time_ns() if now_ns is None else now_ns
    if marker.kind == "chat":
        return {"model": model_name, "created_at": rfc3339_ns(now),
                "message": {"role": "assistant", "content": ""},
                "done_reason": marker.done_reason, "done": True}
    if marker.kind == "generate":
        return {"model": model_name, "created_at": rfc3339_ns(now), "response": "",
                "done": True, "done_reason": marker.done_reason}
    if marker.kind == "embed":
        return {"model": model_name, "embeddings": []}
    return {"embedding": []}


# --- requests ---------------------------------------------------------------------------------

def upstream_path(openai_body: dict) -> str:
    """Which llama-server route a translated body goes to."""
    if "messages" in openai_body:
        return UPSTREAM_CHAT
    if "prompt" in openai_body:
        return UPSTREAM_COMPLETIONS
    return UPSTREAM_EMBEDDINGS


def wants_stream(body: dict) -> bool:
    """Ollama streams unless "stream" is false."""
    return _stream_flag(body)


def chat_request(body: dict, model_name: str) -> dict | ModelLoad:
    """/api/chat JSON -> /v1/chat/completions JSON, or a ModelLoad marker."""
    _check_common(body)
    stream = _stream_flag(body)
    messages = body.get("messages")
    if messages is None or messages == []:
        return ModelLoad("chat", _load_reason(body))
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be a list")
    out: dict[str, Any] = {"model": model_name, "messages": _convert_messages(messages),
                           "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    out.update(_options(body.get("options")))
    response_format = _response_format(body.get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    out.update(_think(body.get("think")))
    return out


def generate_request(body: dict, model_name: str) -> dict | ModelLoad:
    """/api/generate JSON -> /v1/chat/completions (templated) or /v1/completions (raw)."""
    _check_common(body)
    stream = _stream_flag(body)
    prompt = body.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    images = body.get("images")
    if images is not None and not isinstance(images, list):
        raise OllamaError(400, "images must be a list of base64 strings")
    suffix = body.get("suffix")
    if suffix:
        raise OllamaError(400, "suffix (fill-in-the-middle) is not supported by this server")
    if not prompt and not images:
        return ModelLoad("generate", _load_reason(body))
    raw = body.get("raw", False)
    if raw is None:
        raw = False
    if not isinstance(raw, bool):
        raise OllamaError(400, "raw must be a boolean")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise OllamaError(400, "system must be a string")

    out: dict[str, Any]
    if raw:
        if images:
            raise OllamaError(400, "images need the chat template: they are not supported "
                                   "with raw: true")
        out = {"model": model_name, "prompt": prompt, "stream": stream}
        fmt = body.get("format")
        response_format = _response_format(fmt)
        if response_format is not None:
            # /v1/completions takes llama-server's own json_schema field.
            out["json_schema"] = fmt if isinstance(fmt, dict) else {"type": "object"}
    else:
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _content_with_images(prompt, images, "images")})
        out = {"model": model_name, "messages": messages, "stream": stream}
        response_format = _response_format(body.get("format"))
        if response_format is not None:
            out["response_format"] = response_format
        out.update(_think(body.get("think")))
    if stream:
        out["stream_options"] = {"include_usage": True}
    out.update(_options(body.get("options")))
    return out


def embed_request(body: dict, model_name: str, *, legacy: bool = False) -> dict | ModelLoad:
    """/api/embed ({"input": str | [str]}) or legacy /api/embeddings ({"prompt": str})
    -> /v1/embeddings, or a ModelLoad marker for empty input."""
    _check_common(body)
    if legacy:
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            return ModelLoad("embeddings", _load_reason(body))
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        inputs: str | list[str] = prompt
    else:
        value = body.get("input")
        if value is None or value == "" or value == []:
            return ModelLoad("embed", _load_reason(body))
        if isinstance(value, str):
            inputs = value
        elif isinstance(value, list):
            if len(value) > MAX_EMBED_INPUTS:
                raise OllamaError(400, f"input has {len(value)} items; the limit is "
                                       f"{MAX_EMBED_INPUTS}")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise OllamaError(400, f"input[{i}] must be a string")
            inputs = value
        else:
            raise OllamaError(400, "input must be a string or a list of strings")
    out: dict[str, Any] = {"model": model_name, "input": inputs, "encoding_format": "float"}
    dimensions = body.get("dimensions")
    if dimensions is not None and not legacy:
        if not _is_int(dimensions) or dimensions <= 0:
            raise OllamaError(400, "dimensions must be a positive integer")
        out["dimensions"] = dimensions
    return out


# --- responses --------------------------------------------------------------------------------

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
    out: dict[str, Any] = {"model": model_name, "created_at": rfc3339_ns(now)}
    if kind == "chat":
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            msg["thinking"] = thinking
        if tool_calls:
            msg["tool_calls"] = tool_calls
        out["message"] = msg
    else:
        out["response"] = content
        if thinking:
            out["thinking"] = thinking
    out["done"] = True
    out["done_reason"] = _done_reason(choice.get("finish_reason"))
    out.update(_metrics(openai.get("usage"), openai.get("timings"), started_ns, now))
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
        obj: dict[str, Any] = {"model": self.model_name,
                               "created_at": rfc3339_ns(self.clock_ns())}
        if self.kind == "chat":
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            obj["message"] = msg
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
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


# --- model listings ---------------------------------------------------------------------------

def version_response() -> dict:
    return {"version": OLLAMA_COMPAT_VERSION}


def ollama_name(name: str) -> str:
    """Ollama names carry a tag; a bare name is "<name>:latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def matches_model(requested: str, name: str) -> bool:
    """Does a client's model name designate the served model `name`? (":latest" optional)"""
    return isinstance(requested, str) and ollama_name(requested) == ollama_name(name)


def details(info: ModelInfo) -> dict:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.family,
        "families": [info.family] if info.family else None,
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization_level,
    }


def capabilities(info: ModelInfo, *, vision: bool = False) -> list[str]:
    """Ollama's capability list from GGUF metadata and the chat template (as Ollama infers
    them). `vision`: a multimodal projector is loaded beside the model."""
    md = info.metadata
    caps = ["embedding" if f"{info.family}.pooling_type" in md else "completion"]
    template = info.template
    if "tools" in template or "tool_call" in template:
        caps.append("tools")
    if ("<think>" in template and "</think>" in template) or "enable_thinking" in template \
            or "reasoning_content" in template:
        caps.append("thinking")
    if vision or f"{info.family}.vision.block_count" in md or md.get("clip.has_vision_encoder"):
        caps.append("vision")
    return caps


def tags_response(models: Iterable[ModelInfo]) -> dict:
    return {"models": [{
        "name": ollama_name(info.name),
        "model": ollama_name(info.name),
        "modified_at": rfc3339(info.modified_at),
        "size": info.size_bytes,
        "digest": info.digest,
        "details": details(info),
    } for info in models]}


def show_response(info: ModelInfo, *, vision: bool = False) -> dict:
    model_info: dict[str, Any] = {}
    for key, value in info.metadata.items():
        if key == "tokenizer.chat_template":
            continue  # returned as "template"
        # Long arrays (token lists, merges) are [] as in Ollama's non-verbose answer.
        model_info[key] = [] if isinstance(value, ArraySummary) else value
    model_info.setdefault("general.parameter_count", info.parameter_count)
    license_text = info.metadata.get("general.license")
    out: dict[str, Any] = {
        "modelfile": f"# Modelfile generated by llama-gguf-inference\n"
                     f"FROM {ollama_name(info.name)}\n",
        "parameters": "",
        "template": info.template,
        "details": details(info),
        "model_info": model_info,
        "capabilities": capabilities(info, vision=vision),
        "modified_at": rfc3339(info.modified_at),
    }
    if isinstance(license_text, str) and license_text:
        out["license"] = license_text
    return out


def ps_response(models: Iterable[ModelInfo], *, context_length: int | None = None,
                size_vram: int | None = None) -> dict:
    """Loaded models: the served model stays loaded (expires_at far ahead).
    `context_length`: llama-server's -c when set, else the model's trained context."""
    return {"models": [{
        "name": ollama_name(info.name),
        "model": ollama_name(info.name),
        "size": info.size_bytes,
        "digest": info.digest,
        "details": details(info),
        "expires_at": NEVER_EXPIRES,
        "size_vram": info.size_bytes if size_vram is None else size_vram,
        "context_length": context_length or info.context_length or 0,
    } for info in models]}


# --- helpers ----------------------------------------------------------------------------------

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


def _check_common(body: Any) -> None:
    if not isinstance(body, dict):
        raise OllamaError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OllamaError(400, "model is required")


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise OllamaError(400, "stream must be a boolean")
    return stream


def _load_reason(body: dict) -> str:
    keep_alive = body.get("keep_alive")
    if _is_int(keep_alive) or isinstance(keep_alive, float):
        return "unload" if keep_alive == 0 else "load"
    if isinstance(keep_alive, str) and keep_alive.strip() in ("0", "0s", "0m", "0h"):
        return "unload"
    return "load"


def _options(options: Any) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in OPTION_MAP:
            field, kind = OPTION_MAP[name]
            if kind == "int":
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                if not _is_int(value):
                    raise OllamaError(400, f"option {name} must be an integer")
            elif not _is_number(value):
                raise OllamaError(400, f"option {name} must be a number")
            out[field] = value
        elif name == "num_predict":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not _is_int(value):
                raise OllamaError(400, "option num_predict must be an integer")
            if value >= 0:                  # -1 unlimited, -2 fill the context: no limit
                out["max_tokens"] = value
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise OllamaError(400, "option stop must be a list of strings")
            if value:
                out["stop"] = value
        # anything else (num_ctx, num_gpu, num_thread, ...) cannot apply per request
    return out


def _response_format(fmt: Any) -> dict | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"schema": fmt}}
    raise OllamaError(400, 'format must be "json" or a JSON schema object')


def _think(think: Any) -> dict:
    if think is None:
        return {}
    if think is True:
        return {"chat_template_kwargs": {"enable_thinking": True}}
    if think is False:
        return {"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "none"}
    if isinstance(think, str) and think in THINK_LEVELS:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": think}
    raise OllamaError(400, f"think must be true, false or one of {', '.join(THINK_LEVELS)}")


def _tools(tools: Any) -> list:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise OllamaError(400, "tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise OllamaError(400, f"tools[{i}] must be an object")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OllamaError(400, f"tools[{i}].function.name is required")
        out.append({**tool, "type": tool.get("type") or "function"})
    return out


def _sniff_image(data: str) -> str:
    head = data[:IMAGE_SNIFF_CHARS]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    for signature, mime in IMAGE_SIGNATURES:
        if raw.startswith(signature):
            return mime
    raise ValueError("not a PNG, JPEG, GIF, WEBP or BMP image")


def _content_with_images(text: str, images: Any, where: str) -> str | list:
    if not images:
        return text
    if not isinstance(images, list):
        raise OllamaError(400, f"{where} must be a list of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for i, image in enumerate(images):
        if not isinstance(image, str) or not image:
            raise OllamaError(400, f"{where}[{i}] must be a base64 string")
        if image.startswith("data:image/"):
            url = image
        else:
            try:
                mime = _sniff_image(image)
            except ValueError as e:
                raise OllamaError(400, f"{where}[{i}]: {e}") from None
            url = f"data:{mime};base64,{image}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _convert_messages(messages: list) -> list[dict]:
    out: list[dict] = []
    pending: list[tuple[str, str]] = []      # (id, name) of tool calls awaiting a result
    for n, msg in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(msg, dict):
            raise OllamaError(400, f"{where} must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise OllamaError(400, f"{where}.role must be one of {', '.join(ROLES)}, "
                                   f"not {role!r}")
        content = msg.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"{where}.content must be a string")
        images = msg.get("images")
        if images and role != "user":
            raise OllamaError(400, f"{where}: images are only supported on user messages")
        converted: dict[str, Any] = {"role": role,
                                     "content": _content_with_images(content, images,
                                                                     f"{where}.images")}
        if role == "assistant":
            thinking = msg.get("thinking")
            if isinstance(thinking, str) and thinking:
                converted["reasoning_content"] = thinking
            calls = msg.get("tool_calls")
            if calls:
                converted["tool_calls"] = _openai_tool_calls(calls, n, where)
                pending = [(c["id"], c["function"]["name"]) for c in converted["tool_calls"]]
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = msg.get("tool_name")
            if name is not None and not isinstance(name, str):
                raise OllamaError(400, f"{where}.tool_name must be a string")
            if isinstance(call_id, str) and call_id:
                pending = [p for p in pending if p[0] != call_id]
            else:
                call_id = None
                match = next((p for p in pending if name and p[1] == name), None) or \
                    (pending[0] if pending else None)
                if match is not None:
                    call_id = match[0]
                    name = name or match[1]
                    pending.remove(match)
            if call_id:
                converted["tool_call_id"] = call_id
            if name:
                converted["name"] = name
        out.append(converted)
    return out


def _openai_tool_calls(calls: Any, n: int, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise OllamaError(400, f"{where}.tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise OllamaError(400, f"{where}.tool_calls[{i}].function.name is required")
        args = fn.get("arguments")
        if args is None:
            args = {}
        if isinstance(args, dict):
            args_text = json.dumps(args, separators=(",", ":"), ensure_ascii=False)
        elif isinstance(args, str):
            args_text = args
        else:
            raise OllamaError(400, f"{where}.tool_calls[{i}].function.arguments must be an "
                                   "object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = f"call_{n}_{i}"          # deterministic: message and call position
        out.append({"id": call_id, "type": "function",
                    "function": {"name": fn["name"], "arguments": args_text}})
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
