"""Router mode end to end (issue 27): entrypoint.sh, the REAL llama-server as a router over three
copies of the demo model, the health server and the gateway, driven by the official clients.

Models: alpha.gguf, beta.gguf (alias b1 from the operator's models.ini), gamma/ (a model in a
folder). MODELS_MAX=1 and alpha preloaded: every request for another model is a switch.
Keys: `e2e` (every model), `ops` (role=admin), `scoped` (models=alpha).

The demo model has random weights: the tests check names, states, shapes and framing, never
text. Each test sets up the state it needs (the module shares one stack), in well under a
minute in all."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ollama
import openai
import pytest

from e2e_stack import (REPO, Stack, demo_model, make_stack, processes_mentioning,  # noqa: F401
                       request, serving)

# Per request deadline (the demo model loads and answers in well under a second; a loaded
# runner is slower).
TIMEOUT_S = 60
# A stream long enough to outlive an unload request by far (the demo model makes ~800 tokens/s
# on one thread: ~2 s) and short enough to end within the gateway's drain (GRACEFUL_TIMEOUT=3
# in e2e_stack) on an idle runner. Each of the PARALLEL=2 slots has CTX/2 = 2048 tokens.
LONG_STREAM_TOKENS = 1500


def add_key(s: Stack, name: str, *args: str) -> str:
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "keys.py"), "--file",
                           str(s.key_file), "add", name, *args], capture_output=True, text=True,
                          timeout=30, check=True)
    return made.stdout.strip().splitlines()[-1].strip()


def many_models(s: Stack, **env: str) -> Stack:
    models = s.tmp / "many"
    (models / "gamma").mkdir(parents=True)
    for rel in ("alpha.gguf", "beta.gguf", "gamma/gamma-q8.gguf"):
        shutil.copyfile(demo_model(), models / rel)
    # one CPU thread per model: two models generating at once on a 2-core runner share it
    (s.data / "models.ini").write_text("[*]\nthreads = 1\n\n[beta]\nalias = b1\n")
    s.env.update({"MODELS_DIR": str(models), "MODELS_MAX": "1", "MODELS_PRELOAD": "alpha",
                  "MODEL_PATH": "", "EXTRA_ARGS": "", "CTX": "4096", "PARALLEL": "2",
                  **env})
    s.admin = add_key(s, "ops", "--role", "admin")
    s.scoped = add_key(s, "scoped", "--models", "alpha")
    return s


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    with serving(many_models(Stack(tmp_path_factory.mktemp("many")))) as s:
        yield s


def sdk(s: Stack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url + "/v1", api_key=key or s.key, timeout=TIMEOUT_S,
                         max_retries=0)


def admin(s: Stack, action: str, model: str) -> tuple[int, dict]:
    status, _, body = request(s.port, f"/admin/models/{action}", "POST",
                              json.dumps({"model": model}).encode(),
                              {"Authorization": f"Bearer {s.admin}",
                               "Content-Type": "application/json"})
    return status, json.loads(body)


def router_states(s: Stack) -> dict[str, str]:
    """llama-server's own view (asked directly, autoload=false)."""
    _, _, body = request(0, "/models?autoload=false", unix_path=s.backend_socket, timeout=10)
    return {m["id"]: m["status"]["value"] for m in json.loads(body)["data"]}


def gateway_states(s: Stack) -> dict[str, str]:
    _, _, body = request(s.port, "/admin/models", headers={
        "Authorization": f"Bearer {s.admin}"})
    return {m["name"]: m["state"] for m in json.loads(body)["models"]}


def hi(client: openai.OpenAI, model: str):
    return client.chat.completions.create(model=model, max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])


