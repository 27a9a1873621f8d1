"""The probe server as a real subprocess: state file -> status, gateway TCP check, no backend
traffic, bounded request heads, config errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEALTH_SERVER = os.path.join(REPO, "scripts", "health_server.py")
START_DEADLINE = 5.0   # s for the subprocess to listen (it takes ~0.1 s)
IO_TIMEOUT = 3.0       # s per probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_state(run_dir: str, word: str | None) -> None:
    """Like entrypoint.sh: temp file + rename (None removes the file)."""
    path = os.path.join(run_dir, "health")
    if word is None:
        if os.path.exists(path):
            os.unlink(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(word + "\n")
    os.replace(tmp, path)


def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(data)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, headers, body


def probe(port: int, method: str = "GET", path: str = "/ping") -> tuple[int, dict[str, str], bytes]:
    return raw_request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


class CountingListener:
    """A TCP listener that accepts and counts connections (closes each at once)."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def wait_count(self, n: int, deadline: float = IO_TIMEOUT) -> int:
        """The count once it reaches n (the accept thread may lag the client's connect)."""
        end = time.monotonic() + deadline
        while self.count < n and time.monotonic() < end:
            time.sleep(0.01)
        return self.count

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(2)


def start_server(env_extra: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, **env_extra)
    return subprocess.Popen([sys.executable, HEALTH_SERVER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("health server did not listen in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    backend = CountingListener()
    ports = {"PORT": free_port(), "PORT_HEALTH": free_port()}
    proc = start_server({"RUN_DIR": run_dir, "HOST": "127.0.0.1", "DATA_DIR": run_dir,
                         "PORT": str(ports["PORT"]), "PORT_HEALTH": str(ports["PORT_HEALTH"]),
                         "PORT_BACKEND": str(backend.port)})
    wait_listening(proc, ports["PORT_HEALTH"])
    info = {"run_dir": run_dir, "port": ports["PORT"], "health": ports["PORT_HEALTH"],
            "backend": backend, "proc": proc}
    yield info
    proc.terminate()
    proc.wait(5)
    backend.close()
    # Nothing of ours ever reached llama-server's port.
    assert backend.count == 0


@pytest.fixture
def gateway(server):
    listener = CountingListener(server["port"])
    yield listener
    listener.close()


@pytest.mark.parametrize("word", [None, "starting", "garbage", "", "READY"])
def test_starting_missing_or_garbage_is_204_without_body(server, word):
    write_state(server["run_dir"], word)
    status, headers, body = probe(server["health"])
    assert status == 204
    assert body == b""
    assert "content-length" not in headers


def test_ready_with_gateway_listening_is_200(server, gateway):
    write_state(server["run_dir"], "ready")
    status, headers, body = probe(server["health"])
    assert status == 200
    assert json.loads(body) == {"status": "ready"}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert gateway.wait_count(1) >= 1  # it did check the port (a bare connect)


def test_ready_without_gateway_is_503(server):
    write_state(server["run_dir"], "ready")
    status, _, body = probe(server["health"])
    assert status == 503
    assert json.loads(body) == {"status": "ready", "gateway": "not accepting"}


def test_gateway_check_is_cached_then_redone_on_state_rewrite(server, gateway):
    write_state(server["run_dir"], "ready")
    for _ in range(5):
        assert probe(server["health"])[0] == 200
    assert gateway.wait_count(1) == 1  # five probes inside the TTL: one connect
    time.sleep(0.1)
    assert gateway.count == 1
    gateway.close()
    write_state(server["run_dir"], "ready")  # a rewrite invalidates the cached answer
    assert probe(server["health"])[0] == 503


@pytest.mark.parametrize("word", ["failed", "stopping"])
def test_failed_and_stopping_are_503(server, gateway, word):
    write_state(server["run_dir"], word)
    status, _, body = probe(server["health"])
    assert status == 503
    assert json.loads(body) == {"status": word}


@pytest.mark.parametrize("path", ["/", "/ping", "/health", "/anything/at/all?x=1"])
def test_any_path_and_head(server, gateway, path):
    write_state(server["run_dir"], "ready")
    status, _, body = probe(server["health"], "GET", path)
    assert status == 200 and body
    status, headers, body = probe(server["health"], "HEAD", path)
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) == len(b'{"status":"ready"}')


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_405(server, method):
    write_state(server["run_dir"], "starting")
    status, headers, _ = probe(server["health"], method)
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


def test_malformed_request_line_400(server):
    status, _, _ = raw_request(server["health"], b"HELLO\r\n\r\n")
    assert status == 400


def test_oversized_head_431(server):
    big = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
    status, _, _ = raw_request(server["health"], big)
    assert status == 431


def test_silent_client_does_not_block_probes(server):
    write_state(server["run_dir"], "starting")
    with socket.create_connection(("127.0.0.1", server["health"]), timeout=IO_TIMEOUT) as idle:
        t0 = time.monotonic()
        assert probe(server["health"])[0] == 204
        assert time.monotonic() - t0 < 1.0
        # and the silent one is dropped after the head deadline (2 s), not held forever
        idle.settimeout(5)
        assert idle.recv(100) == b""


def test_bad_config_exits_2_naming_the_variable(tmp_path):
    proc = start_server({"RUN_DIR": str(tmp_path), "PORT_HEALTH": "nope"})
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert "PORT_HEALTH" in err


def test_sigterm_exits_0(tmp_path):
    port = free_port()
    proc = start_server({"RUN_DIR": str(tmp_path), "HOST": "127.0.0.1",
                         "PORT_HEALTH": str(port), "PORT": str(free_port())})
    wait_listening(proc, port)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=5)
    assert proc.returncode == 0
