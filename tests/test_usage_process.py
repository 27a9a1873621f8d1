"""The usage ledger of the gateway as a real process (scripts/gateway.py, issue 28): SIGTERM writes
every row before the exit, a stream that ends during the drain included; after kill -9 the file
opens cleanly, holds every row older than the writer's flush interval, and the next start
appends to it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

from fakes.fake_llama import FakeLlamaThread
from helpers import ALICE, write_key_file
from llamagw.observe import usage

GATEWAY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "scripts", "gateway.py")
START_DEADLINE_S = 10.0
EXIT_DEADLINE_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gateway:
    def __init__(self, tmp_path, backend_port: int, **extra: str):
        self.port = _free_port()
        self.data = tmp_path / "data"
        self.data.mkdir(exist_ok=True)
        keys = str(tmp_path / "keys.txt")
        write_key_file(keys, f"alice:{ALICE}\n")
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME")}
        env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "PORT_HEALTH": str(_free_port()),
                    "PORT_BACKEND": str(backend_port), "DATA_DIR": str(self.data),
                    "RUN_DIR": str(tmp_path / "run"), "AUTH_KEYS_FILE": keys,
                    "GRACEFUL_TIMEOUT": "5", "MAX_REQUESTS_PER_MINUTE": "10000"})
        env.update(extra)
        self.proc = subprocess.Popen([sys.executable, GATEWAY], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except ConnectionRefusedError:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                assert time.monotonic() < deadline, "the gateway did not start listening"
                time.sleep(0.05)

    def chat(self, **fake) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
            if fake:
                body["fake"] = fake
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Authorization": f"Bearer {ALICE}",
                          "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            return json.loads(resp.read())
        finally:
            conn.close()

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=EXIT_DEADLINE_S)
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=EXIT_DEADLINE_S)

    @property
    def ledger(self) -> str:
        files = sorted((self.data / "usage").glob("*" + usage.FILE_SUFFIX))
        assert len(files) == 1, files
        return str(files[0])


def _rows(path: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return conn.execute("SELECT request_id, key_id, outcome, completion_tokens FROM usage "
                            "ORDER BY id").fetchall()
    finally:
        conn.close()


def test_sigterm_writes_every_row_before_the_exit(tmp_path):
    with FakeLlamaThread() as fake:
        gw = Gateway(tmp_path, fake.port)
        try:
            for _ in range(20):
                gw.chat()
            # A stream still running at SIGTERM: drained, so its row is made during the
            # shutdown, after the last periodic flush, and must be written before the exit.
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            body = json.dumps({"model": "demo", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}],
                               "fake": {"events": 8, "interval": 0.1}}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            gw.proc.send_signal(signal.SIGTERM)
            received = first
            while not received.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            sock.close()
            assert received.endswith(b"0\r\n\r\n") and b"data: [DONE]" in received
            _, err = gw.proc.communicate(timeout=EXIT_DEADLINE_S)
            assert gw.proc.returncode == 0, err
            assert b"usage ledger closed: 21 row(s) written, 0 dropped" in err
        finally:
            gw.kill()
        rows = _rows(gw.ledger)
        assert len(rows) == 21 and all(r[1:3] == ("alice", "ok") for r in rows)
        assert rows[-1][3] == 8                                  # the drained stream's tokens
        assert not os.path.exists(gw.ledger + "-wal")            # one self-contained file


def test_kill_9_loses_at_most_the_last_flush_interval_and_the_next_start_appends(tmp_path):
    with FakeLlamaThread() as fake:
        gw = Gateway(tmp_path, fake.port)
        try:
            for _ in range(10):
                gw.chat()
            time.sleep(usage.MAX_FLUSH_INTERVAL_S + 0.5)         # the writer flushed them
            for _ in range(5):
                gw.chat()
            gw.proc.kill()                                       # SIGKILL: no flush at exit
            gw.proc.communicate(timeout=EXIT_DEADLINE_S)
        finally:
            gw.kill()
        path = gw.ledger
        rows = _rows(path)                                       # opens cleanly
        assert 10 <= len(rows) <= 15
        # a new worker on the same DATA_DIR appends to the same file
        gw = Gateway(tmp_path, fake.port)
        try:
            gw.chat()
            code, err = gw.stop()
            assert code == 0, err
        finally:
            gw.kill()
        assert gw.ledger == path
        after = _rows(path)
        assert after[:len(rows)] == rows and len(after) == len(rows) + 1


def test_retention_is_applied_at_start_as_configured(tmp_path):
    path = usage.usage_path(str(tmp_path / "data"))          # this host's file, as the gateway's
    old = usage.Ledger(path, retention_days=None)
    now = time.time()
    for days in (3, 0.5):                                    # one row older than a day, one not
        old.record((now - days * 86400, f"old-{days}", "alice", None, "chat_completions", 200,
                    "ok", 1, 1, None, 1.0, 1.0, 1, 1))
    assert old.close()
    with FakeLlamaThread() as fake:
        gw = Gateway(tmp_path, fake.port, USAGE_RETENTION_DAYS="1")
        try:
            gw.chat()
            time.sleep(usage.MAX_FLUSH_INTERVAL_S + 0.5)      # the writer's first pass: retention
            code, err = gw.stop()
            assert code == 0, err
        finally:
            gw.kill()
    assert gw.ledger == path
    assert [r[0] for r in _rows(path)][:1] == ["old-0.5"] and len(_rows(path)) == 2


def test_usage_disabled_writes_nothing(tmp_path):
    with FakeLlamaThread() as fake:
        gw = Gateway(tmp_path, fake.port, USAGE_ENABLED="false")
        try:
            gw.chat()
            code, err = gw.stop()
            assert code == 0, err
        finally:
            gw.kill()
    assert not (gw.data / "usage").exists()
    assert "usage ledger" not in err
