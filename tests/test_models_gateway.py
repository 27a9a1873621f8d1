"""Router mode through the real gateway (issue 27): the fake router (tests/fakes/fake_router.py)
for the models' states and loads, the fake llama-server for inference, the Gateway in between.

Names (aliases, ":latest", the default, 404 before anything reaches llama-server), per-key
scoping of requests and listings (403), loads bounded by MODEL_LOAD_WAIT (503 model_loading) and
failed models (503 model_failed), probes that never load, the admin API (load, unload, switch,
/admin/events), streams the router cuts (an error event, never a clean end), per-model slots,
the Ollama API per model, metrics and the access log. Single-model mode keeps its behaviour,
plus key scoping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket

import gguf
import numpy as np
import pytest

from fakes.fake_llama import FakeLlama
from fakes.fake_router import FakeModel, FakeRouter
from helpers import (ALICE, BOB, FAST_ENV, RawClient, Stack, aio, chat, eventually, get, post,
                     write_key_file)
from llamagw import app as gateway
from llamagw import config as config_mod
from llamagw.admin import models_api
from llamagw.limits import keys
from llamagw.models.catalog import Catalog, State
from llamagw.models.router import RouterClient, RouterController
from llamagw.observe import accesslog

ROOT = "sk-root-0123456789abcdef00"        # role=admin
DAVE = "sk-dave-0123456789abcdef00"        # models=b1 (beta, by its alias)
KEYS = (f"alice:{ALICE}\n"
        f"bob:{BOB} models=alpha\n"
        f"dave:{DAVE} models=b1\n"
        f"root:{ROOT} role=admin\n")
# Controller timings: each rule is shown in well under a second.
FAST_CTL = dict(load_timeout=3.0, drain_timeout=2.0, unload_timeout=2.0, resync_interval=5.0,
                poll_interval=0.05, reconnect_initial=0.02, reconnect_max=0.1)


def three(**kw) -> list[FakeModel]:
    return [FakeModel("alpha", **kw), FakeModel("beta", aliases=["b1"], **kw),
            FakeModel("gamma", **kw)]


def write_gguf(path: str, title: str, ctx: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_string("general.name", title)
    w.add_uint32("llama.context_length", ctx)
    w.add_token_list([f"tok{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class RouterStack:
    """FakeRouter (control, on a Unix socket) + FakeLlama (inference) + the Gateway in router
    mode over a MODELS_DIR of tiny GGUFs (alpha.gguf, beta.gguf, gamma/gamma-q8.gguf)."""

    def __init__(self, tmp_path, models=None, *, models_max: int = 1, env: dict | None = None,
                 backoff: float = 0.3, access_log: bool = False, router_up: bool = True):
        self.tmp = str(tmp_path)
        self.sock = os.path.join(self.tmp, "router.sock")
        self.models_dir = os.path.join(self.tmp, "models")
        self.router = FakeRouter(models if models is not None else three(),
                                 models_max=models_max, unix_path=self.sock)
        self.fake = FakeLlama()
        self.models_max = models_max
        self.backoff = backoff
        self.env = dict(FAST_ENV)
        self.env.update({"DATA_DIR": os.path.join(self.tmp, "data"),
                         "RUN_DIR": os.path.join(self.tmp, "run"),
                         "AUTH_KEYS_FILE": os.path.join(self.tmp, "keys.txt"),
                         "MODELS_DIR": self.models_dir, "MODELS_MAX": str(models_max),
                         "MODEL_LOAD_WAIT": "2"})
        self.env.update(env or {})
        self.want_access_log = access_log
        self.router_up = router_up
        self.access = None
        self.clients: list[RawClient] = []

    async def __aenter__(self) -> RouterStack:
        for name, ctx in (("alpha", 1024), ("beta", 2048)):
            write_gguf(os.path.join(self.models_dir, f"{name}.gguf"), f"Model {name}", ctx)
        write_gguf(os.path.join(self.models_dir, "gamma", "gamma-q8.gguf"), "Model gamma", 4096)
        os.makedirs(self.env["RUN_DIR"], exist_ok=True)
        os.makedirs(self.env["DATA_DIR"], exist_ok=True)
        if self.router_up:
            await self.router.start()
        await self.fake.start()
        self.env["PORT_BACKEND"] = str(self.fake.port)
        self.config = config_mod.load_config(self.env)
        write_key_file(self.config.auth_keys_file, KEYS)
        store = keys.KeyStore(self.config.auth_keys_file)
        store.load()
        if self.want_access_log:
            os.makedirs(self.config.logs_dir, exist_ok=True)
            self.access = accesslog.AccessLog(self.config.access_log_path, max_bytes=1 << 20,
                                              backups=1)
        self.catalog = Catalog(backoff_initial=self.backoff, backoff_max=self.backoff * 4)
        self.ctl = RouterController(RouterClient(self.sock), models_max=self.models_max,
                                    catalog=self.catalog,
                                    load_wait=self.config.model_load_wait, **FAST_CTL)
        self.gw = gateway.Gateway(self.config, store=store, access_log=self.access,
                                  router=self.ctl)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await self.gw.start(sock)
        self.port = self.gw.port
        if self.router_up:
            await eventually(lambda: self.ctl.connected and self.catalog.synced)
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.abort()
        await self.gw.shutdown(0.2)
        await self.fake.stop()
        await self.router.stop()
        if self.access is not None:
            self.access.close()

    async def client(self) -> RawClient:
        c = await RawClient.connect(self.port)
        self.clients.append(c)
        return c

    async def one(self, data: bytes, **kw):
        c = await self.client()
        try:
            return await c.request(data, **kw)
        finally:
            c.abort()

    def state(self, name: str) -> State:
        return self.catalog.get(name).state

    def inference_models(self) -> list[str]:
        """The "model" of each inference request llama-server got."""
        return [json.loads(r.body).get("model") for r in self.fake.requests
                if r.method == "POST"]

    def access_records(self) -> list[dict]:
        self.access.close()
        with open(self.config.access_log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def mchat(model=None, **fake) -> dict:
    body = chat(**fake)
    if model is None:
        del body["model"]
    else:
        body["model"] = model
    return body


def router_gets_autoload_free(s: RouterStack) -> bool:
    return all(q.get("autoload") == "false" for m, p, q in s.router.requests if m == "GET")


# ---- names ---------------------------------------------------------------------------------------

@aio
async def test_names_and_aliases_reach_llama_server_as_the_canonical_name(tmp_path):
    async with RouterStack(tmp_path, models_max=2) as s:
        r = await s.one(post("/v1/chat/completions", mchat("b1")))
        assert r.status == 200, r
        r = await s.one(post("/v1/chat/completions", mchat("alpha:latest")))
        assert r.status == 200, r
        r = await s.one(post("/v1/completions", {"model": "alpha", "prompt": "x"}))
        assert r.status == 200, r
        assert s.inference_models() == ["beta", "alpha", "alpha"]
        assert dict(s.router.loads) == {"beta": 1, "alpha": 1}
        assert s.state("alpha") is State.LOADED and s.state("beta") is State.LOADED
        assert router_gets_autoload_free(s)


@aio
async def test_unknown_model_is_404_before_anything_reaches_llama_server(tmp_path):
    async with RouterStack(tmp_path) as s:
        for path, body in (("/v1/chat/completions", mchat("delta")),
                           ("/v1/chat/completions", mchat("Alpha")),       # case-sensitive
                           ("/v1/embeddings", {"model": "nope", "input": "x"}),
                           ("/tokenize", {"model": "nope", "content": "x"})):
            r = await s.one(post(path, body))
            assert r.status == 404 and r.error()["code"] == "model_not_found", r
        r = await s.one(post("/api/chat", {"model": "delta", "messages": []}))
        assert r.status == 404 and set(r.json()) == {"error"}              # Ollama's shape
        assert s.fake.requests == [] and not s.router.loads


@aio
async def test_a_request_without_a_model_uses_the_default_or_is_refused(tmp_path):
    async with RouterStack(tmp_path) as s:
        r = await s.one(post("/v1/chat/completions", mchat(None)))
        assert r.status == 400 and r.error()["code"] == "model_required"
        r = await s.one(post("/v1/chat/completions", mchat(7)))
        assert r.status == 400 and r.error()["code"] == "invalid_model"
    async with RouterStack(tmp_path / "d", env={"MODELS_DEFAULT": "gamma"}) as s:
        r = await s.one(post("/v1/chat/completions", mchat(None)))
        assert r.status == 200, r
        r = await s.one(post("/v1/chat/completions", mchat("")))
        assert r.status == 200, r
        assert s.inference_models() == ["gamma", "gamma"]


@aio
async def test_listings_come_from_the_catalog_without_paths(tmp_path):
    async with RouterStack(tmp_path) as s:
        r = await s.one(get("/v1/models"))
        assert r.status == 200
        data = r.json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["alpha", "beta", "gamma"]
        assert data["data"][1]["aliases"] == ["b1"]
        assert {m["state"] for m in data["data"]} == {"unloaded"}
        for path in ("/v1/models", "/admin/models", "/api/tags"):
            raw = (await s.one(get(path, key=ROOT))).body
            assert s.tmp.encode() not in raw and b"llama-server" not in raw, path
        head = await s.one(get("/v1/models", method=b"HEAD"), head_request=True)
        assert head.status == 200 and int(head.get("content-length")) == len(r.body)
        assert s.fake.requests == []               # llama-server's own list is never asked


# ---- scoping ---------------------------------------------------------------------------------------

@aio
async def test_a_key_uses_and_sees_only_its_models(tmp_path):
    async with RouterStack(tmp_path, models_max=3) as s:
        r = await s.one(post("/v1/chat/completions", mchat("beta"), key=BOB))
        assert r.status == 403 and r.error()["code"] == "model_not_allowed"
        r = await s.one(post("/api/generate", {"model": "beta", "prompt": "x"}, key=BOB))
        assert r.status == 403 and "may not use" in r.json()["error"]
        assert (await s.one(post("/v1/chat/completions", mchat("alpha"), key=BOB))).status \
            == 200
        # dave's models= names beta by its alias
        assert (await s.one(post("/v1/chat/completions", mchat("beta"), key=DAVE))).status \
            == 200
        assert s.inference_models()[-2:] == ["alpha", "beta"]
        ids = [m["id"] for m in (await s.one(get("/v1/models", key=BOB))).json()["data"]]
        assert ids == ["alpha"]
        ids = [m["id"] for m in (await s.one(get("/v1/models", key=DAVE))).json()["data"]]
        assert ids == ["beta"]
        ids = [m["id"] for m in (await s.one(get("/v1/models"))).json()["data"]]
        assert ids == ["alpha", "beta", "gamma"]
        tags = [m["name"] for m in (await s.one(get("/api/tags", key=BOB))).json()["models"]]
        assert tags == ["alpha:latest"]
        ps = (await s.one(get("/api/ps", key=DAVE))).json()["models"]
        assert [m["name"] for m in ps] == ["beta:latest"]          # loaded and allowed
        ps = (await s.one(get("/api/ps"))).json()["models"]
        assert sorted(m["name"] for m in ps) == ["alpha:latest", "beta:latest"]
        r = await s.one(post("/api/show", {"model": "gamma"}, key=BOB))
        assert r.status == 403


@contextlib.asynccontextmanager
async def single_model_stack(tmp_path):
    """The gateway in single-model mode over a tiny GGUF (described), with the router tests'
    keys."""
    model = tmp_path / "m" / "demo.gguf"
    write_gguf(str(model), "Demo", 512)
    async with Stack(tmp_path, {"MODEL_PATH": str(model)}) as s:
        write_key_file(s.config.auth_keys_file, KEYS)
        s.gw.reload_keys()
        await s.gw.catalog.load()
        yield s


@aio
async def test_single_model_mode_scopes_keys_too(tmp_path):
    async with single_model_stack(tmp_path) as s:
        r = await s.one(post("/v1/chat/completions", chat(), key=BOB))     # models=alpha
        assert r.status == 403 and r.error()["code"] == "model_not_allowed"
        assert s.fake.requests == []
        assert (await s.one(get("/v1/models", key=BOB))).json() == {"object": "list",
                                                                   "data": []}
        assert (await s.one(get("/api/tags", key=BOB))).json() == {"models": []}
        assert (await s.one(get("/api/ps", key=BOB))).json() == {"models": []}
        r = await s.one(post("/api/chat", {"model": "demo", "messages": [
            {"role": "user", "content": "hi"}], "stream": False}, key=BOB))
        assert r.status == 403
        # a key without models= and the one model's name: as before
        assert (await s.one(post("/v1/chat/completions", chat()))).status == 200
        assert [m["name"] for m in (await s.one(get("/api/tags"))).json()["models"]] == [
            "demo:latest"]
        ids = [m["id"] for m in (await s.one(get("/v1/models"))).json()["data"]]
        assert ids == ["demo"]                      # llama-server's own list, relayed


# ---- loads bounded, never accidental -------------------------------------------------------------

@aio
async def test_a_slow_load_answers_503_model_loading_then_serves(tmp_path):
    models = [FakeModel("alpha"), FakeModel("slow", load_time=0.8)]
    async with RouterStack(tmp_path, models, env={"MODEL_LOAD_WAIT": "0.2"}) as s:
        r = await s.one(post("/v1/chat/completions", mchat("slow")))
        assert r.status == 503 and r.error()["code"] == "model_loading"
        assert int(r.get("retry-after")) >= 1
        assert s.state("slow") is State.LOADING                    # the load goes on
        await eventually(lambda: s.state("slow") is State.LOADED, 3)
        assert (await s.one(post("/v1/chat/completions", mchat("slow")))).status == 200
        assert s.router.loads["slow"] == 1 and s.fake.requests[-1:] and \
            s.inference_models() == ["slow"]


@aio
async def test_a_failed_model_is_503_model_failed_and_backs_off(tmp_path):
    models = [FakeModel("alpha"), FakeModel("broken", fail=True)]
    async with RouterStack(tmp_path, models, backoff=5.0) as s:
        r = await s.one(post("/v1/chat/completions", mchat("broken")))
        assert r.status == 503 and r.error()["code"] == "model_failed", r
        assert "failed to load" in r.error()["message"]
        assert int(r.get("retry-after")) >= 1
        r = await s.one(post("/api/chat", {"model": "broken", "messages": [
            {"role": "user", "content": "x"}]}))
        assert r.status == 503 and "failed" in r.json()["error"]
        assert s.router.loads["broken"] == 1                       # no retry in the back-off
        assert s.fake.requests == []
        failed = [m for m in (await s.one(get("/admin/models", key=ROOT))).json()["models"]
                  if m["name"] == "broken"]
        assert failed[0]["state"] == "failed" and "failed to load" in failed[0]["failure"]


@aio
async def test_probes_metrics_listings_and_admin_reads_never_load(tmp_path):
    async with RouterStack(tmp_path) as s:
        for raw in (get("/health", key=None), get("/metrics", key=None), get("/v1/models"),
                    get("/api/tags"), get("/api/ps"), get("/admin/models", key=ROOT),
                    post("/api/show", {"model": "beta"}), get("/ping", key=None)):
            assert (await s.one(raw)).status == 200, raw
        health = (await s.one(get("/health", key=None))).json()
        assert health["router"] == "connected" and health["models"]["unloaded"] == 3
        assert health["preload"] == "ready"                 # none to wait for
        assert not s.router.loads and s.fake.requests == []
        assert router_gets_autoload_free(s)


# ---- the admin API ---------------------------------------------------------------------------------

@aio
async def test_admin_load_unload_switch(tmp_path):
    async with RouterStack(tmp_path) as s:
        r = await s.one(post("/admin/models/load", {"model": "alpha"}, key=ALICE))
        assert r.status == 403 and r.error()["code"] == "forbidden"
        r = await s.one(post("/admin/models/load", {"model": "alpha"}, key=ROOT))
        assert (r.status, r.json()) == (200, {"model": "alpha", "state": "loaded"})
        r = await s.one(post("/admin/models/switch", {"model": "b1"}, key=ROOT))
        assert (r.status, r.json()) == (200, {"model": "beta", "state": "loaded"})
        assert s.state("alpha") is State.UNLOADED
        r = await s.one(post("/admin/models/unload", {"model": "beta"}, key=ROOT))
        assert (r.status, r.json()) == (200, {"model": "beta", "state": "unloaded"})
        r = await s.one(post("/admin/models/unload", {"model": "beta"}, key=ROOT))
        assert r.status == 200 and r.json()["state"] == "unloaded"       # idempotent
        r = await s.one(post("/admin/models/load", {"model": "nope"}, key=ROOT))
        assert r.status == 404 and r.error()["code"] == "model_not_found"
        r = await s.one(post("/admin/models/load", {}, key=ROOT))
        assert r.status == 400 and r.error()["code"] == "model_required"
        snap = (await s.one(get("/admin/models", key=ROOT))).json()
        assert snap["mode"] == "router" and snap["max"] == 1
        assert [m["name"] for m in snap["models"]] == ["alpha", "beta", "gamma"]
        want = {"name", "aliases", "state", "size", "quantization", "context", "in_flight",
                "last_used", "failure", "draining"}
        assert all(want <= set(m) for m in snap["models"])
        assert s.router.evictions == []          # every unload was the gateway's, drained


@aio
async def test_admin_load_of_a_failed_model_ignores_the_back_off(tmp_path):
    models = [FakeModel("alpha"), FakeModel("broken", fail=True)]
    async with RouterStack(tmp_path, models, backoff=30.0) as s:
        assert (await s.one(post("/v1/chat/completions", mchat("broken")))).status == 503
        r = await s.one(post("/admin/models/load", {"model": "broken"}, key=ROOT))
        assert r.status == 503 and r.error()["code"] == "model_failed"
        assert s.router.loads["broken"] == 2                       # the operator's retry
        s.router.models["broken"].fail = False
        r = await s.one(post("/admin/models/load", {"model": "broken"}, key=ROOT))
        assert (r.status, r.json()["state"]) == (200, "loaded")


@aio
async def test_admin_answers_202_when_the_action_outlasts_the_wait(tmp_path):
    models = [FakeModel("alpha"), FakeModel("slow", load_time=0.6)]
    async with RouterStack(tmp_path, models, env={"MODEL_LOAD_WAIT": "0.1"}) as s:
        r = await s.one(post("/admin/models/load", {"model": "slow"}, key=ROOT))
        assert (r.status, r.json()) == (202, {"model": "slow", "state": "loading"})
        await eventually(lambda: s.state("slow") is State.LOADED, 3)


@aio
async def test_single_model_mode_admin_lists_the_model_and_refuses_actions(tmp_path):
    async with single_model_stack(tmp_path) as s:
        snap = (await s.one(get("/admin/models", key=ROOT))).json()
        assert snap["mode"] == "single" and snap["max"] == 1
        (m,) = snap["models"]
        assert (m["name"], m["state"], m["context"]) == ("demo", "loaded", 512)
        assert m["quantization"] == "Q8_0" and m["size"] > 0
        for action in ("load", "unload", "switch"):
            r = await s.one(post(f"/admin/models/{action}", {"model": "demo"}, key=ROOT))
            assert r.status == 409 and r.error()["code"] == "single_model_mode"
        c = await s.client()
        await c.send(get("/admin/events", key=ROOT))
        status, headers, _ = await c.head()
        assert status == 200
        size = int(await c.line(), 16)
        event = (await c.exactly(size + 2))[:-2]
        assert event.startswith(b"event: snapshot\ndata: ")
        assert json.loads(event.split(b"data: ", 1)[1])["models"][0]["name"] == "demo"


async def read_events(c: RawClient, want, timeout: float = 3.0) -> list[dict]:
    """SSE events from a chunked /admin/events answer until want(events) holds."""
    events: list[dict] = []
    buf = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not want(events):
        size = int(await c.line(deadline - loop.time()), 16)
        if size == 0:
            assert await c.line(deadline - loop.time()) == b"\r\n"     # the clean end
            break
        buf += (await c.exactly(size + 2, deadline - loop.time()))[:-2]
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            if block.startswith(b":"):
                events.append({"type": "heartbeat"})
                continue
            kind = block.split(b"\n")[0].removeprefix(b"event: ").decode()
            data = json.loads(block.split(b"data: ", 1)[1])
            assert data["type"] == kind
            events.append(data)
    return events


@aio
async def test_admin_events_snapshot_then_changes_heartbeats_and_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(models_api, "EVENTS_HEARTBEAT", 0.2)
    async with RouterStack(tmp_path) as s:
        c = await s.client()
        await c.send(get("/admin/events", key=ALICE))
        assert (await c.response()).status == 403
        c = await s.client()
        await c.send(get("/admin/events", key=ROOT))
        status, headers, _ = await c.head()
        assert status == 200 and dict(headers)["content-type"].startswith("text/event-stream")
        first = await read_events(c, lambda e: len(e) >= 1)
        assert first[0]["type"] == "snapshot"
        assert [m["name"] for m in first[0]["models"]] == ["alpha", "beta", "gamma"]
        assert (await s.one(post("/admin/models/load", {"model": "gamma"}, key=ROOT))).status \
            == 200
        seen = await read_events(c, lambda e: any(
            ev["type"] == "model" and ev["model"]["name"] == "gamma"
            and ev["model"]["state"] == "loaded" for ev in e))
        states = [ev["model"]["state"] for ev in seen if ev["type"] == "model"
                  and ev["model"]["name"] == "gamma"]
        assert states[0] == "loading" and states[-1] == "loaded"
        beats = await read_events(c, lambda e: any(ev["type"] == "heartbeat" for ev in e))
        assert beats[-1]["type"] == "heartbeat"
        # shutdown ends the stream at once (a clean end), without waiting for the drain
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stopping = asyncio.ensure_future(s.gw.shutdown(5.0))
        rest = await read_events(c, lambda e: False)
        assert await c.closed(2.0)
        assert loop.time() - t0 < 2.0
        await stopping
        assert all(ev["type"] != "snapshot" for ev in rest)


# ---- streams the router cuts ---------------------------------------------------------------------

@pytest.mark.parametrize("knob", ["router_cut_after", "end_after"])
@aio
async def test_a_stream_the_router_cuts_ends_with_an_error_event(tmp_path, knob):
    async with RouterStack(tmp_path, access_log=True) as s:
        before = s.ctl.snapshots
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", mchat("alpha", stream=True, events=4,
                                                                **{knob: 2})))
        assert r.status == 200
        assert not r.complete                         # no clean end of the chunked body
        events = [line for line in r.body.split(b"\n") if line.startswith(b"data: ")]
        assert len(events) == 3 and b"[DONE]" not in r.body
        error = json.loads(events[-1][6:])["error"]
        assert error["code"] == "upstream_cut" and error["type"] == "upstream_error"
        await eventually(lambda: s.catalog.get("alpha").in_flight == 0)
        await eventually(lambda: s.ctl.snapshots > before)   # released as cut: re-read
        record = s.access_records()[-1]
        assert record["outcome"] == "upstream_error" and record["model"] == "alpha"


@aio
async def test_an_ollama_stream_the_router_cuts_ends_with_an_error_line(tmp_path):
    async with RouterStack(tmp_path) as s:
        s.fake.defaults.update({"router_cut_after": 2, "events": 4})
        r = await s.one(post("/api/chat", {"model": "alpha", "messages": [
            {"role": "user", "content": "hi"}]}))
        assert r.status == 200
        lines = [json.loads(line) for line in r.body.splitlines() if line.strip()]
        assert "error" in lines[-1] and not any(line.get("done") for line in lines)
        await eventually(lambda: s.catalog.get("alpha").in_flight == 0)


@aio
async def test_a_non_streamed_answer_the_router_cuts_is_a_json_502(tmp_path):
    """The router answers a non-streamed request whose instance died with a 500 whose body is
    its raw `proxy error: ...` text under a JSON content type: the client gets the gateway's
    502 upstream_cut in the route's envelope (OpenAI, then Ollama), the lease released as cut."""
    async with RouterStack(tmp_path, access_log=True) as s:
        before = s.ctl.snapshots
        r = await s.one(post("/v1/chat/completions", mchat("alpha", router_cut_after=0)))
        assert r.status == 502 and r.get("content-type").startswith("application/json")
        error = r.json()["error"]
        assert error["code"] == "upstream_cut" and "stopped the model" in error["message"]
        assert b"proxy error" not in r.body
        await eventually(lambda: s.catalog.get("alpha").in_flight == 0)
        await eventually(lambda: s.ctl.snapshots > before)   # released as cut: re-read
        record = s.access_records()[-1]
        assert record["status"] == 502 and record["model"] == "alpha"
        s.fake.defaults.update({"router_cut_after": 0})
        r = await s.one(post("/api/chat", {"model": "alpha", "stream": False, "messages": [
            {"role": "user", "content": "hi"}]}))
        assert r.status == 502 and set(r.json()) == {"error"}
        assert "stopped the model" in r.json()["error"]


