"""tests/bench/hotpath.py drives the real request path in memory: it must keep working (it
raises when the answer is not a 200 or a stream does not end)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hotpath  # noqa: E402


def _keys(tmp_path) -> str:
    path = tmp_path / "keys"
    path.write_text(f"hotpath:{hotpath.KEY} rpm=10000000 concurrency=100000\n")
    os.chmod(path, 0o600)
    return str(tmp_path)


def test_hotpath_measures_requests_through_the_whole_gateway(tmp_path):
    tmp = _keys(tmp_path)
    loop_cpu: list[float] = []
    assert asyncio.run(hotpath.run(tmp, 50, sse=False, loop_cpu=loop_cpu)) > 0
    assert len(loop_cpu) == 1 and loop_cpu[0] > 0
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 50 and all('"status":200' in line for line in lines)
    # the usage ledger is in the measured path: one row per request, written at close
    rows = hotpath.usage.query(hotpath.usage.usage_dir(tmp), group="key")
    assert rows == [{"key_id": "hotpath", "requests": 50, "prompt_tokens": 150,
                     "completion_tokens": 250, "errors": 0}]


def test_hotpath_runs_without_the_ledger(tmp_path):
    tmp = _keys(tmp_path)
    assert asyncio.run(hotpath.run(tmp, 20, sse=False, use_ledger=False)) > 0
    assert not (tmp_path / "usage").exists()


def test_hotpath_measures_relayed_events(tmp_path):
    assert asyncio.run(hotpath.run(_keys(tmp_path), 50, sse=True)) > 0


def test_hotpath_spreads_events_over_many_streams(tmp_path):
    assert asyncio.run(hotpath.run(_keys(tmp_path), 200, sse=True, streams=70)) > 0
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 70 and all('"status":200' in line for line in lines)


def test_hotpath_opens_and_closes_both_connections_per_stream(tmp_path):
    assert asyncio.run(hotpath.run(_keys(tmp_path), 30, sse=False, new_conns=True)) > 0
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 30 and all('"stream":true' in line and '"status":200' in line
                                    for line in lines)


def test_hotpath_sends_a_long_conversation(tmp_path):
    body = hotpath.conversation(30_000)
    assert len(body) >= 30_000 and b"\\n" in body and b'\\"' in body
    assert asyncio.run(hotpath.run(_keys(tmp_path), 20, sse=False, body=body)) > 0
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 20 and all('"status":200' in line for line in lines)
