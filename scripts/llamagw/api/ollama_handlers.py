"""The Ollama-compatible API on the gateway port: route handlers and response transforms.

The translations themselves are pure functions in api/ollama.py; this module does the I/O around
them. Requests go through the same admission (keys, rate and concurrency limits), access log and
metrics as the OpenAI routes. Inference calls are rebuilt as OpenAI-compatible llama-server calls
and their answers are transformed on the fly by relay.Exchange: a streamed answer is split into SSE
events and each one becomes NDJSON lines written at once (no buffering of the whole stream).

Errors are Ollama-shaped: {"error": "..."} with the HTTP status; an error after streaming began
arrives as a last NDJSON line {"error": "..."}.

Models: in single-model mode the one model (a name that is not it: 404). In router mode
(models/serving.py) /api/tags lists the models the key may use, /api/ps the loaded ones, and
/api/show reads each model's own GGUF header (models/describe.py, off the event loop, cached);
an inference request is resolved and scoped by the pipeline (404, 403, its model's slots), and
leased here: an empty prompt or empty messages loads the model (done_reason "load"), with
keep_alive 0 drains and unloads it ("unload").
"""

from __future__ import annotations

import json
import logging
import time

from llamagw import config
from llamagw.api import ollama as ollama_api
from llamagw.context import Call, Response
from llamagw.errors import OllamaError
from llamagw.net import relay
from llamagw.wire.sse import SSEError, SSESplitter

log = logging.getLogger("gateway")

# Non-streamed answers (and upstream error bodies) are collected whole before translation; an
# embeddings batch is the largest legitimate one (2048 inputs x 4096 floats as JSON ~ 100 MB is
# far beyond what RunPod carries: its payload limit).
MAX_COLLECTED_BODY = config.PAYLOAD_LIMIT


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


def _single_allowed(call: Call) -> bool:
    """Single-model mode: may the caller's key use the one model?"""
    name = call.services.models.single_name
    return not name or call.ctx.key_models is None or name in call.ctx.key_models


async def tags(call: Call) -> Response:
    services = call.services
    if not services.router_mode:
        infos = services.catalog.infos() if _single_allowed(call) else []
        return _json(200, ollama_api.tags_response(infos))
    return _json(200, ollama_api.tags_response(
        await _described(call, services.models.visible(call.ctx.key_models))))


async def show(call: Call) -> Response:
    services = call.services
    cat = services.catalog
    data = _parse(call.body)
    requested = data.get("model") or data.get("name") or ""
    if services.router_mode:
        name = services.models.resolve_listed(requested, call.ctx.key_models)
        info = await cat.describe(name)
        if info is None:
            raise OllamaError(404, f"model '{requested}' has no readable GGUF header",
                              "model_not_found")
        return _json(200, ollama_api.show_response(info, vision=cat.has_projector(name)))
    if cat.info is None or (requested and not ollama_api.matches_model(requested, cat.name)):
        raise OllamaError(404, f"model '{requested}' not found", "model_not_found")
    if not _single_allowed(call):
        raise OllamaError(403, f"this key may not use model '{cat.name}'", "model_not_allowed")
    return _json(200, ollama_api.show_response(cat.info))


async def ps(call: Call) -> Response:
    services = call.services
    cat = services.catalog
    key_models = call.ctx.key_models
    if services.router_mode:
        loaded = services.models.loaded(key_models)
        out = ollama_api.ps_response(await _described(call, loaded))
        by_name = {m.name: m for m in loaded}
        for item in out["models"]:      # llama-server's own context size, when it told
            m = by_name.get(item["name"].rsplit(":", 1)[0])
            if m is not None and isinstance(m.meta.get("n_ctx"), int):
                item["context_length"] = m.meta["n_ctx"]
        return _json(200, out)
    ready = services.backend.get() in ("ready", "unknown")
    return _json(200, ollama_api.ps_response(cat.infos() if ready and _single_allowed(call)
                                             else []))


async def _described(call: Call, models) -> list:
    """Router mode: the GGUF descriptions of catalog models (read once, cached); the file of
    a loaded model is hashed in the background for its digest."""
    cat = call.services.catalog
    out = []
    for m in models:
        info = await cat.describe(m.name)
        if info is not None:
            out.append(info)
            if m.state.value == "loaded":
                cat.want_digest(m.name)
    return out


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
    services = call.services
    catalog = services.catalog
    if services.router_mode:
        model = call.ctx.model            # resolved and scoped by the pipeline
    else:
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
        if services.router_mode:
            if upstream_body.done_reason == "unload":
                await services.models.unload(model)
            else:
                await services.models.load(model)
        return _json(200, ollama_api.load_response(upstream_body, model))
    if services.router_mode:
        await call.hold()           # the model's lease (loading it first), then its slot
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
