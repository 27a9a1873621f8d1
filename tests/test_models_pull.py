"""Router mode: pull a model into MODELS_DIR and delete one (models/pulls.py, admin/pull_api.py)
through the real gateway, with the fake hub (tests/fakes/fake_hub.py) as Hugging Face and the
fake router re-reading the generated preset on GET /models?reload=1."""

from __future__ import annotations

import asyncio
import json
import os
import time

import ollama

from fakes.fake_hub import FakeHub
from helpers import ALICE, Stack, aio, get, post
from test_models_gateway import ROOT, RouterStack, write_gguf

REPO = "acme/tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"


def tiny_gguf(tmp_path) -> bytes:
    """A readable GGUF (the Ollama listings describe it), padded to ~256 KiB so the download
    reports progress more than once."""
    path = os.path.join(str(tmp_path), "src", FILE)
    write_gguf(path, "Tiny", 512)
    with open(path, "rb") as fh:
        return fh.read() + bytes(256 << 10)


def preset_text(models_dir: str) -> str:
    return ("; generated\n[*]\nstop-timeout = 10\n\n"
            f"[alpha]\nmodel = {models_dir}/alpha.gguf\n\n"
            f"[beta]\nmodel = {models_dir}/beta.gguf\nalias = b1\n\n"
            f"[gamma]\nmodel = {models_dir}/gamma/gamma-q8.gguf\n")


class PullStack(RouterStack):
    def __init__(self, tmp_path, hub: FakeHub):
        preset = os.path.join(str(tmp_path), "run", "models-preset.ini")
        super().__init__(tmp_path, env={"MODELS_PRESET_FILE": preset,
                                        "HF_ENDPOINT": hub.endpoint})
        self.preset = preset
        self.router.preset_path = preset

    async def __aenter__(self):
        os.makedirs(os.path.dirname(self.preset), exist_ok=True)
        with open(self.preset, "w") as fh:
            fh.write(preset_text(self.models_dir))
        return await super().__aenter__()


