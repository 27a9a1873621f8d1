"""entrypoint.sh with models by URL (issue 30): MODEL_URL / MODELS_URLS downloaded from the loopback
hub (tests/fakes/fake_hub.py) while the health server answers 204, 503 when the download fails for
good, and the downloaded file handed to the (fake) llama-server."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import time

import pytest
from fakes.fake_hub import SIGNATURE, FakeHub
from test_entrypoint import (  # noqa: F401  (stack is a fixture)
    BOOT_DEADLINE,
    GGUF_BYTES,
    health,
    llama_args,
    router_models,
    router_stack,
    stack,
)

TOKEN = "hf_test_token_never_logged"
# The model: 3 MB sent at 3 MB/s, so the download takes about a second (long enough to see 204).
MODEL = b"GGUF" + bytes(range(256)) * (3 * 4096)
RATE = 3e6


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as h:
        yield h


def url_stack(stack, hub, **env):
    env = {"MODEL_NAME": None, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, **env}
    return stack(**env)


def test_model_url_downloads_while_health_answers_204_then_serves_it(stack, hub):
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    hub.add("acme/tiny-GGUF", "tiny-Q8_0.gguf", b"GGUF other")
    hub.rate = RATE
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF:q4_k_m").start()
    model = s.data / "models" / "tiny-Q4_K_M.gguf"
    partial = s.data / "models" / ".tiny-Q4_K_M.gguf.partial"
    s.wait_health(204, deadline=3)
    seen_partial = False
    end = time.monotonic() + BOOT_DEADLINE
    while not model.exists() and time.monotonic() < end:   # the download, seen from outside
        if partial.exists():
            assert health(s.health_port) == 204
            assert (s.run_dir / "health").read_text().strip() == "starting"
            assert not (s.run_dir / "gateway.pid").exists()    # nothing serves a missing model
            seen_partial = True
        time.sleep(0.05)
    assert seen_partial
    s.wait_health(200)
    assert hashlib.sha256(model.read_bytes()).digest() == hashlib.sha256(MODEL).digest()
    args = llama_args(s)
    assert args[args.index("-m") + 1] == str(model)
    assert args[args.index("--alias") + 1] == "tiny-Q4_K_M"
    out = s.output()
    assert "fetch_model INFO: tiny-Q4_K_M.gguf: downloaded 3.1 MB" in out
    assert TOKEN not in out and SIGNATURE not in out
    assert not partial.exists() and not (s.data / "models" / ".tiny-Q4_K_M.gguf.lock").exists()
    cdn_auth = [r for r in hub.requests if r[0] == "cdn" and "authorization" in r[3]]
    assert cdn_auth == []
    assert s.stop() == 0


def test_a_model_already_downloaded_is_used_without_the_hub(stack, hub, tmp_path):
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF/tiny-Q4_K_M.gguf").start()
    s.wait_health(200)
    assert s.stop() == 0
    gets = hub.cdn_gets
    hub.stop()                                             # the hub is down on the second boot
    s.out.close()
    s.out_path = tmp_path / "stdout2.log"
    s.start()
    s.wait_health(200)
    assert hub.cdn_gets == gets
    assert "using tiny-Q4_K_M.gguf, downloaded earlier" in s.output()
    assert s.stop() == 0


def test_model_path_says_where_a_plain_url_goes(stack, hub, tmp_path):
    hub.files["tiny.gguf"] = MODEL
    target = tmp_path / "elsewhere" / "custom.gguf"
    s = url_stack(stack, hub, MODEL_URL=f"{hub.cdn}/files/tiny.gguf?sig=abc",
                  MODEL_PATH=str(target), MODEL_SHA256=hashlib.sha256(MODEL).hexdigest())
    s.start()
    s.wait_health(200)
    assert target.read_bytes() == MODEL
    args = llama_args(s)
    assert args[args.index("-m") + 1] == str(target)
    assert args[args.index("--alias") + 1] == "custom"
    assert "sig=abc" not in s.output()
    assert s.stop() == 0


def test_a_named_file_has_the_gateway_start_during_the_download(stack, hub):
    """When the spec names the file (no hub lookup needed), the gateway starts beside the
    download instead of after it: it answers 503 backend_starting meanwhile, then serves."""
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    hub.rate = RATE / 10                                   # 10 s: until the gateway answered
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF/tiny-Q4_K_M.gguf").start()
    model = s.data / "models" / "tiny-Q4_K_M.gguf"
    partial = s.data / "models" / ".tiny-Q4_K_M.gguf.partial"
    answered = None
    end = time.monotonic() + BOOT_DEADLINE
    while not model.exists() and time.monotonic() < end:
        if partial.exists() and (s.run_dir / "gateway.pid").exists():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=2)
                conn.request("GET", "/v1/models")
                resp = conn.getresponse()
                if not model.exists():
                    answered = (resp.status, json.loads(resp.read())["error"]["code"])
                    break
            except ConnectionRefusedError:
                pass                                       # still starting
        time.sleep(0.02)
    hub.rate = None                                        # the rest at full speed
    assert answered == (503, "backend_starting")
    s.wait_health(200)
    args = llama_args(s)
    assert args[args.index("-m") + 1] == str(model)
    assert args[args.index("--alias") + 1] == "tiny-Q4_K_M"
    assert "restarting the gateway" not in s.output()
    assert s.stop() == 0


def test_a_failed_download_answers_503_then_exits_1(stack, hub):
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    hub.faults = ["wrong"]                                 # the CDN sends the wrong bytes
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF:Q4_K_M",
                  DOWNLOAD_FAIL_HOLD="3").start()
    s.wait_health(503)
    assert (s.run_dir / "health").read_text().strip() == "failed"
    rc = s.proc.wait(BOOT_DEADLINE)
    out = s.output()
    assert rc == 1
    assert "sha256" in out and "expected " + hashlib.sha256(MODEL).hexdigest() in out
    assert "model download failed" in out and "health 503 for 3 s" in out
    assert [p.name for p in (s.data / "models").iterdir() if "Q4" in p.name] == \
        [".tiny-Q4_K_M.gguf.download.json"]                 # no model, no partial file
    assert "starting llama-server" not in out


def test_a_url_naming_nothing_usable_exits_2(stack, hub):
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_S.gguf", MODEL[:100])
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF:Q4_K", DOWNLOAD_FAIL_HOLD="0.5")
    rc, out = s.run()
    assert rc == 2
    assert "2 .gguf files hold 'Q4_K' (tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf)" in out
    assert hub.cdn_gets == 0


@pytest.mark.parametrize("env,message", [
    ({"MODEL_URL": "ftp://host/m.gguf"}, "a model URL is http(s)://"),
    ({"MODEL_URL": "hf://acme/repo"}, "needs a QUANT"),
    ({"MODEL_URL": "https://host/m.gguf", "MODEL_SHA256": "abc"}, "not 64 hex digits"),
    ({"MODEL_SHA256": "0" * 64}, "MODEL_SHA256 goes with MODEL_URL"),
    ({"MODELS_URLS": "https://host/m.gguf"}, "MODELS_URLS needs MODELS_DIR"),
    ({"MODELS_DIR": "/nonexistent", "MODEL_URL": "https://h/m.gguf"}, "MODEL_URL is for one model"),
    ({"MODEL_URL": "https://h/m.gguf", "MODEL_NAME": "../m.gguf"}, "cannot be the local file name"),
    ({"DOWNLOAD_FAIL_HOLD": "x", "MODEL_URL": "https://h/m.gguf"}, "DOWNLOAD_FAIL_HOLD must be"),
])
def test_bad_download_settings_exit_2_before_starting(stack, hub, env, message):
    s = url_stack(stack, hub, **env)
    rc, out = s.run()
    assert rc == 2
    assert out.count(message) == 1          # said once (the download beside the check is quiet)
    assert not (s.run_dir / "health_server.pid").exists()


def test_sigterm_during_the_download_exits_0_and_keeps_the_partial_file(stack, hub):
    hub.add("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", MODEL)
    hub.rate = 3e5                                         # 10 s: TERM comes first
    s = url_stack(stack, hub, MODEL_URL="hf://acme/tiny-GGUF:Q4_K_M").start()
    partial = s.data / "models" / ".tiny-Q4_K_M.gguf.partial"
    end = time.monotonic() + BOOT_DEADLINE
    while not (partial.exists() and partial.stat().st_size) and time.monotonic() < end:
        time.sleep(0.05)
    # the health server, once the boot saw it up, dies meanwhile: restarted at once, the
    # download goes on
    end = time.monotonic() + 5
    while "health server up" not in s.output():
        assert time.monotonic() < end, s.output()
        time.sleep(0.02)
    hs = s.pid_of("health_server")
    os.kill(hs, signal.SIGKILL)
    s.wait_health(204, deadline=5)
    assert s.pid_of("health_server") != hs
    assert "health server: exited (signal KILL)" in s.output()
    t = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t < 5
    assert partial.exists() and 0 < partial.stat().st_size < len(MODEL)
    assert not (s.data / "models" / ".tiny-Q4_K_M.gguf.lock").exists()


def test_router_mode_downloads_models_urls_before_the_preset(stack, hub, tmp_path):
    hub.add("acme/alpha-GGUF", "alpha.gguf", GGUF_BYTES)
    hub.files["beta.gguf"] = GGUF_BYTES + b"beta"
    models_dir = tmp_path / "downloaded"                   # created by the download
    s = router_stack(stack, tmp_path, models=(), MODELS_DIR=str(models_dir),
                     HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, MODELS_PRELOAD="beta",
                     MODELS_URLS=f"hf://acme/alpha-GGUF:alpha, {hub.cdn}/files/beta.gguf")
    s.start()
    s.wait_health(204, deadline=3)
    s.wait_health(200)
    assert sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".")) == \
        ["alpha.gguf", "beta.gguf"]
    assert router_models(s) == {"alpha": "unloaded", "beta": "loaded"}
    assert "models_preset: 2 model(s): alpha, beta" in s.output()
    assert s.stop() == 0
