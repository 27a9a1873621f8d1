"""Small pieces every admin API handler uses: JSON answers, the JSON body, the query string.

The admin routes' security headers (admin/static.API_HEADERS: CSP, nosniff, no-store, ...) are
added to every answer by the pipeline from the route's `headers` (api/routes.admin_route), errors
included: handlers add only their content type.
"""

from __future__ import annotations

import json
import urllib.parse

from llamagw.context import Response
from llamagw.errors import GatewayError

JSON = [("content-type", "application/json")]
# A query string of the admin API has a handful of short parameters.
MAX_QUERY_PARAMS = 16


def json_response(status: int, obj: object, headers: list[tuple[str, str]] | None = None
                  ) -> Response:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Response(status, JSON + list(headers or ()), body.encode("utf-8"))


def body_object(call) -> dict:
    """The request's JSON object (routes with json_body=True were checked by jsonguard; an
    empty body is {})."""
    if not call.body:
        return {}
    try:
        obj = json.loads(call.body)
    except ValueError:
        raise GatewayError(400, "The body must be a JSON object", "invalid_json") from None
    if not isinstance(obj, dict):
        raise GatewayError(400, "The body must be a JSON object", "invalid_json")
    return obj


def query(call) -> dict[str, str]:
    """The query string's parameters (the first value of each); 400 when malformed."""
    try:
        pairs = urllib.parse.parse_qsl(call.req.query, keep_blank_values=True,
                                       strict_parsing=False, max_num_fields=MAX_QUERY_PARAMS)
    except ValueError:
        raise GatewayError(400, "Too many query parameters", "invalid_query") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        out.setdefault(name, value)
    return out


def int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within [low, high]; 400 otherwise."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise GatewayError(400, f"{name} must be a whole number from {low} to {high}",
                           "invalid_query")
    value = int(raw)
    if not low <= value <= high:
        raise GatewayError(400, f"{name} must be a whole number from {low} to {high}",
                           "invalid_query")
    return value