def ndjson(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def check_progress(lines: list[dict], size: int) -> None:
    statuses = [line.get("status") for line in lines]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    pulling = [line for line in lines if "completed" in line]
    assert pulling, lines
    done = [line["completed"] for line in pulling]
    assert done == sorted(done) and done[-1] == size       # the last bytes said too
    assert all(line["total"] == size and line["digest"].startswith("sha256:")
               for line in pulling)


@aio
async def test_pull_streams_progress_then_the_model_is_listed_and_delete_removes_it(tmp_path):
    DATA = tiny_gguf(tmp_path)
    with FakeHub() as hub:
        sha = hub.add(REPO, FILE, DATA)
        hub.rate = 200_000
        async with PullStack(tmp_path, hub) as s:
            body = {"model": f"hf.co/{REPO}:Q4_K_M"}
            # admin only: no key 401, an inference key 403
            assert (await s.one(post("/api/pull", body, key=None))).status == 401
            assert (await s.one(post("/api/pull", body, key=ALICE))).status == 403
            assert (await s.one(post("/admin/models/pull", body, key=ALICE))).status == 403
            # a name that is no URL: 400 in Ollama's shape
            r = await s.one(post("/api/pull", {"model": "llama3:8b"}, key=ROOT))
            assert r.status == 400 and "error" in r.json()
            r = await s.one(post("/api/pull", body, key=ROOT), timeout=30)
            assert r.status == 200 and r.get("content-type") == "application/x-ndjson"
            lines = ndjson(r.body)
            check_progress(lines, len(DATA))
            assert any(line["digest"] == f"sha256:{sha}" for line in lines if "digest" in line)
            path = os.path.join(s.models_dir, FILE)
            with open(path, "rb") as fh:
                assert fh.read() == DATA
            assert "[tiny-Q4_K_M]" in open(s.preset).read()
            assert "[alpha]" in open(s.preset).read()
            tags = (await s.one(get("/api/tags"))).json()
            assert "tiny-Q4_K_M:latest" in [m["name"] for m in tags["models"]]
            admin = (await s.one(get("/admin/models", key=ROOT))).json()
            assert "tiny-Q4_K_M" in [m["name"] for m in admin["models"]]
            # a loaded model is not deleted
            r = await s.one(post("/admin/models/load", {"model": "alpha"}, key=ROOT))
            assert r.status == 200
            r = await s.one(post("/admin/models/delete", {"model": "alpha"}, key=ROOT))
            assert r.status == 409
            assert os.path.exists(os.path.join(s.models_dir, "alpha.gguf"))
            # Ollama's delete: admin only, then gone from the folder, the preset and the lists
            delete = post("/api/delete", {"model": "tiny-Q4_K_M"}, key=ALICE).replace(
                b"POST", b"DELETE", 1)
            assert (await s.one(delete)).status == 403
            r = await s.one(delete.replace(ALICE.encode(), ROOT.encode()))
            assert r.status == 200, r
            assert not os.path.exists(path)
            assert "[tiny-Q4_K_M]" not in open(s.preset).read()
            tags = (await s.one(get("/api/tags"))).json()
            assert "tiny-Q4_K_M:latest" not in [m["name"] for m in tags["models"]]
            r = await s.one(delete.replace(ALICE.encode(), ROOT.encode()))
            assert r.status == 404 and "error" in r.json()
            assert (await s.one(post("/admin/models/delete", {"model": "../x"},
                                     key=ROOT))).status == 404


@aio
async def test_a_client_that_leaves_mid_pull_leaves_a_partial_the_next_pull_resumes(tmp_path):
    """The pull's client goes away after some progress: the download stops (its place among the
    pulls freed), the partial file stays, and the next pull asks the CDN only for the rest."""
    DATA = tiny_gguf(tmp_path)
    with FakeHub() as hub:
        hub.add(REPO, FILE, DATA)
        hub.rate = 100_000                                 # ~2.6 s for the file
        async with PullStack(tmp_path, hub) as s:
            partial = os.path.join(s.models_dir, f".{FILE}.partial")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(post("/api/pull", {"model": f"hf.co/{REPO}:Q4_K_M"}, key=ROOT))
            await writer.drain()
            seen = b""
            while b'"completed":' not in seen.partition(b"\r\n\r\n")[2] \
                    or not os.path.exists(partial) or os.path.getsize(partial) < 50_000:
                piece = await asyncio.wait_for(reader.read(4096), 10)
                assert piece, seen
                seen += piece
            writer.close()                                 # the client leaves
            await writer.wait_closed()

            # the download stops: it lets go of its lock (held while it writes the partial)
            lock = os.path.join(s.models_dir, f".{FILE}.lock")
            deadline = time.monotonic() + 10
            while os.path.exists(lock):
                assert time.monotonic() < deadline, "the download goes on without its client"
                await asyncio.sleep(0.02)
            have = os.path.getsize(partial)
            await asyncio.sleep(0.5)                       # and writes nothing more
            assert os.path.getsize(partial) == have
            assert 0 < have < len(DATA)
            assert not os.path.exists(os.path.join(s.models_dir, FILE))
            hub.rate = None
            r = await s.one(post("/api/pull", {"model": f"hf.co/{REPO}:Q4_K_M"}, key=ROOT),
                            timeout=30)
            assert r.status == 200 and ndjson(r.body)[-1] == {"status": "success"}
            ranges = [h.get("range") for role, _, _, h in hub.requests if role == "cdn"]
            assert ranges[-1] == f"bytes={have}-"          # only the rest was asked for
            with open(os.path.join(s.models_dir, FILE), "rb") as fh:
                assert fh.read() == DATA
            assert not os.path.exists(partial)


@aio
async def test_the_official_ollama_client_pulls_and_lists(tmp_path):
    DATA = tiny_gguf(tmp_path)
    with FakeHub() as hub:
        hub.add(REPO, FILE, DATA)
        hub.rate = 200_000
        async with PullStack(tmp_path, hub) as s:
            client = ollama.Client(host=f"http://127.0.0.1:{s.port}",
                                   headers={"Authorization": f"Bearer {ROOT}"}, timeout=30)

            def pull_and_list():
                before = [m.model for m in client.list().models]   # the folder was read...
                lines = [dict(p) for p in client.pull(f"hf.co/{REPO}:Q4_K_M", stream=True)]
                return lines, before, [m.model for m in client.list().models]

            lines, before, names = await asyncio.to_thread(pull_and_list)
            assert "tiny-Q4_K_M:latest" not in before
            check_progress([{k: v for k, v in line.items() if v is not None} for line in lines],
                           len(DATA))
            assert "tiny-Q4_K_M:latest" in names                   # ...and again after
            # stream=False: one answer
            os.unlink(os.path.join(s.models_dir, FILE))
            r = await asyncio.to_thread(client.pull, f"hf.co/{REPO}:Q4_K_M", stream=False)
            assert r.status == "success"


@aio
async def test_single_model_mode_answers_501_to_an_admin_pull_or_delete(tmp_path):
    async with Stack(tmp_path, key_file=f"alice:{ALICE}\nroot:{ROOT} role=admin\n") as s:
        body = {"model": "hf.co/a/b:Q4_K_M"}
        assert (await s.one(post("/api/pull", body, key=ALICE))).status == 403
        r = await s.one(post("/api/pull", body, key=ROOT))
        assert r.status == 501 and "/api/pull" in r.json()["error"]
        r = await s.one(post("/api/delete", {"model": "x"}, key=ROOT).replace(
            b"POST", b"DELETE", 1))
        assert r.status == 501 and "/api/delete" in r.json()["error"]
        r = await s.one(post("/admin/models/pull", body, key=ROOT))
        assert r.status == 409 and r.json()["error"]["code"] == "single_model_mode"
        assert s.fake.requests == []
