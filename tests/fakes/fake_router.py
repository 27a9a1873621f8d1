"""A fake llama-server in router mode: /models, /models/load, /models/unload, /models/sse.

Shapes and quirks as observed in the pinned build (/work/shared/ROUTER-MODE.md §2-§4):
  - GET /models: {"data": [...], "object": "list"}; each entry with status.value, status.args and
    status.preset (absolute paths: what the gateway must never show), `failed`/`exit_code` once
    an instance exited non-zero, and the child's `meta` merged in while it runs;
  - POST /models/load: 200 at once, the load runs in the background; 400 "model is already
    running"; 404 "File Not Found" for an unknown name; with --models-max reached it evicts the
    least recently used loaded model itself (busy or not: the fake has no requests), or answers
    500 "model limit reached, try again later" when every running model is still loading;
  - POST /models/unload: 200 at once, the exit follows (`stop_time`); 400 "model is not found" /
    "model is not running"; unloading a loading model kills it: unloaded, exit_code 1, failed;
  - GET /models/sse: chunked text/event-stream, no snapshot, no heartbeat; `model_status` on
    spawn, `status_change` afterwards (exit_code on unloaded);
  - every GET route that names a model autoloads it unless autoload=false (here: /props);
  - the Unix socket file stays behind after exit, and a start on an existing path fails.

Knobs (attributes, change them between requests): per model `load_time`, `fail` (the load ends
with exit code 1), `meta`; router-wide `silent` (SSE sends nothing: only re-reads of /models see
changes), `status_override` {(method, path): (status, body)}, `models_delay` (s before answering
GET /models). drop_sse() closes every SSE stream (a gap). crash(name) kills an instance.

Recording: `requests` [(method, path, query)], `loads` / `unloads` Counters, `sse_connections`,
`evictions` (models it evicted itself to make room), `max_running`.

Standard library only; never imports from scripts/.

CLI (stands in for llama-server via LLAMA_SERVER_BIN, router mode only):
    python3 tests/fakes/fake_router.py --models-preset F [--models-max N] [--no-models-autoload]
        --host PATH.sock | --host 127.0.0.1 --port N     (other flags are ignored)
Models and aliases come from the preset's sections (`model =`, `alias =`, `load-on-startup`).
A model file that does not start with b"GGUF" fails to load. Env: FAKE_LOAD_SECONDS (load
time, default 0.05), FAKE_FAIL_START=1 (exit 1 at once). Prints its argv, then
"router listening on ..." once it accepts connections. SIGTERM / SIGINT: exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
import urllib.parse

# Request head / body bounds: the gateway's control requests are tiny.
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20
# Per SSE client: queued events before the client counts as gone (the real router has no bound
# we could observe; the gateway reads its stream at once).
MAX_SSE_QUEUE = 10_000
DEFAULT_META = {"vocab_type": 1, "n_vocab": 32000, "n_ctx": 4096, "n_ctx_train": 4096,
                "n_embd": 64, "n_params": 2130240, "size": 4261120, "ftype": "F16"}


class FakeModel:
    def __init__(self, name: str, path: str = "", aliases=(), *, load_time: float = 0.05,
                 fail: bool = False, meta: dict | None = None):
        self.name = name
        self.path = path or f"/models/{name}.gguf"
        self.aliases = list(aliases)
        self.load_time = load_time
        self.fail = fail
        self.meta = dict(DEFAULT_META if meta is None else meta)
        self.state = "unloaded"
        self.exit_code = 0
        self.last_used = 0.0
        self.task: asyncio.Task | None = None


class FakeRouter:
    def __init__(self, models, *, models_max: int = 1, autoload: bool = False,
                 unix_path: str = "", host: str = "127.0.0.1", port: int = 0,
                 stop_time: float = 0.01, bin_path: str = "/opt/llama/llama-server"):
        self.models: dict[str, FakeModel] = {}
        for m in models:
            m = m if isinstance(m, FakeModel) else FakeModel(**m)
            self.models[m.name] = m
        self.models_max = models_max
        self.autoload = autoload
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.stop_time = stop_time
        self.bin_path = bin_path
        self.silent = False
        self.models_delay = 0.0
        self.status_override: dict[tuple[str, str], tuple[int, dict]] = {}
        self.preset_path = ""               # set: GET /models?reload=1 re-reads its sections
        self.reloads = 0
        self.requests: list[tuple[str, str, dict]] = []
        self.loads: collections.Counter = collections.Counter()
        self.unloads: collections.Counter = collections.Counter()
        self.sse_connections = 0
        self.evictions: list[str] = []     # models the fake router evicted by itself
        self.max_running = 0               # most instances running at once
        self._sse: set[asyncio.Queue] = set()
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.unix_path:
            if os.path.exists(self.unix_path):
                raise OSError(f"couldn't bind HTTP server socket {self.unix_path}: in use")
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path,
                                                           limit=MAX_HEAD_BYTES)
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                      limit=MAX_HEAD_BYTES)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for m in self.models.values():
            if m.task:
                m.task.cancel()
        self.drop_sse()
        if self._server is not None:
            self._server.close()
            for w in list(self._conns):
                w.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ---- knobs ------------------------------------------------------------------------------------
    def drop_sse(self) -> None:
        for q in list(self._sse):
            q.put_nowait(None)

    def crash(self, name: str) -> None:
        m = self.models[name]
        if m.task:
            m.task.cancel()
        self._set(m, "unloaded", exit_code=1)

    def running(self) -> list[FakeModel]:
        return [m for m in self.models.values() if m.state in ("loading", "loaded", "sleeping")]

    # ---- state --------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the preset: a new section becomes a model, a gone one goes away."""
        self.reloads += 1
        sections, _glob = read_preset(self.preset_path)
        for name, keys in sections.items():
            if name not in self.models:
                self.models[name] = FakeModel(name, keys.get("model", ""))
        for name in [n for n in self.models if n not in sections]:
            del self.models[name]

    def _emit(self, name: str, event: str, data: dict) -> None:
        if self.silent:
            return
        payload = {"model": name, "event": event, "data": data}
        for q in list(self._sse):
            if q.qsize() < MAX_SSE_QUEUE:
                q.put_nowait(payload)

    def _set(self, m: FakeModel, state: str, exit_code: int = 0, *, spawn: bool = False) -> None:
        m.state = state
        data: dict = {"status": state}
        if state == "unloaded":
            m.exit_code = exit_code
            data["exit_code"] = exit_code
        elif state == "loaded":
            m.exit_code = 0
            data["info"] = {"id": m.name, "aliases": [m.name], "object": "model",
                            "owned_by": "llamacpp", "meta": m.meta}
        self._emit(m.name, "model_status" if spawn else "status_change", data)

    def _find(self, name) -> FakeModel | None:
        if not isinstance(name, str):
            return None
        if name in self.models:
            return self.models[name]
        for m in self.models.values():
            if name in m.aliases:
                return m
        return None

    def _entry(self, m: FakeModel) -> dict:
        running = m.state != "unloaded"
        args = [self.bin_path, "--host", "127.0.0.1", "--port", "0", "--alias", m.name,
                "--model", m.path]
        status = {"value": m.state, "args": args,
                  "preset": f"[{m.name}]\nmodel = {m.path}\n\n"}
        if m.state == "unloaded" and m.exit_code != 0:
            status["exit_code"] = m.exit_code
            status["failed"] = True
        entry = {"id": m.name, "aliases": list(m.aliases), "tags": [], "object": "model",
                 "owned_by": "llamacpp", "created": int(time.time()), "status": status,
                 "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                 "source": "preset", "can_remove": False}
        if running and m.state != "loading":
            entry["meta"] = m.meta
        return entry

    def load(self, m: FakeModel) -> tuple[int, dict]:
        """POST /models/load, as the router does it (its own LRU eviction included)."""
        if m.state != "unloaded":
            return 400, _err(400, "model is already running", "invalid_request_error")
        if self.models_max > 0 and len(self.running()) >= self.models_max:
            idle = [r for r in self.running() if r.state != "loading"]
            if not idle:
                return 500, _err(500, "model limit reached, try again later", "server_error")
            victim = min(idle, key=lambda r: r.last_used)
            self.evictions.append(victim.name)
            self._set(victim, "unloaded", 0)      # the real one waits for the exit: ~0.06 s
        self.loads[m.name] += 1
        m.last_used = time.monotonic()
        self._set(m, "loading", spawn=True)
        self.max_running = max(self.max_running, len(self.running()))
        m.task = asyncio.get_running_loop().create_task(self._loading(m))
        return 200, {"success": True}

    async def _loading(self, m: FakeModel) -> None:
        await asyncio.sleep(m.load_time)
        if m.fail:
            self._set(m, "unloaded", 1)
        else:
            self._set(m, "loaded")

    def unload(self, m: FakeModel) -> tuple[int, dict]:
        if m.state == "unloaded":
            return 400, _err(400, "model is not running", "invalid_request_error")
        self.unloads[m.name] += 1
        if m.state == "loading":           # killed at once: reported as a failure
            if m.task:
                m.task.cancel()
            self._set(m, "unloaded", 1)
        else:
            async def stop():
                await asyncio.sleep(self.stop_time)
                self._set(m, "unloaded", 0)
            m.task = asyncio.get_running_loop().create_task(stop())
        return 200, {"success": True}

    # ---- HTTP -------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                if length > MAX_BODY_BYTES:
                    return
                body = await reader.readexactly(length) if length else b""
                url = urllib.parse.urlsplit(target)
                query = dict(urllib.parse.parse_qsl(url.query))
                self.requests.append((method, url.path, query))
                if method == "GET" and url.path == "/models/sse":
                    await self._sse_stream(writer)
                    return
                status, payload = await self._route(method, url.path, query, body)
                data = json.dumps(payload).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json; charset=utf-8"
                             b"\r\nContent-Length: %d\r\n%s\r\n"
                             % (status, len(data), b"Connection: close\r\n" if close else b"")
                             + data)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    async def _route(self, method: str, path: str, query: dict, body: bytes):
        override = self.status_override.get((method, path))
        if override is not None:
            return override
        if method == "GET" and path in ("/health", "/v1/health"):
            return 200, {"status": "ok"}
        if method == "GET" and path in ("/models", "/v1/models"):
            if self.models_delay:
                await asyncio.sleep(self.models_delay)
            if query.get("reload") in ("1", "true") and self.preset_path:
                self.reload()
            return 200, {"data": [self._entry(m) for m in self.models.values()],
                         "object": "list"}
        if method == "GET" and path == "/props":
            m = self._find(query.get("model"))
            if m is None:
                return 400, _err(400, "model name is missing from the request",
                                 "invalid_request_error")
            if m.state != "loaded":
                auto = query.get("autoload")
                if auto in ("false", "0") or (auto is None and not self.autoload):
                    return 400, _err(400, "model is not loaded", "invalid_request_error")
                self.load(m)
                return 503, _err(503, "Loading model", "unavailable_error")
            return 200, {"model_alias": m.name, "total_slots": 1}
        if method == "POST" and path in ("/models/load", "/models/unload"):
            try:
                data = json.loads(body or b"{}")
            except ValueError as exc:
                return 400, _err(400, f"[json.exception.parse_error.101] {exc}",
                                 "invalid_request_error")
            m = self._find(data.get("model") if isinstance(data, dict) else None)
            if path == "/models/load":
                if m is None:
                    return 404, _err(404, "File Not Found", "not_found_error")
                return self.load(m)
            if m is None:
                return 400, _err(400, "model is not found", "invalid_request_error")
            return self.unload(m)
        return 404, _err(404, "File Not Found", "not_found_error")

    async def _sse_stream(self, writer: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue()
        self._sse.add(q)
        self.sse_connections += 1
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\n"
                         b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            while True:
                event = await q.get()
                if event is None:
                    return           # dropped: the connection closes without a last chunk
                data = b"data: " + json.dumps(event).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
        finally:
            self._sse.discard(q)


def _err(code: int, message: str, kind: str) -> dict:
    return {"error": {"code": code, "message": message, "type": kind}}


# ---- CLI -------------------------------------------------------------------------------------------
def read_preset(path: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """{section: {key: value}} of an INI as llama-server reads it (values end at ';' or '#')."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in ";#":
                continue
            if line.startswith("["):
                current = sections.setdefault(line[1:line.index("]")].strip(), {})
                continue
            key, _, value = line.partition("=")
            for c in ";#":
                value = value.split(c, 1)[0]
            (current if current is not None else sections.setdefault("default", {}))[
                key.strip()] = value.strip()
    glob = sections.pop("*", {})
    return sections, glob


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="fake-llama-router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--models-preset", default="")
    p.add_argument("--models-dir", default="")
    p.add_argument("--models-max", type=int, default=4)
    p.add_argument("--no-models-autoload", action="store_true")
    p.add_argument("-m", "--model", default="")
    args, _ignored = p.parse_known_args(argv)
    return args


async def _cli_main(args) -> int:
    loop = asyncio.get_running_loop()
    if args.model or not args.models_preset:
        print("fake-router: only router mode (--models-preset, no -m) is faked",
              file=sys.stderr, flush=True)
        return 1
    sections, _glob = read_preset(args.models_preset)
    load_time = float(os.environ.get("FAKE_LOAD_SECONDS", "0.05") or 0.05)
    models = []
    startup = []
    for name, keys in sections.items():
        path = keys.get("model", "")
        try:
            with open(path, "rb") as f:
                ok = f.read(4) == b"GGUF"
        except OSError:
            ok = False
        aliases = [a.strip() for a in keys.get("alias", "").split(",") if a.strip()]
        models.append(FakeModel(name, path, aliases, load_time=load_time, fail=not ok))
        if keys.get("load-on-startup") in ("true", "1", "on", "enabled"):
            startup.append(name)
    if args.models_max > 0 and len(startup) > args.models_max or \
            (args.models_max == 0 and startup):
        print(f"fake-router: number of models to load on startup ({len(startup)}) exceeds "
              f"models_max ({args.models_max})", file=sys.stderr, flush=True)
        return 1
    unix = args.host if args.host.endswith(".sock") else ""
    router = FakeRouter(models, models_max=args.models_max,
                        autoload=not args.no_models_autoload, unix_path=unix,
                        host=args.host if not unix else "127.0.0.1", port=args.port)
    done = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: done.done() or done.set_result(0))
    try:
        await router.start()
    except OSError as exc:
        print(f"fake-router: {exc}", file=sys.stderr, flush=True)
        return 1
    print("fake-router: router listening on "
          + (f"unix://{unix}" if unix else f"http://{args.host}:{router.port}")
          + f" with {len(models)} model(s)", flush=True)
    for name in startup:
        router.load(router.models[name])
    code = await done
    await router.stop()
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("fake-router: argv " + json.dumps(argv), flush=True)
    if os.environ.get("FAKE_FAIL_START") == "1":
        print("fake-router: FAKE_FAIL_START=1", file=sys.stderr, flush=True)
        return 1
    return asyncio.run(_cli_main(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
