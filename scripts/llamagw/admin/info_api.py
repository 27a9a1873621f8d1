"""GET /admin/logs and GET /admin/system (ADMIN-API.md).

/admin/logs?source=gateway|llama|boot&tail=N: the last N (default and most: logbuffer's
TAIL_DEFAULT) lines of the in-memory log buffer (observe/logbuffer.py: cleaned and redacted when
they were kept), oldest first. /admin/system: admin/system.SystemProbe's snapshot, taken in a
worker thread (it reads /proc and may run nvidia-smi).
"""

from __future__ import annotations

from llamagw.admin.answers import int_param, json_response, query
from llamagw.context import Call, Response
from llamagw.errors import GatewayError
from llamagw.observe import logbuffer

LOG_SOURCES = ("gateway", "llama", "boot")


async def logs(call: Call) -> Response:
    params = query(call)
    source = params.get("source") or None
    if source is not None and source not in LOG_SOURCES:
        raise GatewayError(400, f"source must be one of {', '.join(LOG_SOURCES)}",
                           "invalid_query")
    tail = int_param(params, "tail", logbuffer.TAIL_DEFAULT, 0, logbuffer.TAIL_DEFAULT)
    return json_response(200, {"lines": call.services.admin.logs.tail(tail, source)})


async def system(call: Call) -> Response:
    return json_response(200, await call.services.admin.system.snapshot())