@aio
async def test_a_json_error_answer_goes_on_as_it_is_and_a_bare_one_is_replaced(tmp_path):
    """llama-server's own error objects reach the client unchanged (status, body); an error
    answer that is no JSON object is the gateway's 502 bad_upstream_response."""
    async with RouterStack(tmp_path) as s:
        r = await s.one(post("/v1/chat/completions", mchat("alpha", status=400)))
        assert r.status == 400 and r.json()["error"]["message"] == "fake error 400"
        s.fake.defaults.update({"status": 500})
        r = await s.one(post("/api/chat", {"model": "alpha", "stream": False, "messages": [
            {"role": "user", "content": "hi"}]}))
        assert r.status == 500 and r.json() == {"error": "fake error 500"}


@aio
async def test_a_whole_stream_ends_clean_and_frees_its_lease(tmp_path):
    async with RouterStack(tmp_path) as s:
        r = await s.one(post("/v1/chat/completions", mchat("alpha", stream=True, events=3)))
        assert r.status == 200 and r.complete and b"data: [DONE]" in r.body
        assert b"upstream_cut" not in r.body
        await eventually(lambda: s.catalog.get("alpha").in_flight == 0)


# ---- per-model slots ---------------------------------------------------------------------------

@aio
async def test_each_model_has_its_own_slots_and_queue(tmp_path):
    models = [FakeModel("alpha"), FakeModel("beta"), FakeModel("slow", load_time=1.0)]
    env = {"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT": "2"}
    async with RouterStack(tmp_path, models, models_max=3, env=env) as s:
        # alpha's one slot is held by a long stream ...
        c = await s.client()
        await c.send(post("/v1/chat/completions", mchat("alpha", stream=True, events=50,
                                                        interval=0.05)))
        status, _, _ = await c.head()
        assert status == 200
        # ... a request for a model that is loading waits in its own queue ...
        waiting = asyncio.ensure_future(s.one(post("/v1/chat/completions", mchat("slow")),
                                              timeout=4))
        await eventually(lambda: s.state("slow") is State.LOADING)
        slow = s.gw.models.slots.get("slow")
        assert slow is None or slow.active == 0      # waiting for the load holds no slot
        # ... and beta is served at once, neither held up
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await s.one(post("/v1/chat/completions", mchat("beta")))).status == 200
        assert loop.time() - t0 < 0.5
        assert s.gw.models.slots["alpha"].active == 1
        assert (await s.one(get("/health", key=None))).json()["backend_active"] == 1
        # alpha's queue holds one more; the next is refused (its own queue, full)
        queued = asyncio.ensure_future(s.one(post("/v1/chat/completions", mchat("alpha")),
                                             timeout=5))
        await eventually(lambda: s.gw.models.slots["alpha"].waiting == 1)
        r = await s.one(post("/v1/chat/completions", mchat("alpha")))
        assert r.status == 503 and r.error()["code"] == "queue_full"
        assert (await waiting).status == 200
        c.abort()                                   # alpha's slot passes to the queued one
        assert (await queued).status == 200
        metrics = (await s.one(get("/metrics", key=None))).body.decode()
        assert 'gateway_model_state{model="slow",state="loaded"} 1' in metrics
        assert 'gateway_model_requests_total{model="beta",status="200"} 1' in metrics
        assert 'gateway_model_queue_depth{model="alpha"} 0' in metrics


