"""The gateway's own answers: /ping, /health, /metrics, and the CORS preflight (none for the
admin API and the dashboard).

Route handlers (api/routes.py): async def handler(call) -> Response, answered without
llama-server.
"""

from __future__ import annotations

import json
import time

from llamagw.context import Call, Response

JSON = [("content-type", "application/json")]


async def ping(call: Call) -> Response:
    return Response(200, JSON, b'{"status":"ok"}')


async def health(call: Call) -> Response:
    services = call.services
    state = services.backend.get()
    slots = services.admission.slots
    body = {
        "status": "ok" if state in ("ready", "unknown") else state,
        "backend": state,
        "uptime_s": round(time.monotonic() - services.started, 3),
        "in_flight": services.in_flight,
        "queue": slots.waiting + services.models.waiting(),       # router mode: per model
        "backend_active": slots.active + services.models.active(),
        "connections": len(services.connections),
        "shutting_down": services.shutting_down,
    }
    models = services.models.health()          # router mode: counts per state, no names
    if models is not None:
        body.update(models)
    return Response(200, JSON + [("cache-control", "no-store")], json.dumps(body).encode())


async def metrics(call: Call) -> Response:
    """Prometheus text, or JSON for Accept: application/json. METRICS_KEY, when set, was checked
    by admission (Auth.METRICS)."""
    services = call.services
    services.metrics.in_flight = services.in_flight
    ctype, body = services.metrics.content_for(call.req.get("accept"))
    return Response(200, [("content-type", ctype)], body)


async def preflight(call: Call) -> Response:
    """OPTIONS: the allowed methods, and the CORS preflight answer for an allowed origin."""
    return Response(*call.services.cors.preflight(call.req))


async def same_origin_preflight(call: Call) -> Response:
    """OPTIONS on an admin API or dashboard path: the allowed methods and no CORS headers,
    whatever the Origin (a browser then refuses the cross-origin request it asked about)."""
    return Response(*call.services.cors.preflight(call.req, cors=False))
