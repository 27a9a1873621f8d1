#!/usr/bin/env python3
"""Usage ledger cost: what record() costs the caller, and whether the writer keeps up.

    python3 tests/bench/usage_bench.py [--rate 2000] [--seconds 5] [--dir DIR]
                                       [--journal wal|delete] [--calls 200000] [--json]

1. caller: the per-request cost on the event loop, in µs: building a UsageRecord and record(),
   building the same values as a tuple and record(), and record() alone (best of 5 runs of
   --calls, the writer running and draining meanwhile).
2. offered load: --rate requests/s for --seconds, paced in 5 ms ticks as an event loop would
   see them; prints the rows/s the writer committed, the largest backlog (rows recorded and not
   yet committed, and as seconds of traffic: the most a kill -9 could lose), drops, and the
   writer thread's CPU per row (an upper bound on what it takes from the event loop: part of it
   is SQLite's C code with the GIL released).
3. capacity: 100,000 rows recorded at once, time until all are committed (rows/s).
4. writer GIL share: the writer's per-row work that holds the GIL (taking a record's values and
   binding its 14 parameters; SQLite's own work runs with the GIL released) measured alone, as a
   no-op INSERT fed the same rows: an upper bound on what each row's write takes from the event
   loop on a machine with a core to spare for the writer's C part. On a single core the whole
   writer CPU per row (section 2) competes with the loop instead.

The issue's targets: caller + writer GIL time <= 3 µs per request; the writer keeps up at 2,000
requests/s (backlog stays under one flush interval's worth, nothing dropped). Figures depend on
the machine and its load: compare runs on the same machine.

--json runs the offered load (2.) only and prints its figures as one JSON object: `make bench`'s
case (f) (tests/bench/run_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from llamagw.observe.usage import (BATCH_ROWS, MIGRATIONS, Ledger, UsageRecord,  # noqa: E402
                                   _values)

KEYS = ("alice", "bob", "carol", "dave")


def build(i: int, now: float) -> UsageRecord:
    return UsageRecord(now, "req-%d" % i, KEYS[i & 3], "qwen2.5-0.5b", "/v1/chat/completions",
                       200, "ok", 31, 57, None, 812.5, 40.25, 412, 1873)


def caller_cost(path: str, calls: int) -> tuple[float, float, float]:
    """Best of 5: (UsageRecord + record(), tuple + record(), record() alone) in µs per call."""
    led = Ledger(path, retention_days=None, max_pending=calls + 1)
    try:
        best = [float("inf")] * 3
        record = led.record
        for _ in range(5):
            now = time.time()
            t0 = time.perf_counter_ns()
            for i in range(calls):
                record(UsageRecord(now, "req-%d" % i, "alice", "qwen2.5-0.5b",
                                   "/v1/chat/completions", 200, "ok", 31, 57, None, 812.5, 40.25,
                                   412, 1873))
            best[0] = min(best[0], (time.perf_counter_ns() - t0) / calls / 1000)
            led.sync(60)
            t0 = time.perf_counter_ns()
            for i in range(calls):
                record((now, "req-%d" % i, "alice", "qwen2.5-0.5b", "/v1/chat/completions", 200,
                        "ok", 31, 57, None, 812.5, 40.25, 412, 1873))
            best[1] = min(best[1], (time.perf_counter_ns() - t0) / calls / 1000)
            led.sync(60)
            recs = [build(i, now) for i in range(calls)]
            t0 = time.perf_counter_ns()
            for r in recs:
                record(r)
            best[2] = min(best[2], (time.perf_counter_ns() - t0) / calls / 1000)
            led.sync(60)
        assert led.dropped == 0, led.stats()
        return best[0], best[1], best[2]
    finally:
        led.close(60)


def offered_load(path: str, rate: int, seconds: float, journal: str) -> dict:
    led = Ledger(path, retention_days=None, journal_mode=journal)
    tick = 0.005
    per_tick = rate * tick
    sent = 0
    max_backlog = 0
    owed = 0.0
    start = time.monotonic()
    cpu0 = led.writer_cpu_s
    loop_cpu = 0.0
    next_tick = start
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        owed += per_tick
        c0 = time.thread_time()
        wall = time.time()
        while owed >= 1.0:
            led.record(build(sent, wall))
            sent += 1
            owed -= 1.0
        loop_cpu += time.thread_time() - c0
        max_backlog = max(max_backlog, sent - led.written - led.dropped)
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start
    written_during = led.written
    t0 = time.monotonic()
    ok = led.close(60)
    drain_s = time.monotonic() - t0
    return {
        "offered_rps": sent / elapsed,
        "committed_rps_during": written_during / elapsed,
        "max_backlog_rows": max_backlog,
        "max_backlog_s": max_backlog / rate,
        "drain_at_close_s": drain_s,
        "written": led.written,
        "dropped": led.dropped,
        "sent": sent,
        "closed_ok": ok,
        "writer_cpu_us_per_row": (led.writer_cpu_s - cpu0) / max(1, led.written) * 1e6,
        "caller_cpu_us_per_row": loop_cpu / max(1, sent) * 1e6,
    }


def capacity(path: str, rows: int) -> float:
    led = Ledger(path, retention_days=None, max_pending=rows + 1)
    try:
        now = time.time()
        recs = [build(i, now) for i in range(rows)]
        t0 = time.monotonic()
        for r in recs:
            led.record(r)
        led.sync(120)
        took = time.monotonic() - t0
        assert led.written == rows, led.stats()
        return rows / took
    finally:
        led.close(60)


def writer_gil_share(rows: int = 100_000) -> float:
    """µs per row of the GIL-holding part of the writer (see the module docstring, 4)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(MIGRATIONS[0][0])
    checks = " AND ".join(f"?{n} IS NULL" for n in range(2, 15))
    noop = f"INSERT INTO usage (ts_ms) SELECT ?1 WHERE {checks}"
    now = time.time()
    recs = [build(i, now) for i in range(rows)]
    best = float("inf")
    for _ in range(3):
        t0 = time.thread_time()
        for i in range(0, rows, BATCH_ROWS):
            conn.execute("BEGIN")
            conn.executemany(noop, map(_values, recs[i:i + BATCH_ROWS]))
            conn.execute("COMMIT")
        best = min(best, (time.thread_time() - t0) / rows * 1e6)
    conn.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="where the ledger files go (default: a temp dir)")
    ap.add_argument("--journal", default="wal", choices=("wal", "delete"))
    ap.add_argument("--json", action="store_true", help="the offered load only, as JSON")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="usage-bench-")
    os.makedirs(base, exist_ok=True)
    try:
        if args.json:
            r = offered_load(os.path.join(base, "load.sqlite"), args.rate, args.seconds,
                             args.journal)
            print(json.dumps({"rate": args.rate, "seconds": args.seconds,
                              "journal": args.journal, **r}))
            return
        build_us, tuple_us, record_us = caller_cost(os.path.join(base, "caller.sqlite"),
                                                    args.calls)
        print(f"caller: UsageRecord + record() {build_us:.2f} us/request; tuple + record() "
              f"{tuple_us:.2f} us; record() alone {record_us:.3f} us (best of 5 x {args.calls})")
        r = offered_load(os.path.join(base, "load.sqlite"), args.rate, args.seconds,
                         args.journal)
        print(f"offered load ({args.journal}): {r['offered_rps']:.0f} req/s for "
              f"{args.seconds:g} s -> committed {r['committed_rps_during']:.0f} rows/s during "
              f"the run (the last interval's rows commit at close); max backlog "
              f"{r['max_backlog_rows']} rows "
              f"({r['max_backlog_s'] * 1000:.0f} ms of traffic); {r['written']}/{r['sent']} "
              f"written, {r['dropped']} dropped; close() drained the rest in "
              f"{r['drain_at_close_s'] * 1000:.0f} ms")
        print(f"cpu per request: caller {r['caller_cpu_us_per_row']:.2f} us (build + record), "
              f"writer thread {r['writer_cpu_us_per_row']:.2f} us per row "
              f"(sum {r['caller_cpu_us_per_row'] + r['writer_cpu_us_per_row']:.2f} us: the "
              f"loop's share on a single core, where the writer's C part competes too)")
        cap = capacity(os.path.join(base, "capacity.sqlite"), 100_000)
        print(f"capacity: {cap:,.0f} rows/s committed by one writer (100,000 rows at once)")
        gil = writer_gil_share()
        print(f"writer GIL share: {gil:.2f} us per row; event loop per request: caller "
              f"{build_us:.2f} + writer {gil:.2f} = {build_us + gil:.2f} us with UsageRecord, "
              f"{tuple_us + gil:.2f} us with a tuple (target <= 3)")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