# ---- the Ollama API per model ----------------------------------------------------------------------

@aio
async def test_ollama_lists_shows_loads_and_unloads_per_model(tmp_path):
    async with RouterStack(tmp_path) as s:
        tags = (await s.one(get("/api/tags"))).json()["models"]
        assert [m["name"] for m in tags] == ["alpha:latest", "beta:latest", "gamma:latest"]
        assert (await s.one(get("/api/ps"))).json() == {"models": []}
        show = (await s.one(post("/api/show", {"model": "gamma"}))).json()
        assert show["model_info"]["general.name"] == "Model gamma"    # its own header
        assert show["model_info"]["llama.context_length"] == 4096
        show = (await s.one(post("/api/show", {"model": "b1"}))).json()
        assert show["model_info"]["general.name"] == "Model beta"
        assert (await s.one(post("/api/show", {"model": "nope"}))).status == 404
        # an empty chat loads the model
        r = await s.one(post("/api/chat", {"model": "beta", "messages": []}))
        assert r.status == 200 and r.json()["done_reason"] == "load"
        assert s.state("beta") is State.LOADED and s.fake.requests == []
        ps = (await s.one(get("/api/ps"))).json()["models"]
        assert [m["name"] for m in ps] == ["beta:latest"]
        assert ps[0]["context_length"] == 4096          # llama-server's n_ctx (fake meta)
        r = await s.one(post("/api/generate", {"model": "beta", "prompt": "hi",
                                               "stream": False}))
        assert r.status == 200 and r.json()["model"] == "beta"
        assert s.inference_models() == ["beta"]
        # keep_alive 0 with an empty prompt unloads it
        r = await s.one(post("/api/generate", {"model": "beta", "keep_alive": 0}))
        assert r.status == 200 and r.json()["done_reason"] == "unload"
        assert s.state("beta") is State.UNLOADED
        assert s.router.unloads["beta"] == 1


