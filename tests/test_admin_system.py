"""llamagw.admin.system: /proc parsing, disk, nvidia-smi (a stand-in script: found, failing,
hanging, absent), the GPU answer cache, the async snapshot."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest

from llamagw.admin import system
from llamagw.admin.system import SystemProbe

SMI_OUT = ("NVIDIA H100 80GB HBM3, 37, 1024, 81559, 41, 71.25\n"
           "Tesla T4, [N/A], 15, 15360, 30, [Not Supported]\n")


def fake_proc(tmp_path, busy: int, idle: int):
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    # user nice system idle iowait irq softirq steal guest guest_nice
    (proc / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                                  "MemAvailable:    4000000 kB\nBuffers: 1 kB\n")
    return proc


def fake_smi(tmp_path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_memory_and_cpu_from_proc(tmp_path):
    proc = fake_proc(tmp_path, busy=100, idle=900)
    probe = SystemProbe(str(tmp_path), proc=str(proc), cpu_sample_s=0)
    assert system.read_memory(str(proc)) == {"total": 16_000_000 * 1024,
                                            "used": 12_000_000 * 1024}
    assert probe.cpu()["percent"] is None          # one sample, no interval
    fake_proc(tmp_path, busy=400, idle=1000)       # +300 busy, +100 idle
    cpu = probe.cpu()
    assert cpu["percent"] == 75.0
    assert cpu["count"] >= 1


def test_missing_proc_gives_nulls(tmp_path):
    probe = SystemProbe(str(tmp_path), proc=str(tmp_path / "none"), cpu_sample_s=0)
    assert probe.cpu()["percent"] is None
    assert system.read_memory(str(tmp_path / "none")) == {"total": None, "used": None}


def test_disk_of_data_dir(tmp_path):
    disk = system.read_disk(str(tmp_path))
    assert disk["path"] == str(tmp_path)
    assert disk["total"] > 0 and 0 <= disk["free"] <= disk["total"]
    assert 0 <= disk["used"] <= disk["total"]
    assert system.read_disk(str(tmp_path / "absent"))["total"] is None


def test_parse_nvidia_smi():
    gpus = system.parse_nvidia_smi(SMI_OUT + "\n")
    assert gpus == [
        {"name": "NVIDIA H100 80GB HBM3", "util": 37.0, "mem_used": 1024 * system.MIB,
         "mem_total": 81559 * system.MIB, "temp": 41.0, "power": 71.25},
        {"name": "Tesla T4", "util": None, "mem_used": 15 * system.MIB,
         "mem_total": 15360 * system.MIB, "temp": 30.0, "power": None},
    ]
    assert system.parse_nvidia_smi("Odd, Name, 1, 2, 3, 4, 5\n")[0]["name"] == "Odd, Name"
    assert system.parse_nvidia_smi("garbage\n,,\n") == []


def test_gpu_from_a_working_nvidia_smi(tmp_path):
    args_file = tmp_path / "args"
    smi = fake_smi(tmp_path, f'echo "$@" > {args_file}\nprintf "{SMI_OUT}"\n')
    gpus, note = system.query_gpus(smi)
    assert note is None and [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3", "Tesla T4"]
    args = args_file.read_text().split()
    assert args == ["--query-gpu=name,utilization.gpu,memory.used,memory.total,"
                    "temperature.gpu,power.draw", "--format=csv,noheader,nounits"]


@pytest.mark.parametrize("body, note", [
    ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver"\n'
     "exit 9\n", "nvidia-smi failed (exit 9): NVIDIA-SMI has failed"),
    ("exit 0\n", "nvidia-smi listed no GPU"),
])
def test_gpu_errors_become_a_note(tmp_path, body, note):
    gpus, got = system.query_gpus(fake_smi(tmp_path, body))
    assert gpus is None and got.startswith(note)


def test_gpu_absent_and_hanging(tmp_path):
    assert system.query_gpus(str(tmp_path / "nvidia-smi")) == (None, "nvidia-smi not found")
    assert system.query_gpus("no-such-nvidia-smi-here") == (None, "nvidia-smi not found")
    smi = fake_smi(tmp_path, "exec sleep 30\n")
    started = time.monotonic()
    gpus, note = system.query_gpus(smi, timeout_s=0.3)
    assert gpus is None and note == "nvidia-smi did not answer within 0.3 s"
    assert time.monotonic() - started < 10


def test_gpu_answer_is_cached(tmp_path):
    now = [100.0]
    smi = fake_smi(tmp_path, f'printf "{SMI_OUT}"\n')
    probe = SystemProbe(str(tmp_path), nvidia_smi=smi, clock=lambda: now[0], gpu_cache_s=2)
    for _ in range(5):
        assert probe.gpus()[0][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert probe.smi_runs == 1
    now[0] += 2
    probe.gpus()
    assert probe.smi_runs == 2


def test_snapshot_shape_off_the_loop(tmp_path):
    now = [50.0]
    proc = fake_proc(tmp_path, busy=1, idle=1)
    probe = SystemProbe(str(tmp_path), version="1.2.3", proc=str(proc), cpu_sample_s=0,
                        nvidia_smi=str(tmp_path / "absent"), clock=lambda: now[0])
    now[0] += 12.34
    snap = asyncio.run(probe.snapshot())
    assert set(snap) == {"cpu", "memory", "disk", "gpu", "gpu_note", "uptime_s", "version"}
    assert snap["gpu"] is None and snap["gpu_note"] == "nvidia-smi not found"
    assert snap["uptime_s"] == 12.3 and snap["version"] == "1.2.3"
    assert snap["disk"]["path"] == str(tmp_path)
    assert set(snap["cpu"]) == {"percent", "count"}


def test_real_machine_snapshot_has_numbers():
    """On this machine's own /proc (Linux): the numbers are there and sane."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc on this system")
    snap = SystemProbe("/", cpu_sample_s=0.05).snapshot_sync()
    assert 0 <= snap["cpu"]["percent"] <= 100
    assert 0 < snap["memory"]["used"] < snap["memory"]["total"]
    assert (snap["gpu"] is None) == (snap["gpu_note"] is not None)
