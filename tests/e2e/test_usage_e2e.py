"""The usage ledger on the real stack (issue 28): what the official OpenAI SDK reports as usage is
what the gateway's ledger holds for those requests, row by row (prompt, completion and cached
tokens, the model), and what GET /admin/usage adds up for the key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import openai
import pytest
from e2e_stack import REPO, request, stack  # noqa: F401 (fixtures)

# The writer flushes every 0.25 s; a reload of the key file takes up to 2 s.
WAIT_S = 10.0


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.key, max_retries=0,
                         timeout=60)


def ledger_rows(stack, request_ids: list[str]) -> dict[str, dict]:
    """The ledger rows of these requests, waiting for the writer to flush them."""
    deadline = time.monotonic() + WAIT_S
    while True:
        rows = {}
        for path in (stack.data / "usage").glob("*.sqlite"):
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            conn.row_factory = sqlite3.Row
            try:
                for row in conn.execute("SELECT * FROM usage"):
                    if row["request_id"] in request_ids:
                        rows[row["request_id"]] = dict(row)
            except sqlite3.OperationalError:      # created, not yet migrated
                pass
            finally:
                conn.close()
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_the_sdks_usage_is_the_ledgers(client, stack):
    asked = {}
    messages = [{"role": "user", "content": "Tell me a story about a small robot and a cat"}]
    for i in range(2):       # the same prompt twice: llama-server reuses its cache the second time
        rid = f"e2e-usage-chat-{i}"
        resp = client.chat.completions.create(
            model="demo-tiny-llama", messages=messages, max_tokens=6, temperature=0,
            extra_headers={"X-Request-Id": rid})
        asked[rid] = (resp.model, resp.usage)
    rid = "e2e-usage-stream"
    stream = client.chat.completions.create(
        model="demo-tiny-llama", messages=[{"role": "user", "content": "Count to ten"}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Request-Id": rid})
    with stream:
        chunks = list(stream)
    asked[rid] = (chunks[-1].model, chunks[-1].usage)
    rid = "e2e-usage-completion"
    resp = client.completions.create(model="demo-tiny-llama", prompt="Once upon a time",
                                     max_tokens=5, temperature=0,
                                     extra_headers={"X-Request-Id": rid})
    asked[rid] = (resp.model, resp.usage)

    rid = "e2e-usage-embedding"
    resp = client.embeddings.create(model="demo-tiny-llama", input="a small robot",
                                    extra_headers={"X-Request-Id": rid})
    embedded = resp.usage.prompt_tokens

    rows = ledger_rows(stack, [*asked, rid])
    assert set(rows) == {*asked, rid}
    for rid, (model, used) in asked.items():
        row = rows[rid]
        assert used is not None and used.prompt_tokens >= 1 and used.completion_tokens >= 1
        assert (row["key_id"], row["status"], row["outcome"]) == ("e2e", 200, "ok"), rid
        assert row["model"] == model, rid
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            used.prompt_tokens, used.completion_tokens), rid
        details = getattr(used, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        assert row["cached_tokens"] == cached, rid
        assert 0 < row["ttfb_ms"] <= row["duration_ms"]
    # the second identical prompt came from llama-server's cache, and the ledger says so
    assert rows["e2e-usage-chat-1"]["cached_tokens"] >= 1
    row = rows["e2e-usage-embedding"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (embedded, None) and embedded >= 1

    # GET /admin/usage adds the same up (an admin key, picked up by the key file reload). This
    # module's stack served these requests only.
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "keys.py"), "--file",
                           str(stack.key_file), "add", "e2e-admin", "--role", "admin"],
                          capture_output=True, text=True, timeout=30, check=True)
    admin = made.stdout.strip().splitlines()[-1].strip()
    deadline = time.monotonic() + WAIT_S
    while True:
        status, _, body = request(stack.port, "/admin/usage?group=key",
                                  headers={"Authorization": f"Bearer {admin}"}, timeout=10)
        if status != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, body
    assert json.loads(body) == {"rows": [{
        "key_id": "e2e", "requests": len(asked) + 1,
        "prompt_tokens": sum(u.prompt_tokens for _, u in asked.values()) + embedded,
        "completion_tokens": sum(u.completion_tokens for _, u in asked.values()),
        "errors": 0}]}
