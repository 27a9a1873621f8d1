"""The dashboard's files: GET /ui (308 to /ui/), /ui/ and /ui/<file> (admin/static.py serves
them from memory with their CSP and security headers), /favicon.ico (308 to the dashboard's
icon, which browsers ask for on their own). All open: the page signs in through /admin/session.
"""

from __future__ import annotations

from llamagw.admin import static
from llamagw.context import Call, Response

FAVICON = static.UI_PREFIX + "favicon.svg"


async def files(call: Call) -> Response:
    req = call.req
    # GET for HEAD too: the pipeline sends a HEAD the same head (with the body's length), no body
    answer = call.services.admin.static.respond("GET", req.path, req.headers)
    if answer is None:                      # a route no file answers: a table mistake
        return Response(404, [("content-type", "application/json")],
                        b'{"error":{"message":"Not found","type":"not_found_error",'
                        b'"code":"not_found"}}')
    headers = [(n, v) for n, v in answer.headers if n != "content-length"]
    return Response(answer.status, headers, answer.body)


async def favicon(call: Call) -> Response:
    return Response(308, [("location", FAVICON), *static.SECURITY_HEADERS])

