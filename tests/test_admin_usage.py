"""GET /admin/usage (issue 28, admin/usage_api.py) through the gateway: the ledger added up by key,
model, hour or day, filtered, as JSON or CSV; admin keys only; bad parameters 400 in the admin
envelope; the files read off the event loop within a deadline, a bounded number at once."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time

import pytest

from helpers import ALICE, BOB, KEY_FILE, Stack, aio, chat, get, post
from llamagw import errors
from llamagw.admin import usage_api
from llamagw.errors import GatewayError
from llamagw.observe import usage

ROOT = "sk-root-0123456789abcdef0"
KEYS = KEY_FILE + f"root:{ROOT} role=admin\n"


async def _traffic(s: Stack) -> None:
    for body, key in ((chat(events=3), ALICE), (chat(stream=True, events=4), ALICE),
                      ({**chat(events=1), "model": "other"}, BOB),
                      (chat(status=500), BOB)):
        await s.one(post("/v1/chat/completions", body, key=key))


@aio
async def test_usage_by_key_and_model_as_json_and_csv(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        await _traffic(s)
        r = await s.one(get("/admin/usage", key=ROOT))
        assert r.status == 200 and r.get("content-type") == "application/json"
        assert r.get("cache-control") == "no-store"
        # rows of this worker's latest requests (its writer flushed first), by key by default
        assert r.json() == {"rows": [
            {"key_id": "alice", "requests": 2, "prompt_tokens": 4, "completion_tokens": 7,
             "errors": 0},
            {"key_id": "bob", "requests": 2, "prompt_tokens": 2, "completion_tokens": 1,
             "errors": 1}]}
        r = await s.one(get("/admin/usage?group=model&key_id=bob", key=ROOT))
        assert r.json()["rows"] == [
            {"model": "", "requests": 1, "prompt_tokens": 0, "completion_tokens": 0,
             "errors": 1},
            {"model": "other", "requests": 1, "prompt_tokens": 2, "completion_tokens": 1,
             "errors": 0}]
        r = await s.one(get("/admin/usage?group=day&model=demo&from=1d&to=" +
                            str(int(time.time()) + 60), key=ROOT))
        today = usage.iso_utc(time.time())[:10]
        assert r.json()["rows"] == [{"day": today, "requests": 2, "prompt_tokens": 4,
                                     "completion_tokens": 7, "errors": 0}]
        r = await s.one(get("/admin/usage?group=hour", key=ROOT))
        (row,) = r.json()["rows"]
        assert row["hour"].endswith(":00:00Z") and row["requests"] == 4
        # a span with nothing in it
        r = await s.one(get("/admin/usage?from=2020-01-01&to=2020-01-02", key=ROOT))
        assert r.json() == {"rows": []}
        # CSV for Accept: text/csv
        r = await s.one(get("/admin/usage?group=key", key=ROOT, extra=b"Accept: text/csv\r\n"))
        assert r.status == 200 and r.get("content-type") == "text/csv; charset=utf-8"
        table = list(csv.reader(io.StringIO(r.body.decode())))
        assert table == [["key_id", "requests", "prompt_tokens", "completion_tokens", "errors"],
                         ["alice", "2", "4", "7", "0"], ["bob", "2", "2", "1", "1"]]
        r = await s.one(get("/admin/usage?from=2020-01-01&to=2020-01-02&group=model", key=ROOT,
                            extra=b"Accept: text/csv\r\n"))
        assert r.body == b"model,requests,prompt_tokens,completion_tokens,errors\r\n"
        # HEAD: the same head, no body
        c = await s.client()
        r = await c.request(get("/admin/usage", key=ROOT, method=b"HEAD"), head_request=True)
        assert r.status == 200 and r.body == b""


@aio
async def test_usage_is_for_admin_keys_only(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        r = await s.one(get("/admin/usage", key=None))
        assert r.status == 401 and r.error()["code"] == "unauthorized"
        r = await s.one(get("/admin/usage", key=ALICE))
        assert r.status == 403 and r.error() == {
            "message": "Key 'alice' may not use the admin API", "type": "permission_error",
            "code": "forbidden"}
        assert (await s.one(post("/admin/usage", {}, key=ROOT))).status == 405
        # an admin's queries are not usage: no row
        assert (await s.one(get("/admin/usage", key=ROOT))).status == 200
        assert await s.usage_rows() == []


@pytest.mark.parametrize("query,code,names", [
    ("group=week", "bad_group", "group"),
    ("from=yesterday", "bad_time", "from"),
    ("to=-5", "bad_time", "to"),
    ("from=2026-01-02&to=2026-01-01", "bad_time", "from"),
    ("from=1d&from=2d", "bad_parameter", "'from'"),
    ("since=1d", "bad_parameter", "'since'"),
    ("key_id=a%20b", "bad_parameter", "key_id"),
    ("model=" + "m" * 300, "bad_parameter", "model"),
    ("model=a%0Ab", "bad_parameter", "model"),
    ("group", "bad_parameter", "query"),
    ("key_id=%ff", "bad_parameter", "query"),
])
def test_bad_parameters_are_400_naming_them(query, code, names):
    with pytest.raises(GatewayError) as err:
        usage_api.parse_params(query)
    assert err.value.status == 400 and err.value.code == code
    assert names in err.value.message.lower() or names in err.value.message


def test_parameters_read():
    now = 1_800_000_000.0
    assert usage_api.parse_params("", now=now) == {
        "since": None, "until": None, "group": "key", "key_id": None, "model": None}
    assert usage_api.parse_params("from=7d&to=&group=day&key_id=alice&model=q%2Fw", now=now) == {
        "since": now - 7 * 86400, "until": None, "group": "day", "key_id": "alice",
        "model": "q/w"}


@aio
async def test_bad_parameters_answer_400_in_the_admin_envelope(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        r = await s.one(get("/admin/usage?group=week", key=ROOT))
        assert r.status == 400 and r.error()["code"] == "bad_group"
        assert r.error()["type"] == "invalid_request_error"


@aio
async def test_queries_run_off_the_loop_with_a_deadline_and_a_bound(tmp_path, monkeypatch):
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow_query(*args, **kwargs):
        started.release()
        release.wait(10)
        return []

    monkeypatch.setattr(usage, "query", slow_query)
    monkeypatch.setattr(usage_api, "QUERY_TIMEOUT_S", 0.3)
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        try:
            first = asyncio.create_task(s.one(get("/admin/usage", key=ROOT)))
            second = asyncio.create_task(s.one(get("/admin/usage", key=ROOT)))
            # the loop serves meanwhile
            assert (await s.one(get("/ping", key=None))).status == 200
            r1, r2 = await first, await second
            for r in (r1, r2):
                assert r.status == 503 and r.error()["code"] == "usage_timeout"
                assert r.get("retry-after") == str(errors.RETRY_AFTER_USAGE)
            # their threads still read: a third query is refused at once
            r = await s.one(get("/admin/usage", key=ROOT))
            assert r.status == 503 and r.error()["code"] == "usage_busy"
            assert r.get("retry-after") == str(errors.RETRY_AFTER_USAGE)
        finally:
            release.set()
        deadline = time.monotonic() + 5
        while usage_api._running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert usage_api._running == 0
        assert (await s.one(get("/admin/usage", key=ROOT))).json() == {"rows": []}
