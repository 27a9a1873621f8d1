"""Gateway request ids: unique in a process, not shared between processes, safe for the log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llamagw import context

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_ids_are_unique_hex_and_valid_request_ids():
    ids = [context.new_request_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for rid in ids[:10] + ids[-10:]:
        assert len(rid) >= 24 and int(rid, 16) >= 0
        assert context.REQUEST_ID_RE.fullmatch(rid)
    # one random prefix per process, a counter after it
    assert len({rid[:16] for rid in ids}) == 1
    assert int(ids[-1][16:], 16) - int(ids[0][16:], 16) == len(ids) - 1


def test_each_process_draws_its_own_prefix():
    code = "from llamagw import context; print(context.new_request_id())"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, capture_output=True,
                           text=True, timeout=30, check=True).stdout.strip() for _ in range(2)}
    assert len(outs) == 2 and all(len(o) >= 24 for o in outs)
    assert len({o[:16] for o in outs}) == 2
