"""The stack under trouble: loading, probes, client disconnects, llama-server crashes, SIGTERM.

Each test starts its own stack (entrypoint.sh + the real llama-server) because it kills or stops it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from e2e_stack import processes_mentioning, request, server_bin
from e2e_stack import make_stack  # noqa: F401 (fixtures)

HERE = Path(__file__).parent
# The bound: a slot must be free within 2 s of the client going away.
SLOT_FREE_DEADLINE_S = 2.0
# A kill -9 of llama-server is noticed by the supervisor's wait at once; allow for a loaded CI.
NOTICE_DEADLINE_S = 10.0
# How long requests are sent after llama-server's death: past the gateway's state file cache
# (gateway.STATE_FILE_TTL, 0.5 s), within which they used to be answered 502.
DEATH_WINDOW_S = 1.0


def long_stream_request(key: str) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "Write forever"}],
                       "max_tokens": 100000, "ignore_eos": True, "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: e2e\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def open_stream(stack) -> socket.socket:
    """Start a long stream through the gateway and return once its first event arrived."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
    sock.sendall(long_stream_request(stack.key))
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return sock


def gateway_up(stack) -> bool:
    try:
        return request(stack.port, "/ping", timeout=5)[0] == 200
    except OSError:
        return False


def wait_for(pred, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {deadline_s} s: {what}")


def test_health_204_while_loading_then_200_and_probes_never_reach_llama_server(make_stack):
    s = make_stack()
    count_file = s.tmp / "llama-connections"
    count_file.write_text("")
    s.env.update(LOAD_DELAY="1.5", REAL_LLAMA_SERVER=server_bin(), COUNT_FILE=str(count_file))
    wrapper = s.tmp / "llama-server"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'counting_llama.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    s.env["LLAMA_SERVER_BIN"] = str(wrapper)
    s.start()
    seen = s.wait_health(204, deadline_s=30)
    assert seen <= {0, 204}
    # While loading, the gateway is up and the API answers 503 JSON with Retry-After, not a hang.
    wait_for(lambda: gateway_up(s), 10, "gateway accepts while the model loads")
    status, headers, body = s.chat()
    assert status == 503 and "retry-after" in headers
    assert json.loads(body)["error"]["code"].startswith("backend_")
    seen = s.wait_health(200)
    assert seen <= {0, 204, 200}
    before = count_file.read_text().count("conn")
    for _ in range(30):
        assert s.health() == 200
    assert count_file.read_text().count("conn") == before      # probes: no llama-server traffic
    status, _, _ = s.chat()                                      # the API does reach it
    assert status == 200
    assert count_file.read_text().count("conn") >= before
    assert s.stop() == 0


def test_client_disconnect_mid_stream_frees_the_slot(make_stack):
    s = make_stack().start()
    s.wait_health(200)
    sock = open_stream(s)
    assert any(s.slots_busy())
    sock.close()
    wait_for(lambda: not any(s.slots_busy()), SLOT_FREE_DEADLINE_S, "slot freed after disconnect")
    # and the gateway still serves, with the key not stuck at its concurrency limit
    for _ in range(5):
        assert s.chat()[0] == 200
    assert s.stop() == 0


def refuses(s) -> bool:
    """llama-server's socket refuses connections: the process is dead (not just signalled)."""
    try:
        if s.backend_socket:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(s.backend_socket)
        else:
            socket.create_connection(("127.0.0.1", s.backend_port), timeout=5).close()
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    return False


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_llama_server_killed_gives_503_at_once_then_recovers(make_stack, transport):
    s = make_stack(BACKEND_TRANSPORT=transport).start()
    s.wait_health(200)
    sock = open_stream(s)
    assert s.chat()[0] == 200     # the gateway has just read `ready` (kept STATE_FILE_TTL)
    old = s.pid("llama-server")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: refuses(s), NOTICE_DEADLINE_S, "llama-server refuses connections")
    # From the first request on (the gateway may still hold `ready`, the supervisor may not
    # have noticed yet): 503 backend_starting with Retry-After, never a 502, until it is back.
    answers = []
    end = time.monotonic() + DEATH_WINDOW_S
    while time.monotonic() < end:
        status, headers, body = s.chat()
        if status == 200:     # restarted already (a fast machine)
            break
        err = json.loads(body)["error"]
        answers.append((status, err["code"], headers.get("retry-after")))
        assert set(err) == {"message", "type", "code"}
        time.sleep(0.01)
    assert answers and set(answers) == {(503, "backend_starting", "5")}, answers
    # The stream it was generating: cut with an error event, and counted as an upstream error.
    sock.settimeout(10)
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    sock.close()
    assert b'"upstream_closed"' in rest and not rest.endswith(b"0\r\n\r\n")
    metrics = request(s.port, "/metrics")[2].decode()
    assert 'gateway_upstream_errors_total{kind="upstream_closed"} 1' in metrics.splitlines()
    s.wait_health(200)
    assert s.pid("llama-server") != old
    assert s.chat()[0] == 200
    assert "restart" in s.output().lower()
    assert s.stop() == 0


def test_sigterm_with_a_live_stream_exits_0_and_leaves_nothing(make_stack):
    s = make_stack().start()
    s.wait_health(200)
    sock = open_stream(s)
    sock.settimeout(30)
    s.proc.send_signal(signal.SIGTERM)
    # the stream ends (finished or cut at GRACEFUL_TIMEOUT) and the connection closes
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end:
        if not sock.recv(65536):
            break
    sock.close()
    assert s.proc.wait(30) == 0, s.output()[-3000:]
    wait_for(lambda: processes_mentioning(str(s.tmp)) == [], 5, "no process left")
