"""GET /admin/system: CPU, memory, the disk of DATA_DIR, the GPUs (nvidia-smi), uptime, version.

Everything here reads files or runs a program: SystemProbe.snapshot() runs it in a thread
(asyncio.to_thread), never on the event loop. nvidia-smi runs with a deadline (NVIDIA_SMI_
TIMEOUT_S) and its answer is reused for GPU_CACHE_S, so a few open dashboards polling the page
start at most one nvidia-smi every GPU_CACHE_S. No nvidia-smi (a CPU image), a timeout or an
error -> "gpu": null with "gpu_note" saying why.

Shape (ADMIN-API.md): {"cpu": {"percent", "count"}, "memory": {"total", "used"},
"disk": {"path", "total", "used", "free"}, "gpu": [{"name", "util", "mem_used", "mem_total",
"temp", "power"}] | null, "gpu_note", "uptime_s", "version"}. Bytes for memory, disk and GPU
memory; percent for util; degrees C; watts. A value a source does not give is null.

CPU percent is the busy share of all CPUs since the previous snapshot (the first snapshot
samples /proc/stat twice, CPU_SAMPLE_S apart).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

NVIDIA_SMI = "nvidia-smi"
GPU_FIELDS = ("name", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu",
              "power.draw")
# 5 s: nvidia-smi answers in ~0.1-0.5 s; a wedged driver must not hold a thread for long.
NVIDIA_SMI_TIMEOUT_S = 5.0
# 2 s: the dashboard's System view refreshes every few seconds; GPU numbers change slower.
GPU_CACHE_S = 2.0
# 0.2 s between the two /proc/stat reads of the first snapshot.
CPU_SAMPLE_S = 0.2
# 64 KiB of nvidia-smi output (8 GPUs are ~1 KiB); 16 GPUs listed at most.
MAX_SMI_OUTPUT = 64 * 1024
MAX_GPUS = 16
MIB = 1024 * 1024


def _read_cpu_times(proc: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of the aggregate `cpu` line of /proc/stat."""
    try:
        with open(os.path.join(proc, "stat"), encoding="ascii") as fh:
            line = fh.readline()
    except OSError:
        return None
    fields = line.split()
    if not fields or fields[0] != "cpu":
        return None
    try:
        values = [int(v) for v in fields[1:]]
    except ValueError:
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: counted in user/nice]
    values = values[:8]
    if len(values) < 4:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values)
    return total - idle, total


def read_memory(proc: str = "/proc") -> dict:
    """{"total", "used"} in bytes from /proc/meminfo (used = MemTotal - MemAvailable)."""
    info = {}
    try:
        with open(os.path.join(proc, "meminfo"), encoding="ascii") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable", "MemFree"):
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        info[name] = int(parts[0]) * 1024
    except OSError:
        return {"total": None, "used": None}
    total = info.get("MemTotal")
    available = info.get("MemAvailable", info.get("MemFree"))
    used = total - available if total is not None and available is not None else None
    return {"total": total, "used": used}


def read_disk(path: str) -> dict:
    """{"path", "total", "used", "free"} in bytes of the filesystem holding `path`."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {"path": path, "total": None, "used": None, "free": None}
    return {"path": path, "total": usage.total, "used": usage.used, "free": usage.free}


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return None           # "[N/A]", "[Not Supported]", ""
    return value if value == value and abs(value) != float("inf") else None


def parse_nvidia_smi(output: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=<GPU_FIELDS> --format=csv,noheader,nounits`."""
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        # a name may hold a comma: the numbers are the last five fields
        parts = line.rsplit(",", len(GPU_FIELDS) - 1)
        if len(parts) < len(GPU_FIELDS):
            continue
        name = parts[0].strip()
        util, mem_used, mem_total, temp, power = (_number(p) for p in parts[1:])
        gpus.append({
            "name": name,
            "util": util,
            "mem_used": int(mem_used * MIB) if mem_used is not None else None,
            "mem_total": int(mem_total * MIB) if mem_total is not None else None,
            "temp": temp,
            "power": power,
        })
        if len(gpus) >= MAX_GPUS:
            break
    return gpus


