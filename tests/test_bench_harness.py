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
