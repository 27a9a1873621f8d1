"""Router mode end to end (issue 30): pull a model into MODELS_DIR and delete it while serving,
on entrypoint.sh and the REAL llama-server as a router, with the loopback hub
(tests/fakes/fake_hub.py) as Hugging Face (HF_ENDPOINT), driven by the official clients.

What the unit tier's fake router only assumes is checked here on the real one: after the gateway
appends the new model's section to the generated preset and asks GET /models?reload=1, the router
serves the new model, and a model loaded before the pull stays loaded (not restarted).

The demo model has random weights: names, states and framing are checked, never text."""

from __future__ import annotations

import hashlib
import json
import shutil

import ollama
import openai
import pytest

from e2e_stack import Stack, demo_model, request, serving
from fakes.fake_hub import FakeHub
from test_models_gateway_e2e import add_key, gateway_states, router_states

TIMEOUT_S = 60
HUB_REPO = "acme/delta-GGUF"
HUB_FILE = "delta-Q8_0.gguf"
NEW = "delta-Q8_0"                  # the router's name of the pulled file
# ~5 MB of demo model at 4 MB/s: more than one progress line, over in about a second
HUB_RATE = 4_000_000


@pytest.fixture(scope="module")
def pulling(tmp_path_factory):
    data = demo_model().read_bytes()
    with FakeHub() as hub:
        sha = hub.add(HUB_REPO, HUB_FILE, data)
        hub.rate = HUB_RATE
        s = Stack(tmp_path_factory.mktemp("pull"))
        models = s.tmp / "models"
        models.mkdir()
        for name in ("alpha.gguf", "beta.gguf"):
            shutil.copyfile(demo_model(), models / name)
        (s.data / "models.ini").write_text("[*]\nthreads = 1\n")
        # MODELS_MAX=2: the pulled model loads beside alpha, so alpha staying loaded tells
        # whether the reload (not an eviction) touched it
        s.env.update({"MODELS_DIR": str(models), "MODELS_MAX": "2", "MODELS_PRELOAD": "alpha",
                      "MODEL_PATH": "", "EXTRA_ARGS": "", "CTX": "2048", "PARALLEL": "1",
                      "HF_ENDPOINT": hub.endpoint})
        s.admin = add_key(s, "ops", "--role", "admin")
        s.models_dir, s.hub, s.sha, s.size = models, hub, sha, len(data)
        with serving(s):
            yield s


def test_pull_serve_and_delete_a_model_on_the_real_router(pulling):
    s = pulling
    client = ollama.Client(host=s.base_url, timeout=TIMEOUT_S,
                           headers={"Authorization": f"Bearer {s.admin}"})
    assert [m.model for m in client.list().models] == ["alpha:latest", "beta:latest"]
    assert router_states(s)["alpha"] == "loaded"

    lines = [{k: v for k, v in dict(p).items() if v is not None}
             for p in client.pull(f"hf.co/{HUB_REPO}:Q8_0", stream=True)]
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    pulling = [line for line in lines if line.get("completed") is not None]
    assert len(pulling) >= 2, lines
    done = [line["completed"] for line in pulling]
    assert done == sorted(done) and done[-1] == s.size
    assert {(line["digest"], line["total"]) for line in pulling} == {(f"sha256:{s.sha}",
                                                                      s.size)}
    path = s.models_dir / HUB_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == s.sha

    # listed by the gateway and known to the real router, which re-read its preset...
    assert f"{NEW}:latest" in [m.model for m in client.list().models]
    assert router_states(s) == {"alpha": "loaded", "beta": "unloaded", NEW: "unloaded"}
    # ...and serves it, beside alpha, which the reload left loaded
    sdk = openai.OpenAI(base_url=s.base_url + "/v1", api_key=s.key, timeout=TIMEOUT_S,
                        max_retries=0)
    answer = sdk.chat.completions.create(model=NEW, max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}])
    assert answer.model == NEW and answer.choices[0].message.content is not None
    assert gateway_states(s) == {"alpha": "loaded", "beta": "unloaded", NEW: "loaded"}
    assert router_states(s) == {"alpha": "loaded", "beta": "unloaded", NEW: "loaded"}

    # a loaded model is not deleted; unloaded, it goes from the lists, the folder and the router
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(NEW)
    assert err.value.status_code == 409
    status, _, body = request(s.port, "/admin/models/unload", "POST",
                              json.dumps({"model": NEW}).encode(),
                              {"Authorization": f"Bearer {s.admin}",
                               "Content-Type": "application/json"})
    assert (status, json.loads(body)) == (200, {"model": NEW, "state": "unloaded"})
    assert client.delete(NEW).status == "success"
    assert [m.model for m in client.list().models] == ["alpha:latest", "beta:latest"]
    assert not path.exists()
    assert sorted(p.name for p in s.models_dir.iterdir()) == ["alpha.gguf", "beta.gguf"]
    assert router_states(s) == {"alpha": "loaded", "beta": "unloaded"}
    assert gateway_states(s) == {"alpha": "loaded", "beta": "unloaded"}
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=NEW, max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}])
    # the hub got the listing and the file; the CDN sent the file once
    assert s.hub.cdn_gets == 1