def query_gpus(nvidia_smi: str = NVIDIA_SMI, timeout_s: float = NVIDIA_SMI_TIMEOUT_S
               ) -> tuple[list[dict] | None, str | None]:
    """(gpus, None) or (None, why not). Runs nvidia-smi: call from a thread."""
    exe = shutil.which(nvidia_smi) if os.sep not in nvidia_smi else nvidia_smi
    if exe is None or not os.path.exists(exe):
        return None, "nvidia-smi not found"
    cmd = [exe, "--query-gpu=" + ",".join(GPU_FIELDS), "--format=csv,noheader,nounits"]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"nvidia-smi did not answer within {timeout_s:g} s"
    except OSError as exc:
        return None, f"nvidia-smi could not run: {exc.strerror or exc}"
    out = proc.stdout[:MAX_SMI_OUTPUT].decode("utf-8", "replace")
    if proc.returncode != 0:
        why = (proc.stderr[:400].decode("utf-8", "replace").strip().splitlines() or
               out.strip().splitlines() or [""])[0]
        return None, f"nvidia-smi failed (exit {proc.returncode}): {why[:200]}".rstrip(": ")
    gpus = parse_nvidia_smi(out)
    if not gpus:
        return None, "nvidia-smi listed no GPU"
    return gpus, None


class SystemProbe:
    """The numbers of GET /admin/system. Thread-safe; snapshot() is the loop's entry."""

    def __init__(self, data_dir: str, *, version: str = "", proc: str = "/proc",
                 nvidia_smi: str = NVIDIA_SMI, started: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 smi_timeout_s: float = NVIDIA_SMI_TIMEOUT_S, gpu_cache_s: float = GPU_CACHE_S,
                 cpu_sample_s: float = CPU_SAMPLE_S):
        self.data_dir = data_dir
        self.version = version
        self.proc = proc
        self.nvidia_smi = nvidia_smi
        self._clock = clock
        self.started = clock() if started is None else started
        self.smi_timeout_s = smi_timeout_s
        self.gpu_cache_s = gpu_cache_s
        self.cpu_sample_s = cpu_sample_s
        self._lock = threading.Lock()
        self._cpu_prev: tuple[int, int] | None = None
        self._gpu: tuple[float, list[dict] | None, str | None] | None = None
        self.smi_runs = 0

    def cpu(self) -> dict:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count()
        with self._lock:
            prev = self._cpu_prev
            if prev is None:
                prev = _read_cpu_times(self.proc)
                if prev is not None and self.cpu_sample_s > 0:
                    time.sleep(self.cpu_sample_s)
            now = _read_cpu_times(self.proc)
            self._cpu_prev = now
        percent = None
        if prev is not None and now is not None and now[1] > prev[1]:
            percent = round(100.0 * (now[0] - prev[0]) / (now[1] - prev[1]), 1)
            percent = min(100.0, max(0.0, percent))
        return {"percent": percent, "count": count}

    def gpus(self) -> tuple[list[dict] | None, str | None]:
        with self._lock:
            cached = self._gpu
            now = self._clock()
            if cached is not None and now - cached[0] < self.gpu_cache_s:
                return cached[1], cached[2]
            gpus, note = query_gpus(self.nvidia_smi, self.smi_timeout_s)
            self.smi_runs += 1
            self._gpu = (self._clock(), gpus, note)
            return gpus, note

    def snapshot_sync(self) -> dict:
        """The whole answer; blocking (files, a subprocess): from a thread only."""
        gpus, note = self.gpus()
        return {
            "cpu": self.cpu(),
            "memory": read_memory(self.proc),
            "disk": read_disk(self.data_dir),
            "gpu": gpus,
            "gpu_note": note,
            "uptime_s": round(max(0.0, self._clock() - self.started), 1),
            "version": self.version,
        }

    async def snapshot(self) -> dict:
        """snapshot_sync() in a worker thread."""
        return await asyncio.to_thread(self.snapshot_sync)
