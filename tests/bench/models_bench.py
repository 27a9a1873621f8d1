"""Case (f) of `make bench` (tests/bench/run_bench.py): many models, the real llama-server as a
router over two copies of the demo model (alpha, beta).

f1, a switch (MODELS_MAX=1): time to first token of a streamed chat for the model that is not
    loaded, so that it must be switched in (the other unloaded first). Through the gateway (its
    own router with --no-models-autoload, as entrypoint.sh starts it: the gateway drains and
    unloads the old model, loads the new one and forwards) against router mode called directly
    (a second, identical router with autoload on: it evicts and loads by itself). Alternating
    alpha, beta, alpha ... so that every request is a switch; gateway and direct interleaved per
    round. The gateway's own added time is the median of the per-round differences.
f2, a loaded model while another loads (MODELS_MAX=2): latency of small chats to alpha, one at
    a time through the gateway, in windows with nothing else going on and in windows where a
    second client loads beta again and again (admin unload, then a chat for beta, which loads
    it). p50 / p99 of each kind of window, interleaved. For reference, the same chats straight
    to the router's socket, alternating with the gateway's in the same windows: what a load
    costs a loaded model on this machine without the gateway.

    Two kinds of loading window. On a GPU worker a load is a process start, a file read and a
    copy to the GPU, while the loaded model's tokens are computed on the GPU: the two do not
    compete for compute. Here both run on the same CPU, so a load slows the loaded model as
    much without the gateway as with it (the "shared CPU" windows, reported for reference).
    The target is judged on the "load aside" windows: every model instance the router starts
    after alpha's is put in the idle scheduling class (SCHED_IDLE: it runs on CPU time nothing
    else wants), which stands in for a load that does not share the compute. The router, the
    gateway and alpha's instance keep their normal class, so what the router and the gateway
    do for a load (spawning, following its state, draining, the catalog) still counts.

Everything listens on 127.0.0.1 or Unix sockets; every child is stopped at the end of its part.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# The harness module (run_bench, which runs as __main__: importing it here would make a second
# copy, with its own registry of children), set by case_g.
rb = None

# Rounds of f1 (each: one switch through the gateway, one direct) and f2 (each: one window of
# each kind, F2_REQUESTS requests each side): the figures are medians and p99s. Short f2
# windows, many rounds: this machine's own noise (a quiet window's p99 moves by a third from one
# window to the next here) then falls on every kind alike.
F1_ROUNDS, F1_ROUNDS_QUICK = 20, 3
F2_ROUNDS, F2_ROUNDS_QUICK = 20, 3
F2_REQUESTS = 50
# Tokens of a measured stream (f1) and of a small chat (f2): the first token is the figure.
STREAM_TOKENS = 8
SMALL_TOKENS = 32
# Per model in the preset: the bench machine's CPUs shared as case d shares them.
PRESET_CTX = 2048
PRESET_PARALLEL = 2
# As in case d: the routers and their model instances on half the CPUs, the gateway, the
# clients and the harness on the others (set by case_g; empty: nothing pinned).
LLAMA_CPUS: set[int] = set()


def _models_dir(bench) -> tuple[Path, Path]:
    """MODELS_DIR with alpha.gguf and beta.gguf, and the preset generated from it as
    entrypoint.sh generates it (scripts/models_preset.py)."""
    models = bench.tmp / "models-f"
    models.mkdir(exist_ok=True)
    for name in ("alpha", "beta"):
        shutil.copyfile(bench.model_path(), models / f"{name}.gguf")
    operator = bench.tmp / "models-f.ini"
    operator.write_text(f"[*]\nthreads = {rb.LLAMA_THREADS}\n")
    preset = bench.tmp / "models-f-preset.ini"
    subprocess.run([sys.executable, str(rb.REPO / "scripts" / "models_preset.py"),
                    "--models-dir", str(models), "--preset", str(operator), "--out", str(preset),
                    "--preload", "", "--ctx", str(PRESET_CTX),
                    "--ngl", str(rb.LLAMA_NGL),
                    "--parallel", str(PRESET_PARALLEL)],
                   check=True, capture_output=True, timeout=60)
    return models, preset


def _start_router(bench, preset: Path, label: str, models_max: int, *,
                  unix: bool) -> tuple:
    where: int | str = str(bench.tmp / f"router-{label}.sock") if unix else rb.free_port()
    if unix and os.path.exists(where):
        os.unlink(where)
    listen = ["--host", where] if unix else ["--host", "127.0.0.1", "--port", str(where)]
    argv = [bench.llama_server_bin(), "--models-preset", str(preset), "--models-max",
            str(models_max), *listen]
    if unix:
        argv.append("--no-models-autoload")     # the gateway decides every load
    cache = bench.tmp / "hf-cache-f"
    cache.mkdir(exist_ok=True)
    child = rb.Child(f"router-{label}", argv, bench.env(LLAMA_CACHE=cache, HF_HOME=cache),
                     bench.logs / f"router-{label}.log")
    if LLAMA_CPUS:
        rb.pin(child.pid, LLAMA_CPUS)           # its model instances inherit it
    rb.wait_until(lambda: rb.http_request(where, "GET", "/health", timeout=2)[0] == 200,
                  rb.LLAMA_LOAD_TIMEOUT, "llama-server's router /health 200", child, period=0.05)
    return child, where


def children_of(pid: int) -> set[int]:
    """The pids of process pid's children (from each of its threads' /proc children list)."""
    out = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return out


class LoadsAside:
    """A watcher that puts every model instance the router starts (other than those in keep)
    and each of their threads in the idle scheduling class, polling every POLL_S while running;
    it moves nothing while `active` is false (it still polls: the same cost in every window).
    A new instance runs a few milliseconds in the normal class before it is seen."""

    POLL_S = 0.002

    def __init__(self, router_pid: int, keep: set[int]):
        self.router_pid, self.keep = router_pid, set(keep)
        self.active = False
        self.moved: set[int] = set()        # instances moved (for the report)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def children(self) -> set[int]:
        return children_of(self.router_pid)

    def idle(self, pid: int) -> None:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    if os.sched_getscheduler(int(tid)) != os.SCHED_IDLE:
                        os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
                except OSError:
                    pass                    # a thread that ended meanwhile
        except OSError:
            pass                            # the instance ended meanwhile

    def _run(self) -> None:
        while not self.stop.wait(self.POLL_S):
            for pid in self.children() - self.keep:
                if self.active:
                    self.moved.add(pid)
                    self.idle(pid)

    def __enter__(self) -> "LoadsAside":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


def chat_body(model: str, tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": tokens, "stream": stream, "temperature": 0, "seed": 42,
            "ignore_eos": True}


def timed_chat(where: int | str, body: dict, headers=(), timeout: float = 60.0
               ) -> tuple[int, float, float]:
    """(status, time to the first content event or the whole answer, total time) of one chat,
    on a new connection (Connection: close)."""
    data = json.dumps(body).encode()
    head = [f"POST {rb.CHAT_PATH} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in headers]
    t0 = time.perf_counter()
    first = None
    raw = b""
    with rb.connect(where, timeout) as s:
        s.settimeout(timeout)
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            raw += piece
            if first is None and (b'"content":"' in raw or not body.get("stream")
                                  and b"\r\n\r\n" in raw):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    return status, first if first is not None else total, total


def _check(status: int, what: str) -> None:
    if status != 200:
        raise RuntimeError(f"case f: {what} answered {status}")


def part_switch(bench, preset: Path, models: Path) -> dict:
    rounds = F1_ROUNDS_QUICK if bench.quick else F1_ROUNDS
    gw_router, gw_sock = _start_router(bench, preset, "f1", 1, unix=True)
    direct, dport = _start_router(bench, preset, "f1-direct", 1, unix=False)
    auth = [("Authorization", f"Bearer {bench.key}")]
    gw, gport = bench.start_gateway(
        gw_sock, "f1", extra_env={"MODELS_DIR": models, "MODELS_MAX": 1},
        check=chat_body("alpha", 1, False))
    try:
        # warm-up: each side has loaded alpha once (file pages cached for both)
        _check(timed_chat(dport, chat_body("alpha", 1, False))[0], "direct warm-up")
        runs = {"gateway": [], "direct": []}
        order = [("gateway", gport, auth), ("direct", dport, ())]
        for rnd in range(rounds):
            model = ("beta", "alpha")[rnd % 2]          # the one not loaded on either side
            for tgt, where, headers in (order if rnd % 2 else order[::-1]):
                status, ttft, total = timed_chat(where, chat_body(model, STREAM_TOKENS, True),
                                                 headers)
                _check(status, f"{tgt} switch to {model}")
                runs[tgt].append({"model": model, "ttft_ms": ttft * 1000,
                                  "total_ms": total * 1000})
                rb.log(f"  f1 {tgt:8s} switch to {model}: first token {ttft * 1000:7.1f} ms")
        diffs = [g["ttft_ms"] - d["ttft_ms"] for g, d in zip(runs["gateway"], runs["direct"])]
        ratios = [g["ttft_ms"] / d["ttft_ms"] for g, d in zip(runs["gateway"], runs["direct"])]
        return {"rounds": rounds, "runs": runs,
                "gateway_ttft_ms": rb.median([r["ttft_ms"] for r in runs["gateway"]]),
                "direct_ttft_ms": rb.median([r["ttft_ms"] for r in runs["direct"]]),
                "ratio": rb.median(ratios), "added_ms": rb.median(diffs)}
    finally:
        bench.stop_gateway(gw, None, "g")
        gw_router.stop()
        direct.stop()


def part_loading(bench, preset: Path, models: Path) -> dict:
    rounds = F2_ROUNDS_QUICK if bench.quick else F2_ROUNDS
    router, sock = _start_router(bench, preset, "f2", 2, unix=True)
    admin_key = "sk-" + secrets.token_urlsafe(32)
    with open(bench.keys_file, "a") as f:          # an admin key for the unloads
        f.write(f"bench-admin:{admin_key} role=admin\n")
    auth = [("Authorization", f"Bearer {bench.key}")]
    admin = [("Authorization", f"Bearer {admin_key}")]
    gw, gport = bench.start_gateway(
        sock, "f2", extra_env={"MODELS_DIR": models, "MODELS_MAX": 2},
        check=chat_body("alpha", 1, False))
    stop = threading.Event()
    loads = [0]

    def churn() -> None:
        """Another client: beta unloaded, then asked for (a load), again and again."""
        while not stop.is_set():
            rb.http_request(gport, "POST", "/admin/models/unload",
                            json.dumps({"model": "beta"}).encode(), admin)
            if stop.is_set():
                break
            if timed_chat(gport, chat_body("beta", 1, False), auth)[0] == 200:
                loads[0] += 1

    def window(loading: bool) -> tuple[list[float], list[float]]:
        thread = None
        if loading:
            stop.clear()
            thread = threading.Thread(target=churn, daemon=True)
            thread.start()
            time.sleep(0.05)
        through, direct = [], []
        body = chat_body("alpha", SMALL_TOKENS, False)
        try:
            for _ in range(F2_REQUESTS):
                for where, headers, out in ((gport, auth, through), (sock, (), direct)):
                    status, _, total = timed_chat(where, body, headers)
                    _check(status, "a chat for the loaded model")
                    out.append(total * 1000)
        finally:
            if thread is not None:
                stop.set()
                thread.join(60)
        return through, direct

    try:
        _check(timed_chat(gport, chat_body("alpha", 1, False), auth)[0], "warm-up")
        kinds = ("quiet", "aside", "shared")
        got = {(side, kind): [] for side in ("gateway", "direct") for kind in kinds}
        # the watcher polls in every window (the same cost everywhere); it moves instances to
        # the idle class only in the "aside" windows
        alpha = children_of(router.pid)                     # the one instance so far
        if len(alpha) != 1:
            raise RuntimeError(f"case g: the router runs {len(alpha)} instances, not alpha's only")
        with LoadsAside(router.pid, alpha) as aside:
            for rnd in range(rounds):
                for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                    aside.active = kind == "aside"
                    through, direct = window(kind != "quiet")
                    got[("gateway", kind)] += through
                    got[("direct", kind)] += direct
                    rb.log(f"  f2 {kind:8s} gateway p50 {rb.percentile(through, 50):6.1f} ms  "
                           f"p99 {rb.percentile(through, 99):6.1f} ms   direct p50 "
                           f"{rb.percentile(direct, 50):6.1f} ms  p99 "
                           f"{rb.percentile(direct, 99):6.1f} ms")
        aside_count = len(aside.moved)
        out = {"rounds": rounds, "requests_per_window": F2_REQUESTS, "beta_loads": loads[0],
               "instances_aside": aside_count}
        for (side, kind), values in got.items():
            out[f"{side}_{kind}_p50_ms"] = rb.percentile(values, 50)
            out[f"{side}_{kind}_p99_ms"] = rb.percentile(values, 99)
        for side in ("gateway", "direct"):
            for kind in ("aside", "shared"):
                out[f"{side}_{kind}_p99_ratio"] = rb.ratio(out[f"{side}_{kind}_p99_ms"],
                                                           out[f"{side}_quiet_p99_ms"])
        # the gateway's own share: what a load costs through it over what it costs direct
        out["aside_gateway_share"] = rb.ratio(out["gateway_aside_p99_ratio"],
                                              out["direct_aside_p99_ratio"])
        out["shared_gateway_share"] = rb.ratio(out["gateway_shared_p99_ratio"],
                                               out["direct_shared_p99_ratio"])
        return out
    finally:
        bench.stop_gateway(gw, None, "g")
        router.stop()


def case_g(bench, harness) -> None:
    global rb, LLAMA_CPUS
    rb = harness
    models, preset = _models_dir(bench)
    own = os.sched_getaffinity(0)
    llama_cpus, rest = rb.split_cpus(own)
    if rest:
        LLAMA_CPUS = llama_cpus
        os.sched_setaffinity(0, rest)     # the gateways and the clients inherit it
    try:
        switch = part_switch(bench, preset, models)
        loading = part_loading(bench, preset, models)
    except Exception:
        rb.log(traceback.format_exc())
        raise
    finally:
        os.sched_setaffinity(0, own)
        LLAMA_CPUS = set()
    bench.results["g"] = {"switch": switch, "loading": loading,
                          "cpus": {"llama": sorted(llama_cpus), "others": sorted(rest)}
                          if rest else None}
    bench.target("g", "switch: time to first token through the gateway within 1.05x of router "
                      "mode direct", f"{switch['ratio']:.3f}x", switch["ratio"] <= 1.05)
    bench.target("g", "switch: the gateway's own added time under 5 ms",
                 f"{switch['added_ms']:.1f} ms", switch["added_ms"] < 5.0)
    bench.target("g", "a loaded model's p99 through the gateway within 1.1x while another "
                      "loads (the load's instance in the idle class, as on a GPU worker)",
                 f"{loading['gateway_aside_p99_ratio']:.2f}x (router direct "
                 f"{loading['direct_aside_p99_ratio']:.2f}x)",
                 loading["gateway_aside_p99_ratio"] <= 1.1)
    bench.target("g", "the gateway's share of that: its loading/quiet p99 ratio over router "
                      "direct's, within 1.1x", f"{loading['aside_gateway_share']:.2f}x "
                                             f"(same CPU: {loading['shared_gateway_share']:.2f}x)",
                 loading["aside_gateway_share"] <= 1.1)


def markdown(f: dict) -> list[str]:
    s, ld = f["switch"], f["loading"]

    def row(label: str, kind: str) -> str:
        return (f"| {label} | {ld[f'gateway_{kind}_p50_ms']:.1f} | "
                f"{ld[f'gateway_{kind}_p99_ms']:.1f} | {ld[f'direct_{kind}_p50_ms']:.1f} | "
                f"{ld[f'direct_{kind}_p99_ms']:.1f} |")

    return [
        "## (g) many models: llama-server's router over two copies of the demo model", "",
        f"Switch (MODELS_MAX=1), time to first token of a streamed chat for the model not "
        f"loaded (median of {s['rounds']} switches each):", "",
        "| through | first token (ms) |", "|---|---|",
        f"| gateway (drains, unloads, loads, forwards) | {s['gateway_ttft_ms']:.1f} |",
        f"| router mode direct (evicts and loads itself) | {s['direct_ttft_ms']:.1f} |",
        f"| gateway / direct (median of per-round ratios) | {s['ratio']:.3f}x |",
        f"| gateway's added time (median of per-round differences) | {s['added_ms']:.1f} ms |",
        "",
        f"A loaded model while another loads (MODELS_MAX=2): chats of {SMALL_TOKENS} tokens to "
        f"alpha one at a time, through the gateway and straight to the router in turn, "
        f"{ld['requests_per_window']} each per window, {ld['rounds']} window(s) of each kind; "
        f"beta was loaded {ld['beta_loads']} times meanwhile ({ld['instances_aside']} of its "
        f"instances put aside):", "",
        "| windows | gateway p50 (ms) | gateway p99 (ms) | direct p50 (ms) | direct p99 (ms) |",
        "|---|---|---|---|---|",
        row("nothing else loading", "quiet"),
        row("beta loading again and again, its instances in the idle class", "aside"),
        row("beta loading again and again on the same CPU", "shared"),
        f"| ratio of p99, loading aside / quiet | | {ld['gateway_aside_p99_ratio']:.2f}x | | "
        f"{ld['direct_aside_p99_ratio']:.2f}x |",
        f"| ratio of p99, loading on the same CPU / quiet | | "
        f"{ld['gateway_shared_p99_ratio']:.2f}x | | {ld['direct_shared_p99_ratio']:.2f}x |", "",
        "The routers and their model instances run on half the CPUs (as in case d). On a GPU "
        "worker a load (a process start, a file read, a copy to the GPU) does not compete with "
        "the loaded model's compute; here it runs on the CPU that computes alpha's tokens, and "
        "slows direct requests as much as the gateway's (the same-CPU row). The target is read "
        "on the windows where beta's instances run in the idle scheduling class, which stands "
        "in for a load that does not share the compute; the router, the gateway and alpha keep "
        "their class, so the router's own work for a load (a few ms of CPU per load, next to "
        "alpha's compute here) still counts, through the gateway and direct alike. The "
        "gateway's share is its loading/quiet ratio over direct's: "
        f"{ld['aside_gateway_share']:.2f}x (load aside), {ld['shared_gateway_share']:.2f}x "
        "(same CPU).", ""]