class Streamer(threading.Thread):
    """One streamed chat through the gateway on its own connection: the raw body, when its
    first event came and when it ended."""

    def __init__(self, s: Stack, model: str, tokens: int = LONG_STREAM_TOKENS):
        super().__init__(daemon=True)
        self.s, self.model, self.tokens = s, model, tokens
        self.status = 0
        self.body = b""
        self.first = threading.Event()
        self.ended_at = 0.0
        self.cut = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.s.port, timeout=TIMEOUT_S)
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"model": self.model, "stream": True, "max_tokens": self.tokens,
                 "ignore_eos": True, "messages": [{"role": "user", "content": "Count"}]}),
                self.s.auth())
            resp = conn.getresponse()
            self.status = resp.status
            try:
                while chunk := resp.read1(65536):
                    self.body += chunk
                    if b"data: {" in self.body:
                        self.first.set()
            except http.client.IncompleteRead:
                self.cut = True                 # closed without the chunked body's end
            self.ended_at = time.monotonic()
            conn.close()
        except BaseException as exc:        # reported by the test
            self.error = exc
        finally:
            self.first.set()

    @property
    def clean(self) -> bool:
        return (self.status == 200 and not self.cut and self.error is None
                and self.body.rstrip().endswith(b"data: [DONE]")
                and b'data: {"error"' not in self.body and b"proxy error: " not in self.body)


# ---- tests ---------------------------------------------------------------------------------------

def test_openai_sdk_chats_with_two_models_by_name_one_at_a_time(many):
    client = sdk(many)
    assert [m.id for m in client.models.list()] == ["alpha", "beta", "gamma"]
    assert hi(client, "alpha").model == "alpha"
    assert router_states(many)["alpha"] == "loaded"
    answer = hi(client, "b1")                   # beta by its alias: a switch (MODELS_MAX=1)
    assert answer.model == "beta" and answer.choices[0].message.content is not None
    assert router_states(many) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    assert gateway_states(many) == {"alpha": "unloaded", "beta": "loaded", "gamma": "unloaded"}
    assert hi(client, "alpha:latest").model == "alpha"      # and back
    # the access log names the model of each
    log = (many.data / "logs" / "api_access.log")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.read_text().count('"model":"beta"') < 1:
        time.sleep(0.1)
    assert '"model":"beta"' in log.read_text()


def test_unknown_and_forbidden_models(many):
    with pytest.raises(openai.NotFoundError) as err:
        hi(sdk(many), "nope")
    assert err.value.body["code"] == "model_not_found"
    scoped = sdk(many, many.scoped)
    with pytest.raises(openai.PermissionDeniedError) as err:
        hi(scoped, "beta")
    assert err.value.body["code"] == "model_not_allowed"
    assert [m.id for m in scoped.models.list()] == ["alpha"]
    assert hi(scoped, "alpha").model == "alpha"
    status, _, body = request(many.port, "/admin/models", headers={
        "Authorization": f"Bearer {many.key}"})
    assert status == 403                              # an inference key is not an admin