# ---- shutdown ------------------------------------------------------------------------------------

@aio
async def test_shutdown_answers_requests_waiting_for_a_load_at_once(tmp_path):
    models = [FakeModel("alpha"), FakeModel("slow", load_time=5.0)]
    async with RouterStack(tmp_path, models, env={"MODEL_LOAD_WAIT": "10"}) as s:
        waiting = asyncio.ensure_future(s.one(post("/v1/chat/completions", mchat("slow")),
                                              timeout=4))
        await eventually(lambda: s.state("slow") is State.LOADING)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await s.gw.shutdown(3.0)
        r = await waiting
        assert r.status == 503 and loop.time() - t0 < 1.0
        assert int(r.get("retry-after")) >= 1


@aio
async def test_the_gateway_answers_503_until_the_router_is_there(tmp_path):
    async with RouterStack(tmp_path, router_up=False, env={"MODELS_PRELOAD": "gamma"}) as s:
        r = await s.one(post("/v1/chat/completions", mchat("alpha")))
        assert r.status == 503 and r.error()["code"] == "backend_starting"
        assert r.get("retry-after")
        assert (await s.one(get("/health", key=None))).json()["router"] == "disconnected"
        await s.router.start()
        await eventually(lambda: s.ctl.connected and s.catalog.synced, 3)
        health = (await s.one(get("/health", key=None))).json()
        assert health["preload"] == "starting"              # MODELS_PRELOAD=gamma: unloaded
        assert (await s.one(post("/v1/chat/completions", mchat("alpha")))).status == 200


