"""The README's curl example, run verbatim against the stack started by `make run`'s code path
(scripts/run_local.py: finds llama-server, makes the demo model, creates and prints a first key,
execs entrypoint.sh). Only the host port and $API_KEY are filled in, as a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from e2e_stack import REPO, free_port, processes_mentioning, request, server_bin

README = REPO / "README.md"
MARKER = "<!-- readme-curl"


def readme_curl_block() -> str:
    text = README.read_text()
    after = text[text.index(MARKER):]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start:after.index("```", start)]


def test_readme_curl_block_is_a_single_curl_call():
    block = readme_curl_block()
    assert block.lstrip().startswith("curl ")
    assert "$API_KEY" in block and "127.0.0.1:8000" in block


def test_readme_curl_against_make_run(tmp_path):
    port, health, backend = free_port(), free_port(), free_port()
    env = dict(os.environ, DATA_DIR=str(tmp_path / "data"), RUN_DIR=str(tmp_path / "run"),
               PORT=str(port), PORT_HEALTH=str(health), PORT_BACKEND=str(backend),
               HOST="127.0.0.1", LLAMA_SERVER_BIN=server_bin(), GRACEFUL_TIMEOUT="2",
               PYTHON=sys.executable)
    for name in ("MODEL_PATH", "MODEL_NAME", "AUTH_KEYS_FILE", "AUTH_ENABLED"):
        env.pop(name, None)
    out_path = tmp_path / "make-run.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_local.py")],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        key = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, out_path.read_text()
            log = out_path.read_text(errors="replace")
            found = re.search(r"^\s+(sk-\S+)\s*$", log, re.M)
            key = key or (found.group(1) if found else None)
            try:
                ready = request(health, "/ping", timeout=5)[0] == 200
            except OSError:
                ready = False
            if key and ready:
                break
            time.sleep(0.1)
        assert key and ready, out_path.read_text()
        assert (tmp_path / "data" / "models" / "demo-tiny-llama.gguf").is_file()
        block = readme_curl_block().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-c", block], env=dict(os.environ, API_KEY=key),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(5)
    assert processes_mentioning(str(tmp_path)) == []
