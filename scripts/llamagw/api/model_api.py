"""GET /v1/models: the models the caller's key may use (route handler, api/routes.py).

Router mode: the gateway's catalog (models/serving.py), scoped to the key; never llama-server's
raw list, which holds the files' absolute paths and its command lines. Single-model mode:
llama-server's own answer, relayed; a key whose `models=` leaves the one model out gets an
empty list, as it may use none.
"""

from __future__ import annotations

import json

from llamagw.context import Call, Response
from llamagw.net import relay

JSON = [("content-type", "application/json; charset=utf-8")]


async def v1_models(call: Call) -> Response | None:
    models = call.services.models
    key_models = call.ctx.key_models
    if models.router:
        body = json.dumps(models.v1_models(key_models), separators=(",", ":")).encode()
        return Response(200, JSON, body)
    name = models.single_name
    if key_models is not None and name and name not in key_models:
        return Response(200, JSON, b'{"object":"list","data":[]}')
    await relay.forward(call, upstream_path="/v1/models")
    return None
