#!/usr/bin/env python3
"""`make bench`: the gateway against the upstream it fronts, called directly, as ratios.

    python3 tests/bench/run_bench.py --out bench-results [--quick] [--cases a,b,...] [--profile]

The cases (a-i), the method, the C tools, the nginx and bare-relay references and how to read the
figures are in tests/bench/README.md, the one copy. Writes OUT/bench.md (the tables) and
OUT/bench.json (all figures, per round), plus the logs of the processes it started; with
--profile, OUT/profile-<case>.txt holds the top functions. Every child is killed at the end, even
on error. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GATEWAY = REPO / "scripts" / "gateway.py"
FAKE = REPO / "tests" / "fakes" / "fake_llama.py"
LOADCLIENT = HERE / "loadclient.py"
REPLAYFAKE_SRC = HERE / "replayfake.c"
SSELOAD_SRC = HERE / "sseload.c"
WRK_SCRIPT = HERE / "wrk_post.lua"
PYRELAY = HERE / "pyrelay.py"
USAGE_BENCH = HERE / "usage_bench.py"
DASHBOARDS = HERE / "dashboards.py"
ENTRYPOINT = REPO / "entrypoint.sh"
DEMO_MODEL = REPO / "data" / "models" / "demo-tiny-llama.gguf"
DEFAULT_LLAMA_CACHE = Path.home() / ".cache" / "llama-gguf-inference"

# ---- limits and sizes (where the numbers come from) -------------------------------------------
# Open files: 10,000 client sockets + 10,000 upstream sockets in the gateway during case c, plus
# logs and the listener; the kernel's nr_open is far above.
NOFILE_WANTED = 65536
# Gateway limits for the benchmark: nothing may be refused (the benchmark measures the relay, not
# admission), while the checks still run. 10,000,000 is config.py's and keys.py's upper bound.
BENCH_RPM = 10_000_000
BENCH_CONCURRENCY = 100_000
BENCH_MAX_CONNECTIONS = 30_000  # above case c's 10,000 streams
# Case f: the request rate the usage ledger's writer must keep up with (issue 28), and the most a
# row may wait to be written (observe/usage.MAX_FLUSH_INTERVAL_S: what kill -9 may lose).
USAGE_RATE = 2000
USAGE_MAX_BACKLOG_S = 1.0
# Start-up: python binds in ~0.2 s; 15 s means something is broken.
START_TIMEOUT = 15.0
# The real llama-server loads the 5 MB demo model in about a second; 120 s bounds a slow disk.
LLAMA_LOAD_TIMEOUT = 120.0
# Largest answer record_answer() takes from the fake (case b's stream of 200 events is 46 KB).
RECORD_MAX_BYTES = 4 * 1024 * 1024
# Compiling one of the C bench tools (a second or two); more means a broken toolchain.
CC_TIMEOUT = 120.0
# SIGTERM, then SIGKILL after this (the gateway drains for GRACEFUL_TIMEOUT, set to 2 s here).
STOP_TIMEOUT = 10.0
BENCH_GRACEFUL_TIMEOUT = "2"
# Open files the gateway needs besides its sockets (listener, logs, epoll, stdio, pipes).
FD_RESERVE = 128
# replayfake's threads: one per CPU, so that the fake is never held to one core while the
# machine has another (one thread sending an event per TCP write fills its core in cases b and c).
REPLAY_THREADS = len(os.sched_getaffinity(0))
# Case c: TCP connects sseload keeps in progress at once. Four loadclient workers kept 64 each;
# well under the gateway's listen backlog (2048), so a burst never costs a 1 s SYN retry.
C_CONNECT_PARALLEL = 256
# RSS sampling period in case c (VmHWM is the figure; samples give the curve's maximum too).
RSS_SAMPLE_PERIOD = 0.05
# llama-server's CPU threads: half the CPUs, so the gateway and the load generator keep the
# rest (its default, all CPUs, stalls its thread barrier whenever another process runs).
LLAMA_THREADS = max(1, len(os.sched_getaffinity(0)) // 2)
# llama-server's GPU layers in cases d, e and g: 0 (the CPU) unless BENCH_NGL says otherwise,
# e.g. BENCH_NGL=99 on a GPU worker with a CUDA llama-server (LLAMA_SERVER_BIN).
LLAMA_NGL = int(os.environ.get("BENCH_NGL", "0"))
# Case d at 8 streams, with nothing pinned, for reference: rounds (the pinned runs are the target).
UNPINNED_ROUNDS = 3
# Case a: the connection count at which the gateway also runs over TCP to the fake, for reference.
TCP_REFERENCE_CONNS = 16
# Case f: the live dashboards open beside the load (issue 29: throughput in (a) and (b) may drop
# by 3 % at most with 8 of them), and the connections of its (a) part.
DASHBOARDS_OPEN = 8
DASHBOARDS_MAX_DROP = 0.03
F_CONNECTIONS = 16
# The nginx reference (cases a, b, d): connections per process, above case a's 64 and b's 64
# streams on both sides; idle upstream connections kept, as the gateway's pool keeps them.
NGINX_WORKER_CONNECTIONS = 1024
NGINX_UPSTREAM_KEEPALIVE = 128
# Steal time (the host running other guests on our CPUs) is shown in a run's CPU cell from this
# much up (% of one core): below it, it is rounding noise.
STEAL_SHOWN_PCT = 1.0
# A round of cases a, b and d in which a run lost this much of a core to steal runs again, at
# most STEAL_RERUNS times (each re-run costs the round's time again).
STEAL_RERUN_PCT = 5.0
STEAL_RERUNS = 1
# Printed under case (a) when the nginx reference ran.
NGINX_NOTE = ("Reference rows: {version} as a plain reverse proxy in the gateway's place (one "
              "process, C, upstream keep-alive on the same Unix socket, no buffering, no access "
              "log, no key check or limits). It is not a target; it shows what a proxy hop costs "
              "on this machine when the proxy itself is cheap.")
# Printed under case (a) beside the relay's rows.
PYRELAY_NOTE = ("Reference rows, the Python floor: `pyrelay.py`, a byte relay on the gateway's own "
                "event loop and transports (one upstream Unix connection per client connection, "
                "no HTTP parsing, no key check, limits, accounting or log). What the gateway costs "
                "beyond it is the gateway's own work per request; what it costs beyond direct is "
                "a hop in Python. It is not a target.")
# Printed under cases (a) and (b): what their upstream is and what its CPU figure means.
REPLAY_NOTE_A = ("The upstream is replayfake (C): the Python fake's answer, recorded once and sent "
                 "back for every POST in llama-server's writes, at about 9 us of CPU per request "
                 "(the Python fake costs about 55 us, and was the bottleneck of the direct runs "
                 "before it). Direct, wrk and replayfake together fill both CPUs: that is as fast "
                 "as a client gets answers from this upstream on this machine.")
REPLAY_NOTE_B = ("Direct, replayfake's CPU is the kernel's: one TCP send per event, as llama-server "
                 "writes a stream (about 5 us each, nearly all system time). Through a proxy it "
                 "writes the same events to a Unix socket, and the proxy sends them on to the "
                 "client in fewer, larger writes when it falls behind.")
# Cold start (case e): health poll period and overall bound.
HEALTH_POLL_PERIOD = 0.005
COLD_START_TIMEOUT = 60.0
# One request's deadline in the harness's own blocking HTTP calls.
HTTP_TIMEOUT = 30.0

CHAT_PATH = "/v1/chat/completions"
SMALL_BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
# llama-server's own counters, read around each case d run (--metrics): how many decode steps it
# ran and how many tokens they generated. Fewer steps per second means llama-server computed
# slower (CPU taken from its compute thread); fewer tokens per step means worse batching
# (requests reaching it spread out, so a step serves fewer slots).
LLAMA_COUNTERS = ("n_decode_total", "tokens_predicted_total")
# Read too where llama-server has it: its own time spent generating (summed over slots), which
# tells a slower compute apart from a slower relay at one stream.
LLAMA_OPTIONAL_COUNTERS = ("tokens_predicted_seconds_total",)
LLAMA_BODY = {"model": "demo", "messages": [{"role": "user", "content": "Tell me a story."}],
              "stream": True, "max_tokens": 96, "temperature": 0, "seed": 42, "ignore_eos": True}

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ======================================= processes ===============================================
class Child:
    """A process started by the harness in its own session (so its whole group can be killed)."""

    registry: list["Child"] = []

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.data_dir: Path | None = None   # a gateway's DATA_DIR (its access log)
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(REPO))
        self.pid = self.proc.pid
        Child.registry.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        """utime + stime in seconds (from /proc/<pid>/stat); 0.0 once gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def status_kb(self, field: str) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int | None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (children of an entrypoint, say) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        if self in Child.registry:
            Child.registry.remove(self)
        return self.proc.returncode

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.registry):
            child.stop(timeout=3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port: int | str, timeout: float) -> socket.socket:
    """A blocking socket to 127.0.0.1:port, or to the Unix socket at path `port` (a str)."""
    if isinstance(port, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(port)
        except BaseException:
            s.close()
            raise
        return s
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def http_request(port: int | str, method: str, path: str, body: bytes = b"", headers=(),
                 timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
    """One blocking request with `Connection: close`; (status, raw body) or raises OSError.
    port: a TCP port on 127.0.0.1, or a Unix socket path."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    with connect(port, timeout) as s:
        s.settimeout(timeout)
        s.sendall(data)
        chunks = []
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            chunks.append(piece)
    raw = b"".join(chunks)
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise OSError("no response head")
    status = int(raw.split(b" ", 2)[1])
    return status, raw[head_end + 4:]


def record_answer(port: int | str, body: dict, timeout: float = HTTP_TIMEOUT) -> list[bytes]:
    """The answer of the server at port (the Python fake) to one keep-alive POST of body, cut
    into the writes llama-server makes: a Content-Length reply is one write (head and body); a
    chunked stream is its head, then one write per chunk, the last-chunk marker the final one.
    The replay fake sends these bytes as they are, so the gateway relays exactly what it would
    from the Python fake."""
    data = json.dumps(body, separators=(",", ":")).encode()
    request = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
               ).encode() + data
    raw = b""
    with connect(port, timeout) as s:
        s.settimeout(timeout)
        s.sendall(request)
        while True:
            end = raw.find(b"\r\n\r\n")
            if end >= 0:
                head = raw[:end + 4].lower()
                if b"\r\ntransfer-encoding: chunked" in head:
                    if raw.endswith(b"\r\n0\r\n\r\n") or raw[end + 4:] == b"0\r\n\r\n":
                        break
                else:
                    length = head.split(b"\r\ncontent-length:", 1)
                    if len(length) != 2:
                        raise RuntimeError(f"answer without framing: {raw[:200]!r}")
                    if len(raw) >= end + 4 + int(length[1].split(b"\r\n", 1)[0]):
                        break
            if len(raw) > RECORD_MAX_BYTES:
                raise RuntimeError("answer too large to record")
            piece = s.recv(65536)
            if not piece:
                raise RuntimeError(f"connection closed mid-answer: {raw[:200]!r}")
            raw += piece
    end = raw.find(b"\r\n\r\n") + 4
    if b"\r\ntransfer-encoding: chunked" not in raw[:end].lower():
        return [raw]
    pieces, rest = [raw[:end]], raw[end:]
    while rest:
        nl = rest.find(b"\r\n")
        stop = nl + 2 + int(rest[:nl], 16) + 2
        pieces.append(rest[:stop])
        rest = rest[stop:]
    return pieces


def write_pieces(path: Path, pieces: list[bytes]) -> None:
    """replayfake's input: [u32 little-endian length][bytes] per write."""
    with open(path, "wb") as f:
        for piece in pieces:
            f.write(len(piece).to_bytes(4, "little") + piece)


def run_generator(name: str, argv: list[str], env: dict, watch, timeout: float,
                  start_at: float = 0.0, on_tick=None,
                  stdin: bytes | None = None) -> tuple[int, bytes, bytes, float, dict]:
    """Run a load generator to its end (killed past timeout) and meter the watched processes
    meanwhile, from start_at (time.time()) if the generator waits for it; the generator's own
    CPU comes from RUSAGE_CHILDREN once reaped. stdin: written to it at once (its spec), then
    closed. on_tick() is called every RSS_SAMPLE_PERIOD while it runs.
    (returncode, stdout, stderr, wall, cpu_pct)."""
    p = subprocess.Popen(argv, env=env,
                         stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin is not None:
        p.stdin.write(stdin)
        p.stdin.close()
        p.stdin = None      # communicate() would flush it
    while time.time() < start_at and p.poll() is None:
        time.sleep(0.005)
    meter = Meter(watch)
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                # communicate() may be called again after a timeout without losing output
                out, err = p.communicate(timeout=(min(RSS_SAMPLE_PERIOD, end - time.monotonic())
                                                  if on_tick else timeout))
                break
            except subprocess.TimeoutExpired:
                if on_tick is None or time.monotonic() >= end:
                    raise RuntimeError(f"{name} did not finish in time") from None
                on_tick()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    wall, cpu_pct = meter.stop(name)
    return p.returncode, out, err, wall, cpu_pct


def build_c_tool(src: Path, out_dir: Path) -> Path:
    """Compile one of the benchmark's C tools (one file, libc and pthreads) into out_dir."""
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise RuntimeError("cases a, b and c need a C compiler for their replay fake and SSE client "
                           "(Debian/Ubuntu: apt-get install -y gcc)")
    out = out_dir / src.stem
    done = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(src)],
                          capture_output=True, text=True, timeout=CC_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {src.name} failed: {done.stderr[-2000:]}")
    return out


def wait_until(pred, timeout: float, what: str, child: Child | None = None,
               period: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}) while waiting for "
                               f"{what}:\n{child.tail()}")
        try:
            value = pred()
            if value:
                return value
        except OSError:
            pass
        time.sleep(period)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f":\n{child.tail()}" if child else ""))


