"""The two ways a request is served (connection.py): on the callback path (the whole request in
one read, a free backend slot, a pooled llama-server connection: no task, no coroutine) and by
the connection's task (anything that has to wait). A client and the access log must not be able
to tell them apart, and every resource is released on both."""

from __future__ import annotations

import asyncio

import pytest

from helpers import Stack, aio, chat, eventually, get, post
from llamagw.net import connection

BAD_KEY = "sk-nobody-0123456789abcdef"
ORIGIN = "https://app.example"

CASES = {
    "chat": (post("/v1/chat/completions", chat()), 200),
    "models": (get("/v1/models"), 200),
    "stream": (post("/v1/chat/completions", chat(stream=True, events=3)), 200),
    "cors": (post("/v1/chat/completions", chat(), extra=f"Origin: {ORIGIN}\r\n".encode()), 200),
    "bad_key": (post("/v1/chat/completions", chat(), key=BAD_KEY), 401),
    "dropped": (post("/v1/chat/completions", chat(drop_before_head=True)), 502),
    "late": (post("/v1/chat/completions", chat(delay_first_byte=0.6)), 504),
    "cut": (post("/v1/chat/completions", chat(stream=True, drop_after=2)), 200),
}
# What may differ between two answers to the same request.
VOLATILE_HEADERS = {"x-request-id", "connection", "x-ratelimit-remaining", "x-ratelimit-reset"}
VOLATILE_FIELDS = {"time", "request_id", "duration_ms", "ttfb_ms", "client"}


