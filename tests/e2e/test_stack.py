"""The whole stack as the container runs it: entrypoint.sh + the real llama-server on the demo
model + health server + gateway. Health goes 204 -> 200, a keyed chat request answers through the
gateway, SIGTERM stops everything with exit 0. Run by `make test-e2e` (sets LLAMA_SERVER_BIN and
DEMO_MODEL); without them the cached llama-server and data/models/demo-tiny-llama.gguf are used."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llama_bin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# The demo model loads in ~0.2 s on 2 CPU cores; a slow CI runner gets 60 s.
READY_DEADLINE_S = 60.0
REQUEST_TIMEOUT_S = 30.0  # one short completion of the tiny model takes milliseconds
STOP_DEADLINE_S = 15.0    # GRACEFUL_TIMEOUT (2) + llama-server stop + margins


def server_bin() -> str:
    env = os.environ.get("LLAMA_SERVER_BIN")
    found = Path(env) if env else llama_bin.find_server(llama_bin.default_cache_dir())
    assert found and os.access(found, os.X_OK), "no llama-server: run `make test-e2e`"
    return str(found)


def demo_model() -> Path:
    path = Path(os.environ.get("DEMO_MODEL") or REPO / "data/models/demo-tiny-llama.gguf")
    assert path.is_file(), f"{path}: missing; run `make model`"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_entrypoint_serves_the_demo_model_and_stops_clean(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    key_file = data / "api_keys.txt"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "keys.py"), "--file",
                           str(key_file), "add", "e2e"], capture_output=True, text=True,
                          timeout=30, check=True)
    key = made.stdout.strip()
    port, health_port, backend = free_port(), free_port(), free_port()
    env = dict(os.environ, DATA_DIR=str(data), RUN_DIR=str(run_dir), HOST="127.0.0.1",
               MODEL_PATH=str(demo_model()), LLAMA_SERVER_BIN=server_bin(), PORT=str(port),
               PORT_HEALTH=str(health_port), PORT_BACKEND=str(backend), CTX="2048", NGL="0",
               GRACEFUL_TIMEOUT="2", MAX_RESTARTS="0", PYTHON=sys.executable)
    out_path = tmp_path / "stdout.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "entrypoint.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        seen = set()
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, out_path.read_text(errors="replace")
            try:
                status, _ = get(health_port, "/ping")
            except OSError:
                status = 0
            seen.add(status)
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200, (seen, out_path.read_text(errors="replace"))
        assert seen <= {0, 204, 200}  # never "unhealthy" while booting

        status, body = get(port, "/v1/chat/completions", "POST",
                           json.dumps({"messages": [{"role": "user", "content": "Hello"}],
                                       "max_tokens": 4}).encode(),
                           {"Authorization": f"Bearer {key}",
                            "Content-Type": "application/json"})
        assert status == 200, body
        reply = json.loads(body)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
        status, _ = get(port, "/v1/models")  # no key
        assert status == 401
        server_log = (data / "logs" / "llama-instruct" / "latest.txt").read_text()
        assert "model loaded" in server_log or "listening" in server_log

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(tmp_path).encode() in blob and int(pid) != os.getpid():
            leftovers.append(pid)
    assert leftovers == []
