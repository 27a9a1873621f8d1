"""The dashboard's live channel (GET /admin/live), its producers (admin/livefeed.py), and the
log and system routes, on the real gateway (loopback tier)."""

from __future__ import annotations

import asyncio
import json
import logging
import types

from admin_helpers import OPS, SSE, admin_stack, sget, sign_in
from helpers import ALICE, Stack, aio, chat, eventually, get, post

from llamagw.admin import livefeed, livehub
from llamagw.observe.metrics import Metrics

PROMPT = "hello there"            # helpers.chat()'s message: never on the live channel


def fast_ticks(s: Stack, tick_s: float = 0.05) -> None:
    s.gw.admin.feed.tick_s = tick_s


@aio
async def test_a_stream_starts_with_hello_models_and_metrics_then_requests_live(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        session = await sign_in(s)
        sse = await SSE.open(s, session)
        assert sse.status == 200
        headers = dict(sse.headers)
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-content-type-options"] == "nosniff"
        kind, hello = await sse.event()
        assert kind == "hello" and hello["key_id"] == "ops" and hello["server_time"] > 0
        assert isinstance(hello["history"], list)
        kind, models = await sse.event()
        assert kind == "models" and models["mode"] == "single"
        assert [m["state"] for m in models["models"]] == ["loaded"]
        kind, metrics = await sse.event()
        assert kind == "metrics" and metrics["in_flight"] == 0 and metrics["state"]
        assert set(metrics) >= {"t", "requests_per_s", "tokens_per_s", "ttft_p50_ms",
                                "ttft_p95_ms", "in_flight", "queue", "error_rate", "state",
                                "uptime_s", "loaded"}
        # a request through the gateway: one `request` event, with no prompt
        r = await s.one(post("/v1/chat/completions", chat(), extra=b"X-Request-Id: rq-1\r\n"))
        assert r.status == 200
        rec = await sse.until("request")
        assert rec["request_id"] == "rq-1" and rec["key_id"] == "alice"
        assert rec["route"] == "/v1/chat/completions" and rec["status"] == 200
        assert rec["prompt_tokens"] is not None and rec["completion_tokens"] is not None
        assert rec["duration_ms"] >= 0 and rec["ttfb_ms"] >= 0
        assert PROMPT not in json.dumps(rec) and ALICE not in json.dumps(rec)
        # the dashboard's own requests are not published
        assert (await s.one(sget("/admin/keys", session))).status == 200
        r = await s.one(get("/v1/models", extra=b"X-Request-Id: rq-2\r\n"))
        rec = await sse.until("request")
        assert rec["request_id"] == "rq-2"
        sse.client.abort()
        await eventually(lambda: len(s.gw.admin.hub) == 0)


@aio
async def test_metrics_tick_while_a_dashboard_listens_and_stop_after(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        fast_ticks(s)
        sse = await SSE.open(s, key=OPS)
        await sse.until("metrics")
        for _ in range(3):
            assert (await s.one(post("/v1/chat/completions", chat()))).status == 200
        await s.one(post("/v1/chat/completions", chat(status=500)))
        m = await sse.until("metrics", lambda d: d["error_rate"])
        assert m["requests_per_s"] > 0 and m["ttft_p50_ms"] is not None
        assert m["error_rate"] == 0.25 and m["tokens_per_s"] > 0
        feed = s.gw.admin.feed
        assert feed._ticker is not None and not feed._ticker.done()
        sse.client.abort()
        await eventually(lambda: feed._ticker is None or feed._ticker.done())
        # later streams get the history in hello
        sse = await SSE.open(s, key=OPS)
        _, hello = await sse.event()
        assert len(hello["history"]) >= 1 and hello["history"][-1]["requests_per_s"] >= 0
        sse.client.abort()


@aio
async def test_log_lines_reach_the_stream_and_the_logs_route_redacted(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        sse = await SSE.open(s, key=OPS)
        await sse.until("metrics")
        logger = logging.getLogger("gateway")
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            logger.warning("backend said <b>hi</b> with Bearer %s", ALICE)
        finally:
            logger.setLevel(level)
        line = await sse.until("log", lambda d: "backend said" in d["text"])
        assert line["source"] == "gateway" and line["level"] == "warning"
        assert ALICE not in line["text"] and "<b>hi</b>" in line["text"]
        r = await s.one(get("/admin/logs?source=gateway&tail=5", key=OPS))
        lines = r.json()["lines"]
        assert r.status == 200 and 1 <= len(lines) <= 5
        assert any("backend said" in x["text"] for x in lines)
        assert ALICE.encode() not in r.raw
        r = await s.one(get("/admin/logs?source=llama", key=OPS))
        assert r.json() == {"lines": []}
        for bad in ("source=nginx", "tail=-1", "tail=501", "tail=x"):
            r = await s.one(get("/admin/logs?" + bad, key=OPS))
            assert r.status == 400 and r.error()["code"] == "invalid_query", bad
        sse.client.abort()


@aio
async def test_the_llama_and_boot_logs_are_followed_without_the_gateways_own_lines(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        llama = tmp_path / "llama.txt"
        boot = tmp_path / "boot.txt"
        llama.write_text("")
        boot.write_text("")
        s.gw.admin.follow_files({"llama": str(llama), "boot": str(boot)})
        s.gw.admin._follower.interval_s = 0.05
        with llama.open("a") as f:
            f.write("srv  log_server_r: request: POST /v1/chat/completions 200\n")
        with boot.open("a") as f:
            f.write("2026-01-02 03:04:05,678 INFO gateway: already in the buffer\n"
                    "entrypoint: llama-server started\n")

        async def texts(source):
            r = await s.one(get(f"/admin/logs?source={source}", key=OPS))
            return [x["text"] for x in r.json()["lines"]]
        for _ in range(100):
            if await texts("llama") and await texts("boot"):
                break
            await asyncio.sleep(0.05)
        assert await texts("llama") == ["srv  log_server_r: request: POST /v1/chat/completions 200"]
        assert await texts("boot") == ["entrypoint: llama-server started"]


@aio
async def test_the_dashboard_cap_and_the_slot_freed_on_every_exit(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        hub = s.gw.admin.hub
        hub.max_subscribers = 2
        a, b = await SSE.open(s, key=OPS), await SSE.open(s, key=OPS)
        c = await SSE.open(s, key=OPS)
        assert c.status == 503
        body = await c.client.reader.read(4096)
        assert b"too_many_dashboards" in body
        # HEAD holds no slot
        r = await s.one(get("/admin/live", key=OPS, method=b"HEAD"), head_request=True)
        assert r.status == 200 and len(hub) == 2
        a.client.abort()
        await eventually(lambda: len(hub) == 1)
        d = await SSE.open(s, key=OPS)
        assert d.status == 200
        b.client.close()                       # a clean close too
        d.client.abort()
        await eventually(lambda: len(hub) == 0)


@aio
async def test_a_slow_dashboard_loses_events_and_is_told(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        s.gw.admin.hub._queue_events = 5
        sse = await SSE.open(s, key=OPS)
        sub = s.gw.admin.hub._subs[0]
        for i in range(20):                    # published faster than the stream is taken
            s.gw.admin.hub.publish("request", {"n": i})
        assert sub.dropped >= 15
        dropped = await sse.until("dropped")
        assert dropped["count"] >= 15
        rec = await sse.until("request")
        assert rec["n"] >= 15
        sse.client.abort()


@aio
async def test_the_system_route(tmp_path):
    async with Stack(tmp_path) as s:
        await admin_stack(s)
        r = await s.one(get("/admin/system", key=OPS))
        body = r.json()
        assert r.status == 200 and set(body) == {"cpu", "memory", "disk", "gpu", "gpu_note",
                                                 "uptime_s", "version"}
        assert body["disk"]["total"] > 0 and body["version"]


# ----------------------------------------------------------------------- the feed, pure
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def feed_for_tests(state="ready"):
    hub = livehub.LiveHub()
    services = types.SimpleNamespace(
        in_flight=0, started=900.0, metrics=Metrics(),
        admission=types.SimpleNamespace(slots=types.SimpleNamespace(waiting=2, active=1)),
        backend=types.SimpleNamespace(get=lambda: state),
        catalog=types.SimpleNamespace(name="demo", info=None))
    clock = Clock()
    feed = livefeed.LiveFeed(hub, services, clock=clock, wall=lambda: 5000.0)
    return feed, hub, clock, services


def finish(feed, services, status=200, ttfb=0.1, completion=10, route="chat_completions",
           started=999.0, request_id="r", path="/v1/x"):
    """A request ends: the gateway's counters (Gateway.observe), then the feed."""
    c = types.SimpleNamespace(route=route, status=status, ttfb=ttfb, completion_tokens=completion,
                              prompt_tokens=3, request_id=request_id, key_id="k", path=path,
                              method="POST", outcome="ok", stream=False, duration=0.5,
                              started=started, model=None)
    services.metrics.observe_request(route, status, "k", 0.5, ttfb)
    services.metrics.add_tokens("k", 3, completion)
    feed.on_request(c)


def test_feed_rates_percentiles_and_error_rate():
    feed, hub, clock, services = feed_for_tests()
    feed._samples.append((clock.now, 0, 0, 0))
    for i in range(1, 101):
        clock.now += 0.05                       # 100 requests in 5 s, ttfb 1..100 ms
        finish(feed, services, ttfb=i / 1000, status=500 if i % 10 == 0 else 200)
        if i % 5 == 0:
            feed.flush()
    m = feed.metrics()
    assert m["requests_per_s"] == 20.0 and m["tokens_per_s"] == 200.0
    # 2xx only: 90 samples (1..99 ms but 10, 20 ...); nearest rank: the 45th and the 86th
    assert m["ttft_p50_ms"] == 49.0 and m["ttft_p95_ms"] == 95.0
    assert m["error_rate"] == 0.1 and m["queue"] == 2 and m["uptime_s"] == 105.0
    assert m["loaded"] == ["demo"] and m["state"] == "ready"
    clock.now += 120                            # a quiet two minutes: nothing in the windows
    feed.tick()
    m = feed.metrics()
    assert (m["requests_per_s"], m["ttft_p50_ms"], m["error_rate"]) == (0.0, None, None)


def test_feed_leaves_the_dashboards_own_traffic_out():
    feed, hub, clock, services = feed_for_tests()
    seen = []
    hub.publish = lambda kind, obj: seen.append((kind, obj))
    finish(feed, services, route="admin_keys", path="/admin/keys")
    finish(feed, services, route="ui", path="/ui/app.js")
    finish(feed, services, route="-", path="/admin/nothing", status=404)
    assert feed.flush() == 0 and seen == [] and feed.totals() == (1, 0, 30)
    finish(feed, services, route="ollama_chat", started=990.0)
    assert feed.flush() == 1 and feed.totals()[0] == 2     # the 404 counts in the rates
    # ended 1000 - (990 + 0.5) = 9.5 s before the flush, on the wall clock of 5000
    assert seen == [("request", dict(seen[0][1], t=4990.5))] and seen[0][1]["t"] == 4990.5


def test_a_busy_batch_is_sampled_errors_first_and_every_request_counted():
    feed, hub, clock, services = feed_for_tests()
    seen = []
    hub.publish = lambda kind, obj: seen.append((kind, obj))
    cap, recent = livefeed.MAX_REQUEST_EVENTS, livefeed.RECENT_REQUESTS
    n = 1000
    for i in range(n):
        finish(feed, services, status=502 if i in (3, n - 200) else 200, started=900.0 + i,
               request_id=f"r{i}")
    assert feed.flush() == cap
    kinds = [k for k, _ in seen]
    assert kinds == ["skipped"] + ["request"] * cap and seen[0][1] == {"count": n - cap}
    ids = [obj["request_id"] for _, obj in seen[1:]]
    # the error among the last RECENT_REQUESTS first (r3 is older than those), then the
    # newest; sent in the order they ended
    assert recent < n - 3 and recent > 200
    assert ids == [f"r{n - 200}"] + [f"r{i}" for i in range(n - cap + 1, n)]
    assert feed.totals()[:2] == (n, 2) and feed.skipped == n - cap


def test_feed_history_is_thinned_for_hello():
    feed, hub, clock, _ = feed_for_tests()
    for i in range(95):
        clock.now += 1
        feed.tick()
    points = feed.history_for_hello()
    assert len(points) == 10 and points[-1] == feed.history[-1]
    assert livefeed.HISTORY_POINTS * livefeed.TICK_S == 3600


def test_models_changes_are_published_once_and_the_hook_replaces_the_source():
    feed, hub, clock, services = feed_for_tests(state="starting")
    seen = []
    hub.publish = lambda kind, obj: seen.append((kind, obj))
    first = feed.first_models()
    assert first["models"][0]["state"] == "loading" and first["mode"] == "single"
    feed.tick()
    assert [k for k, _ in seen] == ["metrics"]
    services.backend.get = lambda: "ready"
    feed.tick()
    assert [k for k, _ in seen] == ["metrics", "metrics", "models"]
    assert seen[-1][1]["models"][0]["state"] == "loaded"
    router = {"models": [{"name": "a", "state": "loading"}], "max": 2, "mode": "router"}
    feed.models_source = lambda: router
    feed.models_changed(router)                 # the hook, with its snapshot
    feed.tick()                                 # no change since: no second models event
    assert [k for k, _ in seen].count("models") == 2 and seen[-1][0] == "metrics"


def test_a_failing_models_source_does_not_stop_the_feed(caplog):
    feed, hub, clock, _ = feed_for_tests()

    def broken():
        raise RuntimeError("boom")
    feed.models_source = broken
    with caplog.at_level(logging.ERROR, logger="gateway"):
        assert feed.models_snapshot()["models"] == []
        feed.tick()
    assert "models snapshot failed" in caplog.text
