"""entrypoint.sh with the fake llama-server and the real health server and gateway: boot checks,
logs, health states through load, crash and restart, giving up, and a clean SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "entrypoint.sh")
FAKE_LLAMA = os.path.join(REPO, "tests", "fakes", "fake_llama.py")
BOOT_DEADLINE = 10.0     # s to reach a state; the fake loads in FAKE_LOAD_SECONDS (~1 s)
# s from exec to the first probe answer: the target is 0.5 s and it measures 0.08-0.25 s on an idle
# 2-core box; 2 s tolerates a CPU-starved runner (1.4 s seen with four busy loops on 2 cores). That health
# comes up before the model is loaded is checked separately: the first answer must be 204.
HEALTH_FIRST_ANSWER = 2.0
EXIT_DEADLINE = 10.0     # s for the entrypoint to exit after TERM / when giving up
# Short knobs keep every test to a few seconds.
FAST_ENV = {"GRACEFUL_TIMEOUT": "1", "LLAMA_STOP_TIMEOUT": "2", "RESTART_BACKOFF_INITIAL": "0.1",
            "RESTART_BACKOFF_MAX": "0.4", "MAX_RESTARTS": "3", "RESTART_WINDOW": "60",
            "MODEL_LOAD_TIMEOUT": "20"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n different free ports (bound all at once: one after another, the kernel may hand the
    same port out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def health(port: int) -> int:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/ping")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def processes_mentioning(marker: str) -> list[str]:
    """Live processes whose command line or environment contains marker (our tmp dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker.encode() in cmd or marker.encode() in environ):
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {shown}")
    return found


