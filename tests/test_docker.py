"""Docker packaging, checked without a Docker engine.

The Dockerfiles, docker/compose.yaml, docker/env.example and .dockerignore are parsed and checked
against the code: every COPY source exists and is in the build context, every ENV is read by the
code and equals its default, the exposed ports are the config's, the user is not root, the
healthcheck probes the health port and maps 204/200/503 to Docker's unhealthy/healthy/unhealthy.
Then entrypoint.sh runs in the image's layout (entrypoint.sh, scripts/ and llama-server side by
side in one app directory, llama-server not on PATH) with the Dockerfile's environment, a fake
llama-server in place of the real one: health 204 -> 200, gateway /ping 200, SIGTERM -> exit 0.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from llamagw import config

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ENTRYPOINT = ROOT / "entrypoint.sh"
FAKE_LLAMA = ROOT / "tests" / "fakes" / "fake_llama.py"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILE_CPU = ROOT / "docker" / "Dockerfile.cpu"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {"cuda": DOCKERFILE, "cpu": DOCKERFILE_CPU}

# Upstream images (llama.cpp .devops/cuda.Dockerfile, cpu.Dockerfile, target "server").
BASE_IMAGES = {"cuda": "ghcr.io/ggml-org/llama.cpp:server-cuda",
               "cpu": "ghcr.io/ggml-org/llama.cpp:server"}
# Where the image puts things: the llama.cpp server image has /app/llama-server, WORKDIR /app.
APP_DIR = "/app"
# The only ARG defaults the CPU file may change, and to what.
CPU_ARG_OVERRIDES = {"BASE_IMAGE": BASE_IMAGES["cpu"], "DEFAULT_NGL": "0"}
# ENV the image sets for programs other than ours, and the value each must have.
EXTERNAL_ENV = {
    "PYTHONUNBUFFERED": "1",                                  # log lines reach docker logs at once
    "LLAMA_ARG_HOST": config.Config().backend_host,           # llama-server's own env fallback
}
# Defaults that depend on the machine (mounted volumes): the image must not pin them.
DERIVED_DEFAULTS = {"DATA_DIR", "AUTH_KEYS_FILE", "USAGE_JOURNAL_MODE"}

# Runtime test deadlines (seconds). The fake llama-server "loads" for FAKE_LOAD_S so that the
# health server's 204 is observable; boot (three Python processes) takes ~1 s on a slow machine.
FAKE_LOAD_S = 1.5
BOOT_DEADLINE_S = 15.0
STOP_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.05
HTTP_TIMEOUT_S = 2.0
HEALTHCHECK_RUN_TIMEOUT_S = 10.0


# ---- a small Dockerfile parser ------------------------------------------------------------------
def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comment lines dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):  # also inside a continuation, as Docker does
            continue
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            instr, _, args = full.partition(" ")
            out.append((instr.upper(), args.strip()))
    assert not pending, f"{path.name}: file ends inside a line continuation"
    return out


def arg_defaults(instrs) -> dict[str, str]:
    args = {}
    for instr, rest in instrs:
        if instr == "ARG":
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip()
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    def repl(m):
        name = m.group(1) or m.group(2)
        assert name in values, f"${name} is not a declared ARG/ENV"
        return values[name]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


def env_of(instrs) -> dict[str, str]:
    """The image's ENV, ARG defaults substituted (only the KEY=VALUE form is allowed)."""
    args = arg_defaults(instrs)
    env: dict[str, str] = {}
    for instr, rest in instrs:
        if instr == "ENV":
            for item in shlex.split(rest):
                assert "=" in item, f"ENV must use KEY=VALUE, got {item!r}"
                name, _, value = item.partition("=")
                env[name] = substitute(value, {**args, **env})
    return env


