"""llamagw.models (preset, catalog, router) against the REAL llama-server in router mode.

Three copies of the demo model: alpha.gguf, beta.gguf (alias b1 from the operator's preset),
gamma/ (a model in a folder), and broken.gguf (a truncated copy). llama-server runs on a Unix
socket with the generated preset, --models-max 1 and --no-models-autoload, as entrypoint.sh
starts it; the tests drive RouterController directly: loads, a switch under MODELS_MAX=1, an
unload that waits for a stream in flight, and a broken model's back-off.

Run by `make test-e2e` (LLAMA_SERVER_BIN, DEMO_MODEL); without them the cached llama-server
and data/models/demo-tiny-llama.gguf are used."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import aio, eventually
from e2e_stack import demo_model, make_stack, processes_mentioning, request, server_bin  # noqa: F401
from llamagw.models import preset
from llamagw.models.catalog import Catalog, State
from llamagw.models.router import (ModelFailed, ModelNotFound, RouterClient, RouterController)

# llama-server's router answers /health within ~0.05 s; a loaded 2-core runner gets 30 s.
ROUTER_START_DEADLINE_S = 30.0
ROUTER_STOP_DEADLINE_S = 15.0
# The stream an unload waits for: ignore_eos makes it exactly this many tokens.
STREAM_TOKENS = 8
# Controller timings: the demo model loads in ~0.1-0.5 s here.
TIMINGS = dict(load_wait=20.0, load_timeout=30.0, drain_timeout=10.0, poll_interval=0.2,
               reconnect_initial=0.05, reconnect_max=0.5)


class RecordingClient(RouterClient):
    """The real client, keeping (method, path, model) of every request it sends."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[tuple[str, str, str]] = []
        self.at: list[float] = []          # when each request was sent (monotonic)
        self.gets: list[str] = []          # full GET targets, query included

    async def request(self, method, path, body=None):
        model = json.loads(body).get("model", "") if body else ""
        self.sent.append((method, path.split("?")[0], model))
        self.at.append(time.monotonic())
        if method == "GET":
            from llamagw.models.router import no_autoload
            self.gets.append(no_autoload(path))
        return await super().request(method, path, body)

    def posts(self, model: str = "") -> list[str]:
        return [p for m, p, name in self.sent if m == "POST" and (not model or name == model)]