def machine_busy() -> tuple[float, float]:
    """(busy, steal): CPU seconds the whole machine spent busy so far, all CPUs, interrupts
    included (/proc/stat), and seconds the hypervisor gave our CPUs to other guests (steal: a
    shared host at work; it slows every process of the run at once)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    except (OSError, ValueError):
        return 0.0, 0.0
    # user nice system idle iowait irq softirq steal
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / CLK_TCK, fields[7] / CLK_TCK


def nginx_binary() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class Meter:
    """CPU of the watched children (/proc/<pid>/stat), of reaped children (the load generator,
    via RUSAGE_CHILDREN) and of the whole machine over one run; as % of one core."""

    def __init__(self, watch):
        self.watch = list(watch)
        self.t0 = time.monotonic()
        self.cpu0 = {c.name: c.cpu() for c in self.watch}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.reaped0 = ru.ru_utime + ru.ru_stime
        self.machine0 = machine_busy()

    def stop(self, generator: str) -> tuple[float, dict]:
        wall = time.monotonic() - self.t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {c.name.split("-")[0]: 100 * (c.cpu() - self.cpu0[c.name]) / wall
               for c in self.watch}
        out[generator] = 100 * (ru.ru_utime + ru.ru_stime - self.reaped0) / wall
        busy, steal = machine_busy()
        out["machine"] = 100 * (busy - self.machine0[0]) / wall
        steal_pct = 100 * (steal - self.machine0[1]) / wall
        if steal_pct >= STEAL_SHOWN_PCT:
            out["steal"] = steal_pct
        return wall, out


def access_records(data_dir: Path):
    """The records of a gateway's access log(s), read after it stopped (bad lines skipped)."""
    for path in sorted((data_dir / "logs").glob("api_access.log*")):
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
        except OSError:
            pass


def access_outcomes(data_dir: Path) -> dict:
    """{"<status> <outcome>": count} over a gateway's access log(s), read after it stopped."""
    counts: dict[str, int] = {}
    for rec in access_records(data_dir):
        k = f"{rec.get('status')} {rec.get('outcome')}"
        counts[k] = counts.get(k, 0) + 1
    return counts


def logged_stream_ttfb_ms(data_dir: Path) -> list[float]:
    """Time to first byte of each stream as the gateway logs it: from its request read to
    llama-server's first byte. Against the client's own figure, it shows how much of a burst's
    wait comes before the gateway has read the request (accept, read) and how much after."""
    return [r["ttfb_ms"] for r in access_records(data_dir)
            if r.get("stream") and isinstance(r.get("ttfb_ms"), (int, float))]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def parse_llama_counters(text: str) -> dict[str, float]:
    """LLAMA_COUNTERS (and LLAMA_OPTIONAL_COUNTERS) from llama-server's Prometheus text
    (/metrics); a missing one is left out."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llamacpp:"):
            continue
        name, _, value = line[len("llamacpp:"):].partition(" ")
        if name in LLAMA_COUNTERS or name in LLAMA_OPTIONAL_COUNTERS:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def llama_counters(where: int | str) -> dict[str, float]:
    """llama-server's counters now ({} when /metrics does not answer 200)."""
    status, body = http_request(where, "GET", "/metrics", timeout=HTTP_TIMEOUT)
    return parse_llama_counters(body.decode("utf-8", "replace")) if status == 200 else {}


def llama_activity(before: dict, after: dict, wall: float) -> dict:
    """What llama-server did between two counter reads `wall` seconds apart: decode steps per
    second, tokens generated per step and its own generation time per token in ms (a slot's:
    the counter sums the slots' times); None where a counter is missing."""
    key = "tokens_predicted_seconds_total"
    gen = None
    tokens = after.get("tokens_predicted_total", 0.0) - before.get("tokens_predicted_total", 0.0)
    if key in before and key in after and tokens > 0:
        gen = (after[key] - before[key]) * 1000 / tokens
    if wall <= 0 or any(k not in before or k not in after for k in LLAMA_COUNTERS):
        return {"decodes_per_s": None, "tokens_per_decode": None, "gen_ms_per_token": gen}
    steps = after["n_decode_total"] - before["n_decode_total"]
    return {"decodes_per_s": steps / wall,
            "tokens_per_decode": tokens / steps if steps > 0 else None, "gen_ms_per_token": gen}


def cpu_list(cpus) -> str:
    """[0, 1, 2, 5] as "0-2, 5" (the kernel's own notation for a CPU set)."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "–"


def split_cpus(cpus) -> tuple[set[int], set[int]]:
    """Case d's CPUs: llama-server's (the first LLAMA_THREADS-sized half) and the others' (the
    proxy, the load client, the harness). With one CPU there is nothing to split: (all, empty)."""
    cpus = sorted(cpus)
    half = len(cpus) // 2
    if not half:
        return set(cpus), set()
    return set(cpus[:half]), set(cpus[half:])


def pin(pid: int, cpus: set[int]) -> int:
    """Every thread of process pid onto cpus; threads it starts later inherit the set from the
    thread that starts them. Returns how many threads were set (a thread that ended meanwhile is
    skipped)."""
    done = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            done += 1
        except (ProcessLookupError, FileNotFoundError):
            pass
    return done


def cpus_of(pid: int) -> list[int]:
    """The CPUs any thread of process pid may run on (the union over its threads)."""
    seen: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seen |= os.sched_getaffinity(int(tid))
        except (ProcessLookupError, FileNotFoundError):
            pass
    return sorted(seen)


def paired_ratio(runs: dict, key: str, side: str = "gateway", base: str = "direct"):
    """Median over rounds of gateway / direct within a round (a gateway run and the direct run
    next to it): drift of the machine between rounds cancels out, which a ratio of the two
    sides' medians does not do when the rounds drift apart."""
    return median([ratio(g[key], d[key]) for g, d in zip(runs[side], runs[base])])


def median_cpu(runs: list[dict]) -> dict:
    """Per process, the median over runs of its CPU %; a figure some runs lack (steal, shown
    only from STEAL_SHOWN_PCT up) counts as 0 there."""
    keys = list(dict.fromkeys(k for r in runs for k in r["cpu_pct"]))
    return {k: median([r["cpu_pct"].get(k, 0.0) for r in runs]) for k in keys}


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE (inherited by every child) to NOFILE_WANTED, or at least to the hard
    limit when raising that is not permitted. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_WANTED, max(hard, NOFILE_WANTED)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ======================================= the bench ===============================================