def only(instrs, name: str) -> str:
    found = [rest for instr, rest in instrs if instr == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def healthcheck(instrs) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK options and its CMD in exec form."""
    rest = only(instrs, "HEALTHCHECK")
    opts = dict(re.findall(r"--([a-z-]+)=(\S+)", rest))
    cmd = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
    assert cmd, "HEALTHCHECK needs CMD in exec form"
    return opts, exec_form(cmd.group(1))


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert m, f"bad duration {text!r}"
    return float(m.group(1)) * units[m.group(2)]


# ---- what the code reads, and its defaults --------------------------------------------------------
def _shell_code_lines() -> list[str]:
    return [line for line in ENTRYPOINT.read_text().splitlines()
            if not line.lstrip().startswith("#")]


def read_by_code(name: str) -> bool:
    """The variable is read by scripts/*.py (as a string literal) or by entrypoint.sh code."""
    for py in SCRIPTS.rglob("*.py"):
        if f'"{name}"' in py.read_text():
            return True
    pat = re.compile(rf"\$\{{?{name}\b|^\s*(int_var|secs_var) {name}\b")
    return any(pat.search(line) for line in _shell_code_lines())


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def code_defaults() -> dict[str, str]:
    """Default of every variable whose default is fixed: entrypoint.sh, scripts/*.py, config."""
    out: dict[str, str] = {}
    for line in _shell_code_lines():
        m = re.match(r"\s*(?:int_var|secs_var) ([A-Z_][A-Z0-9_]*) (\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
        for name, value in re.findall(r"\b([A-Z_][A-Z0-9_]*)=\$\{\1:-([^}$]*)\}", line):
            out[name] = value
    for py in SCRIPTS.rglob("*.py"):
        for name, value in re.findall(r'environ\.get\("([A-Z_][A-Z0-9_]*)", "([^"]*)"\)',
                                      py.read_text()):
            out[name] = value
    cfg = config.load_config({})
    for field in cfg.__dataclass_fields__:
        name = field.upper()
        if name not in DERIVED_DEFAULTS and read_by_code(name):
            out.setdefault(name, _as_text(getattr(cfg, field)))
    return out


def same_value(a: str, b: str) -> bool:
    """Equal as numbers when both are numbers ("30" == "30.0"), else as text."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# ---- .dockerignore matching (moby patternmatcher semantics, the subset we use) ---------------------
def _glob_re(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out += pattern[i:j + 1]
            i = j + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(rel_path: str) -> bool:
    """True when .dockerignore leaves rel_path out of the build context (last match wins; a
    pattern that matches a parent directory matches everything under it)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        rules.append((neg, _glob_re(pattern)))
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for neg, rx in rules:
        if any(rx.match(c) for c in candidates):
            excluded = not neg
    return excluded


# ---- the Dockerfiles ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def variant(request):
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


def test_base_image_is_the_llama_cpp_server_image(variant):
    kind, instrs = variant
    assert instrs[0] == ("ARG", f"BASE_IMAGE={BASE_IMAGES[kind]}")
    assert only(instrs, "FROM") == "${BASE_IMAGE}"


def test_cpu_file_differs_from_the_main_one_only_in_arg_defaults():
    main, cpu = parse_dockerfile(DOCKERFILE), parse_dockerfile(DOCKERFILE_CPU)
    assert len(main) == len(cpu)
    changed = {}
    for (mi, mr), (ci, cr) in zip(main, cpu):
        if (mi, mr) != (ci, cr):
            assert mi == ci == "ARG", f"{mi} {mr!r} != {ci} {cr!r}"
            name, _, value = cr.partition("=")
            assert mr.partition("=")[0] == name
            changed[name] = value
    assert changed == CPU_ARG_OVERRIDES
    assert env_of(cpu)["NGL"] == "0"
    assert env_of(main)["NGL"] == code_defaults()["NGL"]


def test_copy_sources_exist_are_in_the_context_and_land_in_app(variant):
    _, instrs = variant
    copies = [rest for instr, rest in instrs if instr == "COPY"]
    assert copies
    dests = {}
    for rest in copies:
        words = [w for w in rest.split() if not w.startswith("--")]
        assert "--from" not in rest
        *sources, dest = words
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY source {src} missing"
            assert not dockerignored(src), f"COPY source {src} is excluded by .dockerignore"
            dests[src.rstrip("/")] = dest
    assert dests == {"scripts": f"{APP_DIR}/scripts/", "entrypoint.sh": f"{APP_DIR}/entrypoint.sh"}
    assert only(instrs, "WORKDIR") == APP_DIR


def test_entrypoint_replaces_the_base_one_and_is_executable(variant):
    _, instrs = variant
    assert exec_form(only(instrs, "ENTRYPOINT")) == [f"{APP_DIR}/entrypoint.sh"]
    assert not [rest for instr, rest in instrs if instr == "CMD"]
    assert os.access(ENTRYPOINT, os.X_OK)
    # COPY keeps the mode git checks out: the index must say executable too.
    staged = subprocess.run(["git", "ls-files", "-s", "entrypoint.sh"], cwd=ROOT,
                            capture_output=True, text=True, timeout=10, check=True).stdout
    assert staged.split()[0] == "100755", staged


def test_only_python3_is_installed_without_recommends_and_apt_lists_cleaned(variant):
    _, instrs = variant
    runs = " && ".join(rest for instr, rest in instrs if instr == "RUN")
    installs = re.findall(r"apt-get install ([^&;]+)", runs)
    assert [i.split() for i in installs] == [["-y", "--no-install-recommends", "python3"]]
    assert "rm -rf /var/lib/apt/lists/*" in runs
    assert "pip" not in runs


def test_exposed_ports_are_the_config_defaults(variant):
    _, instrs = variant
    cfg = config.load_config({})
    exposed = {int(p.split("/")[0]) for p in only(instrs, "EXPOSE").split()}
    assert exposed == {cfg.port, cfg.port_health}
    assert cfg.port_backend not in exposed  # llama-server stays on loopback


def test_every_env_is_read_by_the_code_and_equals_its_default(variant):
    _, instrs = variant
    env = env_of(instrs)
    defaults = code_defaults()
    for name, value in env.items():
        if name in EXTERNAL_ENV:
            assert value == EXTERNAL_ENV[name], name
            continue
        if name == "NGL":
            continue  # checked per variant in test_cpu_file_differs_...
        assert read_by_code(name), f"ENV {name} is read by nothing in scripts/ or entrypoint.sh"
        assert name in defaults, f"ENV {name}: no fixed default in the code"
        assert same_value(value, defaults[name]), f"ENV {name}={value}, code: {defaults[name]}"
    assert not DERIVED_DEFAULTS & env.keys(), "machine-dependent defaults must stay unset"
    for name in ("PORT", "PORT_HEALTH", "PORT_BACKEND", "RUN_DIR", "CTX", "NGL"):
        assert name in env


def test_entrypoint_and_config_agree_on_shared_defaults():
    cfg = config.load_config({})
    defaults = code_defaults()
    for name in ("PORT", "PORT_HEALTH", "PORT_BACKEND", "RUN_DIR", "HOST", "WORKER_TYPE",
                 "GRACEFUL_TIMEOUT"):
        assert same_value(defaults[name], _as_text(getattr(cfg, name.lower()))), name


def test_runs_as_a_fixed_non_root_user_who_owns_data(variant):
    _, instrs = variant
    args = arg_defaults(instrs)
    user = substitute(only(instrs, "USER"), args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    runs = {i: substitute(rest, args).replace('"', "")
            for i, (instr, rest) in enumerate(instrs) if instr == "RUN"}
    assert any(f"useradd --uid {uid} --gid {gid}" in r for r in runs.values())
    chown = [i for i, r in runs.items() if re.search(rf"chown {uid}:{gid} /data\b", r)]
    assert chown, "/data must be chowned to the user"
    order = [instr for instr, _ in instrs]
    assert only(instrs, "VOLUME") == "/data"
    assert chown[0] < order.index("VOLUME") < order.index("USER")


def test_signals_and_python_output(variant):
    _, instrs = variant
    assert only(instrs, "STOPSIGNAL") == "SIGTERM"
    assert env_of(instrs)["PYTHONUNBUFFERED"] == "1"


def test_healthcheck_options(variant):
    _, instrs = variant
    opts, cmd = healthcheck(instrs)
    assert cmd[0] == "python3"
    # Reads PORT_HEALTH, falling back to the config default (exec form: no shell expansion).
    assert "PORT_HEALTH" in cmd[-1] and f"'{config.Config().port_health}'" in cmd[-1]
    # A normal model load must not count against the retries.
    assert duration_s(opts["start-period"]) >= float(code_defaults()["MODEL_LOAD_TIMEOUT"])
    assert duration_s(opts["timeout"]) > 1
    assert int(opts["retries"]) >= 1


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,healthy", [(200, True), (204, False), (503, False)])
def test_healthcheck_command_maps_statuses(status, healthy):
    handler = type("H", (_StatusHandler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, cmd = healthcheck(parse_dockerfile(DOCKERFILE))
        rc = _run_healthcheck(cmd, {"PORT_HEALTH": str(server.server_address[1]),
                                    "HOST": "0.0.0.0"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert rc == (0 if healthy else 1)


def test_healthcheck_command_fails_when_nothing_listens():
    port = _free_ports(1)[0]
    _, cmd = healthcheck(parse_dockerfile(DOCKERFILE))
    assert _run_healthcheck(cmd, {"PORT_HEALTH": str(port)}) == 1


def _run_healthcheck(cmd: list[str], env: dict[str, str]) -> int:
    full_env = {"PATH": os.environ["PATH"], **env}
    return subprocess.run(cmd, env=full_env, capture_output=True,
                          timeout=HEALTHCHECK_RUN_TIMEOUT_S).returncode


# ---- .dockerignore ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [".git/config", ".venv/bin/python", "tests/test_docker.py",
                                  "data/models/demo-tiny-llama.gguf", "data/api_keys.txt",
                                  "bench-results/run.json", ".pytest_cache/v/x",
                                  "scripts/__pycache__/config.cpython-312.pyc", "Makefile"])
def test_dockerignore_leaves_out(path):
    assert dockerignored(path)


@pytest.mark.parametrize("path", ["entrypoint.sh", "scripts", "scripts/gateway.py",
                                  "scripts/llamagw/config.py"])
def test_dockerignore_keeps(path):
    assert not dockerignored(path)


# ---- env.example --------------------------------------------------------------------------------------
def env_example() -> dict[str, str]:
    entries = {}
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if m:
            assert m.group(1) not in entries, f"{m.group(1)} listed twice"
            assert "#" not in m.group(2), f"{m.group(1)}: docker --env-file keeps inline comments"
            assert i > 0 and lines[i - 1].startswith("# "), f"{m.group(1)} has no comment line"
            entries[m.group(1)] = m.group(2)
    return entries


def test_env_example_names_exist_and_show_the_defaults():
    entries = env_example()
    defaults = code_defaults()
    for name, value in entries.items():
        assert read_by_code(name), f"env.example: {name} is read by nothing"
        if value == "":  # "not set": the code must treat it so (no fixed non-empty default)
            assert defaults.get(name, "") == "" or name in DERIVED_DEFAULTS, name
        else:
            assert name in defaults and same_value(value, defaults[name]), \
                f"env.example {name}={value}, code: {defaults.get(name)}"


def test_env_example_lists_every_setting():
    entries = env_example()
    cfg_names = {f.upper() for f in config.Config.__dataclass_fields__}
    shell_names = {m.group(1) for line in _shell_code_lines()
                   for m in [re.match(r"\s*(?:int_var|secs_var) ([A-Z_]+)", line)] if m}
    wanted = ({n for n in cfg_names if read_by_code(n)} | shell_names
              | {"MODEL_NAME", "MODEL_PATH", "LLAMA_SERVER_BIN", "EXTRA_ARGS", "DATA_DIR",
                 "RUN_DIR", "HOST", "WORKER_TYPE", "AUTH_KEYS_FILE", "LOG_LEVEL"})
    assert wanted - entries.keys() == set()
    image_env = env_of(parse_dockerfile(DOCKERFILE))
    assert set(image_env) - set(EXTERNAL_ENV) <= entries.keys()


# ---- compose ------------------------------------------------------------------------------------------
def test_compose_references_existing_files_and_the_image_contract():
    doc = yaml.safe_load(COMPOSE.read_text())
    base = COMPOSE.parent
    (svc,) = doc["services"].values()
    context = (base / svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    env_files = [e if isinstance(e, str) else e["path"] for e in svc["env_file"]]
    assert env_files and all((base / e).is_file() for e in env_files)
    cfg = config.load_config({})
    ports = {tuple(int(x) for x in p.split(":")) for p in svc["ports"]}
    assert ports == {(cfg.port, cfg.port), (cfg.port_health, cfg.port_health)}
    (volume,) = svc["volumes"]
    host, container = volume.split(":")
    assert (base / host).resolve() == ROOT / "data" and container == "/data"
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "healthcheck" not in svc  # the Dockerfile's applies
    # docker stop must outlast the drain plus llama-server's stop.
    defaults = code_defaults()
    grace = float(defaults["GRACEFUL_TIMEOUT"]) + float(defaults["LLAMA_STOP_TIMEOUT"])
    assert duration_s(svc["stop_grace_period"]) > grace


# ---- entrypoint.sh in the image's layout --------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _path_without_llama_server() -> str:
    dirs = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "llama-server"))]
    return os.pathsep.join(dirs)


def test_entrypoint_boots_and_stops_in_the_image_layout(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    shutil.copytree(SCRIPTS, app / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ENTRYPOINT, app / "entrypoint.sh")
    shim = app / "llama-server"  # where the llama.cpp image has it: next to entrypoint.sh
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_LLAMA}" "$@"\n')
    shim.chmod(0o755)
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "models").mkdir(parents=True)
    (data / "models" / "tiny.gguf").write_bytes(b"GGUF")

    port, port_health, port_backend = _free_ports(3)
    image_env = env_of(parse_dockerfile(DOCKERFILE))
    env = {**image_env,
           "PORT": str(port), "PORT_HEALTH": str(port_health), "PORT_BACKEND": str(port_backend),
           "DATA_DIR": str(data), "RUN_DIR": str(run),
           "HOST": "127.0.0.1",  # the image listens on 0.0.0.0; a test stays on loopback
           "MODEL_NAME": "tiny.gguf", "PATH": _path_without_llama_server(),
           "HOME": str(tmp_path), "FAKE_LOAD_SECONDS": str(FAKE_LOAD_S)}
    assert shutil.which("llama-server", path=env["PATH"]) is None
    _, health_cmd = healthcheck(parse_dockerfile(DOCKERFILE))

    log_path = tmp_path / "entrypoint.out"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(app / "entrypoint.sh")], cwd=app, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seen, health_rc_loading = [], None
        deadline = time.monotonic() + BOOT_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            code = _status(f"http://127.0.0.1:{port_health}/ping")
            if code and (not seen or seen[-1] != code):
                seen.append(code)
            if code == 204 and health_rc_loading is None:
                health_rc_loading = _run_healthcheck(health_cmd, env)
            if code == 200:
                break
            time.sleep(POLL_INTERVAL_S)
        out = log_path.read_text(errors="replace")
        assert seen and seen[0] == 204 and seen[-1] == 200 and set(seen) <= {204, 200}, \
            f"health statuses {seen}\n{out}"
        assert health_rc_loading == 1, "HEALTHCHECK must not pass while loading"
        assert _run_healthcheck(health_cmd, env) == 0
        assert _status(f"http://127.0.0.1:{port}/ping") == 200
        assert f"llama-server {app}/llama-server" in out, out

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=STOP_DEADLINE_S)
        out = log_path.read_text(errors="replace")
        assert rc == 0, out
        assert _status(f"http://127.0.0.1:{port_health}/ping") == 0  # everything is gone
        assert _status(f"http://127.0.0.1:{port}/ping") == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_DEADLINE_S)
