"""The probe server as a real subprocess: state file -> status, gateway TCP check, no backend
traffic, bounded request heads, config errors, SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import selectors
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
# Under a flood, a probe must still get its answer within this (RunPod's own probe timeout is
# longer; one lost SYN costs a 1 s retransmission, so 2 s tells "answered" from "starved").
PROBE_DEADLINE = 2.0
FLOOD_PROBES = 40      # sequential probes during a flood: every one must be answered
FLOOD_MAX_SECONDS = 30.0   # the flood thread stops by itself after this, whatever happens


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


def timed_probe(port: int) -> tuple[int | None, float]:
    """(status or None if no proper answer came, seconds taken), within PROBE_DEADLINE."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_DEADLINE) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            buf = b""
            while True:
                left = PROBE_DEADLINE - (time.monotonic() - t0)
                if left <= 0:
                    return None, time.monotonic() - t0
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return None, time.monotonic() - t0
    line = buf.split(b"\r\n", 1)[0].split()
    status = int(line[1]) if len(line) >= 2 and line[0] == b"HTTP/1.1" and b"\r\n\r\n" in buf \
        else None
    return status, time.monotonic() - t0


class IdleFlood:
    """`n` TCP connections to 127.0.0.1:port that send nothing, each reopened as soon as the
    server closes it, and one that trickles an endless request head a byte every
    TRICKLE_INTERVAL (also reopened): what starved the old probe server. One thread, non-blocking
    sockets; it stops on stop() or after FLOOD_MAX_SECONDS, and opens at most MAX_OPENS sockets
    in all."""

    TRICKLE_INTERVAL = 0.05
    MAX_OPENS = 200_000

    def __init__(self, port: int, n: int):
        self.addr = ("127.0.0.1", port)
        self.n = n
        self.opens = 0          # sockets opened, reopens included
        self.closed_by_server = 0
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._trickler: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _open(self, trickle: bool = False) -> None:
        if self.opens >= self.MAX_OPENS:
            return
        self.opens += 1
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            return
        self._sel.register(s, selectors.EVENT_READ, trickle)
        if trickle:
            self._trickler = s

    def _reopen(self, s: socket.socket, trickle: bool) -> None:
        self._sel.unregister(s)
        s.close()
        self.closed_by_server += 1
        if trickle:
            self._trickler = None
        self._open(trickle)

    def _run(self) -> None:
        end = time.monotonic() + FLOOD_MAX_SECONDS
        try:
            for _ in range(self.n):
                self._open()
            self._open(trickle=True)
            head = b"GET / HTTP/1.1\r\nX-Pad: "
            sent = 0
            next_trickle = time.monotonic()
            while not self._stop.is_set() and time.monotonic() < end:
                for key, _ in self._sel.select(self.TRICKLE_INTERVAL):
                    try:
                        data = key.fileobj.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._reopen(key.fileobj, key.data)
                        if key.data:
                            sent = 0
                now = time.monotonic()
                if self._trickler is not None and now >= next_trickle:
                    next_trickle = now + self.TRICKLE_INTERVAL
                    byte = head[sent:sent + 1] or b"a"
                    try:
                        self._trickler.send(byte)
                        sent += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._reopen(self._trickler, True)
                        sent = 0
        finally:
            for key in list(self._sel.get_map().values()):
                key.fileobj.close()
            self._sel.close()

    def wait_open(self, deadline: float = IO_TIMEOUT) -> None:
        end = time.monotonic() + deadline
        while self.opens < self.n + 1 and time.monotonic() < end:
            time.sleep(0.01)


def probes_during(port: int, count: int = FLOOD_PROBES) -> list[tuple[int | None, float]]:
    results = []
    for _ in range(count):
        results.append(timed_probe(port))
        time.sleep(0.03)   # spread over more than one head deadline of the flood's sockets
    return results


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


def test_probes_answered_while_idle_connections_flood_the_port(server):
    """300 idle connections, each reopened when closed, and a trickling one: every probe still
    gets its answer (the old server, 64 threads and the rest closed unanswered, failed ~39 of
    40 probes)."""
    write_state(server["run_dir"], "starting")
    with IdleFlood(server["health"], 300) as flood:
        flood.wait_open()
        time.sleep(0.3)
        results = probes_during(server["health"])
    failed = [r for r in results if r[0] != 204]
    assert not failed, f"{len(failed)} of {len(results)} probes failed: {failed[:5]}"
    assert max(t for _, t in results) < PROBE_DEADLINE


