"""The Ollama-compatible API on the gateway port: route handlers and response transforms.

The translations themselves are pure functions in api/ollama.py; this module does the I/O around
them. Requests go through the same admission (keys, rate and concurrency limits), access log and
metrics as the OpenAI routes. Inference calls are rebuilt as OpenAI-compatible llama-server calls
and their answers are transformed on the fly by relay.Exchange: a streamed answer is split into SSE
events and each one becomes NDJSON lines written at once (no buffering of the whole stream).

Errors are Ollama-shaped: {"error": "..."} with the HTTP status; an error after streaming began
arrives as a last NDJSON line {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from llamagw import config
from llamagw.api import ollama as ollama_api
from llamagw.context import Call, Response
from llamagw.errors import OllamaError
from llamagw.models import gguf as gguf_meta
from llamagw.models.gguf import ModelInfo, read_gguf_metadata
from llamagw.net import relay
from llamagw.wire.sse import SSEError, SSESplitter

log = logging.getLogger("gateway")

# Non-streamed answers (and upstream error bodies) are collected whole before translation; an
# embeddings batch is the largest legitimate one (2048 inputs x 4096 floats as JSON ~ 100 MB is
# far beyond what RunPod carries: its payload limit).
MAX_COLLECTED_BODY = config.PAYLOAD_LIMIT


class _Described:
    """A ModelInfo whose `digest` is a plain value: "" until the worker thread has hashed the
    file. ModelInfo.digest itself hashes the whole file when called, which on the event loop
    would freeze the gateway for minutes on a multi-GB model."""

    __slots__ = ("_info", "digest")

    def __init__(self, info: ModelInfo, digest: str = ""):
        self._info = info
        self.digest = digest

    def __getattr__(self, name):
        return getattr(self._info, name)


class ModelCatalog:
    """The served model, described from its GGUF header (read in a worker thread).

    The header is published as soon as it is read, so /api/tags and /api/show answer while the
    file's sha256 is still being computed (their `digest` is "" until then)."""

    def __init__(self, model_path: str, model_name: str):
        self.path = model_path
        base = model_name or (os.path.basename(model_path) if model_path else "default")
        self.name = base[:-5] if base.endswith(".gguf") else base
        self.info: _Described | None = None

    async def load(self) -> None:
        if not self.path:
            return
        try:
            info = await asyncio.to_thread(read_gguf_metadata, self.path, name=self.name)
            self.info = _Described(info)
            digest = await asyncio.to_thread(gguf_meta.file_digest, info.path)
            self.info = _Described(info, digest)
        except (OSError, ValueError) as exc:
            log.warning("cannot read GGUF metadata of %s: %s", self.path, exc)

    def infos(self) -> list:
        return [self.info] if self.info is not None else []


def _json(status: int, obj) -> Response:
    return Response(status, [("content-type", "application/json; charset=utf-8")],
                    ollama_api.dumps(obj))


def _parse(body: bytes) -> dict:
    return ollama_api.parse_json_body(body)


# ------------------------------------------------------------------ transforms (relay.Exchange)
class _Collect:
    """Collect a whole upstream body (bounded) and translate it at the end."""

    streaming = False

    def __init__(self, finish):
        self._finish = finish
        self._parts: list[bytes] = []
        self._size = 0
        self._too_large = False
        self.status = 200
        self.content_type = "application/json; charset=utf-8"

    def head(self, status: int) -> None:
        self.status = status

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > MAX_COLLECTED_BODY:
            self._too_large = True
            self._parts.clear()
        else:
            self._parts.append(data)
        return b""

    def finish(self) -> bytes:
        if self._too_large:
            self.status = 502
            return ollama_api.error_body("llama-server's answer is too large")
        raw = b"".join(self._parts)
        if self.status >= 400:
            err = ollama_api.upstream_error(self.status, raw)
            return err.body()
        try:
            return ollama_api.dumps(self._finish(json.loads(raw)))
        except OllamaError as err:
            self.status = err.status
            return err.body()
        except ValueError:
            self.status = 502
            return ollama_api.error_body("llama-server returned invalid JSON")

    def cut(self, message: str | None = None) -> bytes:
        return b""