@aio
async def test_an_unload_waits_for_the_stream_in_flight_and_shutdown_ends_the_wait(tmp_path):
    async with RouterStack(tmp_path) as s:
        stream = await s.client()
        await stream.send(post("/v1/chat/completions", mchat("alpha", stream=True, events=8,
                                                                 interval=0.05)))
        assert (await stream.head())[0] == 200
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await s.one(post("/admin/models/unload", {"model": "alpha"}, key=ROOT))
        assert (r.status, r.json()) == (200, {"model": "alpha", "state": "unloaded"})
        assert loop.time() - t0 > 0.2                 # it waited for the stream ...
        rest = b""
        while chunk := await stream.reader.read(65536):
            rest += chunk
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")       # ... which ended whole
        assert s.router.unloads["alpha"] == 1 and s.router.evictions == []
        # an unload waiting for a stream when the gateway stops: 503 at once, the stream drains
        assert (await s.one(post("/v1/chat/completions", mchat("alpha")))).status == 200
        stream = await s.client()
        await stream.send(post("/v1/chat/completions", mchat("alpha", stream=True, events=10,
                                                                 interval=0.05)))
        assert (await stream.head())[0] == 200
        unload = asyncio.ensure_future(s.one(post("/admin/models/unload", {"model": "alpha"},
                                                  key=ROOT)))
        await eventually(lambda: s.catalog.get("alpha").draining)
        stopping = asyncio.ensure_future(s.gw.shutdown(3.0))
        r = await unload
        assert r.status == 503 and r.error()["code"] == "backend_stopping"
        rest = b""
        while chunk := await stream.reader.read(65536):
            rest += chunk
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        await stopping