@pytest.fixture
def inproc(tmp_path):
    """start(cap) -> (port, server): a HealthServer in a thread of this process, with its
    connection cap lowered so that a test reaches it with few sockets; state "starting"."""
    from llamagw.health import prober as prober_module
    from llamagw.health import server as health_server
    started = []

    def start(cap: int):
        write_state(str(tmp_path), "starting")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(health_server.LISTEN_BACKLOG)
        prober = prober_module.Prober(os.path.join(str(tmp_path), "health"), "127.0.0.1",
                                      free_port())
        srv = health_server.HealthServer(listener, prober, max_connections=cap)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        started.append((srv, thread, listener))
        return listener.getsockname()[1], srv

    yield start
    for srv, thread, listener in started:
        srv.stop()
        thread.join(5)
        assert not thread.is_alive()
        listener.close()


def wait_for(predicate, deadline: float = IO_TIMEOUT) -> bool:
    end = time.monotonic() + deadline
    while not predicate() and time.monotonic() < end:
        time.sleep(0.005)
    return predicate()


def test_at_the_cap_the_oldest_idle_connection_makes_room(inproc):
    from llamagw.health import server as health_server
    port, srv = inproc(4)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) for _ in range(4)]
    try:
        assert wait_for(lambda: len(srv.waiting) == 4)
        t0 = time.monotonic()
        # the fifth: the oldest idle one is dropped (once held MIN_HOLD, so the probe may wait
        # that long in the listen queue)
        status, took = timed_probe(port)
        assert status == 204
        idle[0].settimeout(IO_TIMEOUT)
        try:
            assert idle[0].recv(100) == b""
        except ConnectionResetError:
            pass
        # dropped for the newcomer, not at its head deadline
        assert time.monotonic() - t0 < health_server.HEAD_TIMEOUT / 2
        assert srv.dropped_at_cap == 1
        for s in idle[1:]:                      # the others are still held
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(100)
    finally:
        for s in idle:
            s.close()


def test_at_the_cap_a_young_connection_is_not_pushed_out_by_newer_ones(inproc, monkeypatch):
    """A probe whose head comes a moment after its connect, while newer connections pile up
    behind it at the cap: it is held MIN_HOLD whatever comes after it (the newcomers wait in the
    listen queue), so it is answered; then the oldest idle connections make room."""
    from llamagw.health import server as health_server
    monkeypatch.setattr(health_server, "MIN_HOLD", 0.5)   # ample for a loaded test machine
    port, srv = inproc(4)
    late = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    idle = []
    try:
        assert wait_for(lambda: len(srv.waiting) == 1)
        t0 = time.monotonic()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
                for _ in range(12)]
        # at the cap with only young connections: no more accepted, none dropped
        assert wait_for(lambda: not srv.accepting)
        assert len(srv.waiting) == 4 and srv.dropped_at_cap == 0
        late.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := late.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 204 ")
        # the queued ones get in: the oldest idle one makes room before its head deadline
        idle[0].settimeout(IO_TIMEOUT)
        try:
            assert idle[0].recv(100) == b""
        except ConnectionResetError:
            pass
        assert srv.dropped_at_cap >= 1
        assert time.monotonic() - t0 < health_server.HEAD_TIMEOUT
    finally:
        late.close()
        for s in idle:
            s.close()


def test_probes_answered_while_a_flood_exceeds_the_cap(inproc):
    """Three times the cap in idle connections, each reopened when closed, and a trickler:
    the oldest idle connections make room, and every probe is answered."""
    port, srv = inproc(32)
    with IdleFlood(port, 96) as flood:
        flood.wait_open()
        assert wait_for(lambda: srv.dropped_at_cap > 0)
        results = probes_during(port)
    failed = [r for r in results if r[0] != 204]
    assert not failed, f"{len(failed)} of {len(results)} probes failed: {failed[:5]}"
    assert flood.closed_by_server > 0


def test_a_head_that_takes_too_long_is_dropped(inproc):
    from llamagw.health import server as health_server
    port, _srv = inproc(8)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        t0 = time.monotonic()
        try:
            for byte in b"GET / HTTP/1.1\r\n":
                s.sendall(bytes([byte]))
                time.sleep(health_server.HEAD_TIMEOUT / 4)
        except OSError:
            pass   # dropped while trickling
        s.settimeout(IO_TIMEOUT)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < health_server.HEAD_TIMEOUT + 1.0


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