def load_result(name: str, rc: int, out: bytes, err: bytes, wall: float, cpu_pct: dict) -> dict:
    """The records of loadclient or sseload (the same JSON), with the run's wall time and CPU."""
    if rc != 0 or not out:
        raise RuntimeError(f"{name} failed ({rc}): {err.decode(errors='replace')[-2000:]}")
    r = json.loads(out)
    return {"records": r["records"], "connect_times": r["connect_times"],
            "failed": r["failed"], "error_count": r["error_count"], "errors": r["errors"],
            "wall": r["wall"], "wall_outer": wall, "cpu_pct": cpu_pct, "processes": 1}


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="llama-bench-"))
        self.logs = self.out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.key = "sk-" + secrets.token_urlsafe(32)
        self.admin_key = "sk-" + secrets.token_urlsafe(32)     # case f's dashboards
        self.keys_file = self.tmp / "api_keys.txt"
        fd = os.open(self.keys_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bench:{self.key} rpm={BENCH_RPM} concurrency={BENCH_CONCURRENCY}\n"
                    f"dashboards:{self.admin_key} role=admin\n")
        self.results: dict = {}
        self.targets: list[dict] = []
        self.fake: Child | None = None
        self.fake_port = 0
        self.fake_socket = str(self.tmp / "fake-llama.sock")
        self.n_gateways = 0
        self.loadavg_start = os.getloadavg()
        self.started = (time.monotonic(), machine_busy()[1])   # for the whole run's steal
        self.outcomes: dict[str, dict] = {}   # gateway name -> {"status outcome": count}
        self.tools: dict[Path, Path] = {}     # C source -> compiled binary (c_tool)

    # ---- processes ----
    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.pop("LLAMA_ARG_HOST", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start_fake(self) -> None:
        if self.fake is not None and self.fake.alive():
            return
        self.fake_port = free_port()
        if os.path.exists(self.fake_socket):   # left by a fake that died: it binds anew
            os.unlink(self.fake_socket)
        # TCP for the direct clients (wrk speaks nothing else; a client outside the container
        # calls llama-server that way), the Unix socket for the gateway, as entrypoint.sh wires it.
        self.fake = Child("fake-llama", [sys.executable, str(FAKE), "-m", "demo", "--host",
                                         "127.0.0.1", "--port", str(self.fake_port), "-np", "64",
                                         "--unix", self.fake_socket],
                          self.env(), self.logs / "fake_llama.log")
        for where in (self.fake_port, self.fake_socket):
            wait_until(lambda w=where: http_request(w, "GET", "/health", timeout=2)[0] == 200,
                       START_TIMEOUT, "the fake llama-server", self.fake)

    def c_tool(self, src: Path) -> Path:
        """The compiled C tool for src (compiled once per run, into the run's temp dir)."""
        if src not in self.tools:
            self.tools[src] = build_c_tool(src, self.tmp)
        return self.tools[src]

    def start_replay(self, body: dict, label: str) -> tuple[Child, int, str]:
        """The replay fake of cases a, b and c: the Python fake's answer to body, recorded once
        and sent back for every POST by replayfake (C, about 9 us of CPU per request against
        the Python fake's 55 us), so that the fake is not the bottleneck of the direct runs.
        A body whose fake knobs pace the stream (interval) is paced the same way. It listens
        on TCP (direct clients) and on a Unix socket (the gateway, nginx)."""
        self.start_fake()
        pieces = record_answer(self.fake_port, body)
        data = self.tmp / f"replay-{label}.bin"
        write_pieces(data, pieces)
        port, sock = free_port(), str(self.tmp / f"replay-{label}.sock")
        knobs = body.get("fake", {})
        pace = (["--interval", f"{knobs['interval']:g}", "--events", str(knobs["events"])]
                if knobs.get("interval") else [])
        child = Child(f"replayfake-{label}", [str(self.c_tool(REPLAYFAKE_SRC)), "--pieces",
                                              str(data), "--port", str(port), "--unix", sock,
                                              "--threads", str(REPLAY_THREADS), *pace],
                      self.env(), self.logs / f"replayfake-{label}.log")
        for where in (port, sock):
            wait_until(lambda w=where: http_request(w, "GET", "/health", timeout=2)[0] == 200,
                       START_TIMEOUT, "the replay fake", child)
        return child, port, sock

    def start_gateway(self, backend: int | str, label: str,
                      profile: Path | None = None, extra_env: dict | None = None,
                      check: dict | None = None) -> tuple[Child, int]:
        """A gateway on a free port; backend: llama-server's Unix socket path (str, the product's
        default wiring) or TCP port on 127.0.0.1 (int, BACKEND_TRANSPORT=tcp). extra_env: more
        settings (case f: router mode); check: the chat body of its check request."""
        self.n_gateways += 1
        port = free_port()
        data = self.tmp / f"gw{self.n_gateways}-data"
        run = self.tmp / f"gw{self.n_gateways}-run"   # no state file: backend state "unknown"
        data.mkdir()
        run.mkdir()
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv.append(str(GATEWAY))
        env = self.env(PORT=port, HOST="127.0.0.1", PORT_HEALTH=free_port(),
                       BACKEND_HOST="127.0.0.1", DATA_DIR=data,
                       PORT_BACKEND=backend if isinstance(backend, int) else free_port(),
                       BACKEND_SOCKET=backend if isinstance(backend, str) else "",
                       RUN_DIR=run, AUTH_ENABLED="true", AUTH_KEYS_FILE=self.keys_file,
                       MAX_CONCURRENT_REQUESTS=BENCH_CONCURRENCY, MAX_QUEUE_SIZE=BENCH_CONCURRENCY,
                       MAX_CONCURRENT_REQUESTS_PER_KEY=BENCH_CONCURRENCY,
                       MAX_REQUESTS_PER_MINUTE=BENCH_RPM, MAX_CONNECTIONS=BENCH_MAX_CONNECTIONS,
                       GRACEFUL_TIMEOUT=BENCH_GRACEFUL_TIMEOUT, **(extra_env or {}))
        gw = Child(f"gateway-{label}", argv, env, self.logs / f"gateway-{label}.log")
        gw.data_dir = data
        wait_until(lambda: http_request(port, "GET", "/ping", timeout=2)[0] == 200,
                   START_TIMEOUT, "the gateway", gw)
        # The measured path must be the authenticated one: check the key works end to end.
        answer = []

        def checked() -> bool:     # router mode: 503 until the router's models are known
            answer[:] = http_request(port, "POST", CHAT_PATH,
                                     json.dumps(check or SMALL_BODY).encode(),
                                     [("Authorization", f"Bearer {self.key}")])
            return answer[0] != 503
        wait_until(checked, START_TIMEOUT, "the gateway's check request", gw)
        status, body = answer
        if status != 200:
            raise RuntimeError(f"gateway check request answered {status}: {body[:300]!r}")
        return gw, port

    def start_nginx(self, backend: int | str, label: str,
                    connections: int = NGINX_WORKER_CONNECTIONS) -> tuple[Child, int] | None:
        """nginx as a plain reverse proxy to backend (a Unix socket path or a TCP port), for
        reference beside the gateway: one process (the gateway is one), upstream keep-alive,
        no buffering (SSE is relayed as it comes), no access log. llama-server closes a
        keep-alive connection after a stream, so a POST on a reused connection can meet a close
        before any answer: proxy_next_upstream retries it, as the gateway's pool does (without
        it nginx answered 502 to about 1 stream in 7). None when nginx is not installed: the
        reference rows are then left out. connections: worker_connections, which counts both
        sides of every proxied request (case c needs two per stream)."""
        binary = nginx_binary()
        if binary is None:
            return None
        port = free_port()
        prefix = self.tmp / f"nginx-{label}"
        (prefix / "tmp").mkdir(parents=True)
        upstream = f"unix:{backend}" if isinstance(backend, str) else f"127.0.0.1:{backend}"
        temp = " ".join(f"{kind}_temp_path {prefix / 'tmp' / kind};"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (prefix / "nginx.conf").write_text(f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections {connections}; }}
http {{
  access_log off;
  {temp}
  upstream llama {{ server {upstream}; keepalive {NGINX_UPSTREAM_KEEPALIVE}; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_next_upstream error timeout non_idempotent;
    }}
  }}
}}
""")
        ngx = Child(f"nginx-{label}", [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                    self.env(), self.logs / f"nginx-{label}.log")
        wait_until(lambda: http_request(port, "GET", "/health", timeout=2)[0] == 200,
                   START_TIMEOUT, "nginx", ngx)
        return ngx, port

    def start_pyrelay(self, unix_path: str, label: str) -> tuple[Child, int]:
        """pyrelay.py (bytes both ways on the gateway's transports, nothing else) in the
        gateway's place, for reference: the floor of a proxy hop in Python on this machine."""
        port = free_port()
        relay = Child(f"pyrelay-{label}", [sys.executable, str(PYRELAY), "--port", str(port),
                                           "--unix", unix_path],
                      self.env(), self.logs / f"pyrelay-{label}.log")
        wait_until(lambda: http_request(port, "GET", "/health", timeout=2)[0] == 200,
                   START_TIMEOUT, "pyrelay", relay)
        return relay, port

    def start_dashboards(self, port: int, label: str) -> Child:
        """DASHBOARDS_OPEN live dashboards on the gateway at port (dashboards.py), open when
        this returns."""
        dash = Child(f"dashboards-{label}", [sys.executable, str(DASHBOARDS), "--port", str(port),
                                             "--key", self.admin_key,
                                             "--n", str(DASHBOARDS_OPEN)],
                     self.env(), self.logs / f"dashboards-{label}.log")
        wait_until(lambda: dash.log_path.read_text(errors="replace").startswith("ready"),
                   START_TIMEOUT, "the dashboards", dash)
        return dash

    # ---- load generators ----
    def request_bytes(self, body: dict) -> str:
        data = json.dumps(body, separators=(",", ":"))
        return (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n{data}")

    def run_clients(self, port: int | str, body: dict, connections: int, *,
                    requests_per_conn: int = 1, duration: float = 0.0, mode: str = "count",
                    timeout: float = 120.0, watch: list[Child] = ()) -> dict:
        """Case d's load: one loadclient process; its records plus CPU of each watched process."""
        start_at = time.time() + 0.5
        spec = {"host": "127.0.0.1", "port": 0 if isinstance(port, str) else port,
                "unix": port if isinstance(port, str) else "",
                "request": self.request_bytes(body),
                "connections": connections, "requests_per_conn": requests_per_conn,
                "duration": duration, "start_at": start_at, "mode": mode, "timeout": timeout}
        rc, out, err, wall, cpu_pct = run_generator(
            "loadclient", [sys.executable, str(LOADCLIENT)], self.env(), watch, timeout + 30,
            start_at, stdin=json.dumps(spec).encode())
        return load_result("loadclient", rc, out, err, wall, cpu_pct)

    def run_sseload(self, port: int | str, body: dict, connections: int, *, duration: float,
                    requests_per_conn: int = 0, timeout: float = 60.0,
                    watch: list[Child] = (), connect_parallel: int = 64, on_tick=None) -> dict:
        """Cases b and c: sseload (C), the same records as run_clients in mode "count"."""
        req = self.tmp / "sseload-request.bin"
        req.write_bytes(self.request_bytes(body).encode("latin-1"))
        start_at = time.time() + 0.3
        where = ["--unix", port] if isinstance(port, str) else ["--port", str(port)]
        argv = [str(self.c_tool(SSELOAD_SRC)), *where, "--request", str(req),
                "--connections", str(connections), "--duration", f"{duration:g}",
                "--requests-per-conn", str(requests_per_conn), "--start-at", f"{start_at:.6f}",
                "--timeout", f"{timeout:g}", "--connect-parallel", str(connect_parallel)]
        rc, out, err, wall, cpu_pct = run_generator("sseload", argv, self.env(), watch,
                                                    timeout + 30, start_at, on_tick)
        return load_result("sseload", rc, out, err, wall, cpu_pct)

    def run_wrk(self, port: int, connections: int, duration: float, watch: list[Child]) -> dict:
        env = self.env(BENCH_BODY=json.dumps(SMALL_BODY), BENCH_AUTH=self.key)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
                "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}{CHAT_PATH}"]
        _rc, out, err, wall, cpu_pct = run_generator("wrk", argv, env, watch, duration + 30)
        line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCHJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {out.decode()[-500:]} {err.decode()[-500:]}")
        r = json.loads(line[len("BENCHJSON "):])
        secs = r["duration_us"] / 1e6
        errors = sum(r["errors"].values())
        return {"rps": r["requests"] / secs, "p50_ms": r["latency_us"]["p50"] / 1000,
                "p99_ms": r["latency_us"]["p99"] / 1000, "requests": r["requests"],
                "errors": errors, "error_detail": r["errors"], "wall": wall, "cpu_pct": cpu_pct}

    def interleave(self, order, rounds: int, one, turn: bool = False) -> tuple[dict, int]:
        """{target: [run, ...]}: one(target, port, watch) for every target of order, rounds
        times, targets interleaved within a round. turn: the order turns round every other
        round. A round in which any run lost STEAL_RERUN_PCT of a core or more to steal (the
        host running other guests on our CPUs, which slows one side of a pair and not the
        other) runs once more, and the attempt with less steal is kept. Returns the runs and
        how many rounds ran again."""
        runs = {tgt: [] for tgt, _port, _watch in order}
        again = 0
        for rnd in range(rounds):
            seq = order[::-1] if turn and rnd % 2 else order
            best = None
            for attempt in range(1 + STEAL_RERUNS):
                got = {tgt: one(tgt, port, watch) for tgt, port, watch in seq}
                steal = max(r["cpu_pct"].get("steal", 0.0) for r in got.values())
                if best is None or steal < best[0]:
                    best = (steal, got)
                if steal < STEAL_RERUN_PCT or attempt == STEAL_RERUNS:
                    break
                again += 1
                log(f"    round {rnd + 1}: steal {steal:.0f} % of a core: the round runs again")
            for tgt in runs:
                runs[tgt].append(best[1][tgt])
        return runs, again

    # ---- targets ----
    def target(self, case: str, text: str, value: str, ok: bool | None) -> None:
        self.targets.append({"case": case, "target": text, "measured": value,
                             "pass": ok})

    # =================================== cases ===================================================
    def case_a(self) -> None:
        if shutil.which("wrk") is None:
            raise RuntimeError("case a needs wrk on PATH (Debian/Ubuntu: apt-get install -y wrk)")
        fake, fport, fsock = self.start_replay(SMALL_BODY, "a")
        prof = self.out / "profile-a.prof" if self.args.profile else None
        gw, gport = self.start_gateway(fsock, "a", prof)
        # For reference, at TCP_REFERENCE_CONNS only: the same gateway reaching the fake over
        # loopback TCP (BACKEND_TRANSPORT=tcp), to show what the Unix socket is worth.
        gwt, tport = self.start_gateway(fport, "a-tcp")
        # For reference: nginx (C, one process) in the gateway's place, on the same Unix socket.
        ngx = self.start_nginx(fsock, "a")
        # For reference, at TCP_REFERENCE_CONNS only: the floor of a Python hop (pyrelay.py).
        relay, rport = self.start_pyrelay(fsock, "a")
        # Five short rounds rather than three long ones: round-to-round swings of +-10 % on a
        # shared machine weigh less in a median of five paired ratios.
        rounds = 1 if self.quick else 5
        dur = 2 if self.quick else 4
        conns = [1, 16, 64]
        res: dict = {"rounds": rounds, "duration_s": dur, "runs": {}}
        watch = [gw, fake]
        # warm-up: imports, code paths, the upstream pool
        for port in (gport, fport, tport, rport) + ((ngx[1],) if ngx else ()):
            self.run_wrk(port, 16, 1, watch)
        for c in conns:
            order = [("gateway", gport, watch), ("direct", fport, watch)]
            if c == TCP_REFERENCE_CONNS:
                order.append(("gateway_tcp", tport, [gwt, fake]))
                order.append(("pyrelay", rport, [relay, fake]))
            if ngx:
                order.append(("nginx", ngx[1], [ngx[0], fake]))
            def one(tgt, port, seen, c=c):
                r = self.run_wrk(port, c, dur if c > 1 else max(2, dur - 2), seen)
                log(f"  a c={c:<3} {tgt:8s} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                    f"p99 {r['p99_ms']:.3f} ms  errors {r['errors']}  cpu "
                    + " ".join(f"{k} {v:.0f}%" for k, v in r["cpu_pct"].items()))
                return r

            # The order turns round every other round, as in cases c and d: a machine that
            # speeds up or slows down over the point favours no target.
            runs, again = self.interleave(order, rounds, one, turn=True)
            res["runs"][c] = runs
            res["steal_reruns"] = res.get("steal_reruns", 0) + again
        res["summary"] = {}
        for c, runs in res["runs"].items():
            s = {}
            for tgt in runs:
                rr = runs[tgt]
                s[tgt] = {"rps": median([r["rps"] for r in rr]),
                          "p50_ms": median([r["p50_ms"] for r in rr]),
                          "p99_ms": median([r["p99_ms"] for r in rr]),
                          "errors": sum(r["errors"] for r in rr),
                          "cpu_pct": median_cpu(rr)}
            s["paired"] = {"rps": paired_ratio(runs, "rps")}
            if "gateway_tcp" in runs:
                s["paired"]["rps_tcp"] = paired_ratio(runs, "rps", "gateway_tcp")
            if "pyrelay" in runs:
                s["paired"]["rps_pyrelay"] = paired_ratio(runs, "rps", "pyrelay")
            if "nginx" in runs:
                s["paired"]["rps_nginx"] = paired_ratio(runs, "rps", "nginx")
            res["summary"][c] = s
        self.stop_gateway(gw, prof, "a")
        self.stop_gateway(gwt, None, "a-tcp")
        relay.stop()
        if ngx:
            ngx[0].stop()
        fake.stop()
        self.results["a"] = res
        s16 = res["summary"][16]
        rr = s16["paired"]["rps"]
        self.target("a", ">= 0.5x direct req/s at 16 connections", f"{rr:.2f}x", rr >= 0.5)
        for c in (1, 16):
            added = res["summary"][c]["gateway"]["p50_ms"] - res["summary"][c]["direct"]["p50_ms"]
            self.target("a", f"p50 added latency <= 0.3 ms ({c} connection{'s' if c > 1 else ''})",
                        f"{added:.3f} ms", added <= 0.3)
        errs = sum(s["gateway"]["errors"] + s["direct"]["errors"] for s in res["summary"].values())
        self.target("a", "no errors (non-2xx, timeouts, resets)", str(errs), errs == 0)
        if "nginx" in s16:   # reference only, no target: what a C proxy does on this machine
            added = s16["nginx"]["p50_ms"] - s16["direct"]["p50_ms"]
            self.target("a", "reference, not a target: nginx at 16 connections",
                        f"{s16['paired']['rps_nginx']:.2f}x req/s, p50 added {added:.3f} ms", None)
        if "pyrelay" in s16:   # reference only: the floor of a hop in Python
            added = s16["pyrelay"]["p50_ms"] - s16["direct"]["p50_ms"]
            self.target("a", "reference, not a target: a bare Python relay (pyrelay) at 16 "
                        "connections", f"{s16['paired']['rps_pyrelay']:.2f}x req/s, p50 added "
                        f"{added:.3f} ms", None)

    def case_b(self) -> None:
        n_streams, n_events = 64, 200
        body = dict(SMALL_BODY, stream=True, fake={"events": n_events, "interval": 0})
        fake, fport, fsock = self.start_replay(body, "b")
        prof = self.out / "profile-b.prof" if self.args.profile else None
        gw, gport = self.start_gateway(fsock, "b", prof)
        ngx = self.start_nginx(fsock, "b")
        rounds = 1 if self.quick else 3
        dur = 2 if self.quick else 4
        watch = [gw, fake]
        order = [("gateway", gport, watch), ("direct", fport, watch)]
        if ngx:
            order.append(("nginx", ngx[1], [ngx[0], fake]))
        for _tgt, port, seen in order:   # warm-up
            self.run_sseload(port, body, n_streams, duration=0, requests_per_conn=1, watch=seen)
        def one(tgt, port, seen):
            m = self.run_sseload(port, body, n_streams, duration=dur, watch=seen,
                                 timeout=dur + 60)
            recs = m["records"]
            events = sum(r[5] for r in recs)
            ok = sum(1 for r in recs if r[4] == 200 and r[5] >= n_events)
            run = {"streams": len(recs), "complete": ok, "failed": m["failed"],
                   "errors": m["errors"], "events": events, "wall": m["wall"],
                   "events_per_s": events / m["wall"],
                   "ttfb_ms": [r[1] * 1000 for r in recs],
                   "cpu_pct": m["cpu_pct"]}
            log(f"  b {tgt:8s} {run['events_per_s']:9.0f} events/s  streams {len(recs)} "
                f"(complete {ok}, failed {m['failed']})  ttfb p50 "
                f"{percentile(run['ttfb_ms'], 50):.2f} ms p99 {percentile(run['ttfb_ms'], 99):.2f}"
                f" ms  cpu " + " ".join(f"{k} {v:.0f}%" for k, v in run["cpu_pct"].items()))
            return run

        runs, again = self.interleave(order, rounds, one, turn=True)
        summary = {}
        for tgt, rr in runs.items():
            ttfb = [x for r in rr for x in r["ttfb_ms"]]
            summary[tgt] = {"events_per_s": median([r["events_per_s"] for r in rr]),
                            "ttfb_p50_ms": percentile(ttfb, 50), "ttfb_p99_ms": percentile(ttfb, 99),
                            "streams": sum(r["streams"] for r in rr),
                            "incomplete": sum(r["streams"] - r["complete"] + r["failed"] for r in rr),
                            "cpu_pct": median_cpu(rr)}
            for r in rr:
                r["ttfb_ms"] = {"p50": percentile(r["ttfb_ms"], 50),
                                "p99": percentile(r["ttfb_ms"], 99)}
        self.stop_gateway(gw, prof, "b")
        fake.stop()
        summary["paired"] = {"events_per_s": paired_ratio(runs, "events_per_s")}
        if ngx:
            ngx[0].stop()
            summary["paired"]["events_per_s_nginx"] = paired_ratio(runs, "events_per_s", "nginx")
        self.results["b"] = {"rounds": rounds, "duration_s": dur, "steal_reruns": again,
                             "streams": n_streams,
                             "events": n_events, "runs": runs, "summary": summary}
        r = summary["paired"]["events_per_s"]
        self.target("b", ">= 0.6x direct events/s", f"{r:.2f}x", r >= 0.6)
        r = ratio(summary["gateway"]["ttfb_p99_ms"], summary["direct"]["ttfb_p99_ms"])
        self.target("b", "TTFB p99 <= 3x direct", f"{r:.2f}x", r <= 3)
        bad = summary["gateway"]["incomplete"] + summary["direct"]["incomplete"]
        self.target("b", "every stream complete", f"{bad} incomplete", bad == 0)
        if ngx:
            n = summary["nginx"]
            self.target("b", "reference, not a target: nginx",
                        f"{summary['paired']['events_per_s_nginx']:.2f}x events/s, TTFB p99 "
                        f"{ratio(n['ttfb_p99_ms'], summary['direct']['ttfb_p99_ms']):.2f}x, "
                        f"{n['incomplete']} incomplete", None)

    def case_h(self) -> None:
        """(a) at F_CONNECTIONS connections and (b), each on one gateway, without and with
        DASHBOARDS_OPEN live dashboards open, interleaved in the same run."""
        fake_a, _fport, sock_a = self.start_replay(SMALL_BODY, "h-a")
        gw_a, port_a = self.start_gateway(sock_a, "h-a")
        n_streams, n_events = 64, 200
        body_b = dict(SMALL_BODY, stream=True, fake={"events": n_events, "interval": 0})
        fake_b, _fport, sock_b = self.start_replay(body_b, "h-b")
        gw_b, port_b = self.start_gateway(sock_b, "h-b")
        rounds = 1 if self.quick else 5
        dur = 2 if self.quick else 4
        n_dash = [0]
        # warm-up: the load paths and the admin path (a dashboard opened and closed)
        self.run_wrk(port_a, F_CONNECTIONS, 1, [gw_a, fake_a])
        self.run_sseload(port_b, body_b, n_streams, duration=0, requests_per_conn=1,
                         watch=[gw_b, fake_b])
        for port in (port_a, port_b):
            n_dash[0] += 1
            self.start_dashboards(port, f"warm{n_dash[0]}").stop()

        def per_cpu(rate, cpu_pct):
            """The rate per second of the gateway's CPU: what it costs, whatever share of the
            CPUs the other work on the machine left it."""
            busy = cpu_pct.get("gateway", 0.0) / 100
            return rate / busy if busy > 0 else None

        def dashboards_for(tgt, port):
            if tgt != "dashboards":
                return None
            n_dash[0] += 1
            return self.start_dashboards(port, str(n_dash[0]))

        def done(dash, run):
            if dash is None:
                return
            dash.stop()
            lines = dash.log_path.read_text(errors="replace").splitlines()
            got = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
            run["dashboards"] = got
            if got.get("ended"):
                raise RuntimeError(f"the gateway closed {got['ended']} dashboard stream(s)")

        def one_a(tgt, port, seen):
            dash = dashboards_for(tgt, port)
            r: dict = {}
            try:
                r = self.run_wrk(port, F_CONNECTIONS, dur, seen + ([dash] if dash else []))
            finally:
                done(dash, r)
            r["per_gateway_cpu_s"] = per_cpu(r["rps"], r["cpu_pct"])
            log(f"  h(a) c={F_CONNECTIONS} {tgt:10s} {r['rps']:9.0f} req/s  p50 "
                f"{r['p50_ms']:.3f} ms  errors {r['errors']}  cpu "
                + " ".join(f"{k} {v:.0f}%" for k, v in r["cpu_pct"].items()))
            return r

        def one_b(tgt, port, seen):
            dash = dashboards_for(tgt, port)
            run: dict = {}
            try:
                m = self.run_sseload(port, body_b, n_streams, duration=dur, timeout=dur + 60,
                                     watch=seen + ([dash] if dash else []))
                recs = m["records"]
                events = sum(r[5] for r in recs)
                run = {"events_per_s": events / m["wall"], "streams": len(recs),
                       "incomplete": sum(1 for r in recs if r[4] != 200 or r[5] < n_events)
                       + m["failed"], "cpu_pct": m["cpu_pct"]}
            finally:
                done(dash, run)
            run["per_gateway_cpu_s"] = per_cpu(run["events_per_s"], run["cpu_pct"])
            log(f"  h(b) {tgt:10s} {run['events_per_s']:9.0f} events/s  streams "
                f"{run['streams']} (incomplete {run['incomplete']})  cpu "
                + " ".join(f"{k} {v:.0f}%" for k, v in run["cpu_pct"].items()))
            return run

        res: dict = {"rounds": rounds, "duration_s": dur, "dashboards": DASHBOARDS_OPEN,
                     "connections": F_CONNECTIONS, "streams": n_streams, "events": n_events}
        try:
            for part, one, port, watch, key in (
                    ("a", one_a, port_a, [gw_a, fake_a], "rps"),
                    ("b", one_b, port_b, [gw_b, fake_b], "events_per_s")):
                order = [("none", port, watch), ("dashboards", port, watch)]
                runs, again = self.interleave(order, rounds, one, turn=True)
                summary = {tgt: {key: median([r[key] for r in rr]),
                                 "cpu_pct": median_cpu(rr)} for tgt, rr in runs.items()}
                summary["paired"] = {key: paired_ratio(runs, key, "dashboards", "none"),
                                     "per_gateway_cpu_s": paired_ratio(
                                         runs, "per_gateway_cpu_s", "dashboards", "none")}
                for tgt, rr in runs.items():
                    summary[tgt]["per_gateway_cpu_s"] = median(
                        [r["per_gateway_cpu_s"] for r in rr if r["per_gateway_cpu_s"]])
                if part == "a":
                    for tgt, rr in runs.items():
                        summary[tgt]["p50_ms"] = median([r["p50_ms"] for r in rr])
                        summary[tgt]["errors"] = sum(r["errors"] for r in rr)
                else:
                    for tgt, rr in runs.items():
                        summary[tgt]["incomplete"] = sum(r["incomplete"] for r in rr)
                events = [r.get("dashboards", {}) for r in runs["dashboards"]]
                summary["dashboard_events"] = sum(e.get("events", 0) for e in events)
                summary["dashboard_dropped"] = sum(e.get("dropped", 0) for e in events)
                res[part] = {"runs": runs, "summary": summary, "steal_reruns": again}
        finally:
            self.stop_gateway(gw_a, None, "h-a")
            self.stop_gateway(gw_b, None, "h-b")
            fake_a.stop()
            fake_b.stop()
        self.results["h"] = res
        for part, key, what in (("a", "rps", f"(a) req/s at {F_CONNECTIONS} connections"),
                                ("b", "events_per_s", "(b) events/s")):
            r = res[part]["summary"]["paired"][key]
            self.target("h", f"{what} with {DASHBOARDS_OPEN} dashboards open >= "
                        f"{1 - DASHBOARDS_MAX_DROP:.2f}x without", f"{r:.3f}x",
                        r >= 1 - DASHBOARDS_MAX_DROP)

    def case_c(self) -> None:
        # 3 rounds at 1,000 (a median of three pairs, not the mean of two); 10,000 takes a
        # minute a round, so one.
        sizes = [(500, 1)] if self.quick else [(1000, 3), (10000, 1)]
        n_events, interval = 40, 0.05
        body = dict(SMALL_BODY, stream=True, fake={"events": n_events, "interval": interval})
        fake, fport, fsock = self.start_replay(body, "c")
        res = {"events": n_events, "interval_s": interval, "sizes": {}}
        # The gateway holds two sockets per stream (client, upstream): past the open-file limit
        # (when it cannot be raised) the case is scaled down and says so.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fit = (nofile - FD_RESERVE) // 2
        for wanted, rounds in sizes:
            n = min(wanted, fit)
            if n < wanted:
                note = (f"{wanted:,} streams need {2 * wanted + FD_RESERVE} open files in the "
                        f"gateway; RLIMIT_NOFILE is {nofile} and cannot be raised here: ran {n:,}")
                res.setdefault("notes", []).append(note)
                log("  " + note)
            rss_lim = 60 if wanted <= 1000 else 200
            rss_all = []
            # For reference: nginx (C, one process) in the gateway's place: what a proxy hop
            # costs these streams on this machine.
            ngx = self.start_nginx(fsock, f"c{n}", connections=2 * n + FD_RESERVE)   # every gateway run's peak, a run done again for steal included

            def one(tgt, _port, _watch, n=n, rss_all=rss_all):
                gw = None
                if tgt == "gateway":
                    # A fresh gateway each run: its peak RSS is this run's, and its first burst
                    # is the one a newly started container meets.
                    # Under --profile each run's gateway overwrites profile-c<n>.txt: the last
                    # run's profile is kept (and its RSS and times are cProfile's, not the
                    # gateway's own).
                    prof = self.out / f"profile-c{n}.prof" if self.args.profile else None
                    gw, port = self.start_gateway(fsock, f"c{n}", profile=prof)
                    rss0 = gw.status_kb("VmRSS")
                    peak = [rss0]

                    def tick(gw=gw, peak=peak):
                        peak[0] = max(peak[0], gw.status_kb("VmRSS"))
                elif tgt == "nginx":
                    port, tick = ngx[1], None
                else:
                    port, tick = fport, None
                watch = [fake] + ([gw] if gw else []) + ([ngx[0]] if tgt == "nginx" else [])
                m = self.run_sseload(port, body, n, duration=0, requests_per_conn=1,
                                     watch=watch, timeout=90, on_tick=tick,
                                     connect_parallel=C_CONNECT_PARALLEL)
                recs = m["records"]
                done = sum(1 for r in recs if r[4] == 200 and r[5] >= n_events)
                times = [r[3] for r in recs]
                run = {"streams": n, "complete": done, "failed": m["failed"],
                       "errors": m["errors"], "wall": m["wall"],
                       "stream_p50_s": percentile(times, 50),
                       "stream_p99_s": percentile(times, 99),
                       "stream_max_s": max(times) if times else None,
                       "ttfb_p99_ms": (percentile([r[1] for r in recs], 99) or 0) * 1000,
                       "connect_p99_ms": (percentile(m["connect_times"], 99) or 0) * 1000,
                       "cpu_pct": m["cpu_pct"]}
                if gw is not None:
                    run["rss_start_mb"] = rss0 / 1024
                    run["rss_peak_sampled_mb"] = peak[0] / 1024
                    run["rss_hwm_mb"] = gw.status_kb("VmHWM") / 1024
                    rss_all.append(run["rss_hwm_mb"])
                    self.stop_gateway(gw, prof, f"c{n}")
                    run["logged_ttfb_p99_ms"] = percentile(logged_stream_ttfb_ms(gw.data_dir), 99)
                log(f"  c n={n:<5} {tgt:8s} complete {done}/{n} (failed {m['failed']})  "
                    f"stream p50 {run['stream_p50_s']:.3f} s p99 {run['stream_p99_s']:.3f} s"
                    + (f"  RSS peak {run['rss_hwm_mb']:.1f} MB" if gw else "")
                    + "  cpu " + " ".join(f"{k} {v:.0f}%" for k, v in run["cpu_pct"].items())
                    + (f"  errors {run['errors']}" if run["errors"] else ""))
                return run

            # Interleaved as cases a, b and d are: the order turns round every other round, and
            # a round that lost STEAL_RERUN_PCT of a core to steal runs once more.
            order = [("gateway", None, None), ("direct", None, None)]
            if ngx:
                order.append(("nginx", None, None))
            runs, again = self.interleave(order, rounds, one, turn=True)
            if ngx:
                ngx[0].stop()
            res["steal_reruns"] = res.get("steal_reruns", 0) + again
            summary = {}
            for tgt, rr in runs.items():
                summary[tgt] = {"complete": sum(r["complete"] for r in rr),
                                "streams": sum(r["streams"] for r in rr),
                                "stream_p99_s": median([r["stream_p99_s"] for r in rr]),
                                "stream_p50_s": median([r["stream_p50_s"] for r in rr]),
                                "ttfb_p99_ms": median([r["ttfb_p99_ms"] for r in rr]),
                                "cpu_pct": median_cpu(rr)}
            summary["gateway"]["rss_hwm_mb"] = max(rss_all)
            summary["gateway"]["logged_ttfb_p99_ms"] = median(
                [r.get("logged_ttfb_p99_ms") for r in runs["gateway"]])
            summary["paired"] = {k: paired_ratio(runs, k) for k in ("stream_p50_s", "stream_p99_s")}
            if ngx:
                summary["paired"].update({f"{k}_nginx": paired_ratio(runs, k, "nginx")
                                          for k in ("stream_p50_s", "stream_p99_s")})
            res["sizes"][n] = {"rounds": rounds, "runs": runs, "summary": summary}
            g, d = summary["gateway"], summary["direct"]
            all_ok = g["complete"] == g["streams"] and d["complete"] == d["streams"]
            self.target("c", f"all {n:,} streams complete", f"{g['complete']}/{g['streams']} "
                        f"(direct {d['complete']}/{d['streams']})", all_ok)
            r = summary["paired"]["stream_p99_s"]
            self.target("c", f"p99 stream time <= 1.1x direct ({n:,})",
                        "n/a" if r is None else f"{r:.3f}x", None if r is None else r <= 1.1)
            lim = rss_lim
            self.target("c", f"gateway peak RSS <= {lim} MB ({n:,})", f"{g['rss_hwm_mb']:.1f} MB",
                        g["rss_hwm_mb"] <= lim)
            if ngx:
                x = summary["nginx"]
                self.target("c", f"reference, not a target: nginx ({n:,})",
                            f"{x['complete']}/{x['streams']} complete, p99 stream time "
                            f"{summary['paired']['stream_p99_s_nginx']:.3f}x", None)
        fake.stop()
        self.results["c"] = res

    def llama_server_bin(self) -> str:
        env_bin = os.environ.get("LLAMA_SERVER_BIN")
        if env_bin:
            return env_bin
        try:
            out = subprocess.run([sys.executable, str(REPO / "scripts" / "llama_bin.py"),
                                  "--cache-dir", os.environ.get("LLAMA_CACHE",
                                                                str(DEFAULT_LLAMA_CACHE))],
                                 capture_output=True, text=True, timeout=30)
            path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
            if out.returncode == 0 and path and os.access(path, os.X_OK):
                return path
        except (OSError, subprocess.TimeoutExpired):
            pass
        found = shutil.which("llama-server")
        if found:
            return found
        raise RuntimeError("llama-server not found: run `make llama-server` or set LLAMA_SERVER_BIN")

    def model_path(self) -> Path:
        model = Path(os.environ.get("DEMO_MODEL", DEMO_MODEL))
        if not model.is_file():
            raise RuntimeError(f"no model at {model}: run `make model`")
        return model

    def start_llama(self, label: str, port: int | None = None, parallel: int = 8,
                    unix: bool = False) -> tuple[Child, int | str]:
        """llama-server on 127.0.0.1:port, or (unix) on a Unix socket as entrypoint.sh starts
        it; returns the child and where it listens (a port, or the socket path)."""
        where: int | str = str(self.tmp / f"llama-{label}.sock") if unix else (port or free_port())
        listen = ["--host", where] if unix else ["--host", "127.0.0.1", "--port", str(where)]
        argv = [self.llama_server_bin(), "-m", str(self.model_path()), *listen, "-c", "2048",
                "-ngl", str(LLAMA_NGL), "-np", str(parallel), "--metrics", "--threads",
                str(LLAMA_THREADS)]
        child = Child(f"llama-server-{label}", argv, self.env(), self.logs / f"llama-server-{label}.log")
        return child, where

    def case_d(self) -> None:
        # The gateway reaches llama-server over a Unix socket, as entrypoint.sh wires it. "direct"
        # is a client calling llama-server without the gateway over TCP, as a client elsewhere
        # does and as cases a-c call the fake; llama-server listens on one address only, so a
        # second, identical one listens on TCP for it (idle while the other runs). "direct_unix"
        # calls the gateway's own llama-server over its socket: the cheapest path there is, shown
        # for reference.
        llama, sock = self.start_llama("d", unix=True)
        llama_tcp, lport = self.start_llama("d-tcp")
        for child, where in ((llama, sock), (llama_tcp, lport)):
            wait_until(lambda w=where: http_request(w, "GET", "/health", timeout=2)[0] == 200,
                       LLAMA_LOAD_TIMEOUT, "llama-server /health 200", child, period=0.1)
        # llama-server computes on its own CPUs; the proxy, the load client and the harness run
        # on the others, for every target alike. In the product the compute is the GPU's, which
        # no proxy can take from it; here it is a CPU thread, and left to the scheduler the
        # proxy's and the client's wake-ups land on that CPU too and preempt it (session 13:
        # decode steps/s 0.94x through the gateway, nginx as low). LLAMA_THREADS is already half
        # the CPUs; the pinning makes the split hold. At 8 streams the case also runs with
        # nothing pinned, for reference.
        own = os.sched_getaffinity(0)
        llama_cpus, rest = split_cpus(own)
        if rest:
            for child in (llama, llama_tcp):
                pin(child.pid, llama_cpus)
            os.sched_setaffinity(0, rest)     # the gateway, nginx and the clients inherit it
        try:
            self._case_d_runs(llama, sock, llama_tcp, lport, own, llama_cpus, rest)
        finally:
            os.sched_setaffinity(0, own)
        llama.stop()
        llama_tcp.stop()

    def _case_d_runs(self, llama, sock, llama_tcp, lport, own, llama_cpus, rest) -> None:
        gw, gport = self.start_gateway(sock, "d")
        ngx = self.start_nginx(sock, "d")   # for reference: nginx in the gateway's place
        # For reference: the floor of a hop in Python (pyrelay.py), as in case a. llama-server
        # closes its connection after each stream, and the relay closes the client's with it: a
        # stream through it costs a new connection at both ends, one through the gateway a new
        # upstream connection only.
        relay, rport = self.start_pyrelay(sock, "d")
        # 5 rounds: a 5 s run of 8 streams moved by ±10 % between rounds on the 2-CPU VM
        rounds = 1 if self.quick else 5
        dur = 2 if self.quick else 5
        targets = (("gateway", gport, [gw, llama]), ("direct", lport, [llama_tcp]),
                   ("direct_unix", sock, [llama]))
        if ngx:
            targets += (("nginx", ngx[1], [ngx[0], llama]),)
        targets += (("pyrelay", rport, [relay, llama]),)
        for _tgt, port, _watch in targets:   # warm-up, and a check that streams carry tokens
            m = self.run_clients(port, LLAMA_BODY, 1, mode="tokens", timeout=60)
            if not m["records"] or m["records"][0][4] != 200 or not m["records"][0][5]:
                raise RuntimeError(f"case d warm-up failed: {m['errors']} {m['records'][:1]}")
        res = {"rounds": rounds, "duration_s": dur, "max_tokens": LLAMA_BODY["max_tokens"],
               "parallel": {},
               "cpus": {"llama": sorted(llama_cpus), "others": sorted(rest)} if rest else None}
        # The llama-server each target's requests reach, for its counters.
        llama_of = {"gateway": sock, "direct": lport, "direct_unix": sock, "nginx": sock,
                    "pyrelay": sock}

        def one(tgt, port, watch, par):
            before = llama_counters(llama_of[tgt])
            m = self.run_clients(port, LLAMA_BODY, par, requests_per_conn=0,
                                 duration=dur, mode="tokens", watch=watch, timeout=dur + 120)
            activity = llama_activity(before, llama_counters(llama_of[tgt]), m["wall"])
            recs = m["records"]
            tokens = sum(r[5] for r in recs if r[4] == 200)
            ttft = [r[2] * 1000 for r in recs if r[2] is not None]
            run = {"streams": len(recs), "failed": m["failed"], "errors": m["errors"],
                   "non_200": sum(1 for r in recs if r[4] != 200), "tokens": tokens,
                   "wall": m["wall"], "tokens_per_s": tokens / m["wall"],
                   "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                   "ttft_ms": ttft, "cpu_pct": m["cpu_pct"], **activity}
            log(f"  d np={par} {tgt:11s} {run['tokens_per_s']:8.0f} tokens/s  streams "
                f"{len(recs)}  ttft p50 {run['ttft_p50_ms'] or 0:.2f} ms  decode steps/s "
                f"{run['decodes_per_s'] or 0:.0f} tokens/step {run['tokens_per_decode'] or 0:.2f}"
                f"  cpu " + " ".join(f"{k} {v:.0f}%" for k, v in run["cpu_pct"].items()))
            return run

        for par in (1, 8):
            # The order turns round every other round: a machine speeding up or slowing down
            # over the case favours no target (with 3 targets the last would always gain).
            runs, again = self.interleave(targets, rounds,
                                          lambda t, p, w, par=par: one(t, p, w, par), turn=True)
            res["steal_reruns"] = res.get("steal_reruns", 0) + again
            summary = {}
            for tgt, rr in runs.items():
                ttft = [x for r in rr for x in r["ttft_ms"]]
                summary[tgt] = {"tokens_per_s": median([r["tokens_per_s"] for r in rr]),
                                "ttft_p50_ms": percentile(ttft, 50),
                                "ttft_p99_ms": percentile(ttft, 99),
                                "failed": sum(r["failed"] + r["non_200"] for r in rr),
                                "decodes_per_s": median([r["decodes_per_s"] for r in rr]),
                                "tokens_per_decode": median([r["tokens_per_decode"] for r in rr]),
                                "gen_ms_per_token": median([r["gen_ms_per_token"] for r in rr]),
                                "cpu_pct": median_cpu(rr)}
                for r in rr:
                    del r["ttft_ms"]
            summary["paired"] = {"tokens_per_s": paired_ratio(runs, "tokens_per_s"),
                                 "decodes_per_s": paired_ratio(runs, "decodes_per_s"),
                                 "gen_ms_per_token": paired_ratio(runs, "gen_ms_per_token"),
                                 "tokens_per_s_unix": paired_ratio(runs, "tokens_per_s",
                                                                   base="direct_unix"),
                                 "tokens_per_s_pyrelay": paired_ratio(runs, "tokens_per_s",
                                                                      "pyrelay"),
                                 "gen_ms_per_token_pyrelay": paired_ratio(
                                     runs, "gen_ms_per_token", "pyrelay")}
            if ngx:
                summary["paired"]["tokens_per_s_nginx"] = paired_ratio(runs, "tokens_per_s",
                                                                       "nginx")
            res["parallel"][par] = {"runs": runs, "summary": summary}
            r = summary["paired"]["tokens_per_s"]
            self.target("d", f">= 0.98x direct tokens/s ({par} stream{'s' if par > 1 else ''})",
                        f"{r:.3f}x (direct over the Unix socket: "
                        f"{summary['paired']['tokens_per_s_unix']:.3f}x)", r >= 0.98)
            bad = sum(summary[t]["failed"] for t in ("gateway", "direct", "direct_unix"))
            self.target("d", f"every stream answered 200 and complete ({par} stream"
                        f"{'s' if par > 1 else ''})", f"{bad} failed", bad == 0)
            if ngx:
                self.target("d", f"reference, not a target: nginx ({par} stream"
                            f"{'s' if par > 1 else ''})",
                            f"{summary['paired']['tokens_per_s_nginx']:.3f}x tokens/s, "
                            f"{summary['nginx']['failed']} failed", None)
            self.target("d", f"reference, not a target: a bare Python relay (pyrelay, {par} "
                        f"stream{'s' if par > 1 else ''})",
                        f"{summary['paired']['tokens_per_s_pyrelay']:.3f}x tokens/s, "
                        f"{summary['pyrelay']['failed']} failed", None)
        if rest:
            # Threads llama-server started during the runs (its compute threads) stayed on its
            # CPUs: shown in the report, so a pinning that did not hold is seen.
            res["cpus"]["llama_seen"] = sorted(set(cpus_of(llama.pid))
                                               | set(cpus_of(llama_tcp.pid)))
            # For reference: 8 streams with nothing pinned (every process on every CPU).
            for child in (llama, llama_tcp, gw):
                pin(child.pid, own)
            os.sched_setaffinity(0, own)
            plain = targets[:2]
            runs, again = self.interleave(plain, 1 if self.quick else UNPINNED_ROUNDS,
                                          lambda t, p, w: one(t, p, w, 8), turn=True)
            res["steal_reruns"] = res.get("steal_reruns", 0) + again
            for rr in runs.values():
                for r in rr:
                    del r["ttft_ms"]
            r = paired_ratio(runs, "tokens_per_s")
            res["unpinned"] = {"rounds": len(runs["gateway"]), "runs": runs,
                               "tokens_per_s": {t: median([x["tokens_per_s"] for x in rr])
                                                for t, rr in runs.items()},
                               "decodes_per_s": paired_ratio(runs, "decodes_per_s"),
                               "paired": r}
            self.target("d", "reference, not a target: nothing pinned (8 streams)",
                        f"{r:.3f}x tokens/s (decode steps/s "
                        f"{res['unpinned']['decodes_per_s']:.3f}x)", None)
        self.stop_gateway(gw, None, "d")
        if ngx:
            ngx[0].stop()
        relay.stop()
        self.results["d"] = res

    def first_token(self, port: int, deadline: float, auth: bool) -> float | None:
        """Send one streaming request; time.monotonic() of the first content byte, or None."""
        body = json.dumps(dict(LLAMA_BODY, max_tokens=8)).encode()
        head = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                "Content-Type: application/json\r\n"
                + (f"Authorization: Bearer {self.key}\r\n" if auth else "")
                + f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.sendall(head + body)
            buf = b""
            while True:
                piece = s.recv(65536)
                if not piece:
                    return None
                buf += piece
                i = buf.find(b'"content":"')
                while i >= 0:
                    j = i + len(b'"content":"')
                    if j < len(buf) and buf[j:j + 1] != b'"':
                        return time.monotonic()
                    i = buf.find(b'"content":"', j)
                if len(buf) > 1 << 20:
                    return None

    def cold_start_once(self, tgt: str, n: int) -> dict:
        model = self.model_path()
        llama_bin = self.llama_server_bin()
        out: dict = {}
        if tgt == "gateway":
            port, hport, bport = free_port(), free_port(), free_port()
            data, run = self.tmp / f"e{n}-data", self.tmp / f"e{n}-run"
            data.mkdir()
            env = self.env(PORT=port, PORT_HEALTH=hport, PORT_BACKEND=bport, HOST="127.0.0.1",
                           DATA_DIR=data, RUN_DIR=run, MODEL_PATH=model,
                           LLAMA_SERVER_BIN=llama_bin, CTX=2048, NGL=LLAMA_NGL, PARALLEL=1,
                           AUTH_KEYS_FILE=self.keys_file, PYTHON=sys.executable,
                           GRACEFUL_TIMEOUT=BENCH_GRACEFUL_TIMEOUT)
            t0 = time.monotonic()
            child = Child(f"entrypoint-{n}", ["bash", str(ENTRYPOINT)], env,
                          self.logs / f"entrypoint-{n}.log")
            probe_port = hport
        else:
            t0 = time.monotonic()
            child, port = self.start_llama(f"e{n}", parallel=1)
            probe_port = port
        deadline = t0 + COLD_START_TIMEOUT
        try:
            first = t204 = t200 = None
            while time.monotonic() < deadline:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n"
                                       f"{child.tail()}")
                try:
                    status, _ = http_request(probe_port, "GET", "/ping" if tgt == "gateway"
                                             else "/health", timeout=2)
                except OSError:
                    status = None
                now = time.monotonic()
                if status is not None and first is None:
                    first = now
                if status == 204 and t204 is None:
                    t204 = now
                if status == 200:
                    t200 = now
                    break
                time.sleep(HEALTH_POLL_PERIOD)
            if t200 is None:
                raise RuntimeError(f"{child.name}: no health 200 within {COLD_START_TIMEOUT:.0f} s"
                                   f":\n{child.tail()}")
            tok = self.first_token(port, deadline, auth=(tgt == "gateway"))
            out = {"health_first_answer_s": first - t0 if first else None,
                   "health_204_s": t204 - t0 if t204 else None, "health_200_s": t200 - t0,
                   "first_token_s": tok - t0 if tok else None}
        finally:
            child.stop(timeout=STOP_TIMEOUT)
        return out

    def case_e(self) -> None:
        if not ENTRYPOINT.is_file() or not (REPO / "scripts" / "health_server.py").is_file():
            raise RuntimeError("entrypoint.sh or scripts/health_server.py is missing: "
                               "case e needs both")
        rounds = 1 if self.quick else 3
        runs = {"gateway": [], "direct": []}
        for i in range(rounds):
            for tgt in ("gateway", "direct"):
                r = self.cold_start_once(tgt, i)
                runs[tgt].append(r)
                log(f"  e {tgt:8s} " + "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} -"
                                                 for k, v in r.items()))
        summary = {tgt: {k: median([r[k] for r in rr]) for k in rr[0]}
                   for tgt, rr in runs.items()}
        self.results["e"] = {"rounds": rounds, "runs": runs, "summary": summary}
        first = max((r["health_first_answer_s"] or 1e9) for r in runs["gateway"])
        self.target("e", "health port answers within 0.5 s of the entrypoint start (worst run)",
                    f"{first:.3f} s", first <= 0.5)
        ok = all(r["health_204_s"] is not None for r in runs["gateway"])
        self.target("e", "health answers 204 before 200", "yes" if ok else "no", ok)

    def case_f(self) -> None:
        """The usage ledger's writer offered USAGE_RATE requests/s (usage_bench.py --json), in
        its own process, for each journal mode the gateway may use."""
        seconds = 3 if self.quick else 10
        res = {}
        for journal in ("wal", "delete"):
            where = self.tmp / f"usage-{journal}"
            proc = subprocess.run([sys.executable, str(USAGE_BENCH), "--json", "--rate",
                                   str(USAGE_RATE), "--seconds", str(seconds), "--journal",
                                   journal, "--dir", str(where)],
                                  capture_output=True, text=True, timeout=seconds + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"usage_bench.py ({journal}) failed: {proc.stderr[-500:]}")
            res[journal] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"  f {journal:6s} {r['committed_rps_during']:.0f} rows/s committed, backlog max "
                f"{r['max_backlog_s'] * 1000:.0f} ms, {r['dropped']} dropped, writer "
                f"{r['writer_cpu_us_per_row']:.1f} us/row, caller "
                f"{r['caller_cpu_us_per_row']:.2f} us/row")
        self.results["f"] = {"rate": USAGE_RATE, "seconds": seconds, "runs": res}
        for journal, r in res.items():
            ok = r["dropped"] == 0 and r["max_backlog_s"] <= USAGE_MAX_BACKLOG_S
            self.target("f", f"usage writer keeps up at {USAGE_RATE:,} req/s ({journal}): "
                             f"nothing dropped, backlog <= {USAGE_MAX_BACKLOG_S:g} s",
                        f"{r['committed_rps_during']:.0f} rows/s, backlog "
                        f"{r['max_backlog_s'] * 1000:.0f} ms, {r['dropped']} dropped", ok)

    def case_g(self) -> None:
        """Many models (issue 27): a switch, and a loaded model while another loads
        (tests/bench/models_bench.py)."""
        import models_bench
        models_bench.case_g(self, sys.modules[__name__])

    def case_i(self) -> None:
        """Cold start with a model download (issue 30): tests/bench/coldstart.py."""
        import coldstart
        coldstart.case_i(self, sys.modules[__name__])

    # ---- profiling ----
    def stop_gateway(self, gw: Child, prof: Path | None, case: str) -> None:
        code = gw.stop(timeout=STOP_TIMEOUT)
        key = gw.name if gw.name not in self.outcomes else f"{gw.name}#{len(self.outcomes)}"
        self.outcomes[key] = access_outcomes(gw.data_dir)
        bad = {k: v for k, v in self.outcomes[key].items() if not k.startswith("200 ok")}
        if bad:
            log(f"  {gw.name} access log, other than 200 ok: {bad}")
        if prof is None:
            return
        if code != 0 or not prof.is_file():
            log(f"  profile for case {case}: gateway exit {code}, no profile written")
            return
        import io
        import pstats
        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.strip_dirs()
        buf.write(f"# gateway under cProfile, case {case} (all rounds, gateway and warm-up)\n")
        st.sort_stats("tottime").print_stats(30)
        st.sort_stats("cumulative").print_stats(40)
        (self.out / f"profile-{case}.txt").write_text(buf.getvalue())
        log(f"  profile for case {case}: {self.out / f'profile-{case}.txt'}")

    # =================================== report ==================================================
    def machine(self) -> dict:
        cpu = "unknown"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = 0
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) // 1024
        except OSError:
            pass
        def cmd(argv):
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else ""
            except (OSError, subprocess.TimeoutExpired):
                return ""
        return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cpu_model": cpu, "cpu_count": os.cpu_count(),
                "cpus_usable": len(os.sched_getaffinity(0)), "memory_mb": mem,
                "python": platform.python_version(), "platform": platform.platform(),
                "wrk": cmd(["wrk", "-v"]),
                "nginx": (cmd([nginx_binary(), "-v"]).removeprefix("nginx version: ")
                          if nginx_binary() else ""),
                "git_commit": cmd(["git", "-C", str(REPO), "rev-parse",
                                                              "--short", "HEAD"]),
                "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "loadavg_start": self.loadavg_start, "loadavg_end": os.getloadavg(),
                "steal_pct": 100 * (machine_busy()[1] - self.started[1])
                / max(1e-9, time.monotonic() - self.started[0]),
                "llama_threads": LLAMA_THREADS, "niceness": os.getpriority(os.PRIO_PROCESS, 0),
                "quick": self.quick}

    def markdown(self, machine: dict) -> str:
        f2 = lambda v, fmt="{:.2f}": "–" if v is None else fmt.format(v)  # noqa: E731
        L = ["# Benchmark: gateway vs llama-server direct", "",
             f"{machine['date']} · {machine['cpu_model']} · {machine['cpus_usable']} CPUs · "
             f"{machine['memory_mb']} MB · Python {machine['python']} · {machine['platform']} · "
             f"commit {machine['git_commit']}" + (" · **--quick**" if self.quick else ""), "",
             "Load average at start {:.2f} / {:.2f} / {:.2f}, at end {:.2f} / {:.2f} / {:.2f}; "
             "steal over the whole run {:.1f} % of one core.".format(
                 *machine["loadavg_start"], *machine["loadavg_end"],
                 machine.get("steal_pct", 0.0)), "",
             "`machine` is the busy time of all CPUs, interrupts included: loopback networking "
             "partly runs there, charged to no process, and other work on the machine shows "
             "there too, so it exceeds the sum of ours. `steal` (shown from "
             f"{STEAL_SHOWN_PCT:g} %) is time the host gave our CPUs to other guests: it slows "
             "every process of that run.", "",
             "Figures are medians over interleaved rounds (gateway, direct, ..., then the "
             "reverse order in the next round); percentiles pool every request of the rounds. "
             "Ratio = gateway / direct; for req/s, events/s, tokens/s and stream times it is "
             "the median over rounds of the ratio within a round (a gateway run and the direct "
             "run beside it), so drift between rounds cancels out. CPU % is of one core, over "
             "the run's wall time.", ""]

        def cpu_cell(d):
            return ", ".join(f"{k} {v:.0f}%" for k, v in d.items())

        def again(res):
            n = res.get("steal_reruns", 0)
            return (f"; {n} round{'s' if n > 1 else ''} ran again for steal of "
                    f"{STEAL_RERUN_PCT:g} % or more") if n else ""

        if "a" in self.results:
            a = self.results["a"]
            L += [f"## (a) non-streaming POST, replay fake (C), wrk ({a['rounds']} × "
                  f"{a['duration_s']} s per point{again(a)})", "",
                  "| conns | metric | gateway | direct | ratio |", "|---|---|---|---|---|"]
            for c, s in a["summary"].items():
                g, d = s["gateway"], s["direct"]
                L.append(f"| {c} | req/s | {g['rps']:.0f} | {d['rps']:.0f} | "
                         f"{f2(s['paired']['rps'])} |")
                L.append(f"| {c} | p50 latency ms | {g['p50_ms']:.3f} | {d['p50_ms']:.3f} | "
                         f"{f2(ratio(g['p50_ms'], d['p50_ms']))} |")
                L.append(f"| {c} | p99 latency ms | {g['p99_ms']:.3f} | {d['p99_ms']:.3f} | "
                         f"{f2(ratio(g['p99_ms'], d['p99_ms']))} |")
                L.append(f"| {c} | CPU | {cpu_cell(g['cpu_pct'])} | {cpu_cell(d['cpu_pct'])} | |")
                for side, label, paired in (("gateway_tcp", "gateway over TCP", "rps_tcp"),
                                            ("pyrelay", "bare Python relay for reference",
                                             "rps_pyrelay"),
                                            ("nginx", "nginx for reference", "rps_nginx")):
                    if side not in s:
                        continue
                    t = s[side]
                    L.append(f"| {c} | req/s, {label} | {t['rps']:.0f} | {d['rps']:.0f} | "
                             f"{f2(s['paired'][paired])} |")
                    for key, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
                        L.append(f"| {c} | {name} latency ms, {label} | {t[key]:.3f} | "
                                 f"{d[key]:.3f} | {f2(ratio(t[key], d[key]))} |")
                    L.append(f"| {c} | CPU, {label} | {cpu_cell(t['cpu_pct'])} | | |")
            L.append("")
            L += [REPLAY_NOTE_A, ""]
            if any("pyrelay" in s for s in a["summary"].values()):
                L += [PYRELAY_NOTE, ""]
            if any("nginx" in s for s in a["summary"].values()):
                L += [NGINX_NOTE.format(version=machine.get("nginx") or "nginx"), ""]
        if "b" in self.results:
            b = self.results["b"]
            L += [f"## (b) SSE: {b['streams']} concurrent streams of {b['events']} events, "
                  f"replay fake and sseload (both C) ({b['rounds']} × {b['duration_s']} s"
                  f"{again(b)})", "", REPLAY_NOTE_B, "",
                  "| metric | gateway | direct | ratio |", "|---|---|---|---|"]
            g, d = b["summary"]["gateway"], b["summary"]["direct"]
            paired = b["summary"].get("paired", {})
            for key, name, fmt in (("events_per_s", "events/s", "{:.0f}"),
                                   ("ttfb_p50_ms", "TTFB p50 ms", "{:.3f}"),
                                   ("ttfb_p99_ms", "TTFB p99 ms", "{:.3f}"),
                                   ("streams", "streams done", "{}"),
                                   ("incomplete", "incomplete", "{}")):
                L.append(f"| {name} | {f2(g[key], fmt)} | {f2(d[key], fmt)} | "
                         f"{f2(paired.get(key, ratio(g[key], d[key])))} |")
            L.append(f"| CPU | {cpu_cell(g['cpu_pct'])} | {cpu_cell(d['cpu_pct'])} | |")
            n = b["summary"].get("nginx")
            if n is not None:
                L.append(f"| events/s, nginx for reference | {n['events_per_s']:.0f} | "
                         f"{d['events_per_s']:.0f} | {f2(paired['events_per_s_nginx'])} |")
                L.append(f"| TTFB p99 ms, nginx for reference | {n['ttfb_p99_ms']:.3f} | "
                         f"{d['ttfb_p99_ms']:.3f} | {f2(ratio(n['ttfb_p99_ms'], d['ttfb_p99_ms']))} |")
                L.append(f"| incomplete, nginx for reference | {n['incomplete']} | "
                         f"{d['incomplete']} | – |")
                L.append(f"| CPU, nginx for reference | {cpu_cell(n['cpu_pct'])} | | |")
            L.append("")
        if "c" in self.results:
            c = self.results["c"]
            L += [f"## (c) many slow streams: {c['events']} events {c['interval_s'] * 1000:.0f} ms "
                  f"apart, paced replay fake and sseload (both C), fresh gateway per run"
                  f"{again(c)}", "",
                  "| streams | metric | gateway | direct | ratio |", "|---|---|---|---|---|"]
            for n, sz in c["sizes"].items():
                g, d = sz["summary"]["gateway"], sz["summary"]["direct"]
                L.append(f"| {n} | complete | {g['complete']}/{g['streams']} | "
                         f"{d['complete']}/{d['streams']} | |")
                for key, name in (("stream_p50_s", "stream time p50 s"),
                                  ("stream_p99_s", "stream time p99 s")):
                    L.append(f"| {n} | {name} | {f2(g[key], '{:.3f}')} | {f2(d[key], '{:.3f}')} | "
                             f"{f2(sz['summary']['paired'][key])} |")
                # a direct run strained by the burst itself shows here first
                L.append(f"| {n} | time to first byte p99 ms | {g['ttfb_p99_ms']:.0f} | "
                         f"{d['ttfb_p99_ms']:.0f} | {f2(ratio(g['ttfb_p99_ms'], d['ttfb_p99_ms']))} |")
                if g.get("logged_ttfb_p99_ms") is not None:
                    L.append(f"| {n} | time to first byte p99 ms, as the gateway logs it (from "
                             f"its request read) | {g['logged_ttfb_p99_ms']:.0f} | | |")
                L.append(f"| {n} | gateway peak RSS MB | {g['rss_hwm_mb']:.1f} | | |")
                L.append(f"| {n} | CPU | {cpu_cell(g['cpu_pct'])} | {cpu_cell(d['cpu_pct'])} | |")
                x = sz["summary"].get("nginx")
                if x is not None:
                    L.append(f"| {n} | complete, nginx for reference | {x['complete']}/"
                             f"{x['streams']} | {d['complete']}/{d['streams']} | |")
                    for key, name in (("stream_p50_s", "stream time p50 s"),
                                      ("stream_p99_s", "stream time p99 s")):
                        L.append(f"| {n} | {name}, nginx for reference | {f2(x[key], '{:.3f}')} "
                                 f"| {f2(d[key], '{:.3f}')} | "
                                 f"{f2(sz['summary']['paired'][key + '_nginx'])} |")
                    L.append(f"| {n} | CPU, nginx for reference | {cpu_cell(x['cpu_pct'])} | | |")
            L.append("")
            L += [f"Note: {note}" for note in c.get("notes", ())] + ([""] if c.get("notes") else [])
            L += ["Note: the fake paces a stream on an absolute schedule (start + i × interval), "
                  "so its own loop lag does not add up over the 40 events; on a machine with few "
                  "CPUs the gateway, the fake and the load client still share the cores, and the "
                  "stream-time ratio then measures CPU contention as well as relay delay.", "",
                  "The gateway's logged time to first byte starts when it has read the request; "
                  "what the client measures on top of it is the burst waiting for the gateway "
                  "to accept and read it (and the head's way back).", ""]
        if "h" in self.results:
            f = self.results["h"]
            L += [f"## (h) {f['dashboards']} live dashboards open (GET /admin/live, read by "
                  f"dashboards.py) beside (a) at {f['connections']} connections and (b), the "
                  f"same gateway without and with them ({f['rounds']} × {f['duration_s']} s)",
                  "", "| case | metric | without | with dashboards | ratio |",
                  "|---|---|---|---|---|"]
            for part, key, name in (("a", "rps", "req/s"), ("b", "events_per_s", "events/s")):
                sm = f[part]["summary"]
                n, d = sm["none"], sm["dashboards"]
                L.append(f"| ({part}) | {name} | {n[key]:.0f} | {d[key]:.0f} | "
                         f"{f2(sm['paired'][key], '{:.3f}')} |")
                L.append(f"| ({part}) | {name.split('/')[0]} per second of gateway CPU | "
                         f"{f2(n['per_gateway_cpu_s'], '{:.0f}')} | "
                         f"{f2(d['per_gateway_cpu_s'], '{:.0f}')} | "
                         f"{f2(sm['paired']['per_gateway_cpu_s'], '{:.3f}')} |")
                if part == "a":
                    L.append(f"| (a) | p50 ms | {n['p50_ms']:.3f} | {d['p50_ms']:.3f} | "
                             f"{f2(ratio(d['p50_ms'], n['p50_ms']))} |")
                L.append(f"| ({part}) | CPU | {cpu_cell(n['cpu_pct'])} | {cpu_cell(d['cpu_pct'])}"
                         " | |")
                L.append(f"| ({part}) | events the dashboards read (dropped notices) | | "
                         f"{sm['dashboard_events']} ({sm['dashboard_dropped']}) | |")
            L += ["", "The dashboards' `request` events are at most 200 a second (a batch of 50 "
                  "every 0.25 s, admin/livefeed.py), whatever the request rate; the metrics "
                  "come once a second. Per second of gateway CPU: the rate divided by the "
                  "gateway's CPU share, its cost whatever the rest of the machine leaves it "
                  "(steadier than the rate on a shared machine).", ""]
        if "d" in self.results:
            dd = self.results["d"]
            L += [f"## (d) real llama-server, demo model, max_tokens {dd['max_tokens']}, "
                  f"temperature 0 ({dd['rounds']} × {dd['duration_s']} s{again(dd)})", "",
                  "| streams | metric | gateway | direct | ratio |", "|---|---|---|---|---|"]
            cpus = dd.get("cpus")
            if cpus:
                L[-2:-2] = [f"llama-server runs on CPU {cpu_list(cpus['llama'])} (its threads were "
                            f"seen on {cpu_list(cpus.get('llama_seen', []))}); the gateway, nginx, "
                            f"the load client and the harness on CPU {cpu_list(cpus['others'])}, "
                            "for every target alike: on the product's GPU no proxy can take the "
                            "compute's CPU. The last row runs with nothing pinned.", ""]
            for par, p in dd["parallel"].items():
                g, d = p["summary"]["gateway"], p["summary"]["direct"]

                def side_by_side(key, name, fmt, g=g, d=d, p=p, par=par):
                    """gateway | direct | paired ratio (else the ratio of the medians)."""
                    gv, dv = g.get(key), d.get(key)
                    L.append(f"| {par} | {name} | {f2(gv, fmt)} | {f2(dv, fmt)} | "
                             f"{f2(p['summary']['paired'].get(key, ratio(gv, dv)))} |")

                for key, name, fmt in (("tokens_per_s", "tokens/s", "{:.0f}"),
                                       ("ttft_p50_ms", "TTFT p50 ms", "{:.2f}"),
                                       ("ttft_p99_ms", "TTFT p99 ms", "{:.2f}")):
                    side_by_side(key, name, fmt)
                L.append(f"| {par} | CPU | {cpu_cell(g['cpu_pct'])} | {cpu_cell(d['cpu_pct'])} | |")
                for key, name, fmt in (("decodes_per_s", "llama-server decode steps/s", "{:.0f}"),
                                       ("tokens_per_decode", "llama-server tokens per step",
                                        "{:.2f}"),
                                       ("gen_ms_per_token", "llama-server ms per token generated, "
                                        "a slot's (its own timer)", "{:.3f}")):
                    if g.get(key) is not None or d.get(key) is not None:
                        side_by_side(key, name, fmt)
                u = p["summary"].get("direct_unix")
                if u is not None:
                    L.append(f"| {par} | tokens/s, direct over the Unix socket | "
                             f"{f2(g['tokens_per_s'], '{:.0f}')} | "
                             f"{f2(u['tokens_per_s'], '{:.0f}')} | "
                             f"{f2(p['summary']['paired']['tokens_per_s_unix'])} |")
                    L.append(f"| {par} | CPU, direct over the Unix socket | | "
                             f"{cpu_cell(u['cpu_pct'])} | |")
                paired = p["summary"]["paired"]

                def reference_rows(side, label, own_timer, d=d, par=par, paired=paired):
                    """A reference proxy's rows (nginx, the bare relay) beside direct."""
                    r = p["summary"].get(side)
                    if r is None:
                        return
                    L.append(f"| {par} | tokens/s, {label} | {f2(r['tokens_per_s'], '{:.0f}')} | "
                             f"{f2(d['tokens_per_s'], '{:.0f}')} | "
                             f"{f2(paired.get(f'tokens_per_s_{side}'))} |")
                    L.append(f"| {par} | TTFT p50 ms, {label} | {f2(r['ttft_p50_ms'])} | "
                             f"{f2(d['ttft_p50_ms'])} | "
                             f"{f2(ratio(r['ttft_p50_ms'], d['ttft_p50_ms']))} |")
                    if own_timer:
                        rg, dg = r.get("gen_ms_per_token"), d.get("gen_ms_per_token")
                        L.append(f"| {par} | llama-server ms per token generated, {label} | "
                                 f"{f2(rg, '{:.3f}')} | {f2(dg, '{:.3f}')} | "
                                 f"{f2(paired.get(f'gen_ms_per_token_{side}', ratio(rg, dg)))} |")
                    L.append(f"| {par} | CPU, {label} | {cpu_cell(r['cpu_pct'])} | | |")

                reference_rows("nginx", "nginx for reference", own_timer=False)
                reference_rows("pyrelay", "bare Python relay for reference", own_timer=True)
            up = dd.get("unpinned")
            if up:
                n = up["rounds"]
                L.append(f"| 8 | tokens/s, nothing pinned, for reference ({n} round"
                         f"{'s' if n != 1 else ''}) | "
                         f"{f2(up['tokens_per_s']['gateway'], '{:.0f}')} | "
                         f"{f2(up['tokens_per_s']['direct'], '{:.0f}')} | {f2(up['paired'])} |")
                L.append(f"| 8 | llama-server decode steps/s ratio, nothing pinned | | | "
                         f"{f2(up['decodes_per_s'])} |")
            L += ["", "The llama-server rows are its own counters (/metrics) over each run: "
                  "decode steps per second fall when llama-server computes slower (its compute "
                  "thread shares the CPUs with the proxy and the client), tokens per step fall "
                  "when requests reach it spread out and a step serves fewer slots. Its time "
                  "per token generated is its own timer: it grows when the compute is slower, "
                  "whatever the proxy's relay does, so at one stream it tells the two apart.", ""]
            if any("pyrelay" in p["summary"] for p in dd["parallel"].values()):
                L += ["Reference rows, the Python floor: `pyrelay.py`, as in case (a), in front of "
                      "the gateway's own llama-server socket. llama-server closes its connection "
                      "after each stream and the relay closes the client's with it, so each "
                      "stream through it opens two new connections; one through the gateway "
                      "opens one (upstream).", ""]
        if "e" in self.results:
            e = self.results["e"]
            g, d = e["summary"]["gateway"], e["summary"]["direct"]
            L += [f"## (e) cold start, seconds from process start (median of {e['rounds']})", "",
                  "| milestone | entrypoint.sh (health port, gateway) | llama-server alone |",
                  "|---|---|---|",
                  f"| health answers | {f2(g['health_first_answer_s'], '{:.3f}')} | "
                  f"{f2(d['health_first_answer_s'], '{:.3f}')} (503 while loading) |",
                  f"| health 204 | {f2(g['health_204_s'], '{:.3f}')} | – |",
                  f"| health 200 | {f2(g['health_200_s'], '{:.3f}')} | "
                  f"{f2(d['health_200_s'], '{:.3f}')} |",
                  f"| first token | {f2(g['first_token_s'], '{:.3f}')} | "
                  f"{f2(d['first_token_s'], '{:.3f}')} |", ""]
        if "f" in self.results:
            f = self.results["f"]
            L += [f"## (f) usage ledger writer, {f['rate']:,} requests/s for {f['seconds']} s",
                  "", "| journal | rows/s committed | max backlog | dropped | writer CPU per row "
                  "| caller CPU per row |", "|---|---|---|---|---|---|"]
            for journal, r in f["runs"].items():
                L.append(f"| {journal} | {r['committed_rps_during']:.0f} | "
                         f"{r['max_backlog_s'] * 1000:.0f} ms | {r['dropped']} | "
                         f"{r['writer_cpu_us_per_row']:.1f} us | "
                         f"{r['caller_cpu_us_per_row']:.2f} us |")
            L += ["", "The writer commits every 0.25 s; the backlog is what kill -9 could lose.",
                  ""]
        if "g" in self.results:
            import models_bench
            L += models_bench.markdown(self.results["g"])
        if "i" in self.results:
            import coldstart
            L += coldstart.markdown(self.results["i"])
        odd = {name: {k: v for k, v in c.items() if not k.startswith("200 ok")}
               for name, c in self.outcomes.items()}
        odd = {name: c for name, c in odd.items() if c}
        if odd:
            L += ["## Gateway access log: requests not `200 ok`", "",
                  "wrk stops with requests in flight: those show as `0 client_closed`.", ""]
            L += [f"- {name}: " + ", ".join(f"{k} × {v}" for k, v in c.items())
                  for name, c in odd.items()] + [""]
        if self.results.get("errors"):
            L += ["## Cases that failed to run", ""]
            L += [f"- ({k}) {v}" for k, v in self.results["errors"].items()] + [""]
        L += ["## Targets", "", "| case | target | measured | result |", "|---|---|---|---|"]
        for t in self.targets:
            res = {True: "PASS", False: "**FAIL**", None: "n/a"}[t["pass"]]
            L.append(f"| {t['case']} | {t['target']} | {t['measured']} | {res} |")
        return "\n".join(L) + "\n"

    def write(self) -> str:
        machine = self.machine()
        md = self.markdown(machine)
        (self.out / "bench.md").write_text(md)
        (self.out / "bench.json").write_text(json.dumps(
            {"machine": machine, "results": self.results, "targets": self.targets,
             "gateway_access_outcomes": self.outcomes},
            indent=1, default=str))
        return md

    def cleanup(self) -> None:
        Child.stop_all()
        shutil.rmtree(self.tmp, ignore_errors=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Every case, in the order they run: the default of --cases and what it accepts.
CASES = "abcdefghi"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The options and the cases asked for (each a known case)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results")
    p.add_argument("--quick", action="store_true", help="short runs, one round, small case c")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {CASES[0]}-{CASES[-1]}")
    p.add_argument("--nice", type=int, default=0,
                   help="run the harness and everything it starts at this niceness (e.g. -10 "
                        "on a machine shared with other work; negative needs root)")
    p.add_argument("--profile", action="store_true",
                   help="run the gateway of cases a, b and c under cProfile (slower; profile only)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if len(c) != 1 or c not in CASES]
    if unknown:
        p.error(f"unknown case(s): {', '.join(unknown)}")
    return args, cases


def main(argv=None) -> int:
    args, cases = parse_args(argv)
    nofile = raise_nofile()
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError as exc:
            log(f"bench: cannot change niceness by {args.nice}: {exc}")
    bench = Bench(args)
    log(f"bench: out {bench.out}, cases {','.join(cases)}, open files {nofile}"
        + (" (quick)" if args.quick else ""))

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    errors = {}
    try:
        for case in CASES:
            if case not in cases:
                continue
            log(f"case {case}")
            t = time.monotonic()
            try:
                getattr(bench, f"case_{case}")()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken case must not lose the others' figures
                errors[case] = f"{type(exc).__name__}: {exc}"
                bench.target(case, "case ran", errors[case].splitlines()[0][:200], False)
                log(f"  case {case} FAILED: {exc}")
                for child in list(Child.registry):
                    if child is not bench.fake:
                        child.stop(timeout=3.0)
            log(f"  case {case}: {time.monotonic() - t:.1f} s")
        if errors:
            bench.results["errors"] = errors
        md = bench.write()
        print(md)
    finally:
        bench.cleanup()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
