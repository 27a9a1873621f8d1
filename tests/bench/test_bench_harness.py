"""The benchmark harness's own arithmetic (tests/bench/run_bench.py): the figures in the README
come from these helpers, so their edge cases are pinned here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


LLAMA_METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 29
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 1540
llamacpp:tokens_predicted_seconds_total 0.77
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 200
llamacpp:n_busy_slots_per_decode 7.7
"""


def test_llama_counters_are_read_from_llama_servers_prometheus_text():
    assert run_bench.parse_llama_counters(LLAMA_METRICS) == {
        "n_decode_total": 200.0, "tokens_predicted_total": 1540.0,
        "tokens_predicted_seconds_total": 0.77}
    # a value that is not a number, or no counters at all: left out, never a crash
    assert run_bench.parse_llama_counters("llamacpp:n_decode_total nan?\nfoo 1\n") == {}


def test_llama_activity_tells_decode_speed_apart_from_tokens_per_step():
    before = {"n_decode_total": 200.0, "tokens_predicted_total": 1540.0}
    after = {"n_decode_total": 1700.0, "tokens_predicted_total": 13040.0}
    assert run_bench.llama_activity(before, after, 5.0) == {
        "decodes_per_s": 300.0, "tokens_per_decode": 11500 / 1500, "gen_ms_per_token": None}
    # no decode step in the run: a rate of 0, no tokens per step
    assert run_bench.llama_activity(before, before, 5.0) == {
        "decodes_per_s": 0.0, "tokens_per_decode": None, "gen_ms_per_token": None}
    # /metrics did not answer (llama-server without --metrics): unknown, not zero
    unknown = {"decodes_per_s": None, "tokens_per_decode": None, "gen_ms_per_token": None}
    assert run_bench.llama_activity({}, after, 5.0) == unknown
    assert run_bench.llama_activity(before, after, 0.0) == unknown


def test_llama_activity_reads_its_own_generation_time_per_token_where_it_has_one():
    before = {"n_decode_total": 200.0, "tokens_predicted_total": 1540.0,
              "tokens_predicted_seconds_total": 0.77}
    after = {"n_decode_total": 1700.0, "tokens_predicted_total": 13040.0,
             "tokens_predicted_seconds_total": 6.52}
    got = run_bench.llama_activity(before, after, 5.0)
    assert got["gen_ms_per_token"] == pytest.approx(5750 / 11500)   # 0.5 ms a token
    assert got["decodes_per_s"] == 300.0
    # no token generated in the run: no time per token (not a division by zero)
    assert run_bench.llama_activity(before, before, 5.0)["gen_ms_per_token"] is None


def _d_side(tokens_per_s, decodes_per_s, tokens_per_decode):
    return {"tokens_per_s": tokens_per_s, "ttft_p50_ms": 3.0, "ttft_p99_ms": 5.0, "failed": 0,
            "decodes_per_s": decodes_per_s, "tokens_per_decode": tokens_per_decode,
            "cpu_pct": {"llama": 100.0}}


MACHINE = {"date": "now", "cpu_model": "cpu", "cpus_usable": 2, "memory_mb": 1, "python": "3",
           "platform": "linux", "git_commit": "abc", "loadavg_start": (0, 0, 0),
           "loadavg_end": (0, 0, 0)}


def _d_markdown(out, summary, **extra) -> str:
    bench = run_bench.Bench(SimpleNamespace(quick=True, out=str(out), profile=False))
    try:
        bench.results["d"] = {"rounds": 1, "duration_s": 2, "max_tokens": 96,
                              "parallel": {8: {"runs": {}, "summary": summary}}, **extra}
        return bench.markdown(MACHINE)
    finally:
        bench.cleanup()


def test_case_d_table_shows_llama_servers_decode_steps_and_tokens_per_step(tmp_path):
    summary = {"gateway": _d_side(2300.0, 300.0, 7.66), "direct": _d_side(2600.0, 340.0, 7.64),
               "paired": {"tokens_per_s": 0.885, "decodes_per_s": 0.882}}
    md = _d_markdown(tmp_path / "1", summary)
    assert "| 8 | llama-server decode steps/s | 300 | 340 | 0.88 |" in md
    # no paired ratio for tokens per step: the ratio of the two medians
    assert "| 8 | llama-server tokens per step | 7.66 | 7.64 | 1.00 |" in md
    # a side without the counters (None) shows a dash, not a crash
    summary["gateway"]["decodes_per_s"] = None
    md = _d_markdown(tmp_path / "2", summary)
    assert "| 8 | llama-server decode steps/s | – | 340 | 0.88 |" in md