def _count_tasks(monkeypatch) -> list:
    started: list = []
    real = connection.ClientConnection._start_task

    def counting(self, *args, **kw):
        started.append(args or kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(connection.ClientConnection, "_start_task", counting)
    return started


async def _serve(s: Stack, raw: bytes, split: bool):
    """One request on a new connection: in one write, or with its last 3 bytes 50 ms later (a
    head or body still arriving: the task serves it)."""
    c = await s.client()
    try:
        if split:
            await c.send(raw[:-3])
            await asyncio.sleep(0.05)
            await c.send(raw[-3:])
        else:
            await c.send(raw)
        r = await c.response()
        closed = await c.closed(0.05)
    finally:
        c.abort()
    await eventually(lambda: s.gw.in_flight == 0, 1.0)
    return r, closed


def _view(r) -> tuple:
    headers = sorted((n, v) for n, v in r.headers if n not in VOLATILE_HEADERS)
    if (r.get("content-type") or "").startswith("text/event-stream"):
        body = [line for line in r.body.split(b"\n") if line.startswith(b"data:")]
        body = [b"data" if b'"error"' not in line else line for line in body]
    elif (r.get("content-type") or "").startswith("application/json"):
        data = r.json()
        body = sorted(data.get("error", data))
    else:
        body = r.body
    return r.status, headers, body, r.complete


@pytest.mark.parametrize("case", sorted(CASES))
@aio
async def test_callback_and_task_paths_answer_alike(tmp_path, monkeypatch, case):
    raw, status = CASES[case]
    async with Stack(tmp_path, {"CORS_ORIGINS": ORIGIN, "REQUEST_TIMEOUT": "0.3"},
                     access_log=True) as s:
        assert (await s.one(post("/v1/chat/completions", chat()))).status == 200   # pool warm
        started = _count_tasks(monkeypatch)
        fast, fast_closed = await _serve(s, raw, split=False)
        # no task (a retry connects; /v1/models has its own handler: the catalog in router
        # mode, scoping to the key)
        assert started == [] or case in ("dropped", "models"), started
        slow, slow_closed = await _serve(s, raw, split=True)
        assert started, "the split request was not served by the task"
        assert fast.status == slow.status == status, (fast, slow)
        assert _view(fast) == _view(slow)
        if case == "bad_key":
            # the whole body was read on the callback path: the connection stays usable; a body
            # still on its way when the key is refused is not waited for
            assert not fast_closed and fast.get("connection") is None
            assert slow_closed and slow.get("connection") == "close"
        else:
            assert fast_closed == slow_closed == (case == "cut")
        records = s.access_records()[-2:]
        if case == "bad_key":       # and the body read on the callback path is counted
            assert records[0].pop("bytes_in") == len(raw.partition(b"\r\n\r\n")[2])
            assert records[1].pop("bytes_in") == 0
        same = [{k: v for k, v in r.items() if k not in VOLATILE_FIELDS} for r in records]
        assert same[0] == same[1], records
        assert s.gw.admission.slots.active == 0 and s.gw.in_flight == 0
        assert s.gw.admission.concurrency.in_flight("alice") == 0


@aio
async def test_pipelined_requests_on_the_callback_path_answered_in_order(tmp_path, monkeypatch):
    async with Stack(tmp_path) as s:
        c = await s.client()
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        started = _count_tasks(monkeypatch)
        batch = [post("/v1/completions", {"prompt": "a b c"}),
                 post("/v1/chat/completions", chat(), key=BAD_KEY),
                 post("/v1/embeddings", {"model": "demo", "input": "x"}),
                 post("/v1/chat/completions", chat(stream=True, events=2))]
        await c.send(b"".join(batch))
        answers = [await c.response() for _ in batch]
        assert [r.status for r in answers] == [200, 401, 200, 200]
        assert answers[0].json()["object"] == "text_completion"
        assert answers[2].json()["object"] == "list"
        assert answers[3].complete and b"[DONE]" in answers[3].body
        assert started == []                          # all four without a task
        assert not await c.closed(0.1)
        # and it goes on (/v1/models has its own handler, in the task)
        assert (await c.request(get("/v1/models"))).status == 200
        assert s.fake.connections_opened == 1


@aio
async def test_keepalive_timeout_closes_an_idle_connection_without_a_task(tmp_path, monkeypatch):
    async with Stack(tmp_path, {"KEEPALIVE_TIMEOUT": "0.2"}) as s:
        c = await s.client()
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        started = _count_tasks(monkeypatch)
        assert (await c.request(post("/v1/chat/completions", chat()))).status == 200
        assert not await c.closed(0.1)
        assert await c.closed(0.5)
        assert started == [] and s.gw.connections == set()


@aio
async def test_handed_over_request_released_if_its_task_never_runs(tmp_path):
    """The callback path hands a request that must wait (no free backend slot) to the task with
    its ticket and slot taken; a task cancelled before its first step still releases them."""
    async with Stack(tmp_path, {"MAX_CONCURRENT_REQUESTS": "1", "QUEUE_TIMEOUT": "2"}) as s:
        busy = await s.client()
        await busy.send(post("/v1/chat/completions", chat(stream=True, events=20, interval=0.05)))
        await busy.head()
        c = await s.client()
        loop = asyncio.get_running_loop()
        cancelled = []
        real = loop.create_task

        def create_then_cancel(coro, **kw):     # the task is cancelled before it ever runs
            task = real(coro, **kw)
            if getattr(coro, "__qualname__", "") == "ClientConnection.run":
                task.cancel()
                cancelled.append(task)
            return task

        loop.create_task = create_then_cancel
        try:
            await c.send(post("/v1/chat/completions", chat()))
            await eventually(lambda: cancelled, 1.0)
        finally:
            del loop.create_task
        assert await c.closed(1.0)
        await eventually(lambda: s.gw.in_flight == 1, 1.0)    # only the busy stream is left
        assert s.gw.admission.concurrency.in_flight("alice") == 1
        assert s.gw.admission.slots.waiting == 0
        busy.abort()
        await eventually(lambda: s.gw.admission.slots.active == 0 and s.gw.in_flight == 0, 1.0)
        assert s.gw.admission.concurrency.in_flight("alice") == 0
        assert (await s.one(post("/v1/chat/completions", chat()))).status == 200
