"""GET /admin/usage: the usage ledger added up, as JSON or CSV (issue 28; ADMIN-API.md "Usage").

    GET /admin/usage?from=&to=&group=key|model|hour|day&key_id=&model=
    -> 200 {"rows": [{<group field>, "requests", "prompt_tokens", "completion_tokens", "errors"}]}
       (group field: key_id, model, hour as ISO-8601 UTC, day as YYYY-MM-DD; observe/usage.query)
    Accept: text/csv -> the same rows as CSV (usage.to_csv: header first, formula-looking cells
    quoted)

from / to: "7d", "24h", epoch seconds or ISO-8601 (usage.parse_time), the rows of [from, to);
absent or empty: no bound (the ledger keeps USAGE_RETENTION_DAYS). group: default key. key_id /
model: only that key's / model's rows. Every worker's file in $DATA_DIR/usage is read and added
up, this worker's latest rows included (the writer is asked to flush first). A parameter that is
unknown, given twice or not valid: 400 in the admin envelope, naming it.

The files are read in a worker thread, never on the event loop, within QUERY_TIMEOUT_S (503
usage_timeout past it); at most MAX_RUNNING_QUERIES at once, a query that outlived its deadline
included until its thread ends (503 usage_busy beyond, with Retry-After). Auth: the route table's
Auth.ADMIN (api/routes.py).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse

from llamagw.context import Call, Response
from llamagw.errors import RETRY_AFTER_USAGE, GatewayError
from llamagw.limits.keys import KEY_ID_RE
from llamagw.observe import usage

# A query reads every worker's file of the span asked: milliseconds for a day of one worker,
# seconds for months of many on a network volume. 10 s is as long as a dashboard waits.
QUERY_TIMEOUT_S = 10.0
# Queries whose thread is still reading. Each holds a thread of the loop's default executor
# (shared with other file work) until it ends, deadline or not: two let the dashboard and a
# script ask at once; more wait for their turn as a 503 with Retry-After.
MAX_RUNNING_QUERIES = 2
# Before reading, this worker's pending rows are written (Ledger.sync), so an answer includes the
# request just made; a failing disk does not hold the answer back longer than this.
SYNC_TIMEOUT_S = 1.0
# The parameters; a query string holds at most these, once each.
PARAMS = ("from", "to", "group", "key_id", "model")

CSV_TYPE = "text/csv; charset=utf-8"
JSON_TYPE = "application/json"

_running = 0


def _bad(message: str, code: str = "bad_parameter") -> GatewayError:
    return GatewayError(400, message, code)


def parse_params(query: str, *, now: float | None = None) -> dict:
    """The query's parameters, checked: {"since", "until", "group", "key_id", "model"}.
    Raises GatewayError 400."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True,
                                       max_num_fields=len(PARAMS), errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"Malformed query string: {exc}") from None
    given: dict[str, str] = {}
    for name, value in pairs:
        if name not in PARAMS:
            raise _bad(f"Unknown parameter {name!r}: use {', '.join(PARAMS)}")
        if name in given:
            raise _bad(f"Parameter {name!r} given twice")
        given[name] = value.strip()
    out = {"since": None, "until": None, "group": "key", "key_id": None, "model": None}
    for name, field in (("from", "since"), ("to", "until")):
        if given.get(name):
            try:
                out[field] = usage.parse_time(given[name], now=now)
            except ValueError as exc:
                raise _bad(f"{name}: {exc}", "bad_time") from None
    if out["since"] is not None and out["until"] is not None and out["since"] >= out["until"]:
        raise _bad("from must be before to", "bad_time")
    if given.get("group"):
        if given["group"] not in usage.GROUPS:
            raise _bad(f"group must be one of {', '.join(usage.GROUPS)}", "bad_group")
        out["group"] = given["group"]
    if given.get("key_id"):
        if not KEY_ID_RE.fullmatch(given["key_id"]):
            raise _bad("key_id: 1-64 letters, digits, '.', '_' or '-'")
        out["key_id"] = given["key_id"]
    if given.get("model"):
        model = given["model"]
        if len(model) > usage.MAX_MODEL_CHARS or not model.isprintable():
            raise _bad(f"model: at most {usage.MAX_MODEL_CHARS} printable characters")
        out["model"] = model
    return out


def _read(folder: str, ledger, params: dict) -> list[dict]:
    """In a worker thread: this worker's pending rows written, then every file read."""
    if ledger is not None:
        ledger.sync(SYNC_TIMEOUT_S)
    return usage.query(folder, since=params["since"], until=params["until"],
                       group=params["group"], key_id=params["key_id"], model=params["model"])


def _done(_future) -> None:
    global _running
    _running -= 1


async def usage_report(call: Call) -> Response:
    """The route handler (api/routes.py ADMIN_ROUTES)."""
    global _running
    params = parse_params(call.req.query)
    if _running >= MAX_RUNNING_QUERIES:
        raise GatewayError(503, "Usage queries are busy; retry shortly", "usage_busy",
                           headers=[("retry-after", str(RETRY_AFTER_USAGE))])
    services = call.services
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, _read, services.config.usage_dir,
                                  getattr(services, "ledger", None), params)
    _running += 1
    future.add_done_callback(_done)
    try:
        rows = await asyncio.wait_for(asyncio.shield(future), QUERY_TIMEOUT_S)
    except TimeoutError:
        raise GatewayError(503, f"The usage query took over {QUERY_TIMEOUT_S:g} s; ask for a "
                                "shorter span", "usage_timeout",
                           headers=[("retry-after", str(RETRY_AFTER_USAGE))]) from None
    headers = [("cache-control", "no-store")]
    if "text/csv" in (call.req.get("accept") or "").lower():
        return Response(200, [("content-type", CSV_TYPE)] + headers,
                        usage.to_csv(rows, params["group"]).encode("utf-8"))
    return Response(200, [("content-type", JSON_TYPE)] + headers,
                    json.dumps({"rows": rows}, separators=(",", ":")).encode("utf-8"))
