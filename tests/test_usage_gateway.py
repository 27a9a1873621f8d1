"""Usage through the gateway (issue 28), in-process against the fake llama-server: the ledger row
of every keyed request against what the fake answered, cut streams, the tokens metric against
the ledger, a failing ledger disk, token limits (429, headers, a stream counted when it ends, the
day's usage seeded from the ledger at start) and fair sharing of the backend slots."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time

from helpers import (ALICE, BOB, KEY_FILE, Stack, aio, chat, eventually, get, post)
from llamagw.observe import usage

DAVE = "sk-dave-0123456789abcdef0"       # tpm=20
ERIN = "sk-erin-0123456789abcdef0"       # tpd=25
ROOT = "sk-root-0123456789abcdef0"       # an admin key
FAY = "sk-fay-0123456789abcdef00"        # rpm=1 tpm=100
KEYS = (KEY_FILE + f"dave:{DAVE} tpm=20\n" + f"erin:{ERIN} tpd=25\n"
        + f"root:{ROOT} role=admin\n" + f"fay:{FAY} rpm=1 tpm=100\n")
# The fake counts a prompt's words as its tokens: chat() asks "hello there", 2 tokens.
PROMPT = 2


def tokens_metric(text: str) -> dict[tuple[str, str, str], int]:
    out = {}
    for m in re.finditer(r'^gateway_tokens_total\{key_id="([^"]*)",model="([^"]*)",'
                         r'kind="([^"]*)"\} (\d+)$', text, re.M):
        out[(m.group(1), m.group(2), m.group(3))] = int(m.group(4))
    return out


# ---- the ledger ----------------------------------------------------------------------------------
@aio
async def test_each_keyed_request_is_one_row_of_what_llama_server_answered(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        body1 = post("/v1/chat/completions", chat(events=3))
        r1 = await s.one(body1)
        r2 = await s.one(post("/v1/chat/completions", chat(stream=True, events=4, cache_n=1)))
        r3 = await s.one(post("/v1/embeddings", {"model": "emb", "input": "one two three"},
                              key=BOB))
        r4 = await s.one(get("/v1/models"))
        # not keyed requests: no key (401), no route (404), a preflight, the gateway's own
        assert (await s.one(post("/v1/chat/completions", chat(), key=None))).status == 401
        assert (await s.one(get("/v1/nothing"))).status == 404
        assert (await s.one(get("/ping", key=None))).status == 200
        assert [r.status for r in (r1, r2, r3, r4)] == [200] * 4
        rows = await s.usage_rows()
        assert [(r["key_id"], r["route"], r["status"], r["outcome"]) for r in rows] == [
            ("alice", "chat_completions", 200, "ok"), ("alice", "chat_completions", 200, "ok"),
            ("bob", "embeddings", 200, "ok"), ("alice", "models", 200, "ok")]
        one, stream, emb, models = rows
        assert [r["request_id"] for r in rows] == [r.get("x-request-id")
                                                   for r in (r1, r2, r3, r4)]
        # the counts and model the fake answered (its usage), what the client saw too
        assert r1.json()["usage"]["completion_tokens"] == 3
        assert (one["model"], one["prompt_tokens"], one["completion_tokens"],
                one["cached_tokens"]) == ("demo", PROMPT, 3, None)
        assert (stream["model"], stream["prompt_tokens"], stream["completion_tokens"],
                stream["cached_tokens"]) == ("demo", PROMPT, 4, 1)
        assert (emb["model"], emb["prompt_tokens"], emb["completion_tokens"]) == ("emb", 3, None)
        assert (models["prompt_tokens"], models["completion_tokens"]) == (None, None)
        head, _, _ = body1.partition(b"\r\n\r\n")
        assert one["bytes_in"] == len(body1) - len(head) - 4
        assert one["bytes_out"] == len(r1.body) and stream["bytes_out"] > 0
        for row in rows:
            assert 0 < row["ttfb_ms"] <= row["duration_ms"] < 5000
            assert abs(row["ts_ms"] / 1000 - time.time()) < 10
        path = s.ledger.path
    # stopped: one self-contained file, and no prompt or secret in it
    assert not os.path.exists(path + "-wal")
    with open(path, "rb") as f:
        data = f.read()
    assert b"hello there" not in data and ALICE.encode() not in data and b"one two" not in data


@aio
async def test_a_cut_stream_counts_what_was_generated(tmp_path):
    async with Stack(tmp_path, usage=True) as s:
        # llama-server closes after 3 of 6 events: no counts came
        r = await s.one(post("/v1/chat/completions", chat(stream=True, events=6, drop_after=3)))
        assert r.status == 200 and not r.complete
        # the client leaves mid-stream
        c = await s.client()
        await c.send(post("/v1/chat/completions",
                          chat(stream=True, events=200, interval=0.01)))
        await c.head()
        await c.line()
        c.abort()
        await s.fake.wait_for(lambda: s.fake.disconnects == 1)
        await eventually(lambda: s.gw.in_flight == 0)
        cut, gone = await s.usage_rows()
        assert (cut["outcome"], cut["prompt_tokens"], cut["completion_tokens"]) == (
            "upstream_error", None, 3)
        assert gone["outcome"] == "client_closed" and gone["prompt_tokens"] is None
        assert 1 <= gone["completion_tokens"] <= s.fake.tokens_predicted - 3 < 200


@aio
async def test_the_tokens_metric_agrees_with_the_ledger(tmp_path):
    async with Stack(tmp_path, usage=True) as s:
        bodies = [(chat(events=2), ALICE), (chat(stream=True, events=5), ALICE),
                  ({**chat(events=4), "model": "other"}, ALICE), (chat(events=1), BOB),
                  ({**chat(stream=True, events=3, drop_after=2), "model": "other"}, BOB),
                  ({"model": "emb", "input": ["a b", "c"]}, BOB)]
        for body, key in bodies:
            path = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
            await s.one(post(path, body, key=key))
        await eventually(lambda: s.gw.in_flight == 0)
        rows = await s.usage_rows()
        assert len(rows) == len(bodies)
        from_ledger: dict = {}
        for row in rows:
            for kind in ("prompt", "completion"):
                n = row[f"{kind}_tokens"]
                if n:
                    label = (row["key_id"], row["model"] or "-", kind)
                    from_ledger[label] = from_ledger.get(label, 0) + n
        scraped = tokens_metric((await s.one(get("/metrics"))).body.decode())
        assert scraped == from_ledger
        assert set(m for _, m, _ in scraped) == {"demo", "other", "emb"}


@aio
async def test_an_unwritable_ledger_drops_counted_rows_and_serving_goes_on(tmp_path):
    async with Stack(tmp_path, usage=True) as s:
        # The usage folder cannot be made (a file is in its place): every open fails.
        with open(os.path.join(s.config.data_dir, "usage"), "w") as f:
            f.write("not a folder\n")
        for _ in range(3):
            r = await s.one(post("/v1/chat/completions", chat()))
            assert r.status == 200
        await asyncio.to_thread(s.ledger.sync)
        assert s.ledger.dropped == 3 and s.ledger.written == 0
        text = (await s.one(get("/metrics"))).body.decode()
        assert re.search(r"^gateway_usage_rows_dropped_total 3$", text, re.M)


@aio
async def test_a_read_only_ledger_file_drops_counted_rows(tmp_path):
    import sqlite3

    def read_only(path):          # the disk went read-only under a file that exists
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
        return conn

    async with Stack(tmp_path, usage=True) as s:
        s.ledger.close()
        led = usage.Ledger(s.ledger.path)
        led.record((time.time(), "r0", "alice", None, "x", 200, "ok", 1, 1, None, 1.0, 1.0, 1, 1))
        assert led.close()                               # the file exists, migrated, 1 row
        s.gw.ledger = s.ledger = usage.Ledger(led.path, connect=read_only)
        for _ in range(2):
            assert (await s.one(post("/v1/chat/completions", chat()))).status == 200
        await asyncio.to_thread(s.ledger.sync)
        assert s.ledger.dropped == 2 and s.ledger.written == 0
        assert "readonly" in (s.ledger.last_error or "").replace(" ", "")
        text = (await s.one(get("/metrics"))).body.decode()
        assert re.search(r"^gateway_usage_rows_dropped_total 2$", text, re.M)


# ---- token limits --------------------------------------------------------------------------------
@aio
async def test_a_key_over_its_tokens_per_minute_gets_429_with_retry_after(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        r1 = await s.one(post("/v1/chat/completions", chat(events=15), key=DAVE))   # 17 tokens
        assert r1.status == 200
        assert (r1.get("x-ratelimit-limit-tokens"), r1.get("x-ratelimit-remaining-tokens")) \
            == ("20", "20")
        r2 = await s.one(post("/v1/chat/completions", chat(events=1), key=DAVE))    # 3 more
        assert r2.status == 200 and r2.get("x-ratelimit-remaining-tokens") == "3"
        r3 = await s.one(post("/v1/chat/completions", chat(), key=DAVE))
        assert r3.status == 429
        assert r3.error()["code"] == "token_limit_exceeded" and "20" in r3.error()["message"]
        assert (r3.get("x-ratelimit-limit-tokens"), r3.get("x-ratelimit-remaining-tokens")) \
            == ("20", "0")
        assert 1 <= int(r3.get("retry-after")) <= 60
        assert len(s.fake.requests) == 2                 # refused before llama-server
        # a key without token limits: no token headers (the request ones only)
        r = await s.one(post("/v1/chat/completions", chat(), key=ALICE))
        assert r.status == 200 and r.get("x-ratelimit-limit-tokens") is None
        assert r.get("x-ratelimit-limit") is not None
        rows = await s.usage_rows()
        assert [(r["key_id"], r["status"], r["outcome"]) for r in rows][2] == (
            "dave", 429, "token_limit_exceeded")
        text = (await s.one(get("/metrics"))).body.decode()
        assert re.search(r'^gateway_rate_limited_total\{key_id="dave"\} 1$', text, re.M)
        # every answer to a key with a token limit says where it stands, other refusals too
        assert (await s.one(post("/v1/chat/completions", chat(), key=FAY))).status == 200
        r = await s.one(post("/v1/chat/completions", chat(), key=FAY))
        assert r.status == 429 and r.error()["code"] == "rate_limit_exceeded"
        assert (r.get("x-ratelimit-limit-tokens"), r.get("x-ratelimit-remaining-tokens")) == (
            "100", "93")


@aio
async def test_a_stream_counts_when_it_ends_and_a_cut_one_counts_its_events(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        # erin: tpd=25. A stream of 20 events (22 tokens) runs; meanwhile nothing is charged.
        c = await s.client()
        await c.send(post("/v1/chat/completions", chat(stream=True, events=20, interval=0.02),
                          key=ERIN))
        r = await s.one(post("/v1/chat/completions", chat(), key=ERIN))          # 7 tokens
        assert r.status == 200 and r.get("x-ratelimit-remaining-tokens") == "25"
        streamed = await c.response()
        assert streamed.complete and streamed.get("x-ratelimit-remaining-tokens") == "25"
        await eventually(lambda: s.gw.in_flight == 0)
        r = await s.one(post("/v1/chat/completions", chat(), key=ERIN))
        assert r.status == 429 and r.get("x-ratelimit-remaining-tokens") == "0"
        # the day's window: until the next UTC midnight
        to_midnight = (math.floor(time.time() / 86400) + 1) * 86400 - time.time()
        assert abs(int(r.get("retry-after")) - to_midnight) <= 2
        # dave: tpm=20. A stream cut after 10 of 30 events counts 10.
        r = await s.one(post("/v1/chat/completions",
                             chat(stream=True, events=30, drop_after=10), key=DAVE))
        assert r.status == 200 and not r.complete
        await eventually(lambda: s.gw.in_flight == 0)
        r = await s.one(post("/v1/chat/completions", chat(), key=DAVE))
        assert r.status == 200 and r.get("x-ratelimit-remaining-tokens") == "10"


@aio
async def test_the_days_usage_survives_a_restart(tmp_path):
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        for _ in range(4):                               # 4 x 7 tokens: over erin's 25
            assert (await s.one(post("/v1/chat/completions", chat(), key=ERIN))).status == 200
        assert (await s.one(post("/v1/chat/completions", chat(), key=ERIN))).status == 429
    # a new gateway on the same DATA_DIR reads today's tokens from its ledger before serving
    async with Stack(tmp_path, usage=True, key_file=KEYS) as s:
        r = await s.one(post("/v1/chat/completions", chat(), key=ERIN))
        assert r.status == 429 and r.error()["code"] == "token_limit_exceeded"
        assert s.fake.requests == []
        assert s.gw.admission.budget.used("erin")[1] == 28


# ---- fair sharing --------------------------------------------------------------------------------
@aio
async def test_a_single_request_is_served_before_a_busy_keys_queue(tmp_path):
    env = {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "100", "QUEUE_TIMEOUT": "10",
           "MAX_CONCURRENT_REQUESTS_PER_KEY": "100", "MAX_REQUESTS_PER_MINUTE": "1000",
           "REQUEST_TIMEOUT": "5"}
    async with Stack(tmp_path, env) as s:
        def ask(tag: str, key: str, **fake) -> bytes:
            body = chat(**fake)
            body["messages"][0]["content"] = tag
            return post("/v1/chat/completions", body, key=key)

        first = await s.client()
        await first.send(ask("alice-running", ALICE, delay_first_byte=0.5))
        await s.fake.wait_for(lambda: len(s.fake.requests) == 1)
        queued = []
        for i in range(50):                              # alice queues 50 more
            c = await s.client()
            await c.send(ask(f"alice-{i}", ALICE))
            queued.append(c)
        await eventually(lambda: s.gw.admission.slots.waiting == 50)
        light = await s.client()
        await light.send(ask("bob-single", BOB))        # then bob's single request
        await eventually(lambda: s.gw.admission.slots.waiting == 51)
        assert (await first.response()).status == 200
        assert (await light.response()).status == 200
        for c in queued:
            assert (await c.response(timeout=10)).status == 200
        order = [r.json()["messages"][0]["content"] for r in s.fake.requests]
        assert order[:2] == ["alice-running", "bob-single"]
        assert order[2:] == [f"alice-{i}" for i in range(50)]       # alice's in her order


@aio
async def test_without_the_ledger_token_limits_still_apply(tmp_path):
    async with Stack(tmp_path, key_file=KEYS) as s:          # USAGE_ENABLED=false: no ledger
        assert s.gw.ledger is None
        for _ in range(3):                                   # 3 x 7 tokens: over dave's 20
            assert (await s.one(post("/v1/chat/completions", chat(), key=DAVE))).status == 200
        r = await s.one(post("/v1/chat/completions", chat(), key=DAVE))
        assert r.status == 429 and r.error()["code"] == "token_limit_exceeded"
        r = await s.one(get("/admin/usage", key=ROOT))
        assert r.status == 200 and r.json() == {"rows": []}
        assert not os.path.exists(s.config.usage_dir)
        text = (await s.one(get("/metrics"))).body.decode()
        assert re.search(r"^gateway_usage_rows_dropped_total 0$", text, re.M)
