"""The benchmark harness's own arithmetic (tests/bench/run_bench.py): the figures in the README
come from these helpers, so their edge cases are pinned here."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

import run_bench  # noqa: E402


def _run(**cpu):
    return {"cpu_pct": cpu}


def test_median_cpu_counts_a_figure_missing_from_some_runs_as_zero():
    # steal is reported only from STEAL_SHOWN_PCT up, so some rounds lack it
    runs = [_run(gateway=80.0, machine=150.0), _run(gateway=90.0, machine=160.0, steal=5.0),
            _run(gateway=70.0, machine=140.0)]
    out = run_bench.median_cpu(runs)
    assert out == {"gateway": 80.0, "machine": 150.0, "steal": 0.0}
    assert list(out) == ["gateway", "machine", "steal"]   # first-seen order: table columns


def test_median_cpu_of_a_figure_every_run_has():
    runs = [_run(steal=2.0), _run(steal=4.0), _run(steal=3.0)]
    assert run_bench.median_cpu(runs) == {"steal": 3.0}


def test_paired_ratio_pairs_runs_of_the_same_round_against_any_base():
    runs = {"gateway": [{"rps": 50.0}, {"rps": 90.0}, {"rps": 60.0}],
            "direct": [{"rps": 100.0}, {"rps": 100.0}, {"rps": 200.0}],
            "nginx": [{"rps": 40.0}, {"rps": 80.0}, {"rps": 220.0}]}
    # per round 0.5, 0.9, 0.3: the median of the ratios, not the ratio of the medians (0.6)
    assert run_bench.paired_ratio(runs, "rps") == 0.5
    assert run_bench.paired_ratio(runs, "rps", "nginx") == 0.8        # 0.4, 0.8, 1.1
    assert run_bench.paired_ratio(runs, "rps", base="nginx") == 1.125  # 1.25, 1.125, 0.27


def test_machine_busy_grows_with_work_and_reports_steal_apart():
    busy0, steal0 = run_bench.machine_busy()
    end = time.process_time() + 0.3
    while time.process_time() < end:   # 0.3 s of this process's own CPU time
        pass
    busy1, steal1 = run_bench.machine_busy()
    assert busy1 - busy0 >= 0.2   # clock ticks: 0.3 s of work is at least 20 ticks
    assert steal1 >= steal0 >= 0.0


def _interleave(order, rounds, steal_of, turn=False):
    calls = []

    def one(tgt, port, watch):
        calls.append(tgt)
        n = len(calls)
        return {"n": n, "cpu_pct": {"steal": steal_of(n)}}

    # interleave uses nothing of the Bench instance: no processes, no temp files needed here
    runs, again = run_bench.Bench.interleave(None, order, rounds, one, turn)
    return runs, again, calls


ORDER = [("gateway", 1, []), ("direct", 2, [])]


def test_interleave_runs_every_target_each_round_and_turns_the_order_round():
    runs, again, calls = _interleave(ORDER, 3, lambda n: 0.0, turn=True)
    assert calls == ["gateway", "direct", "direct", "gateway", "gateway", "direct"]
    assert again == 0
    assert [r["n"] for r in runs["gateway"]] == [1, 4, 5]
    assert [r["n"] for r in runs["direct"]] == [2, 3, 6]


def test_a_round_with_steal_runs_again_and_the_quieter_attempt_is_kept():
    # run 2 (direct, round 1) lost 30 % of a core: round 1 runs again (runs 3 and 4), quiet
    runs, again, calls = _interleave(ORDER, 2, lambda n: 30.0 if n == 2 else 0.0)
    assert again == 1
    assert len(calls) == 6
    assert [r["n"] for r in runs["gateway"]] == [3, 5]   # a round's runs stay paired
    assert [r["n"] for r in runs["direct"]] == [4, 6]


def test_steal_every_time_is_bounded_and_keeps_the_least_bad_attempt():
    # every attempt loses well over STEAL_RERUN_PCT, each a little less than the one before
    runs, again, calls = _interleave(ORDER, 1, lambda n: 60.0 - n)
    last = run_bench.STEAL_RERUNS
    assert len(calls) == 2 * (1 + last)
    assert again == last
    assert [r["n"] for r in runs["gateway"]] == [2 * last + 1]
    assert [r["n"] for r in runs["direct"]] == [2 * last + 2]
