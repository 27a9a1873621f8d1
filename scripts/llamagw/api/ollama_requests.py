"""Ollama requests -> llama-server's OpenAI-compatible requests (pure, no I/O).

chat_request / generate_request / embed_request check an Ollama body (OllamaError 400 with the
field at fault) and return the OpenAI body to send to upstream_path(body), or a ModelLoad marker
for Ollama's "load the model" request (empty messages / prompt / input), answered by
load_response() without calling upstream. Messages, images (bare base64 sniffed to a data: URI),
options, format, think and tools are translated as api/ollama.py's docstring decides; every
list is bounded (MAX_EMBED_INPUTS) or bounded by the request body's size.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
from typing import Any

from llamagw.api.ollama_common import OllamaError, _is_int, _is_number, rfc3339_ns

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




def upstream_path(openai_body: dict) -> str:
    """Which llama-server route a translated body goes to."""
    if "messages" in openai_body:
        return UPSTREAM_CHAT
    if "prompt" in openai_body:
        return UPSTREAM_COMPLETIONS
    return UPSTREAM_EMBEDDINGS


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