def test_case_d_table_shows_the_bare_relay_and_llama_servers_own_time_per_token(tmp_path):
    summary = {"gateway": _d_side(2300.0, 300.0, 7.66), "direct": _d_side(2600.0, 340.0, 7.64),
               "pyrelay": _d_side(2400.0, 310.0, 7.70),
               "paired": {"tokens_per_s": 0.885, "decodes_per_s": 0.882,
                          "gen_ms_per_token": 1.05, "tokens_per_s_pyrelay": 0.923}}
    summary["gateway"]["gen_ms_per_token"] = 0.525
    summary["direct"]["gen_ms_per_token"] = 0.5
    summary["pyrelay"]["gen_ms_per_token"] = 0.52
    summary["pyrelay"]["cpu_pct"] = {"pyrelay": 12.0}
    md = _d_markdown(tmp_path / "1", summary)
    assert ("| 8 | llama-server ms per token generated, a slot's (its own timer) | 0.525 | 0.500 "
            "| 1.05 |") in md
    assert "| 8 | tokens/s, bare Python relay for reference | 2400 | 2600 | 0.92 |" in md
    assert ("| 8 | llama-server ms per token generated, bare Python relay for reference | 0.520 "
            "| 0.500 | 1.04 |") in md
    assert "| 8 | CPU, bare Python relay for reference | pyrelay 12% | | |" in md
    assert "`pyrelay.py`, as in case (a)" in md
    # a run without the relay (an older result): no relay rows, no note
    del summary["pyrelay"]
    md = _d_markdown(tmp_path / "2", summary)
    assert "bare Python relay" not in md and "`pyrelay.py`, as in case (a)" not in md


def test_logged_stream_ttfb_reads_every_access_log_and_only_streams(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "api_access.log.1").write_text(
        '{"status":200,"outcome":"ok","stream":true,"ttfb_ms":12.5}\n'
        'not json\n'
        '{"status":200,"outcome":"ok","stream":false,"ttfb_ms":1.0}\n')
    (logs / "api_access.log").write_text(
        '{"status":200,"outcome":"ok","stream":true,"ttfb_ms":40}\n'
        '{"status":504,"outcome":"upstream_timeout","stream":true,"ttfb_ms":null}\n')
    assert sorted(run_bench.logged_stream_ttfb_ms(tmp_path)) == [12.5, 40]
    assert run_bench.access_outcomes(tmp_path) == {"200 ok": 3, "504 upstream_timeout": 1}
    assert run_bench.logged_stream_ttfb_ms(tmp_path / "none") == []


