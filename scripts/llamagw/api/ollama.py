"""Ollama's REST API as pure translations to and from llama-server's OpenAI-compatible API.

No sockets, no asyncio: the gateway parses the request, calls a *_request function, sends the
result upstream (to upstream_path(body)), and turns the answer back with chat_response /
embed_response, or, when streaming, feeds each SSE `data:` payload to a ChatStream and writes
the NDJSON lines it returns (Content-Type NDJSON_CONTENT_TYPE).

Public API (all pure; times injectable):
    OllamaError(status, message) .body(); error_body(msg); dumps(obj); parse_json_body(raw);
    upstream_error(status, raw); not_supported(path) -> OllamaError(501) | None
    chat_request(body, model) / generate_request(body, model) / embed_request(body, model,
        legacy=) -> OpenAI body | ModelLoad;  upstream_path(openai_body)
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

Layout: this module is the public face (the names below); the code lives in
api/ollama_common.py (OllamaError, error_body, dumps, parse_json_body, upstream_error,
not_supported, rfc3339_ns), api/ollama_requests.py (*_request, upstream_path, ModelLoad,
load_response), api/ollama_responses.py (chat_response, embed_response),
api/ollama_stream.py (ChatStream, NDJSON_CONTENT_TYPE) and api/ollama_listings.py (version,
tags, show, ps, capabilities, names, ROOT_TEXT). Limits are read where they are used: patch
them in those modules.
"""

from __future__ import annotations

from llamagw.api.ollama_common import (
    OllamaError, dumps, error_body, not_supported, parse_json_body, rfc3339_ns, upstream_error,
)
from llamagw.api.ollama_listings import (
    NEVER_EXPIRES, OLLAMA_COMPAT_VERSION, ROOT_TEXT, capabilities, details, matches_model,
    ollama_name, ps_response, show_response, tags_response, version_response,
)
from llamagw.api.ollama_requests import (
    ModelLoad, chat_request, embed_request, generate_request, load_response, upstream_path,
)
from llamagw.api.ollama_responses import chat_response, embed_response
from llamagw.api.ollama_stream import NDJSON_CONTENT_TYPE, ChatStream

__all__ = [
    "OllamaError", "dumps", "error_body", "not_supported", "parse_json_body", "rfc3339_ns",
    "upstream_error",
    "NEVER_EXPIRES", "OLLAMA_COMPAT_VERSION", "ROOT_TEXT", "capabilities", "details",
    "matches_model", "ollama_name", "ps_response", "show_response", "tags_response",
    "version_response",
    "ModelLoad", "chat_request", "embed_request", "generate_request", "load_response",
    "upstream_path",
    "chat_response", "embed_response",
    "NDJSON_CONTENT_TYPE", "ChatStream",
]