@aio
async def test_the_dashboards_live_channel_follows_model_changes(tmp_path):
    """GET /admin/live's `models` events come from the router catalog: a load by another
    operator shows in an open dashboard as it happens (loading, then loaded)."""
    async with RouterStack(tmp_path) as s:
        c = await s.client()
        await c.send(get("/admin/live", key=ROOT))
        status, _headers, _ = await c.head()
        assert status == 200
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        buf = b""
        snapshots: list[dict] = []

        async def until(want) -> None:
            nonlocal buf
            while not want():
                size = int(await c.line(deadline - loop.time()), 16)
                assert size, "the live stream ended"
                buf += (await c.exactly(size + 2, deadline - loop.time()))[:-2]
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    if block.startswith(b"event: models\n"):
                        snapshots.append(json.loads(block.split(b"data: ", 1)[1]))

        def gamma(state: str) -> bool:
            return any(m["name"] == "gamma" and m["state"] == state
                       for snap in snapshots for m in snap["models"])

        await until(lambda: bool(snapshots))
        assert snapshots[0]["mode"] == "router" and not gamma("loaded")
        assert (await s.one(post("/admin/models/load", {"model": "gamma"}, key=ROOT))).status \
            == 200
        await until(lambda: gamma("loaded"))
        assert all(set(m) >= {"name", "state", "in_flight"} for m in snapshots[-1]["models"])
