"""The admin API's models part (issue 27; /work/wt/ADMIN-API.md "Models"): route handlers.

    GET  /admin/models                 {"models": [...], "max": N, "mode": "router|single"}
    POST /admin/models/load            {"model": NAME} -> 200 {"model", "state"}
    POST /admin/models/unload          (202 with the state now when it takes longer than
    POST /admin/models/switch           MODEL_LOAD_WAIT; the action goes on)
    GET  /admin/events                 SSE: `event: snapshot` first, then `event: model` per
                                       change (`removed` for a model gone), `: heartbeat`
                                       comments; ends at shutdown

Auth.ADMIN and the admin envelope (api/routes.py). Reading never loads a model. In
single-model mode /admin/models lists the one model (its state from the backend state) and
the actions answer 409 single_model_mode. The work is in models/serving.ModelService.
"""

from __future__ import annotations

import json

from llamagw.context import Call, Response, StreamResponse
from llamagw.errors import GatewayError
from llamagw.models.router import HEARTBEAT_INTERVAL

JSON = [("content-type", "application/json"), ("cache-control", "no-store")]
SSE = [("content-type", "text/event-stream; charset=utf-8")]
# /admin/events: a heartbeat comment after this long without a change (below common proxy idle
# timeouts of 60 s; it also finds a dashboard that vanished without a word).
EVENTS_HEARTBEAT = HEARTBEAT_INTERVAL


def _json(status: int, obj) -> Response:
    return Response(status, JSON, json.dumps(obj, separators=(",", ":")).encode())


async def list_models(call: Call) -> Response:
    return _json(200, call.services.models.snapshot())


async def _act(call: Call, action: str) -> Response:
    try:
        data = json.loads(call.body)
    except ValueError:
        raise GatewayError(400, "The body must be a JSON object", "invalid_json") from None
    status, answer = await call.services.models.action(action, data.get("model"))
    return _json(status, answer)


async def load(call: Call) -> Response:
    return await _act(call, "load")


async def unload(call: Call) -> Response:
    return await _act(call, "unload")


async def switch(call: Call) -> Response:
    return await _act(call, "switch")


async def events(call: Call) -> StreamResponse:
    chunks = await call.services.models.open_events(EVENTS_HEARTBEAT)
    # a stream silent for twice the heartbeat is stuck: cut (context.StreamResponse)
    return StreamResponse(200, SSE, chunks, idle_timeout=2 * EVENTS_HEARTBEAT + 5)