class Router:
    """The real llama-server in router mode over a temp MODELS_DIR."""

    def __init__(self, tmp_path: Path):
        demo = demo_model()
        self.tmp = tmp_path
        models = tmp_path / "models"
        (models / "gamma").mkdir(parents=True)
        shutil.copyfile(demo, models / "alpha.gguf")
        shutil.copyfile(demo, models / "beta.gguf")
        shutil.copyfile(demo, models / "gamma" / "gamma-q8.gguf")
        with open(demo, "rb") as src, open(models / "broken.gguf", "wb") as dst:
            dst.write(src.read(100_000))                     # header intact, tensors cut
        operator = tmp_path / "models.ini"
        operator.write_text("[beta]\nalias = b1\n")
        self.generated = preset.generate(str(models), str(operator), preload=[], models_max=1,
                                         defaults={"ctx-size": "512", "n-gpu-layers": "0",
                                                   "parallel": "1"})
        self.preset_path = tmp_path / "models-preset.ini"
        self.generated.write(str(self.preset_path))
        self.sock = str(tmp_path / "router.sock")
        self.log_path = tmp_path / "router.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        cache = self.tmp / "hf-cache"
        cache.mkdir()
        env = dict(os.environ, LLAMA_CACHE=str(cache), HF_HOME=str(cache))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [server_bin(), "--models-preset", str(self.preset_path), "--models-max", "1",
             "--no-models-autoload", "--host", self.sock],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        client = RouterClient(self.sock, request_timeout=2)
        deadline = time.monotonic() + ROUTER_START_DEADLINE_S
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                status, _ = await client.request("GET", "/health")
                if status == 200:
                    return
            except Exception:
                pass
            assert time.monotonic() < deadline, "router never answered /health"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(ROUTER_STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc:
            self.log.close()


@pytest.fixture
def router(tmp_path):
    r = Router(tmp_path)
    yield r
    r.stop()


async def controller(router: Router, **kw) -> tuple[RouterController, RecordingClient]:
    await router.start()
    client = RecordingClient(router.sock)
    catalog = Catalog(backoff_initial=kw.pop("backoff", 10.0), backoff_max=60.0)
    opts = dict(TIMINGS)
    opts.update(kw)
    ctl = RouterController(client, models_max=1, catalog=catalog, **opts)
    await ctl.start(timeout=10)
    return ctl, client


async def chat(sock: str, model: str, *, max_tokens: int = 8, stream: bool = False,
               first_bytes: asyncio.Event | None = None,
               read_on: asyncio.Event | None = None) -> bytes:
    """One chat completion straight to the router over its socket; the whole raw answer.
    first_bytes is set at the first event; read_on makes a slow client: past the first event it
    reads on only once read_on is set (the answer cannot end before)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Count"}],
                       "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}).encode()
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        data = b""
        async with asyncio.timeout(30):
            while chunk := await reader.read(65536):
                data += chunk
                if first_bytes is not None and b"data: " in data and not first_bytes.is_set():
                    first_bytes.set()
                    if read_on is not None:
                        await read_on.wait()
        return data
    finally:
        writer.close()


# ---- tests -------------------------------------------------------------------------------------

@aio
async def test_catalog_names_and_a_load_on_the_real_router(router):
    ctl, client = await controller(router)
    try:
        assert ctl.catalog.names() == ["alpha", "beta", "broken", "gamma"]
        assert ctl.resolve("b1") == "beta" and ctl.resolve("gamma") == "gamma"
        with pytest.raises(ModelNotFound):
            ctl.resolve("Alpha")                         # case-sensitive, like the router
        shown = json.dumps(ctl.snapshot())
        assert str(router.tmp) not in shown and "llama-server" not in shown
        assert all(ctl.catalog.get(n).state is State.UNLOADED for n in ctl.catalog.names())

        with await ctl.acquire("gamma") as lease:       # the model kept in a folder
            answer = await chat(router.sock, lease.name)
            assert b" 200 " in answer.split(b"\r\n", 1)[0]
            assert b'"model":"gamma"' in answer
        public = ctl.catalog.public("gamma")
        assert public["state"] == "loaded" and public["quantization"] == "F16"
        assert public["size"] > 0 and public["context"] == 512
        assert public["last_used"] is not None and public["in_flight"] == 0
        # a request straight to an unloaded model is refused (--no-models-autoload): loads
        # only happen through the gateway
        refused = await chat(router.sock, "alpha")
        assert b" 400 " in refused.split(b"\r\n", 1)[0] and b"not loaded" in refused
        assert ctl.catalog.get("alpha").state is State.UNLOADED
        assert client.gets and all(g.endswith("autoload=false") for g in client.gets)
    finally:
        await ctl.close()


@aio
async def test_switch_under_models_max_1_unloads_first(router):
    ctl, client = await controller(router)
    try:
        seen: list[tuple[str, str]] = []

        async def watch():
            async for ev in ctl.events(heartbeat=5):
                if ev["type"] == "model":
                    item = (ev["model"]["name"], ev["model"]["state"])
                    if not seen or seen[-1] != item:
                        seen.append(item)
        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        (await ctl.acquire("alpha")).release()
        (await ctl.acquire(ctl.resolve("b1"))).release()       # beta, by its alias
        assert client.posts() == ["/models/load", "/models/unload", "/models/load"]
        assert ctl.catalog.get("alpha").state is State.UNLOADED
        assert ctl.catalog.get("beta").state is State.LOADED
        # alpha was gone before beta started loading: never two models in memory
        assert seen.index(("alpha", "unloaded")) < seen.index(("beta", "loading"))
        await ctl.switch("gamma")
        assert ctl.catalog.get("gamma").state is State.LOADED
        assert ctl.catalog.get("beta").state is State.UNLOADED
        assert seen.index(("beta", "unloaded")) < seen.index(("gamma", "loading"))
        watcher.cancel()
    finally:
        await ctl.close()


@aio
async def test_unload_waits_for_the_stream_in_flight(router):
    ctl, client = await controller(router)
    try:
        lease = await ctl.acquire("alpha")
        started, read_on = asyncio.Event(), asyncio.Event()
        # a slow client: its stream is in flight until the test lets it read on, however fast
        # the model generates
        stream = asyncio.ensure_future(chat(router.sock, "alpha", max_tokens=STREAM_TOKENS,
                                            stream=True, first_bytes=started, read_on=read_on))
        await asyncio.wait_for(started.wait(), 10)

        ended = []

        async def stream_then_release():
            data = await stream
            ended.append(time.monotonic())
            lease.release()                 # what the gateway does when the stream ends
            return data
        relay = asyncio.ensure_future(stream_then_release())
        unload = asyncio.ensure_future(ctl.unload("alpha"))
        # the unload drains (no new requests) and waits: nothing is asked of the router while
        # the stream is in flight
        await eventually(lambda: ctl.catalog.get("alpha").draining, 10.0)
        await asyncio.sleep(0.1)            # room for an unload that would not wait
        assert not unload.done() and not ended
        assert client.posts("alpha") == ["/models/load"]
        read_on.set()                       # the client reads on: the stream ends
        data = await relay
        await asyncio.wait_for(unload, 20)
        # the stream ran to its end: [DONE], no "proxy error" from a killed child
        assert data.rstrip().endswith(b"0") and b"data: [DONE]" in data
        assert b"proxy error" not in data
        assert b'"finish_reason":"length"' in data                 # all its tokens
        assert b'"predicted_n":%d' % STREAM_TOKENS in data
        assert client.posts("alpha") == ["/models/load", "/models/unload"]
        unload_at = client.at[client.sent.index(("POST", "/models/unload", "alpha"))]
        assert unload_at >= ended[0]                 # asked only once the stream ended
        assert ctl.catalog.get("alpha").state is State.UNLOADED
        assert ctl.catalog.get("alpha").failures == 0          # a clean stop, not a failure
    finally:
        await ctl.close()


@aio
async def test_broken_model_fails_backs_off_and_stops_evicting(router):
    ctl, client = await controller(router, backoff=0.5)
    try:
        (await ctl.acquire("alpha")).release()
        with pytest.raises(ModelFailed) as err:
            await ctl.acquire("broken")
        assert "failed to load" in err.value.message and err.value.retry_after >= 1
        assert ctl.catalog.public("broken")["state"] == "failed"
        with pytest.raises(ModelFailed):                     # within the back-off: no try
            await ctl.acquire("broken")
        assert client.posts("broken") == ["/models/load"]
        # the failed load evicted alpha once (drained and unloaded by the gateway, not by the
        # router); alpha comes back on demand
        assert client.posts("alpha") == ["/models/load", "/models/unload"]
        (await ctl.acquire("alpha")).release()
        await asyncio.sleep(0.6)
        with pytest.raises(ModelFailed):                     # the one retry that may evict
            await ctl.acquire("broken")
        assert client.posts("broken") == ["/models/load"] * 2
        (await ctl.acquire("alpha")).release()
        await asyncio.sleep(1.1)
        with pytest.raises(ModelFailed) as err:              # now it waits for free memory
            await ctl.acquire("broken")
        assert "loads again only when memory is free" in err.value.message
        assert client.posts("broken") == ["/models/load"] * 2
        assert ctl.catalog.get("alpha").state is State.LOADED
    finally:
        await ctl.close()


# ---- entrypoint.sh in router mode with the real llama-server ----------------------------------------

def test_entrypoint_router_mode_boots_preloads_and_stops_clean(make_stack, tmp_path):
    models = tmp_path / "many"
    (models / "gamma").mkdir(parents=True)
    for rel in ("alpha.gguf", "beta.gguf", "gamma/gamma-q8.gguf"):
        shutil.copyfile(demo_model(), models / rel)
    s = make_stack(MODELS_DIR=str(models), MODELS_PRELOAD="gamma", MODEL_PATH="",
                   EXTRA_ARGS="", CTX="1024", PARALLEL="1")
    s.start()
    seen = s.wait_health(200)
    assert 200 in seen
    _, _, body = request(0, "/models?autoload=false", unix_path=s.backend_socket, timeout=10)
    states = {m["id"]: m["status"]["value"] for m in json.loads(body)["data"]}
    assert states == {"alpha": "unloaded", "beta": "unloaded", "gamma": "loaded"}
    # the router was started with the generated preset and no per-model flag
    line = next(ln for ln in s.output().splitlines() if "starting llama-server" in ln)
    assert "--models-preset" in line and "--no-models-autoload" in line
    assert " -c " not in line and " -m " not in line and "--alias" not in line
    # a chat for the loaded model goes through the gateway and the router
    status, _, answer = request(s.port, "/v1/chat/completions", "POST", json.dumps(
        {"model": "gamma", "messages": [{"role": "user", "content": "hi"}],
         "max_tokens": 4}).encode(), s.auth())
    assert status == 200 and json.loads(answer)["model"] == "gamma"
    assert s.stop() == 0, s.output()[-4000:]
    assert processes_mentioning(str(s.tmp)) == []      # the router's children are gone too
