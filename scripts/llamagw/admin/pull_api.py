"""Router mode: pull and delete models (models/pulls.py), for admin keys only.

    POST   /api/pull              Ollama's: {"model": "hf.co/OWNER/REPO:QUANT" | URL,
                                  "stream": true} -> NDJSON progress lines, then
                                  {"status": "success"}; "stream": false: the last line only
    DELETE /api/delete            Ollama's: {"model": NAME} -> 200, empty
    POST   /admin/models/pull     {"model": ..., "stream": true} -> the same NDJSON lines
    POST   /admin/models/delete   {"model": NAME} -> {"model": NAME, "deleted": true}

Single-model mode: 501 (Ollama) / 409 single_model_mode (admin). An error before the first line
is an answer with its status; one after it (the download failed) is a last {"error": "..."} line.
"""

from __future__ import annotations

import json

from llamagw.context import Call, Response, StreamResponse
from llamagw.errors import GatewayError, OllamaError
from llamagw.models.pulls import PullError

NDJSON = [("content-type", "application/x-ndjson")]
JSON = [("content-type", "application/json"), ("cache-control", "no-store")]
# A pull may be silent while the hub is asked again (backoff) or a partial file is hashed; its
# lines otherwise come every 0.5 s. Past this silence the stream is cut (the download stops).
PULL_IDLE_TIMEOUT = 600.0


def _line(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _pulls(call: Call, ollama: bool):
    models = call.services.models
    if not models.router:
        if ollama:
            raise OllamaError(501, f"{call.req.path} needs router mode (MODELS_DIR): this "
                                   "gateway serves one model, chosen when the container starts")
        raise GatewayError(409, "Pulling and deleting models needs router mode (MODELS_DIR); "
                                "this gateway serves one model", "single_model_mode")
    return models.pulls


def _error(exc: PullError, ollama: bool) -> GatewayError:
    if ollama:
        return OllamaError(exc.status, str(exc))
    return GatewayError(exc.status, str(exc), exc.code)


async def _pull(call: Call, ollama: bool) -> Response | StreamResponse:
    pulls = _pulls(call, ollama)
    data = json.loads(call.body)
    requested = data.get("model", data.get("name"))
    try:
        lines = pulls.stream(requested)
    except PullError as exc:
        raise _error(exc, ollama) from None
    if data.get("stream", True) is False:
        last = None
        try:
            async for last in lines:
                pass
        except PullError as exc:
            raise _error(exc, ollama) from None
        return Response(200, JSON, _line(last)[:-1])

    async def chunks():
        try:
            async for item in lines:
                yield _line(item)
        except PullError as exc:
            yield _line({"error": str(exc)})
        finally:
            await lines.aclose()

    return StreamResponse(200, NDJSON, chunks(), idle_timeout=PULL_IDLE_TIMEOUT)


async def _delete(call: Call, ollama: bool) -> str:
    pulls = _pulls(call, ollama)
    data = json.loads(call.body)
    try:
        return await pulls.delete(data.get("model", data.get("name")))
    except PullError as exc:
        raise _error(exc, ollama) from None


async def ollama_pull(call: Call):
    return await _pull(call, True)


async def admin_pull(call: Call):
    return await _pull(call, False)


async def ollama_delete(call: Call) -> Response:
    await _delete(call, True)
    return Response(200, JSON, b"")


async def admin_delete(call: Call) -> Response:
    name = await _delete(call, False)
    return Response(200, JSON, _line({"model": name, "deleted": True})[:-1])