def test_case_d_cpus_split_llama_servers_half_from_everyone_elses():
    assert run_bench.split_cpus({0, 1}) == ({0}, {1})
    assert run_bench.split_cpus({3, 1, 2, 0}) == ({0, 1}, {2, 3})
    assert run_bench.split_cpus({4, 6, 9}) == ({4}, {6, 9})
    # one CPU: nothing to split, nothing pinned
    assert run_bench.split_cpus({5}) == ({5}, set())
    assert run_bench.cpu_list([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert run_bench.cpu_list([]) == "–"


_THREADS_CHILD = """
import os, sys, threading, time
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()    # a thread before the pinning
print("ready", flush=True)
sys.stdin.readline()
ids = []
def later():
    ids.append(threading.get_native_id())
    stop.wait()
t = threading.Thread(target=later, daemon=True)            # and one after it
t.start()
while not ids:
    time.sleep(0.01)
print(sorted(os.sched_getaffinity(ids[0])), flush=True)
"""


def test_pin_moves_every_thread_and_threads_started_later_inherit_it():
    cpus = {min(os.sched_getaffinity(0))}
    child = subprocess.Popen([sys.executable, "-c", _THREADS_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert run_bench.pin(child.pid, cpus) == 2     # the main thread and the first one
        assert run_bench.cpus_of(child.pid) == sorted(cpus)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == str(sorted(cpus))
        assert run_bench.cpus_of(child.pid) == sorted(cpus)
    finally:
        child.kill()
        child.wait()


def test_case_d_report_says_where_llama_server_ran_and_shows_the_unpinned_reference(tmp_path):
    summary = {"gateway": _d_side(2300.0, 300.0, 7.66), "direct": _d_side(2350.0, 305.0, 7.64),
               "paired": {"tokens_per_s": 0.99, "decodes_per_s": 0.985}}
    md = _d_markdown(tmp_path / "1", summary,
                     cpus={"llama": [0], "others": [1], "llama_seen": [0]},
                     unpinned={"rounds": 3, "tokens_per_s": {"gateway": 2200.0, "direct": 2400.0},
                               "decodes_per_s": 0.93, "paired": 0.915})
    assert "llama-server runs on CPU 0 (its threads were seen on 0)" in md
    assert "the load client and the harness on CPU 1" in md
    assert "| 8 | tokens/s, nothing pinned, for reference (3 rounds) | 2200 | 2400 | 0.92 |" in md
    assert "| 8 | llama-server decode steps/s ratio, nothing pinned | | | 0.93 |" in md
    # a run on one CPU pins nothing and says nothing of it
    md = _d_markdown(tmp_path / "2", summary, cpus=None)
    assert "llama-server runs on CPU" not in md and "nothing pinned" not in md


def test_case_g_table_shows_both_parts():
    import models_bench
    switch = {"rounds": 20, "gateway_ttft_ms": 212.6, "direct_ttft_ms": 211.5, "ratio": 1.007,
              "added_ms": 1.4}
    loading = {"rounds": 20, "requests_per_window": 50, "beta_loads": 40, "instances_aside": 9,
               "aside_gateway_share": 0.99, "shared_gateway_share": 1.02,
               **{f"{side}_{kind}_p{p}_ms": 1.0 + p for side in ("gateway", "direct")
                  for kind in ("quiet", "aside", "shared") for p in (50, 99)},
               **{f"{side}_{kind}_p99_ratio": 1.0 for side in ("gateway", "direct")
                  for kind in ("aside", "shared")}}
    text = "\n".join(models_bench.markdown({"switch": switch, "loading": loading}))
    assert "| gateway (drains, unloads, loads, forwards) | 212.6 |" in text
    assert "| gateway's added time (median of per-round differences) | 1.4 ms |" in text
    assert "beta was loaded 40 times" in text and "(9 of its instances put aside)" in text
    assert "0.99x (load aside), 1.02x (same CPU)" in text
    assert text.count("| 51.0 | 100.0 | 51.0 | 100.0 |") == 3      # quiet, aside, same CPU


def test_loads_aside_moves_new_children_to_the_idle_class_only_while_active():
    """Case g's watcher: a child the parent starts after the kept one goes to SCHED_IDLE (all
    its threads) while the watcher is active; the kept child and the parent keep their class."""
    import models_bench
    code = ("import subprocess, sys, time\n"
            "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])]\n"
            "print(kids[0].pid, flush=True)\n"
            "sys.stdin.readline()\n"
            "kids.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']))\n"
            "print(kids[1].pid, flush=True)\n"
            "sys.stdin.readline()\n"
            "[k.kill() for k in kids]\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        kept = int(parent.stdout.readline())
        with models_bench.LoadsAside(parent.pid, {kept}) as watcher:
            assert watcher.children() == {kept}
            parent.stdin.write("\n")
            parent.stdin.flush()
            new = int(parent.stdout.readline())
            time.sleep(0.1)
            assert os.sched_getscheduler(new) != os.SCHED_IDLE       # not active yet
            watcher.active = True
            deadline = time.monotonic() + 5
            while os.sched_getscheduler(new) != os.SCHED_IDLE and time.monotonic() < deadline:
                time.sleep(0.01)
            assert os.sched_getscheduler(new) == os.SCHED_IDLE
            assert watcher.moved == {new}
            assert os.sched_getscheduler(kept) == os.SCHED_OTHER
            assert os.sched_getscheduler(parent.pid) == os.SCHED_OTHER
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.wait(10) == 0
    finally:
        parent.kill()
        parent.wait()


def test_every_case_can_be_asked_for_and_runs_by_default():
    """`make bench` runs every case: the default selection is all of them, each accepted alone,
    and each has its method on Bench (a case added to the list but not to the check made the
    default run refuse to start)."""
    args, cases = run_bench.parse_args([])
    assert cases == list(run_bench.CASES)
    for case in run_bench.CASES:
        assert run_bench.parse_args(["--cases", case])[1] == [case]
        assert callable(getattr(run_bench.Bench, f"case_{case}"))
    with pytest.raises(SystemExit):
        run_bench.parse_args(["--cases", "a,z"])


def test_case_i_figures_and_table():
    """Case (i): medians per part, the ratio stack / (download + llama), the boot's own time."""
    import coldstart
    figures = {"download": [0.10, 0.12, 0.11], "llama": [0.09, 0.08, 0.09],
               "stack": [0.40, 0.30, 0.33], "local": [0.2, 0.2, 0.21]}
    s = coldstart.summary(figures)
    assert s["median"] == {"download": 0.11, "llama": 0.09, "stack": 0.33, "local": 0.2}
    assert s["ratio"] == pytest.approx(0.33 / 0.20)
    assert s["boot_own_s"] == pytest.approx(0.13)
    assert s["download_path_s"] == pytest.approx(0.13)
    paced = coldstart.summary({k: [v * 10 for v in vs] for k, vs in figures.items()})
    text = "\n".join(coldstart.markdown({"model_mb": 5.0, "paced_rate": 5e6,
                                         "unpaced": s, "paced": paced}))
    assert "| stack / (download + llama) | 1.65x | 1.65x |" in text
    assert "| the boot's own time (stack - download - llama) | 130 ms | 1300 ms |" in text
    assert "| seconds | CDN unpaced | CDN at 5 MB/s |" in text