class _NdjsonStream:
    """SSE from llama-server -> NDJSON lines, event by event."""

    content_type = ollama_api.NDJSON_CONTENT_TYPE
    streaming = True

    def __init__(self, stream: ollama_api.ChatStream):
        self._stream = stream
        self._sse = SSESplitter()
        self._error: _Collect | None = None
        self.status = 200

    def head(self, status: int) -> None:
        self.status = status
        if status >= 400:     # llama-server refused: answer one Ollama error object
            self.streaming = False
            self._error = _Collect(lambda data: data)
            self._error.head(status)
            self.content_type = "application/json; charset=utf-8"

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            return self._error.feed(data)
        out: list[bytes] = []
        try:
            for event in self._sse.feed(data):
                out.extend(self._stream.feed_event(event))
        except SSEError as exc:
            out.append(self._stream.error_line(str(exc)))
        return b"".join(out)

    def finish(self) -> bytes:
        if self._error is not None:
            return self._error.finish()
        return b"".join(self._stream.finish())

    def cut(self, message: str | None = None) -> bytes:
        """The stream was cut (upstream closed or idle timeout): one last error line, unless the
        answer is already complete (its done line sent)."""
        if self._error is not None or self._stream.done:
            return b""
        return self._stream.error_line(
            message or "llama-server closed the stream before it was complete")


# ------------------------------------------------------------------ handlers
# Route handlers (api/routes.py): async def handler(call). The local ones return a Response;
# the inference ones relay llama-server's answer, transformed, and return None.
async def root(call: Call) -> Response:
    return Response(200, [("content-type", "text/plain; charset=utf-8")],
                    ollama_api.ROOT_TEXT.encode())


async def version(call: Call) -> Response:
    return _json(200, ollama_api.version_response())


async def tags(call: Call) -> Response:
    return _json(200, ollama_api.tags_response(call.services.catalog.infos()))


async def show(call: Call) -> Response:
    cat = call.services.catalog
    data = _parse(call.body)
    requested = data.get("model") or data.get("name") or ""
    if cat.info is None or (requested and not ollama_api.matches_model(requested, cat.name)):
        raise OllamaError(404, f"model '{requested}' not found", "model_not_found")
    return _json(200, ollama_api.show_response(cat.info))


async def ps(call: Call) -> Response:
    cat = call.services.catalog
    ready = call.services.backend.get() in ("ready", "unknown")
    return _json(200, ollama_api.ps_response(cat.infos() if ready else []))


async def unsupported(call: Call) -> Response:
    raise ollama_api.not_supported(call.req.path) or OllamaError(
        501, "models are managed by the container")


async def chat(call: Call) -> Response | None:
    return await _infer(call, "chat")


async def generate(call: Call) -> Response | None:
    return await _infer(call, "generate")


async def embed(call: Call) -> Response | None:
    return await _infer(call, "embed")


async def embeddings(call: Call) -> Response | None:
    return await _infer(call, "embeddings")


async def _infer(call: Call, kind: str) -> Response | None:
    """Inference: translate, call llama-server, transform the answer back."""
    data = _parse(call.body)
    catalog = call.services.catalog
    model = catalog.name
    requested = data.get("model")
    if isinstance(requested, str) and requested:
        if not catalog.path:
            # No MODEL_PATH (a llama-server started by hand): whatever it serves answers,
            # under the name the client asked for.
            model = requested
        elif not ollama_api.matches_model(requested, model):
            raise OllamaError(404, f"model '{requested}' not found", "model_not_found")
    started = time.time_ns()
    if kind == "chat":
        upstream_body = ollama_api.chat_request(data, model)
    elif kind == "generate":
        upstream_body = ollama_api.generate_request(data, model)
    else:
        upstream_body = ollama_api.embed_request(data, model, legacy=kind == "embeddings")
    if isinstance(upstream_body, ollama_api.ModelLoad):
        return _json(200, ollama_api.load_response(upstream_body, model))
    if kind in ("chat", "generate"):
        if upstream_body.get("stream"):
            transform = _NdjsonStream(ollama_api.ChatStream(model, kind))
        else:
            transform = _Collect(lambda resp: ollama_api.chat_response(
                resp, model, kind, started))
    else:
        dims = data.get("dimensions") if isinstance(data.get("dimensions"), int) else None
        legacy = kind == "embeddings"
        transform = _Collect(lambda resp: ollama_api.embed_response(
            resp, model, legacy, started_ns=started, dimensions=dims))
    payload = json.dumps(upstream_body, separators=(",", ":")).encode()
    await relay.forward(call, upstream_path=ollama_api.upstream_path(upstream_body),
                        transform=transform, method="POST", body=payload,
                        headers=[("content-type", "application/json")])
    return None
