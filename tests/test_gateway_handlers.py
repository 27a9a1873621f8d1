"""Route handlers (api/routes.py): a route added to the table is served with the facts it carries.

A handler answers a whole Response or a StreamResponse; a streamed one is written with chunked
framing and backpressure, a client that leaves cancels it, and every stream is bounded (idle
timeout). The admin auth level: a key whose role is admin, else 403; no key 401; in the admin
envelope. The routes here exist in the tests only: registered in the table for one test."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
import types

import pytest

from helpers import ALICE, Stack, aio, eventually, get, post
from llamagw.api import routes
from llamagw.context import Response, StreamResponse
from llamagw.errors import Envelope, GatewayError
from llamagw.limits.admission import Auth

ROOT = "sk-root-0123456789abcdef00"     # the admin key of these tests (see as_admin)
EVENTS = [b"data: {\"n\": %d}\n\n" % i for i in range(3)]
NDJSON = [b'{"n":%d}\n' % i for i in range(3)]


class Probe:
    """What a test stream did: chunks produced, and how its generator ended."""

    def __init__(self):
        self.produced = 0
        self.ended: str | None = None

    async def stream(self, chunks, *, pause: float = 0.0, then_wait: float = 0.0):
        try:
            for chunk in chunks:
                self.produced += 1
                yield chunk
                if pause:
                    await asyncio.sleep(pause)
            if then_wait:
                await asyncio.sleep(then_wait)
            self.ended = "done"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        except GeneratorExit:
            self.ended = "closed"
            raise


def route(path: str, handler, *, auth: Auth = Auth.KEY, envelope: Envelope = Envelope.OPENAI,
          streams: bool = True, method: str = "GET") -> routes.Route:
    return routes.Route(method, path, path.strip("/").replace("/", "_"), handler, auth, envelope,
                        streams=streams)


def register(monkeypatch, *added: routes.Route) -> None:
    for r in added:
        monkeypatch.setitem(routes.ROUTES, r.key, r)


def stream_route(monkeypatch, probe: Probe, chunks, ctype: str = "text/event-stream",
                 idle_timeout: float | None = None, **kw) -> None:
    async def handler(call):
        return StreamResponse(200, [("content-type", ctype)], probe.stream(chunks, **kw),
                              idle_timeout=idle_timeout)
    register(monkeypatch, route("/test/stream", handler))


async def read_head_and_chunks(c, n: int) -> tuple[int, list[tuple[str, str]], list[bytes]]:
    status, headers, _ = await c.head()
    chunks = []
    for _ in range(n):
        size = int((await c.line()).strip(), 16)
        chunks.append((await c.exactly(size + 2))[:-2])
    return status, headers, chunks


@pytest.mark.parametrize("ctype,chunks", [("text/event-stream", EVENTS),
                                          ("application/x-ndjson", NDJSON)], ids=["sse", "ndjson"])
@aio
async def test_a_streamed_answer_is_chunked_complete_and_keeps_the_connection(
        tmp_path, monkeypatch, ctype, chunks):
    probe = Probe()
    stream_route(monkeypatch, probe, chunks, ctype)
    async with Stack(tmp_path, access_log=True) as s:
        c = await s.client()
        r = await c.request(get("/test/stream", extra=b"X-Request-Id: stream-1\r\n"))
        assert r.status == 200 and r.complete and r.body == b"".join(chunks)
        assert r.get("content-type") == ctype and r.get("transfer-encoding") == "chunked"
        assert r.get("cache-control") == "no-cache" and r.get("x-accel-buffering") == "no"
        assert r.get("x-request-id") == "stream-1" and r.get("connection") is None
        assert probe.ended == "done"
        assert (await c.request(get("/ping"))).status == 200       # kept alive
        await eventually(lambda: s.gw.in_flight == 0, 1.0)
        assert s.gw.admission.concurrency.in_flight("alice") == 0
        rec = s.access_records()[0]
        assert (rec["status"], rec["outcome"], rec["stream"], rec["key_id"]) == \
            (200, "ok", True, "alice")
        assert rec["bytes_out"] == len(r.body)


@pytest.mark.parametrize("how", ["close", "reset", "half_close"])
@aio
async def test_a_client_that_leaves_cancels_the_stream_where_it_waits(tmp_path, monkeypatch,
                                                                      how):
    probe = Probe()
    stream_route(monkeypatch, probe, EVENTS[:1], then_wait=30, idle_timeout=30)
    async with Stack(tmp_path, access_log=True) as s:
        c = await s.client()
        await c.send(get("/test/stream"))
        status, _, chunks = await read_head_and_chunks(c, 1)
        assert status == 200 and chunks == EVENTS[:1]
        assert probe.ended is None                 # waiting for its next chunk
        if how == "half_close":
            c.writer.write_eof()
        else:
            if how == "reset":                     # RST: connection_lost, no end-of-stream
                c.writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.abort()
        await eventually(lambda: probe.ended == "cancelled", 1.0)
        await eventually(lambda: s.gw.in_flight == 0 and not s.gw.connections, 1.0)
        assert s.gw.admission.concurrency.in_flight("alice") == 0
        assert s.access_records()[0]["outcome"] == "client_closed"


@aio
async def test_a_silent_stream_is_cut_at_its_idle_timeout(tmp_path, monkeypatch):
    probe = Probe()
    stream_route(monkeypatch, probe, EVENTS[:1], then_wait=30, idle_timeout=0.2)
    async with Stack(tmp_path, access_log=True) as s:
        c = await s.client()
        await c.send(get("/test/stream"))
        started = time.monotonic()
        assert (await read_head_and_chunks(c, 1))[2] == EVENTS[:1]
        assert await c.closed(2.0)                 # without the last chunk
        assert 0.15 <= time.monotonic() - started < 2.0
        assert probe.ended == "cancelled"
        await eventually(lambda: s.gw.in_flight == 0, 1.0)
        assert s.access_records()[0]["outcome"] == "stream_idle_timeout"


@aio
async def test_heartbeats_keep_a_stream_alive_past_its_idle_timeout(tmp_path, monkeypatch):
    probe = Probe()
    beats = [b": ping\n\n"] * 6 + [EVENTS[0]]      # 0.6 s of heartbeats every 0.1 s, then data
    stream_route(monkeypatch, probe, beats, pause=0.1, idle_timeout=0.3)
    async with Stack(tmp_path) as s:
        r = await s.one(get("/test/stream"))
        assert r.status == 200 and r.complete and r.body == b"".join(beats)
        assert probe.ended == "done"


@aio
async def test_a_stream_the_client_does_not_read_waits_then_is_dropped(tmp_path, monkeypatch):
    """Backpressure: no chunk is asked for while the client's buffer is full, so what the
    handler produced is bounded by the socket buffers; CLIENT_WRITE_TIMEOUT drops the client."""
    probe = Probe()
    stream_route(monkeypatch, probe, [b"x" * 65536] * 2000, idle_timeout=30)   # 128 MiB
    async with Stack(tmp_path, {"CLIENT_WRITE_TIMEOUT": "0.4"}, access_log=True) as s:
        c = await s.client(rcvbuf=4096)
        c.reader._limit = 4096
        await c.send(get("/test/stream"))
        assert (await c.head())[0] == 200          # then never read again
        conn = next(iter(s.gw.connections))
        await eventually(lambda: conn.write_paused, 3.0)
        paused_at = time.monotonic()
        await eventually(lambda: not s.gw.connections, 3.0)
        assert time.monotonic() - paused_at >= 0.3
        assert probe.produced < 200 and probe.ended == "closed"
        await eventually(lambda: s.gw.in_flight == 0, 1.0)
        assert s.access_records()[0]["outcome"] == "client_write_timeout"
        c.abort()


@aio
async def test_head_gets_the_stream_head_and_the_generator_is_closed_unread(tmp_path,
                                                                            monkeypatch):
    probe = Probe()
    stream_route(monkeypatch, probe, EVENTS)
    async with Stack(tmp_path) as s:
        c = await s.client()
        r = await c.request(get("/test/stream", method=b"HEAD"), head_request=True)
        assert r.status == 200 and r.get("transfer-encoding") == "chunked"
        assert probe.produced == 0
        assert (await c.request(get("/ping"))).status == 200       # nothing was left unread


@aio
async def test_an_http10_client_gets_the_stream_close_delimited(tmp_path, monkeypatch):
    probe = Probe()
    stream_route(monkeypatch, probe, EVENTS)
    async with Stack(tmp_path) as s:
        r = await s.one(get("/test/stream", version=b"HTTP/1.0"))
        assert r.status == 200 and r.get("transfer-encoding") is None
        assert r.get("connection") == "close" and r.body == b"".join(EVENTS)


@aio
async def test_a_whole_answer_from_a_handler(tmp_path, monkeypatch):
    async def made(call):
        return Response(201, [("content-type", "text/plain")], b"made " + call.body)
    register(monkeypatch, route("/test/made", made, streams=False, method="POST"))
    async with Stack(tmp_path) as s:
        c = await s.client()
        r = await c.request(b"POST /test/made HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                            + ALICE.encode() + b"\r\nContent-Length: 2\r\n\r\nit")
        assert (r.status, r.body, r.get("content-length")) == (201, b"made it", "7")
        r = await c.request(get("/test/made"))
        assert r.status == 405 and r.get("allow") == "POST"


@aio
async def test_a_stream_on_a_route_not_declared_streaming_is_a_500(tmp_path, monkeypatch,
                                                                   caplog):
    probe = Probe()

    async def handler(call):
        return StreamResponse(200, [("content-type", "text/event-stream")],
                              probe.stream(EVENTS))
    register(monkeypatch, route("/test/undeclared", handler, streams=False))
    async with Stack(tmp_path) as s:
        with caplog.at_level(logging.ERROR, logger="gateway"):
            r = await s.one(get("/test/undeclared"))
        assert r.status == 500 and r.error()["code"] == "internal_error"
        assert probe.produced == 0 and "test_undeclared" in caplog.text


async def _hello(call):
    return Response(200, [("content-type", "application/json")],
                    json.dumps({"key": call.ctx.key_id}).encode())


ADMIN_HELLO = route("/admin/api/hello", _hello, auth=Auth.ADMIN, envelope=Envelope.ADMIN,
                    streams=False)


def as_admin(monkeypatch, gw) -> None:
    """ROOT is a key whose role is admin (the key file's role=admin setting)."""
    store = gw.admission.store
    lookup = store.lookup

    def with_root(presented):
        if presented == ROOT:
            return types.SimpleNamespace(key_id="root", rpm=None, concurrency=None, role="admin")
        return lookup(presented)
    monkeypatch.setattr(store, "lookup", with_root)


@pytest.mark.parametrize("auth_enabled", ["true", "false"])
@aio
async def test_admin_routes_need_a_key_whose_role_is_admin(tmp_path, monkeypatch, auth_enabled):
    """Whatever AUTH_ENABLED says: the admin API is never open."""
    register(monkeypatch, ADMIN_HELLO)
    async with Stack(tmp_path, {"AUTH_ENABLED": auth_enabled}) as s:
        as_admin(monkeypatch, s.gw)
        r = await s.one(get("/admin/api/hello", key=None))
        assert r.status == 401 and r.error()["code"] == "unauthorized"
        r = await s.one(get("/admin/api/hello", key=ALICE))        # an inference key
        err = r.error()
        assert r.status == 403 and (err["code"], err["type"]) == ("forbidden", "permission_error")
        r = await s.one(get("/admin/api/hello", key=ROOT))
        assert r.status == 200 and r.json() == {"key": "root"}
        r = await s.one(get("/admin/api/nothing", key=ROOT))
        assert r.status == 404 and r.error()["code"] == "not_found"


@aio
async def test_without_a_key_file_nobody_is_admin(tmp_path, monkeypatch):
    register(monkeypatch, ADMIN_HELLO)
    async with Stack(tmp_path, {"AUTH_ENABLED": "false"}, with_keys=False) as s:
        assert (await s.one(get("/v1/models", key=None))).status == 200      # the API is open
        r = await s.one(get("/admin/api/hello", key=ROOT))
        assert r.status == 401 and r.error()["code"] == "invalid_api_key"


@pytest.mark.parametrize("envelope", list(Envelope))
@aio
async def test_an_error_is_rendered_in_its_routes_envelope(tmp_path, monkeypatch, envelope):
    async def refuse(call):
        raise GatewayError(409, "already there", "conflict", headers=[("x-why", "test")])
    register(monkeypatch, route("/test/refuse", refuse, envelope=envelope, streams=False))
    async with Stack(tmp_path, access_log=True) as s:
        r = await s.one(get("/test/refuse"))
        assert r.status == 409 and r.get("x-why") == "test"
        assert r.get("content-type") == "application/json"
        if envelope is Envelope.OLLAMA:
            assert r.json() == {"error": "already there"}
        else:
            assert r.error() == {"message": "already there", "type": "invalid_request_error",
                                 "code": "conflict"}
        assert s.access_records()[0]["outcome"] == "conflict"


@pytest.mark.parametrize("path,ollama", [("/v1/nope", False), ("/api/nope", True), ("/", True),
                                         ("/admin/api/nope", False), ("/nope", False)])
@aio
async def test_a_path_no_route_serves_gets_the_errors_of_the_api_asked(tmp_path, path, ollama):
    async with Stack(tmp_path) as s:
        for raw, status in ((get(path), 404 if path != "/" else 200),
                            (post(path, {}), 404 if path != "/" else 405)):
            r = await s.one(raw)
            assert r.status == status, r
            if status == 200:
                continue
            if ollama:
                assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
            else:
                assert r.error()["code"] in ("not_found", "method_not_allowed")
