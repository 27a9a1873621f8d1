"""A fake admin API (ADMIN-API.md) and the dashboard's files, in-process, on 127.0.0.1.

For the real-browser tests (tests/browser/) until the gateway serves the admin routes: the
contract's routes, statuses and shapes over a small asyncio HTTP/1.1 server, built on the real
pieces the gateway will use (llamagw.admin.sessions / origin / static / livehub / system,
llamagw.observe.logbuffer, the key file through llamagw.limits.keys / keyfile, usage.to_csv and
parse_time). What is fake: the models (state machine with timers), the metrics (a 1-Hz tick of
made-up numbers), the requests (emit_request), the usage rows (from emitted requests plus a seed).

Runs in its own thread with its own event loop; the test thread drives it with the thread-safe
methods: emit_request, emit_log, set_model, drop_live, and reads `calls` (method, path, status).

    fake = FakeAdmin(tmp_dir).start()      # .url, .admin_key, .user_key
    ...
    fake.stop()
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import urllib.parse
from collections import deque

from llamagw import errors
from llamagw.admin import livehub, origin, sessions, static
from llamagw.admin.system import SystemProbe
from llamagw.limits import keyfile
from llamagw.limits.keys import KeyInfo, KeyStore, extract_key
from llamagw.observe import logbuffer, usage

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20
JSON = "application/json"
XSS = "<img src=x onerror=alert(1)>"


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str, headers=()):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, list(headers)


class Req:
    def __init__(self, method, target, headers, body, client):
        self.method, self.target, self.headers, self.body, self.client = \
            method, target, headers, body, client
        self.path, _, self.query = target.partition("?")
        self.params = dict(urllib.parse.parse_qsl(self.query))

    def header(self, name):
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def json(self) -> dict:
        try:
            obj = json.loads(self.body or b"{}")
        except ValueError:
            raise HttpError(400, "body is not JSON", "invalid_json") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "body must be a JSON object", "invalid_json")
        return obj


def default_models() -> list[dict]:
    now = time.time()
    return [
        {"name": "qwen3-8b", "aliases": ["qwen"], "state": "loaded", "size": 5_027_784_704,
         "quantization": "Q4_K_M", "context": 32768, "in_flight": 1, "last_used": now - 12,
         "failure": None, "draining": False},
        {"name": "llama-3.2-1b", "aliases": [], "state": "unloaded", "size": 807_690_240,
         "quantization": "Q8_0", "context": 8192, "in_flight": 0, "last_used": now - 4000,
         "failure": None, "draining": False},
        {"name": "broken-model", "aliases": [], "state": "failed", "size": 1_200_000_000,
         "quantization": "F16", "context": 4096, "in_flight": 0, "last_used": None,
         "failure": "llama-server exited with code 1 while loading\n"
                    "llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' "
                    "data is not within the file bounds",
         "draining": False},
        {"name": XSS, "aliases": ['"><svg onload=alert(2)>'], "state": "unloaded",
         "size": 123_456_789, "quantization": "Q4_0", "context": 2048, "in_flight": 0,
         "last_used": None, "failure": None, "draining": False},
    ]


class FakeAdmin:
    def __init__(self, data_dir: str, *, load_s: float = 0.4, unload_s: float = 0.2,
                 metrics_interval_s: float = 1.0, heartbeat_s: float = 2.0,
                 nvidia_smi: str = "nvidia-smi", admin_keys: bool = True):
        self.data_dir = data_dir
        self.load_s, self.unload_s = load_s, unload_s
        self.metrics_interval_s = metrics_interval_s
        os.makedirs(data_dir, exist_ok=True)
        self.keys_path = os.path.join(data_dir, "api_keys.txt")
        self.admin_key = self.user_key = None
        if admin_keys:
            self.admin_key = keyfile.add_key(self.keys_path, KeyInfo("ops", role="admin"))
        self.user_key = keyfile.add_key(self.keys_path, KeyInfo("alice", rpm=60, tpm=20000))
        keyfile.add_key(self.keys_path, KeyInfo("bob", concurrency=2,
                                                models=frozenset({"qwen3-8b"})), hashed=True)
        self.keystore = KeyStore(self.keys_path)
        self.keystore.load()
        self.sessions = sessions.SessionStore()
        self.limiter = sessions.SignInLimiter()
        self.hub = livehub.LiveHub(heartbeat_s=heartbeat_s)
        self.static = static.StaticFiles.load()
        self.logs = logbuffer.LogBuffer()
        self.logs.add_listener(lambda e: self.hub.publish_threadsafe("log", e))
        self.system = SystemProbe(data_dir, version="0.1.0-test", nvidia_smi=nvidia_smi,
                                  cpu_sample_s=0.05)
        self.models = default_models()
        self.usage_rows: list[dict] = []
        self.last_used: dict[str, float] = {}
        self.calls: deque = deque(maxlen=2000)
        self.started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._tick = 0
        self.port = 0
        self._seed()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeAdmin:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="fake-admin", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake admin did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._conn, "127.0.0.1", 0, limit=MAX_HEAD)
        self.port = server.sockets[0].getsockname()[1]
        ticker = asyncio.create_task(self._metrics_loop())
        self._ready.set()
        async with server:
            await self._stop.wait()
            self.hub.close_all()
            ticker.cancel()
            server.close()

    def _call(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    # -- test controls (any thread) ------------------------------------------------------------
    def emit_request(self, **fields) -> None:
        self._call(self._emit_request, fields)

    def emit_log(self, text: str, level: str = "info", source: str = "llama") -> None:
        self.logs.append(source, level, text)

    def set_model(self, name: str, **fields) -> None:
        self._call(self._set_model, name, fields)

    def drop_live(self) -> None:
        """End every live stream (as a restart would): the page must reconnect."""
        self._call(self.hub.close_all)

    def publish(self, event_type: str, obj: object) -> None:
        self._call(self.hub.publish, event_type, obj)

    # -- data ------------------------------------------------------------------------------------
    def _seed(self) -> None:
        """Usage rows: alice and bob today (seconds ago); ci-bot only on earlier days; one row
        past 30 days."""
        now = time.time()
        seed = [("alice", "qwen3-8b", 200, 1 / 3600, 1200, 340),
                ("alice", "qwen3-8b", 200, 2 / 3600, 800, 260),
                ("bob", "qwen3-8b", 200, 3 / 3600, 1500, 90),
                ("alice", "llama-3.2-1b", 429, 26, 0, 0),
                ("ci-bot", "qwen3-8b", 200, 30, 4200, 900),
                ("ci-bot", "qwen3-8b", 500, 120, 600, 0),
                ("bob", "llama-3.2-1b", 200, 240, 2500, 700),
                ("ci-bot", "qwen3-8b", 200, 40 * 24, 9999, 9999)]
        for key_id, model, status, hours_ago, prompt, completion in seed:
            self.usage_rows.append({"t": now - hours_ago * 3600, "key_id": key_id,
                                    "model": model, "status": status, "prompt_tokens": prompt,
                                    "completion_tokens": completion})
        for text in ("gateway: listening on 127.0.0.1:8000", "keys: loaded 3 key(s)",
                     "router: qwen3-8b loaded in 4.2 s"):
            self.logs.append("gateway", "info", text)
        self.logs.append("llama", "info", "main: server is listening on http://127.0.0.1:8081")
        self.logs.append("llama", "warning", "W srv  load_model: flash attention not available")
        self.logs.append("boot", "error", f"boot: bad line echoing {XSS}")

    def _emit_request(self, fields: dict) -> None:
        rec = {"t": time.time(), "request_id": f"req-{len(self.usage_rows)}",
               "key_id": "alice", "model": "qwen3-8b", "route": "/v1/chat/completions",
               "status": 200, "prompt_tokens": 42, "completion_tokens": 17,
               "duration_ms": 812.5, "ttfb_ms": 95.1}
        rec.update(fields)
        self.usage_rows.append(rec)
        self.last_used[rec["key_id"]] = rec["t"]
        self.hub.publish("request", rec)

    def _models_snapshot(self) -> dict:
        return {"models": [dict(m) for m in self.models], "max": 2, "mode": "router"}

    def _find_model(self, name) -> dict:
        for m in self.models:
            if m["name"] == name:
                return m
        raise HttpError(404, "no such model", "model_not_found")

    def _set_model(self, name: str, fields: dict) -> None:
        for m in self.models:
            if m["name"] == name:
                m.update(fields)
        self.hub.publish("models", self._models_snapshot())

    def _later(self, delay: float, name: str, **fields) -> None:
        self._loop.call_later(delay, self._set_model, name, fields)

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.metrics_interval_s)
            self._tick += 1
            if self.hub.active:
                self.hub.publish("metrics", self._metrics())

    def _metrics(self, t: float | None = None, k: int | None = None) -> dict:
        """Made-up numbers that move: a slow wave plus a deterministic wobble."""
        k = self._tick if k is None else k
        wave = (math.sin(k / 90) + 1) / 2
        wobble = (math.sin(k / 11) + math.sin(k / 4.7)) / 4 + 0.5
        return {"t": time.time() if t is None else t,
                "requests_per_s": round(1.5 + 3 * wave + wobble, 2),
                "tokens_per_s": round(150 + 260 * wave + 40 * wobble, 1),
                "ttft_p50_ms": round(95 + 40 * wave + 10 * wobble, 1),
                "ttft_p95_ms": round(240 + 120 * wave + 60 * wobble, 1),
                "in_flight": int(1 + 3 * wave + wobble), "queue": int(2 * wave * wobble),
                "error_rate": 0.012, "state": "ready",
                "uptime_s": round(time.monotonic() - self.started + 86_000, 1),
                "loaded": [m["name"] for m in self.models if m["state"] == "loaded"]}

    def _history(self, seconds: int = 1800, step: int = 5) -> list[dict]:
        """The last `seconds` of metrics, one point every `step` s, as a server that kept them
        could send in hello (ADMIN-API.md: "up to an hour the server may send in hello")."""
        now = time.time()
        return [self._metrics(now - seconds + i, self._tick - seconds + i)
                for i in range(0, seconds, step)]

    # -- HTTP ----------------------------------------------------------------------------------
    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers.append((name.strip().lower(), value.strip()))
                length = int(dict(headers).get("content-length", "0") or 0)
                if length > MAX_BODY:
                    break
                body = await reader.readexactly(length) if length else b""
                req = Req(method, target, headers, body, client)
                if req.path == "/admin/live" and method == "GET":
                    await self._live(req, reader, writer)
                    break
                status, out_headers, out = await self._respond(req)
                self.calls.append((method, req.path, status))
                writer.write(self._head(status, out_headers, len(out)) + out)
                await writer.drain()
                if (req.header("connection") or "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _head(status: int, headers: list, length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}"]
        lines += [f"{n}: {v}" for n, v in headers]
        if length is not None:
            lines.append(f"content-length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _respond(self, req: Req) -> tuple[int, list, bytes]:
        page = self.static.respond(req.method, req.target, req.headers)
        if page is not None:
            return page.status, [h for h in page.headers if h[0] != "content-length"], page.body
        if req.path in ("/", "/favicon.ico"):
            return 308, [("location", "/ui/" if req.path == "/" else "/ui/favicon.svg")], b""
        try:
            status, obj, extra = await self._admin(req)
        except HttpError as exc:
            status, extra = exc.status, exc.headers
            obj = {"error": {"message": exc.message, "type": _etype(exc.status),
                             "code": exc.code}}
        headers = list(static.API_HEADERS) + list(extra)
        if isinstance(obj, bytes):
            return status, headers, obj
        if obj is None:
            return status, headers, b""
        return status, headers + [("content-type", JSON)], json.dumps(obj).encode()

    # -- auth ----------------------------------------------------------------------------------
    def _auth(self, req: Req) -> tuple[str, sessions.Session | None]:
        """(key_id, session or None for a bearer caller); raises 401 / 403."""
        try:
            presented = extract_key(req.headers)
        except errors.GatewayError as exc:
            raise HttpError(exc.status, exc.message, exc.code) from None
        if presented is not None:
            info = self.keystore.lookup(presented)
            if info is None:
                raise HttpError(401, "Invalid API key", "unauthorized")
            if not info.is_admin:
                raise HttpError(403, "This key may not use the admin API", "forbidden")
            return info.key_id, None
        session = self.sessions.get(sessions.session_id_from(req.headers))
        if session is None:
            raise HttpError(401, "Sign in first", "unauthorized")
        info = self.keystore.get(session.key_id)
        if info is None or not info.is_admin:
            self.sessions.revoke_key(session.key_id)
            raise HttpError(401, "Sign in first", "unauthorized")
        if req.method == "POST":
            if not sessions.csrf_ok(session, req.header("x-csrf-token")) or \
                    not origin.same_origin(req.headers, scheme="http"):
                raise HttpError(403, "Missing or wrong CSRF token, or another origin", "csrf")
        return session.key_id, session

    async def _admin(self, req: Req) -> tuple[int, object, list]:
        m, p = req.method, req.path
        if not p.startswith("/admin/"):
            raise HttpError(404, "Not found", "not_found")
        if (m, p) == ("GET", "/admin/setup"):
            admins = any(i.is_admin for i in map(self.keystore.get, self.keystore.key_ids()))
            return 200, {"admin_keys": admins}, []
        if (m, p) == ("POST", "/admin/session"):
            return self._sign_in(req)
        key_id, session = self._auth(req)
        secure = sessions.request_is_https("http", req.headers)
        if (m, p) == ("GET", "/admin/session"):
            if session is None:
                raise HttpError(401, "No session", "unauthorized")
            return 200, {"key_id": key_id, "csrf": session.csrf,
                         "expires_in": self.sessions.expires_in(session)}, []
        if (m, p) == ("POST", "/admin/session/logout"):
            self.sessions.revoke(sessions.session_id_from(req.headers))
            return 204, None, [("set-cookie", sessions.clear_cookie_header(secure=secure))]
        if (m, p) == ("GET", "/admin/models"):
            return 200, self._models_snapshot(), []
        if m == "POST" and p in ("/admin/models/load", "/admin/models/unload",
                                 "/admin/models/switch"):
            return 200, self._model_action(p.rsplit("/", 1)[1], req.json().get("model")), []
        if (m, p) == ("GET", "/admin/usage"):
            return self._usage(req)
        if (m, p) == ("GET", "/admin/keys"):
            return 200, {"keys": await asyncio.to_thread(self._list_keys)}, []
        if (m, p) == ("POST", "/admin/keys"):
            return await self._create_key(req.json())
        if m == "POST" and p in ("/admin/keys/rotate", "/admin/keys/revoke"):
            return await self._edit_key(p.rsplit("/", 1)[1], req.json().get("key_id"))
        if (m, p) == ("GET", "/admin/logs"):
            tail = int(req.params.get("tail", logbuffer.TAIL_DEFAULT))
            return 200, {"lines": self.logs.tail(tail, req.params.get("source") or None)}, []
        if (m, p) == ("GET", "/admin/system"):
            return 200, await self.system.snapshot(), []
        raise HttpError(404, "Not found", "not_found")

    def _sign_in(self, req: Req) -> tuple[int, object, list]:
        wait = self.limiter.retry_after(req.client)
        if wait:
            raise HttpError(429, "Too many sign-in attempts", "rate_limited",
                            [("retry-after", str(wait))])
        key = req.json().get("key")
        info = self.keystore.lookup(key) if isinstance(key, str) else None
        if info is None:
            self.limiter.failure(req.client)
            raise HttpError(401, "Unknown key", "unauthorized")
        if not info.is_admin:
            self.limiter.failure(req.client)
            raise HttpError(403, "An inference key cannot sign in to the dashboard",
                            "not_admin")
        sid, session = self.sessions.create(info.key_id)
        cookie = sessions.cookie_header(sid, secure=sessions.request_is_https("http",
                                                                              req.headers))
        return 200, {"csrf": session.csrf, "key_id": info.key_id,
                     "expires_in": self.sessions.expires_in(session)}, [("set-cookie", cookie)]

    # -- routes --------------------------------------------------------------------------------
    def _model_action(self, action: str, name) -> dict:
        m = self._find_model(name)
        if action in ("load", "switch"):
            if action == "switch":
                for other in self.models:
                    if other is not m and other["state"] == "loaded":
                        other["state"] = "unloaded"
            if m["state"] in ("loaded", "loading"):
                raise HttpError(409, "model is loaded already", "model_busy")
            m["state"], m["failure"] = "loading", None
            if name == "broken-model":
                self._later(self.load_s, name, state="failed",
                            failure="llama-server exited with code 1 while loading")
            else:
                self._later(self.load_s, name, state="loaded")
        else:
            if m["state"] not in ("loaded", "loading"):
                raise HttpError(409, "model is not loaded", "model_not_loaded")
            m["draining"] = True
            self._later(self.unload_s, name, state="unloaded", draining=False, in_flight=0)
        self.hub.publish("models", self._models_snapshot())
        return {"model": name, "state": m["state"]}

    def _usage(self, req: Req) -> tuple[int, object, list]:
        group = req.params.get("group", "key")
        if group not in ("key", "model"):
            raise HttpError(400, "group must be key or model (in this fake)", "bad_group")
        try:
            since = usage.parse_time(req.params["from"]) if "from" in req.params else None
        except ValueError as exc:
            raise HttpError(400, str(exc), "bad_time") from None
        field = "key_id" if group == "key" else "model"
        totals: dict = {}
        for r in self.usage_rows:
            if since is not None and r["t"] < since:
                continue
            acc = totals.setdefault(r[field], [0, 0, 0, 0])
            acc[0] += 1
            acc[1] += r.get("prompt_tokens") or 0
            acc[2] += r.get("completion_tokens") or 0
            acc[3] += r["status"] >= 400
        rows = [{field: g, "requests": a[0], "prompt_tokens": a[1], "completion_tokens": a[2],
                 "errors": a[3]} for g, a in sorted(totals.items())]
        if "text/csv" in (req.header("accept") or ""):
            return 200, usage.to_csv(rows, group).encode(), [
                ("content-type", "text/csv; charset=utf-8")]
        return 200, {"rows": rows}, []

    def _list_keys(self) -> list[dict]:
        out = []
        for listed in keyfile.list_keys(self.keys_path):
            i = listed.info
            out.append({"key_id": i.key_id, "role": i.role, "rpm": i.rpm,
                        "concurrency": i.concurrency, "tpm": i.tpm, "tpd": i.tpd,
                        "models": sorted(i.models) if i.models is not None else None,
                        "hashed": listed.hashed, "last_used": self.last_used.get(i.key_id)})
        return out

    async def _create_key(self, body: dict) -> tuple[int, object, list]:
        key_id = body.get("key_id")
        settings = {k: body[k] for k in ("role", "rpm", "concurrency", "tpm", "tpd", "models")
                    if body.get(k) is not None}
        try:
            secret = await asyncio.to_thread(keyfile.add_key, self.keys_path,
                                             KeyInfo(str(key_id)))
            if settings:
                await asyncio.to_thread(keyfile.update_key, self.keys_path, str(key_id),
                                        settings)
        except (keyfile.KeyEditError, ValueError) as exc:
            raise HttpError(400, str(exc).split(": ", 1)[-1], "bad_key") from None
        self.keystore.reload()
        return 201, {"key_id": key_id, "secret": secret}, []

    async def _edit_key(self, action: str, key_id) -> tuple[int, object, list]:
        try:
            if action == "rotate":
                secret = await asyncio.to_thread(keyfile.rotate_key, self.keys_path, str(key_id))
            else:
                await asyncio.to_thread(keyfile.revoke_key, self.keys_path, str(key_id))
        except keyfile.KeyEditError as exc:
            raise HttpError(404, str(exc).split(": ", 1)[-1], "key_not_found") from None
        self.keystore.reload()
        self.sessions.revoke_key(str(key_id))
        return 200, ({"key_id": key_id, "secret": secret} if action == "rotate"
                     else {"key_id": key_id}), []

    async def _live(self, req: Req, reader, writer) -> None:
        try:
            key_id, _ = self._auth(req)
            sub = self.hub.subscribe(initial=[
                ("hello", {"key_id": key_id, "server_time": time.time(),
                           "history": self._history()}),
                ("models", self._models_snapshot()),
                ("metrics", self._metrics())])
        except HttpError as exc:
            body = json.dumps({"error": {"message": exc.message, "type": _etype(exc.status),
                                         "code": exc.code}}).encode()
            writer.write(self._head(exc.status, list(static.API_HEADERS) +
                                    [("content-type", JSON)], len(body)) + body)
            self.calls.append(("GET", req.path, exc.status))
            await writer.drain()
            return
        except livehub.HubFull:
            writer.write(self._head(503, list(static.API_HEADERS), 0))
            self.calls.append(("GET", req.path, 503))
            return
        self.calls.append(("GET", req.path, 200))
        writer.write(self._head(200, list(static.API_HEADERS) + [
            ("content-type", "text/event-stream"), ("connection", "close")], None))
        eof = asyncio.ensure_future(reader.read(1))       # the browser went away: free the slot
        eof.add_done_callback(lambda _: sub.close())
        try:
            with sub:
                async for chunk in sub.frames():
                    writer.write(chunk)
                    await writer.drain()
        finally:
            eof.cancel()


def _etype(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status,
                                                                     "invalid_request_error")
