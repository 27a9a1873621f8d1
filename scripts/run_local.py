"""`make run`: the whole stack on this machine, on the tiny demo model, with a first API key.

    python3 scripts/run_local.py [--cache-dir DIR] [--dry-run]

1. llama-server: $LLAMA_SERVER_BIN, else found or built by `scripts/llama_bin.py --ensure`.
2. model: MODEL_PATH or MODEL_NAME when set; else the demo model data/models/demo-tiny-llama.gguf
   under DATA_DIR (default: the repo's data/), made by `.venv/bin/python tests/tools/make_model.py`.
3. API key: when auth is on and the key file ($AUTH_KEYS_FILE, default $DATA_DIR/api_keys.txt) has
   no key, `scripts/keys.py add local` makes one; it is printed once with a curl line to paste.
4. exec entrypoint.sh with CTX 2048 and, when there is no GPU (no nvidia-smi), NGL 0, unless set.

--dry-run builds, writes and starts nothing: it prints the environment it would set
(`ENV NAME=VALUE` lines) and the command it would exec (`EXEC ...`). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(REPO, "entrypoint.sh")
DEMO_MODEL_NAME = "demo-tiny-llama.gguf"
FIRST_KEY_NAME = "local"
# The tiny demo model is trained on nothing; 2048 tokens of context keep its memory small.
LOCAL_CTX = "2048"
# Variables shown by --dry-run, in this order (when set).
SHOWN = ("DATA_DIR", "MODEL_PATH", "MODEL_NAME", "LLAMA_SERVER_BIN", "NGL", "CTX", "PORT",
         "AUTH_KEYS_FILE")
# A find on PATH/cache is instant; a first build compiles llama.cpp (~10-20 min on 2 cores).
BUILD_TIMEOUT_S = 3600
# Making the demo model (a few MB of random weights) and key-file commands take a second or so.
TOOL_TIMEOUT_S = 300
_FALSE = {"0", "false", "no", "off"}


def say(msg: str) -> None:
    print(f"run_local: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str], timeout: float, capture: bool = False) -> str:
    """Run a tool; exit 1 naming it when it fails. Returns its stdout when captured."""
    try:
        done = subprocess.run(cmd, env=env, timeout=timeout, check=False, text=True,
                              stdout=subprocess.PIPE if capture else None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"FATAL: {' '.join(cmd)}: {exc}")
        sys.exit(1)
    if done.returncode != 0:
        say(f"FATAL: {' '.join(cmd)} exited {done.returncode}")
        sys.exit(1)
    return done.stdout or ""


def curl_line(port: str, key: str) -> str:
    return (f"curl -s http://127.0.0.1:{port}/v1/chat/completions "
            f"-H \"Authorization: Bearer {key}\" -H \"Content-Type: application/json\" "
            "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'")


def count_keys(key_file: str, env: dict[str, str]) -> int:
    if not os.path.exists(key_file):
        return 0
    out = run([sys.executable, os.path.join(REPO, "scripts", "keys.py"), "--file", key_file,
               "list"], env, TOOL_TIMEOUT_S, capture=True)
    return max(0, len(out.strip().splitlines()) - 1)  # minus the header line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default="", help="llama-server build cache (llama_bin.py)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the env and the command, build/write/start nothing")
    args = ap.parse_args(argv)
    dry = args.dry_run
    env = dict(os.environ)
    env.setdefault("DATA_DIR", os.path.join(REPO, "data"))
    env["DATA_DIR"] = os.path.abspath(env["DATA_DIR"])
    if args.cache_dir:
        env["LLAMA_CACHE"] = os.path.abspath(args.cache_dir)  # make_model finds the vocab there
    cache_args = ["--cache-dir", env["LLAMA_CACHE"]] if args.cache_dir else []

    # 1. llama-server
    if not env.get("LLAMA_SERVER_BIN"):
        cmd = [sys.executable, os.path.join(REPO, "scripts", "llama_bin.py"), "--ensure",
               *cache_args]
        if dry:
            say(f"would find or build llama-server: {' '.join(cmd)}")
        else:
            say("finding llama-server (a first build takes a while) ...")
            env["LLAMA_SERVER_BIN"] = run(cmd, env, BUILD_TIMEOUT_S, capture=True).strip()

    # 2. model
    if not env.get("MODEL_PATH") and not env.get("MODEL_NAME"):
        env["MODEL_NAME"] = DEMO_MODEL_NAME
        model = os.path.join(env["DATA_DIR"], "models", DEMO_MODEL_NAME)
        if not os.path.exists(model):
            cmd = [os.path.join(REPO, ".venv", "bin", "python"),
                   os.path.join(REPO, "tests", "tools", "make_model.py"), "--out", model]
            if dry:
                say(f"would make the demo model: {' '.join(cmd)}")
            else:
                run(cmd, env, TOOL_TIMEOUT_S)

    # 3. a first API key
    port = env.get("PORT") or "8000"
    key_file = env.get("AUTH_KEYS_FILE") or os.path.join(env["DATA_DIR"], "api_keys.txt")
    if env.get("AUTH_ENABLED", "").strip().lower() in _FALSE:
        say(f"AUTH_ENABLED is off: no key needed\n  {curl_line(port, 'none')}")
    elif count_keys(key_file, env) == 0:
        cmd = [sys.executable, os.path.join(REPO, "scripts", "keys.py"), "--file", key_file,
               "add", FIRST_KEY_NAME]
        if dry:
            say(f"would create a first key: {' '.join(cmd)}")
        else:
            key = run(cmd, env, TOOL_TIMEOUT_S, capture=True).strip()
            print(f"\nYour first API key (shown once, kept in {key_file}):\n  {key}\n"
                  f"Try it once the stack says ready:\n  {curl_line(port, key)}\n", flush=True)
    else:
        say(f"keys exist in {key_file}; list them with: make keys ARGS=list; "
            f"make a new one with: make keys ARGS=\"add NAME\"\n  {curl_line(port, 'YOUR_KEY')}")

    # 4. the entrypoint, with small local defaults
    env.setdefault("CTX", LOCAL_CTX)
    if "NGL" not in env and shutil.which("nvidia-smi", path=env.get("PATH")) is None:
        env["NGL"] = "0"
    cmd = ["bash", ENTRYPOINT]
    if dry:
        for name in SHOWN:
            if name in env:
                print(f"ENV {name}={env[name]}")
        print(f"EXEC {' '.join(cmd)}")
        return 0
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