class Stack:
    def __init__(self, tmp_path, **env):
        self.tmp = str(tmp_path)
        self.data = tmp_path / "data"
        self.run_dir = tmp_path / "run"
        (self.data / "models").mkdir(parents=True)
        (self.data / "models" / "tiny.gguf").write_bytes(b"GGUF fake")
        shim = tmp_path / "llama-server"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_LLAMA} "$@"\n')
        shim.chmod(0o755)
        self.port, self.health_port, self.backend = free_ports(3)
        self.env = dict(os.environ, DATA_DIR=str(self.data), RUN_DIR=str(self.run_dir),
                        MODEL_NAME="tiny.gguf", LLAMA_SERVER_BIN=str(shim), HOST="127.0.0.1",
                        PORT=str(self.port), PORT_HEALTH=str(self.health_port),
                        PORT_BACKEND=str(self.backend), AUTH_ENABLED="false",
                        PYTHON=sys.executable,  # as in the image: no version-manager shim
                        FAKE_LOAD_SECONDS="0.5", **FAST_ENV)
        for k, v in env.items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = v
        self.out_path = tmp_path / "stdout.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Stack:
        self.out = open(self.out_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(["bash", ENTRYPOINT], env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        return self

    def run(self, timeout: float = EXIT_DEADLINE) -> tuple[int, str]:
        self.start()
        rc = self.proc.wait(timeout)
        return rc, self.output()

    def output(self) -> str:
        self.out.flush()
        return self.out_path.read_text(errors="replace")

    def wait_health(self, want: int, deadline: float = BOOT_DEADLINE) -> float:
        end = time.monotonic() + deadline
        seen = []
        while time.monotonic() < end:
            code = health(self.health_port)
            seen.append(code)
            if code == want:
                return time.monotonic()
            assert self.proc.poll() is None, f"entrypoint exited {self.proc.returncode}:\n" \
                                             f"{self.output()}"
            time.sleep(0.05)
        raise AssertionError(f"health never {want}; saw {sorted(set(seen))}\n{self.output()}")

    def pid_of(self, name: str) -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(EXIT_DEADLINE)
        return rc

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:  # a failed test: ask nicely first
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc:
            self.out.close()


@pytest.fixture
def stack(tmp_path):
    made = []

    def make(**env) -> Stack:
        s = Stack(tmp_path, **env)
        made.append(s)
        return s

    yield make
    for s in made:
        s.cleanup()
    # whatever happened in the test, nothing it started may outlive it
    left = processes_mentioning(str(tmp_path))
    for line in left:  # ours (they carry our unique tmp dir): don't leak them into later tests
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except OSError:
            pass
    assert left == []


# ---- refusals: nothing is started ----------------------------------------------------------------

def test_missing_model_is_fatal_and_starts_nothing(stack):
    s = stack(MODEL_NAME="absent.gguf")
    rc, out = s.run()
    assert rc == 1
    assert "FATAL" in out and str(s.data / "models" / "absent.gguf") in out
    assert "MODEL_NAME=absent.gguf" in out
    assert not (s.run_dir / "health_server.pid").exists()
    assert not (s.run_dir / "health").exists()
    assert health(s.health_port) == 0


def test_unreadable_model_path_is_fatal(stack, tmp_path):
    s = stack(MODEL_PATH=str(tmp_path / "nowhere" / "m.gguf"), MODEL_NAME=None)
    rc, out = s.run()
    assert rc == 1
    assert "FATAL" in out and "MODEL_PATH=" in out


def test_no_model_configured_is_fatal(stack):
    rc, out = stack(MODEL_NAME=None, MODEL_PATH=None).run()
    assert rc == 1
    assert "FATAL" in out and "MODEL_PATH" in out and "MODEL_NAME" in out


def test_missing_llama_server_is_fatal(stack, tmp_path):
    s = stack(LLAMA_SERVER_BIN=str(tmp_path / "no-such-llama-server"))
    rc, out = s.run()
    assert rc == 1
    assert "FATAL" in out and "LLAMA_SERVER_BIN" in out
    assert not (s.run_dir / "health_server.pid").exists()


@pytest.mark.parametrize("var,value", [
    ("PORT", "80a"), ("PORT_HEALTH", "70000"), ("PORT_BACKEND", "-1"), ("CTX", "big"),
    ("NGL", "1.5"), ("PARALLEL", "0"), ("MODEL_LOAD_TIMEOUT", "soon"), ("GRACEFUL_TIMEOUT", "-3"),
    ("MAX_RESTARTS", "x"), ("WORKER_TYPE", "../evil"), ("LOG_LEVEL", "loud"),
])
def test_bad_env_exits_2_naming_the_variable(stack, var, value):
    rc, out = stack(**{var: value}).run()
    assert rc == 2
    fatal = [line for line in out.splitlines() if "FATAL" in line]
    assert fatal and var in fatal[0]


def test_equal_ports_exit_2(stack):
    s = stack()
    s.env["PORT_BACKEND"] = s.env["PORT"]
    rc, out = s.run()
    assert rc == 2 and "PORT_BACKEND" in out


def test_bad_gateway_config_exits_2(stack):
    # Checked by scripts/llamagw/config.py, which the entrypoint asks before it starts anything.
    s = stack(CLIENT_HEADER_TIMEOUT="never")
    rc, out = s.run()
    assert rc == 2
    assert "CLIENT_HEADER_TIMEOUT" in out
    assert not (s.run_dir / "health").exists()


# ---- the life of a worker -----------------------------------------------------------------------

def test_boot_load_crash_restart_and_sigterm(stack):
    s = stack(FAKE_LOAD_SECONDS="1").start()
    # 204 almost at once, and all through the model load
    t_first = s.wait_health(204, deadline=3)
    assert t_first - s.t0 < HEALTH_FIRST_ANSWER
    assert (s.run_dir / "health").read_text().strip() == "starting"
    # API calls while loading: the gateway answers 503 JSON (it reads the same state file)
    t_gw = time.monotonic() + 5
    while time.monotonic() < t_gw:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=2)
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
            conn.close()
            break
        except OSError:
            time.sleep(0.05)
    if (s.run_dir / "health").read_text().strip() == "starting":
        assert status == 503 and "error" in json.loads(body)
    t_ready = s.wait_health(200)
    assert t_ready - s.t0 >= 1.0  # not before the fake finished loading
    assert (s.run_dir / "health").read_text().strip() == "ready"

    # logs: boot log and server log, each folder with latest.txt -> newest file
    boot_dir, server_dir = s.data / "logs" / "_boot", s.data / "logs" / "llama-instruct"
    for folder, kind in ((boot_dir, "boot"), (server_dir, "server")):
        latest = folder / "latest.txt"
        assert latest.is_symlink()
        target = latest.resolve()
        assert target.parent == folder and f"_{kind}_" in target.name
    assert "health server up" in (boot_dir / "latest.txt").read_text()
    assert "llama-server start #1" in (server_dir / "latest.txt").read_text()
    assert "model loaded" in (server_dir / "latest.txt").read_text()  # fake's own output
    assert "model loaded" in s.output()  # ... mirrored to stdout too

    # llama-server crashes: health leaves 200, then comes back after the restart
    first = s.pid_of("llama-server")
    os.kill(first, signal.SIGKILL)
    s.wait_health(204, deadline=3)
    s.wait_health(200)
    second = s.pid_of("llama-server")
    assert second != first
    assert "exited while serving (signal KILL)" in s.output()

    # the gateway dies: restarted, health 200 again
    gw = s.pid_of("gateway")
    os.kill(gw, signal.SIGKILL)
    time.sleep(0.3)
    s.wait_health(200)
    assert s.pid_of("gateway") != gw

    # the health server dies: restarted on the same port
    hs = s.pid_of("health_server")
    os.kill(hs, signal.SIGKILL)
    time.sleep(0.3)
    s.wait_health(200)
    assert s.pid_of("health_server") != hs
    assert "health server: exited (signal KILL)" in s.output()

    # SIGTERM: stopping, everything down in order, exit 0 in time
    t_stop = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t_stop < 1 + 2 + 3  # GRACEFUL_TIMEOUT + margins
    out = s.output()
    assert out.index("stopping gateway") < out.index("stopping llama-server") \
        < out.index("stopping health server")
    assert processes_mentioning(s.tmp) == []


def test_fail_start_gives_up_after_max_restarts(stack):
    s = stack(FAKE_FAIL_START="1", MAX_RESTARTS="2")
    rc, out = s.run()
    assert rc == 1
    assert "llama-server start #3" in (s.data / "logs" / "llama-instruct" / "latest.txt").read_text()
    assert "start #4" not in out
    assert "giving up" in out and "exit code 1" in out
    assert (s.run_dir / "health").read_text().strip() == "failed"


def test_load_timeout_counts_as_failure(stack):
    s = stack(FAKE_LOAD_SECONDS="30", MODEL_LOAD_TIMEOUT="0.5", MAX_RESTARTS="0")
    rc, out = s.run()
    assert rc == 1
    assert "not ready after MODEL_LOAD_TIMEOUT=0.5 s" in out


def test_sigterm_while_loading_exits_0_quickly(stack):
    s = stack(FAKE_LOAD_SECONDS="30").start()
    s.wait_health(204, deadline=3)
    while not (s.run_dir / "llama-server.pid").exists():
        assert time.monotonic() - s.t0 < BOOT_DEADLINE
        time.sleep(0.05)
    t = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t < 3
    assert processes_mentioning(s.tmp) == []


def llama_args(s: Stack) -> list[str]:
    line = next(ln for ln in s.output().splitlines() if "starting llama-server" in ln)
    return line.split(": ", 2)[2].split()[1:]


def api_status(s: Stack, path: str = "/v1/models") -> int:
    """An API call through the gateway (AUTH_ENABLED=false here): it reaches llama-server."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_llama_flags_are_explicit_and_extra_args_split(stack):
    s = stack(CTX="1024", NGL="0", PARALLEL="2", EXTRA_ARGS="--pooling  mean   --threads 2").start()
    s.wait_health(200)
    assert llama_args(s) == ["-m", str(s.data / "models" / "tiny.gguf"),
                             "--host", str(s.run_dir / "llama-server.sock"),
                             "-c", "1024", "-ngl", "0", "-np", "2", "--metrics", "--alias", "tiny",
                             "--pooling", "mean", "--threads", "2"]
    assert s.stop() == 0


# ---- how the gateway reaches llama-server: Unix socket (default) or TCP --------------------------

def test_unix_socket_is_private_replaces_a_stale_one_and_is_removed_at_exit(stack):
    s = stack()
    sock_path = s.run_dir / "llama-server.sock"
    s.run_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)   # a socket file left by a killed llama-server
    stale.bind(str(sock_path))
    stale.close()
    s.start()
    s.wait_health(200)
    assert "backend unix:" + str(sock_path) in s.output()
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0   # only this user connects
    assert api_status(s) == 200
    # a crash leaves the socket file behind: the restart must still bind
    os.kill(s.pid_of("llama-server"), signal.SIGKILL)
    s.wait_health(204, deadline=3)
    s.wait_health(200)
    assert api_status(s) == 200
    assert s.stop() == 0
    assert not sock_path.exists()


def test_tcp_transport_listens_on_port_backend(stack):
    s = stack(BACKEND_TRANSPORT="tcp").start()
    s.wait_health(200)
    assert llama_args(s)[2:6] == ["--host", "127.0.0.1", "--port", str(s.backend)]
    assert "backend 127.0.0.1:" + str(s.backend) in s.output()
    assert api_status(s) == 200
    assert not (s.run_dir / "llama-server.sock").exists()
    assert s.stop() == 0


def test_backend_socket_path_is_honoured(stack, tmp_path):
    path = tmp_path / "elsewhere" / "llama.sock"
    path.parent.mkdir()
    s = stack(BACKEND_SOCKET=str(path)).start()
    s.wait_health(200)
    assert llama_args(s)[2:4] == ["--host", str(path)]
    assert api_status(s) == 200
    assert s.stop() == 0


@pytest.mark.parametrize("env,names", [
    ({"BACKEND_TRANSPORT": "udp"}, "BACKEND_TRANSPORT"),
    ({"BACKEND_SOCKET": "relative/llama.sock"}, "BACKEND_SOCKET"),
    ({"BACKEND_SOCKET": "/tmp/llama-server.socket"}, "BACKEND_SOCKET"),   # llama-server: *.sock
    ({"BACKEND_SOCKET": "/" + "d" * 110 + "/x.sock"}, "BACKEND_SOCKET"),   # over sun_path
])
def test_bad_backend_transport_exits_2(stack, env, names):
    rc, out = stack(**env).run()
    assert rc == 2
    fatal = [line for line in out.splitlines() if "FATAL" in line]
    assert fatal and names in fatal[0]


def test_a_live_socket_is_not_taken_over(stack, tmp_path):
    path = tmp_path / "busy.sock"
    other = socket.socket(socket.AF_UNIX)     # another process serves on that path
    other.bind(str(path))
    other.listen(1)
    try:
        rc, out = stack(BACKEND_SOCKET=str(path)).run()
        assert rc == 2 and "in use by another process" in out
        assert stat.S_ISSOCK(os.stat(path).st_mode)     # still there, still theirs
    finally:
        other.close()


def test_an_early_exit_leaves_a_socket_it_never_used(stack, tmp_path):
    path = tmp_path / "theirs.sock"
    foreign = socket.socket(socket.AF_UNIX)
    foreign.bind(str(path))
    foreign.close()
    rc, _ = stack(BACKEND_SOCKET=str(path), PORT="80a").run()    # fatal before any start
    assert rc == 2
    assert path.exists()


def test_backend_socket_on_a_regular_file_is_refused_and_kept(stack, tmp_path):
    victim = tmp_path / "notes.sock"
    victim.write_text("not a socket")
    rc, out = stack(BACKEND_SOCKET=str(victim)).run()
    assert rc == 2 and "not a socket" in out
    assert victim.read_text() == "not a socket"


# ---- make run: scripts/run_local.py --dry-run ---------------------------------------------------

RUN_LOCAL = os.path.join(REPO, "scripts", "run_local.py")


def dry_run(tmp_path, gpu: bool, **env) -> tuple[dict[str, str], list[str], str]:
    bindir = tmp_path / ("gpubin" if gpu else "bin")
    bindir.mkdir(exist_ok=True)
    if gpu:
        smi = bindir / "nvidia-smi"
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(0o755)
    full = {"PATH": str(bindir), "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data"),
            "LLAMA_SERVER_BIN": "/opt/llama-server"}
    full.update(env)
    done = subprocess.run([sys.executable, RUN_LOCAL, "--cache-dir", str(tmp_path / "cache"),
                           "--dry-run"], env={k: v for k, v in full.items() if v is not None},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    shown = dict(ln[4:].split("=", 1) for ln in done.stdout.splitlines() if ln.startswith("ENV "))
    execs = [ln[5:] for ln in done.stdout.splitlines() if ln.startswith("EXEC ")]
    return shown, execs, done.stderr


def test_run_local_dry_run_defaults_without_gpu(tmp_path):
    shown, execs, err = dry_run(tmp_path, gpu=False)
    assert shown["NGL"] == "0" and shown["CTX"] == "2048"
    assert shown["MODEL_NAME"] == "demo-tiny-llama.gguf"
    assert shown["DATA_DIR"] == str(tmp_path / "data")
    assert execs == [f"bash {ENTRYPOINT}"]
    assert "would make the demo model" in err and "make_model.py" in err
    assert "would create a first key" in err
    assert not (tmp_path / "data").exists()  # a dry run writes nothing


def test_run_local_dry_run_keeps_user_settings_and_gpu_default(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    shown, _, err = dry_run(tmp_path, gpu=True, MODEL_PATH=str(model), CTX="4096",
                            LLAMA_SERVER_BIN=None)
    assert "NGL" not in shown  # a GPU: entrypoint.sh's default (99) applies
    assert shown["CTX"] == "4096" and shown["MODEL_PATH"] == str(model)
    assert "MODEL_NAME" not in shown and "demo model" not in err
    assert "would find or build llama-server" in err and "--ensure" in err


def test_run_local_existing_key_is_not_replaced(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:sk-" + "a" * 40 + "\n")
    keys.chmod(0o600)
    _, _, err = dry_run(tmp_path, gpu=False, AUTH_KEYS_FILE=str(keys))
    assert "would create a first key" not in err
    assert "keys exist" in err and "curl -s http://127.0.0.1:8000/v1/chat/completions" in err


# ---- router mode (MODELS_DIR): llama-server's router over many models -----------------------------

FAKE_ROUTER = os.path.join(REPO, "tests", "fakes", "fake_router.py")
GGUF_BYTES = b"GGUF" + b"\0" * 60


def router_stack(stack, tmp_path, models=("alpha.gguf", "beta.gguf", "gamma/gamma-q8.gguf"),
                 **env) -> Stack:
    """A Stack whose llama-server is the fake router, over a MODELS_DIR of fake GGUF files
    (a name ending in .broken gets bytes that fail to load)."""
    models_dir = tmp_path / "many"
    for rel in models:
        path = models_dir / rel.removesuffix(".broken")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"junk" if rel.endswith(".broken") else GGUF_BYTES)
    env.setdefault("MODELS_DIR", str(models_dir))
    env.setdefault("MODEL_NAME", None)
    s = stack(**env)
    (tmp_path / "llama-server").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_ROUTER} "$@"\n')
    s.models_dir = models_dir
    return s


def router_models(s: Stack) -> dict:
    conn = http.client.HTTPConnection("localhost", timeout=2)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2)
    sock.connect(str(s.run_dir / "llama-server.sock"))
    conn.sock = sock
    try:
        conn.request("GET", "/models?autoload=false")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {m["id"]: m["status"]["value"] for m in data["data"]}


def test_router_mode_boots_with_a_generated_preset_and_waits_for_preload(stack, tmp_path):
    s = router_stack(stack, tmp_path, MODELS_PRELOAD="beta", FAKE_LOAD_SECONDS="1", CTX="2048")
    s.run_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)          # left behind by a killed router
    stale.bind(str(s.run_dir / "llama-server.sock"))
    stale.close()
    s.start()
    s.wait_health(204, deadline=3)
    t_ready = s.wait_health(200)
    assert t_ready - s.t0 >= 1.0                   # not before beta finished loading
    preset = s.run_dir / "models-preset.ini"
    args = llama_args(s)
    assert args == ["--models-preset", str(preset), "--models-max", "1", "--no-models-autoload",
                    "--host", str(s.run_dir / "llama-server.sock"), "--metrics"]
    text = preset.read_text()
    assert "[*]\nstop-timeout = 5\nctx-size = 2048\nn-gpu-layers = 99\nparallel = 1\n" in text
    assert f"[beta]\nmodel = {s.models_dir / 'beta.gguf'}\nload-on-startup = true\n" in text
    assert f"[gamma]\nmodel = {s.models_dir / 'gamma' / 'gamma-q8.gguf'}\n" in text
    assert router_models(s) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    out = s.output()
    assert "models_preset: 3 model(s): alpha, beta, gamma" in out
    assert "preload models loaded: beta=loaded" in out
    assert s.stop() == 0
    assert not (s.run_dir / "llama-server.sock").exists()


def test_router_mode_default_model_is_preloaded_and_max_0_preloads_through_the_router(
        stack, tmp_path):
    s = router_stack(stack, tmp_path, MODEL_NAME="gamma", MODELS_MAX="0",
                     MODELS_PRELOAD="alpha,gamma").start()
    s.wait_health(200)
    # llama-server's load-on-startup breaks with --models-max 0: loaded by request instead
    assert "load-on-startup" not in (s.run_dir / "models-preset.ini").read_text()
    assert router_models(s) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
    assert s.stop() == 0


def test_router_mode_without_preload_is_ready_at_once(stack, tmp_path):
    s = router_stack(stack, tmp_path).start()
    s.wait_health(200)
    assert router_models(s) == {"alpha": "unloaded", "beta": "unloaded", "gamma": "unloaded"}
    assert s.stop() == 0


@pytest.mark.parametrize("env,message", [
    ({"MODELS_PRELOAD": "alpha,beta"}, "MODELS_MAX=1"),
    ({"MODELS_PRELOAD": "delta"}, "MODELS_PRELOAD: no model 'delta'"),
    ({"MODELS_MAX": "many"}, "MODELS_MAX: must be a whole number"),   # config.py's check
    ({"MODEL_NAME": "delta.gguf"}, "the default model"),
    ({"MODELS_PRESET": "PRESET"}, "models.ini:2: unknown key 'bogus'"),
    ({"MODELS_PRESET": "/nonexistent/models.ini"}, "cannot read it"),
])
def test_router_mode_bad_configuration_exits_2_before_starting(stack, tmp_path, env, message):
    ini = tmp_path / "conf" / "models.ini"        # not $DATA_DIR/models.ini: not the default
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("[alpha]\nbogus = 1\n")
    env = {k: (str(ini) if v == "PRESET" else v) for k, v in env.items()}
    s = router_stack(stack, tmp_path, **env)
    rc, out = s.run()
    assert rc == 2
    assert message in out
    assert not (s.run_dir / "health_server.pid").exists()


def test_router_mode_reads_data_dir_models_ini_by_default(stack, tmp_path):
    ini = tmp_path / "data" / "models.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("[alpha]\nalias = first\nc = 512\n")
    s = router_stack(stack, tmp_path, MODELS_PRELOAD="first").start()
    s.wait_health(200)
    text = (s.run_dir / "models-preset.ini").read_text()
    assert "alias = first\nctx-size = 512\nload-on-startup = true\n" in text
    assert router_models(s)["alpha"] == "loaded"
    assert s.stop() == 0


def test_router_mode_broken_preload_model_fails_the_worker(stack, tmp_path):
    s = router_stack(stack, tmp_path, models=("alpha.gguf", "broken.gguf.broken"),
                     MODELS_PRELOAD="broken", MAX_RESTARTS="0")
    rc, out = s.run()
    assert rc == 1
    assert "preload model failed: broken: llama-server's instance exited with code 1" in out
    assert (s.run_dir / "health").read_text().strip() == "failed"