def test_admin_load_unload_and_switch(many):
    assert admin(many, "load", "gamma") == (200, {"model": "gamma", "state": "loaded"})
    assert router_states(many)["gamma"] == "loaded"
    assert admin(many, "switch", "alpha") == (200, {"model": "alpha", "state": "loaded"})
    assert router_states(many) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
    assert admin(many, "unload", "alpha") == (200, {"model": "alpha", "state": "unloaded"})
    assert set(router_states(many).values()) == {"unloaded"}
    status, body = admin(many, "load", "nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # metrics carry the models' states (catalog names only)
    _, _, text = request(many.port, "/metrics")
    assert b'gateway_model_state{model="alpha",state="unloaded"} 1' in text
    assert b'gateway_model_state{model="gamma",state="unloaded"} 1' in text


def test_a_stream_outlives_the_unload_of_its_model(many):
    assert admin(many, "load", "alpha")[0] == 200
    stream = Streamer(many, "alpha")
    stream.start()
    assert stream.first.wait(TIMEOUT_S) and stream.error is None
    t0 = time.monotonic()
    status, body = admin(many, "unload", "alpha")        # waits for the stream to end
    unloaded_at = time.monotonic()
    stream.join(TIMEOUT_S)
    assert (status, body) == (200, {"model": "alpha", "state": "unloaded"})
    assert stream.clean, stream.body[-300:]            # to its [DONE], never cut
    assert stream.body.count(b"data: {") >= LONG_STREAM_TOKENS // 2   # events, not tokens
    assert stream.ended_at - t0 > 0.5                   # it outlived the unload request...
    assert unloaded_at >= stream.ended_at               # ...which answered once it ended
    assert router_states(many)["alpha"] == "unloaded"


def test_ollama_lists_loads_and_unloads(many):
    client = ollama.Client(host=many.base_url, timeout=TIMEOUT_S,
                           headers={"Authorization": f"Bearer {many.key}"})
    names = [m.model for m in client.list().models]
    assert names == ["alpha:latest", "beta:latest", "gamma:latest"]
    admin(many, "unload", "alpha")
    assert client.ps().models == []
    loaded = client.generate(model="gamma")               # an empty prompt loads the model
    assert loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == ["gamma:latest"]
    answer = client.chat(model="gamma", messages=[{"role": "user", "content": "hi"}],
                         options={"num_predict": 4})
    assert answer.model == "gamma" and answer.done
    gone = client.generate(model="gamma", keep_alive=0)    # keep_alive 0: unloaded
    assert gone.done_reason == "unload"
    assert client.ps().models == []
    assert router_states(many)["gamma"] == "unloaded"
    show = client.show("b1")
    assert show.modelinfo and show.details.format == "gguf"
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404


def test_sigterm_with_streams_on_two_models_exits_0_and_leaves_nothing(make_stack):
    s = many_models(make_stack(), MODELS_MAX="2", MODELS_PRELOAD="alpha,beta")
    s.start()
    s.wait_health(200)
    streams = [Streamer(s, "alpha", 300), Streamer(s, "b1", 300)]
    for st in streams:
        st.start()
    for st in streams:
        assert st.first.wait(TIMEOUT_S) and st.error is None, st.error
    assert s.stop(signal.SIGTERM) == 0, s.output()[-4000:]
    for st in streams:
        st.join(TIMEOUT_S)
        assert st.error is None and st.status == 200, st.error
        # drained to its [DONE], or, still going at GRACEFUL_TIMEOUT, cut visibly: never an
        # end that looks clean
        assert st.clean or (st.cut and b"[DONE]" not in st.body), st.body[-300:]
    assert processes_mentioning(str(s.tmp)) == []
    assert "gateway stopped (exit code 0)" in s.output()


def instances_of(s: Stack, rel: str) -> list[int]:
    """The pids of the router's instance serving models/<rel> (its command line names the file;
    the router's own names only the preset)."""
    path = str(s.tmp / "many" / rel).encode()
    found = []
    for pid in processes_mentioning(str(s.tmp)):
        try:
            if path in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_instance_that_dies_mid_answer_is_an_error_never_a_clean_end(make_stack):
    """kill -9 of the model's llama-server instance mid-answer: a stream ends with the
    gateway's upstream_cut event and no clean end (the router's raw `proxy error:` text is
    what it sends); a non-streamed answer is the gateway's 502 upstream_cut in OpenAI's shape
    (the router answers 500 with that raw text as the body)."""
    s = many_models(make_stack(), MODELS_MAX="2", MODELS_PRELOAD="alpha,beta")
    s.start()
    s.wait_health(200)
    stream = Streamer(s, "alpha")
    stream.start()
    assert stream.first.wait(TIMEOUT_S) and stream.error is None
    pids = instances_of(s, "alpha.gguf")
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    stream.join(TIMEOUT_S)
    assert stream.error is None and stream.status == 200
    assert stream.cut and b"[DONE]" not in stream.body, stream.body[-300:]
    assert b'"code":"upstream_cut"' in stream.body.replace(b" ", b"")

    outcome: dict = {}

    def long_answer():
        try:
            sdk(s).chat.completions.create(model="b1", max_tokens=2000,
                                           extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "Count"}])
            outcome["error"] = None
        except BaseException as exc:           # checked below
            outcome["error"] = exc

    pids = instances_of(s, "beta.gguf")
    assert len(pids) == 1
    busy0 = cpu_seconds(pids[0])
    asker = threading.Thread(target=long_answer, daemon=True)
    asker.start()
    end = time.monotonic() + TIMEOUT_S           # generating: its instance uses CPU
    while cpu_seconds(pids[0]) < busy0 + 0.05 and "error" not in outcome:
        assert time.monotonic() < end
        time.sleep(0.005)
    os.kill(pids[0], signal.SIGKILL)
    asker.join(TIMEOUT_S)
    exc = outcome["error"]
    assert isinstance(exc, openai.APIStatusError) and exc.status_code == 502, exc
    assert exc.body["code"] == "upstream_cut", exc.body
    assert s.stop() == 0, s.output()[-4000:]
