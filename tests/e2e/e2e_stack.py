"""The real stack for end-to-end tests (helpers and fixtures; e2e test modules import them): entrypoint.sh + the real llama-server on the demo model +
health server + gateway, in a temp DATA_DIR, on free loopback ports, with a real key.

`make test-e2e` sets LLAMA_SERVER_BIN and DEMO_MODEL; without them the cached llama-server and
data/models/demo-tiny-llama.gguf are used (a clear failure if neither exists: run `make test-e2e`).
"""

from __future__ import annotations

import contextlib
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

REPO = Path(__file__).resolve().parents[2]
# The demo model loads in well under a second on 2 cores; a loaded CI runner gets 90 s.
READY_DEADLINE_S = 90.0
REQUEST_TIMEOUT_S = 60.0
STOP_DEADLINE_S = 20.0
# /v1/embeddings needs llama-server's --embeddings with a pooling type; chat keeps working.
E2E_EXTRA_ARGS = "--embeddings --pooling mean"


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


def request(port: int, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT_S,
            unix_path: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port, or to the Unix socket unix_path (llama-server's default)."""
    conn = http.client.HTTPConnection("127.0.0.1" if not unix_path else "localhost", port or None,
                                      timeout=timeout)
    try:
        if unix_path:
            conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.sock.settimeout(timeout)
            conn.sock.connect(unix_path)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def processes_mentioning(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            blob = (Path(f"/proc/{pid}/cmdline").read_bytes()
                    + Path(f"/proc/{pid}/environ").read_bytes())
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(pid))
    return found


class Stack:
    """entrypoint.sh as the container runs it, with a first key."""

    def __init__(self, tmp: Path, **env_over: str):
        self.tmp = tmp
        self.data = tmp / "data"
        self.run_dir = tmp / "run"
        self.data.mkdir(parents=True, exist_ok=True)
        self.key_file = self.data / "api_keys.txt"
        made = subprocess.run([sys.executable, str(REPO / "scripts" / "keys.py"), "--file",
                               str(self.key_file), "add", "e2e"], capture_output=True,
                              text=True, timeout=30, check=True)
        self.key = made.stdout.strip().splitlines()[-1].strip()
        assert self.key.startswith("sk-")
        self.port, self.health_port, self.backend_port = free_port(), free_port(), free_port()
        self.model = demo_model()
        self.env = dict(os.environ, DATA_DIR=str(self.data), RUN_DIR=str(self.run_dir),
                        HOST="127.0.0.1", MODEL_PATH=str(self.model),
                        LLAMA_SERVER_BIN=server_bin(), PORT=str(self.port),
                        PORT_HEALTH=str(self.health_port), PORT_BACKEND=str(self.backend_port),
                        CTX="4096", NGL="0", PARALLEL="2", GRACEFUL_TIMEOUT="3",
                        EXTRA_ARGS=E2E_EXTRA_ARGS, PYTHON=sys.executable,
                        RESTART_BACKOFF_MAX="1")
        self.env.update(env_over)
        self.out_path = tmp / "stdout.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    def start(self) -> "Stack":
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(["bash", str(REPO / "entrypoint.sh")], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def health(self) -> int:
        try:
            return request(self.health_port, "/ping", timeout=5)[0]
        except OSError:
            return 0

    def wait_health(self, want: int, deadline_s: float = READY_DEADLINE_S) -> set[int]:
        seen: set[int] = set()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            status = self.health()
            seen.add(status)
            if status == want:
                return seen
            time.sleep(0.02)
        raise AssertionError(f"health never {want} (seen {seen}):\n{self.output()[-4000:]}")

    def pid(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text().strip())

    def chat(self, content: str = "Hello", **extra) -> tuple[int, dict, bytes]:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8,
                "temperature": 0, **extra}
        return request(self.port, "/v1/chat/completions", "POST", json.dumps(body).encode(),
                       self.auth())

    @property
    def backend_socket(self) -> str:
        """llama-server's Unix socket as entrypoint.sh wires it; "" with BACKEND_TRANSPORT=tcp."""
        if self.env.get("BACKEND_TRANSPORT", "unix") == "tcp":
            return ""
        return self.env.get("BACKEND_SOCKET") or str(self.run_dir / "llama-server.sock")

    def slots_busy(self) -> list[bool]:
        """llama-server's own /slots, asked directly (the gateway does not expose it)."""
        _, _, body = request(self.backend_port, "/slots", timeout=5,
                             unix_path=self.backend_socket)
        return [bool(s.get("is_processing")) for s in json.loads(body)]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError("entrypoint did not stop in time:\n" + self.output()[-4000:])

    def kill_all(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        for pid in processes_mentioning(str(self.tmp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def make_stack(tmp_path):
    """A fresh stack per test (for tests that kill or stop it)."""
    stacks: list[Stack] = []

    def _make(**env) -> Stack:
        s = Stack(tmp_path / f"s{len(stacks)}", **env)
        stacks.append(s)
        return s

    yield _make
    for s in stacks:
        s.kill_all()


@contextlib.contextmanager
def serving(s: Stack):
    """A stack started (or starting) until health 200; at the end it must stop with exit 0 and
    leave no process behind; killed whatever happens."""
    try:
        if s.proc is None:
            s.start()
        s.wait_health(200)
        yield s
        assert s.stop() == 0, s.output()[-4000:]
        assert processes_mentioning(str(s.tmp)) == []
    finally:
        s.kill_all()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One running stack shared by a module's read-only tests."""
    with serving(Stack(tmp_path_factory.mktemp("stack"))) as s:
        yield s

