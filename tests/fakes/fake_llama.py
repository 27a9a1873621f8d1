"""A fake llama-server: the same HTTP/1.1 shapes, plus knobs for drops, stalls and slow streams.

It is for fault injection, fast loopback tests and benchmarks; the end-to-end tier still runs the
real llama-server. Standard library only, and nothing from scripts/ (it is the independent
counterpart of the gateway). Built on asyncio Protocols so it is never the bottleneck of a
benchmark: a plain non-streaming request is answered inside data_received, without a task.

HTTP like llama-server (cpp-httplib): keep-alive; JSON with Content-Length; streams as
`Transfer-Encoding: chunked` + `Content-Type: text/event-stream`, one chunk per SSE event;
idle keep-alive connections closed (FIN) after `keepalive_timeout`; while `loading`, every route
answers 503 "Loading model".

Routes: GET /health, /v1/health, /v1/models, /models, /slots, /props ({"private": true}, a
route the gateway must never expose), /metrics; POST /v1/chat/completions, /chat/completions,
/v1/completions, /completions, /v1/embeddings, /embeddings. Anything else: 404 JSON.

Knobs shape the POST inference routes (GET routes are plain). Server-wide defaults live in
`FakeLlama.defaults` (change them between requests); one request overrides them with a "fake"
object in its JSON body, e.g. {"fake": {"events": 200, "interval": 0.05, "drop_after": 3}}.
An unknown knob name answers 400, so a typo cannot pass silently.

    events            content events in a stream / tokens in a reply (5)
    interval          seconds between events; a non-stream reply waits events*interval (0)
    payload_size      characters of content per event, 0 = a short token "tok<i> " (0)
    texts             list of strings: event i's content is texts[i % len(texts)] instead of
                      the "tok<i> " token, written as llama-server writes JSON: UTF-8, not
                      escaped as \\uXXXX (None)
    ping_every        send a `: ping` SSE comment after every k-th event (0 = never)
    drop_after        stream: close the connection after k content events, no terminator
                      (k = events: after all content, before the usage chunk); non-stream:
                      send the head and half the body, then close (None)
    stall_after       stream: after k events stop sending, keep the connection open until the
                      client closes; non-stream: send the head only, then stall (None)
    router_cut_after  stream: after k content events, what llama-server's router sends when the
                      model's instance dies: raw text `proxy error: Failed to read connection`
                      (no SSE framing), then a clean end of the chunked body, no [DONE];
                      non-stream: a 500 whose JSON-typed chunked body is that text (None)
    end_after         stream: after k content events, a clean end of the chunked body without
                      the final event and [DONE] (None)
    drop_before_head  read the request, then close without sending a byte (False)
    delay_first_byte  seconds to sleep before the response head (0)
    status            answer this HTTP status with a llama-server JSON error body (None)
    close_after_response  answer with `Connection: close` and close (False)
    cache_n           prompt tokens "reused from the cache", reported as llama-server does:
                      usage.prompt_tokens_details.cached_tokens, timings.cache_n, and
                      timings.prompt_n without them (None: neither field is sent)

Recording: `requests` (RecordedRequest: method, target, path, headers [(lower name, value)],
body capped), `disconnects` (client closed while a response was in progress),
`connections_opened`, `active_connections`, `active_streams`, `drops`, `responses`;
`await wait_for(pred)` in the server's loop, `wait_until(pred)` from another thread.

CLI (stands in for llama-server via LLAMA_SERVER_BIN):
    python3 tests/fakes/fake_llama.py -m MODEL --host H --port P -c N -ngl N -np N --metrics
Other llama-server flags are ignored. Env: FAKE_LOAD_SECONDS (503 loading for that long),
FAKE_EXIT_AFTER (exit 1 after N s, a crash), FAKE_FAIL_START=1 (exit 1 at once).
SIGTERM / SIGINT: stop and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

# ---- limits (every one named; where the number came from) ------------------------------------
# cpp-httplib's CPPHTTPLIB_KEEPALIVE_TIMEOUT_SECOND, which llama-server uses: 5 s.
DEFAULT_KEEPALIVE_TIMEOUT = 5.0
# llama-server `--timeout` (read/write timeout) default: 600 s. Bounds a half-sent request and a stall.
READ_TIMEOUT = 600.0
STALL_MAX_SECONDS = 600.0
# Largest request head accepted; generous (cpp-httplib caps each header line at 8 KiB).
MAX_HEAD_BYTES = 64 * 1024
# RunPod load-balancing endpoints cap payloads at 30 MB; accept a bit more than that.
MAX_BODY_BYTES = 32 * 1024 * 1024
# Bytes of a body kept in `requests`: enough for any test prompt, small for a benchmark.
RECORD_BODY_CAP = 64 * 1024
# Recorded requests kept; past this the oldest half is dropped (a benchmark sends many more).
MAX_RECORDED_REQUESTS = 10_000
# Bytes of pipelined input buffered while a response is in progress before reading pauses.
MAX_PIPELINE_BUFFER = 1024 * 1024
# Events in one stream: bounds a request's CPU and memory however the knobs are set.
MAX_EVENTS = 1_000_000
# Characters of content per event.
MAX_PAYLOAD_SIZE = 1024 * 1024
# Dimension of the fake embedding vectors (small: the shape is what tests check).
EMBEDDING_DIM = 8
# Deadline for FakeLlamaThread to start or stop its loop.
THREAD_START_TIMEOUT = 5.0
# Listen backlog: the benchmark opens ~10,000 streams at once (case c); asyncio's default of
# 100 overflowed and the gateway's connects timed out. The gateway's own listener uses 2048.
LISTEN_BACKLOG = 2048

DEFAULT_KNOBS: dict = {
    "events": 5,
    "interval": 0.0,
    "payload_size": 0,
    "ping_every": 0,
    "drop_after": None,
    "stall_after": None,
    "drop_before_head": False,
    "delay_first_byte": 0.0,
    "status": None,
    "close_after_response": False,
    "router_cut_after": None,
    "end_after": None,
    "end_delay": 0.0,       # seconds between a stream's `data: [DONE]` and its closing chunk
    "texts": None,          # content of the events, cycled (see the module docstring)
    "cache_n": None,        # cached prompt tokens reported (see the module docstring)
}

# llama-server's error types (server-common / utils: error_type -> status).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    408: "Request Timeout", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_body(status: int, message: str) -> bytes:
    """llama-server's error envelope: {"error": {"code", "message", "type"}}."""
    etype = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"code": status, "message": message, "type": etype}}).encode()


LOADING_BODY = error_body(503, "Loading model")
NOT_FOUND_BODY = error_body(404, "File Not Found")
HEALTH_BODY = b'{"status":"ok"}'
PROPS_BODY = b'{"private":true}'
PING_EVENT = b": ping\n\n"
DONE_EVENT = b"data: [DONE]\n\n"
CHUNK_END = b"0\r\n\r\n"
# What llama-server's router appends when the instance behind a stream dies (ROUTER-MODE.md §4).
ROUTER_CUT_TEXT = b"proxy error: Failed to read connection"


@dataclass(slots=True)
class RecordedRequest:
    method: str
    target: str          # as sent, query included
    path: str            # target without the query
    headers: list        # [(lower-case name, value)]
    body: bytes          # first RECORD_BODY_CAP bytes
    body_len: int        # full length

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def json(self):
        return json.loads(self.body)


class _Request:
    __slots__ = ("method", "target", "path", "headers", "body", "close")

    def __init__(self, method, target, path, headers, body, close):
        self.method = method
        self.target = target
        self.path = path
        self.headers = headers
        self.body = body
        self.close = close


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _decode_chunked(buf: bytearray, start: int):
    """Decode a chunked body starting at buf[start]; (body, end) or None when more is needed."""
    pos = start
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip() or b"x", 16)
        if size < 0 or len(out) + size > MAX_BODY_BYTES:
            raise ValueError("chunked body too large")
        pos = eol + 2
        if size == 0:
            # trailers, then an empty line
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2


class _Conn(asyncio.Protocol):
    """One client connection: parse heads, answer, keep-alive idle timer, flow control."""

    def __init__(self, srv: "FakeLlama"):
        self.srv = srv
        self.transport = None
        self.buf = bytearray()
        self.busy = False          # a response is in progress
        self.closed = False
        self.in_process = False
        self.idle = None           # timer handle; fires at or before idle_deadline
        self.idle_deadline = None  # loop time to close at; None while not idle
        self.task = None
        self.write_paused = False
        self.drain_fut = None
        self.lost_fut = None
        self.reading_paused = False
        self.sent_continue = False
        self.origin = None

    # ---- asyncio callbacks ----
    def connection_made(self, transport):
        self.transport = transport
        srv = self.srv
        srv.connections_opened += 1
        srv._conns.add(self)
        self.lost_fut = srv._loop.create_future()
        self._arm(srv.keepalive_timeout)
        srv._changed()

    def data_received(self, data):
        self.idle_deadline = None   # the timer stays scheduled; it re-checks when it fires
        self.buf += data
        if not self.busy:
            self._process()
        elif len(self.buf) > MAX_PIPELINE_BUFFER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc):
        srv = self.srv
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self.busy and not srv._stopping:
            srv.disconnects += 1
        self.busy = False
        srv._conns.discard(self)
        if not self.lost_fut.done():
            self.lost_fut.set_result(None)
        if self.drain_fut is not None and not self.drain_fut.done():
            self.drain_fut.set_result(None)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        srv._changed()

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if self.drain_fut is not None and not self.drain_fut.done():
            self.drain_fut.set_result(None)

    # ---- helpers ----
    def _arm(self, seconds):
        """One lazy idle timer per connection (re-arming per request costs no call_later)."""
        loop = self.srv._loop
        self.idle_deadline = deadline = loop.time() + seconds
        if self.idle is None or self.idle.when() > deadline:
            if self.idle is not None:
                self.idle.cancel()
            self.idle = loop.call_at(deadline, self._idle_expired)

    def _idle_expired(self):
        self.idle = None
        deadline = self.idle_deadline
        if deadline is None or self.busy or self.closed:
            return
        now = self.srv._loop.time()
        if now < deadline:
            self.idle = self.srv._loop.call_at(deadline, self._idle_expired)
            return
        self.closed = True
        self.transport.close()

    async def _drain(self):
        while self.write_paused and not self.closed:
            self.drain_fut = self.srv._loop.create_future()
            await self.drain_fut

    def _write(self, data: bytes):
        if not self.closed:
            self.transport.write(data)

    def _fatal(self, status: int, message: str):
        body = error_body(status, message)
        self.busy = False
        self._write(self._head(status, "application/json; charset=utf-8", len(body), True) + body)
        self.closed = True
        self.transport.close()

    def _head(self, status, ctype, length, close, origin=None) -> bytes:
        parts = ["HTTP/1.1 %d %s\r\nServer: llama.cpp\r\nContent-Type: %s\r\n"
                 % (status, REASONS.get(status, "Unknown"), ctype)]
        if length is None:
            parts.append("Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n")
        else:
            parts.append("Content-Length: %d\r\n" % length)
        if origin is not None:
            # llama-server reflects any Origin: a gateway must not pass this on blindly.
            parts.append("Access-Control-Allow-Origin: %s\r\n" % origin)
        if close:
            parts.append("Connection: close\r\n\r\n")
        else:
            parts.append("Keep-Alive: timeout=%d, max=100\r\n\r\n"
                         % max(1, round(self.srv.keepalive_timeout)))
        return "".join(parts).encode("latin-1")

    def _done(self, close: bool):
        """The response is complete: close, or go back to reading (pipelined input first)."""
        self.busy = False
        self.srv.responses += 1
        if close or self.srv._stopping:
            self.closed = True
            self.transport.close()
        else:
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            if not self.in_process:
                self._process()
        self.srv._changed()

    # ---- parsing ----
    def _process(self):
        self.in_process = True
        try:
            while not self.busy and not self.closed:
                buf = self.buf
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._fatal(431, "request head too large")
                    else:
                        self._arm(READ_TIMEOUT if buf else self.srv.keepalive_timeout)
                    return
                if end > MAX_HEAD_BYTES:
                    self._fatal(431, "request head too large")
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                    self._fatal(400, "bad request line")
                    return
                method = parts[0].decode("latin-1")
                target = parts[1].decode("latin-1")
                close = parts[2] != b"HTTP/1.1"
                headers = []
                clen = 0
                chunked = False
                expect = False
                origin = None
                for line in lines[1:]:
                    name, sep, value = line.partition(b":")
                    if not sep:
                        self._fatal(400, "bad header line")
                        return
                    name = name.strip().lower().decode("latin-1")
                    value = value.strip().decode("latin-1")
                    headers.append((name, value))
                    if name == "content-length":
                        try:
                            clen = int(value)
                        except ValueError:
                            clen = -1
                        if clen < 0:
                            self._fatal(400, "bad content-length")
                            return
                    elif name == "connection":
                        v = value.lower()
                        if "close" in v:
                            close = True
                        elif "keep-alive" in v:
                            close = False
                    elif name == "transfer-encoding":
                        chunked = "chunked" in value.lower()
                    elif name == "expect":
                        expect = value.lower() == "100-continue"
                    elif name == "origin":
                        origin = value
                if clen > MAX_BODY_BYTES:
                    self._fatal(413, "request body too large")
                    return
                start = end + 4
                if chunked:
                    try:
                        res = _decode_chunked(buf, start)
                    except ValueError:
                        self._fatal(400, "bad chunked body")
                        return
                    if res is None:
                        self._need_body(expect)
                        return
                    body, stop = res
                else:
                    stop = start + clen
                    if len(buf) < stop:
                        self._need_body(expect)
                        return
                    body = bytes(buf[start:stop])
                del buf[:stop]
                self.sent_continue = False
                path = target.split("?", 1)[0]
                self.busy = True
                req = _Request(method, target, path, headers, body, close)
                self.srv._record(req)
                self._dispatch(req, origin)
        finally:
            self.in_process = False

    def _need_body(self, expect):
        if expect and not self.sent_continue:
            self.sent_continue = True
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm(READ_TIMEOUT)

    # ---- routing ----
    def _dispatch(self, req: _Request, origin):
        srv = self.srv
        self.origin = origin
        if srv.loading:
            return self._json(503, LOADING_BODY, req.close)
        handler = _ROUTES.get((req.method, req.path))
        if handler is None:
            return self._json(404, NOT_FOUND_BODY, req.close)
        handler(self, req)

    def _json(self, status: int, body: bytes, close: bool):
        self._write(self._head(status, "application/json; charset=utf-8", len(body), close,
                               self.origin) + body)
        self._done(close)

    def _get_health(self, req):
        self._json(200, HEALTH_BODY, req.close)

    def _get_models(self, req):
        body = {"object": "list", "data": [{"id": self.srv.model_id, "object": "model",
                                            "owned_by": "llamacpp", "created": 0}]}
        self._json(200, json.dumps(body).encode(), req.close)

    def _get_slots(self, req):
        srv = self.srv
        body = [{"id": i, "n_ctx": srv.n_ctx, "is_processing": busy}
                for i, busy in enumerate(srv.slots)]
        self._json(200, json.dumps(body).encode(), req.close)

    def _get_props(self, req):
        self._json(200, PROPS_BODY, req.close)

    def _get_metrics(self, req):
        srv = self.srv
        if not srv.metrics:
            return self._json(501, error_body(
                501, "This server does not support metrics endpoint. Start it with `--metrics`"),
                req.close)
        text = ("# TYPE llamacpp:requests_processing gauge\n"
                "llamacpp:requests_processing %d\n"
                "# TYPE llamacpp:n_tokens_predicted_total counter\n"
                "llamacpp:n_tokens_predicted_total %d\n"
                % (srv.active_streams, srv.tokens_predicted)).encode()
        self._write(self._head(200, "text/plain; version=0.0.4", len(text), req.close,
                               self.origin) + text)
        self._done(req.close)

    def _post_chat(self, req):
        self._inference(req, "chat")

    def _post_completion(self, req):
        self._inference(req, "text")

    def _post_embeddings(self, req):
        self._inference(req, "embed")

    def _inference(self, req: _Request, kind: str):
        try:
            body = json.loads(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as e:
            return self._json(400, error_body(400, "Failed to parse JSON: %s" % e), req.close)
        kn = dict(self.srv.defaults)
        fake = body.get("fake")
        if fake is not None:
            unknown = set(fake) - set(DEFAULT_KNOBS) if isinstance(fake, dict) else {"fake"}
            if unknown:
                return self._json(400, error_body(
                    400, "unknown fake knob(s): %s" % ", ".join(sorted(unknown))), req.close)
            kn.update(fake)
        try:
            kn = _normalize_knobs(kn)
        except (TypeError, ValueError) as e:
            return self._json(400, error_body(400, "bad fake knob: %s" % e), req.close)
        events = kn["events"]
        stream = bool(body.get("stream")) and kind != "embed"
        simple = not (kn["delay_first_byte"] or kn["drop_before_head"] or kn["status"]
                      or kn["drop_after"] is not None or kn["stall_after"] is not None
                      or kn["router_cut_after"] is not None or kn["end_after"] is not None
                      or (kn["interval"] and events))
        if simple and not stream:
            close = req.close or kn["close_after_response"]
            self.srv.tokens_predicted += 0 if kind == "embed" else events
            return self._json(200, _reply_body(self.srv, kind, body, kn), close)
        self.task = self.srv._loop.create_task(self._slow(req, kind, body, kn, stream))

    async def _slow(self, req, kind, body, kn, stream):
        srv = self.srv
        slot = srv._take_slot() if kind != "embed" else None
        if stream:
            srv.active_streams += 1
        srv._changed()
        try:
            if kn["delay_first_byte"]:
                await asyncio.sleep(kn["delay_first_byte"])
            if kn["drop_before_head"]:
                return self._drop()
            close = req.close or kn["close_after_response"]
            if kn["status"]:
                status = kn["status"]
                return self._json(status, error_body(status, "fake error %d" % status), close)
            if stream:
                await self._stream(kind, body, kn, close)
            else:
                await self._reply(kind, body, kn, close)
        except Exception as e:  # a bug in the fake: answer 500 rather than hang the client
            if self.busy and not self.closed:
                self._fatal(500, "fake llama-server error: %r" % e)
        finally:
            if slot is not None:
                srv.slots[slot] = False
            if stream:
                srv.active_streams -= 1
            srv._changed()

    async def _reply(self, kind, body, kn, close):
        if kn["interval"] and kn["events"]:
            await asyncio.sleep(kn["interval"] * kn["events"])
        data = _reply_body(self.srv, kind, body, kn)
        self.srv.tokens_predicted += 0 if kind == "embed" else kn["events"]
        head = self._head(200, "application/json; charset=utf-8", len(data), close, self.origin)
        if kn["drop_after"] is not None:
            self._write(head + data[:len(data) // 2])
            return self._drop()
        if kn["stall_after"] is not None:
            self._write(head)
            return await self._stall()
        if kn["router_cut_after"] is not None:   # the router's answer when the instance died
            self._write(self._head(500, "application/json; charset=utf-8", None, True)
                        + _chunk(ROUTER_CUT_TEXT) + CHUNK_END)
            return self._drop()
        self._write(head + data)
        self._done(close)

    async def _stream(self, kind, body, kn, close):
        srv = self.srv
        events = kn["events"]
        interval = kn["interval"]
        ping_every = kn["ping_every"]
        drop_after = kn["drop_after"]
        stall_after = kn["stall_after"]
        size = kn["payload_size"]
        texts = kn["texts"]
        model = body.get("model") or srv.model_id
        created = int(time.time())
        rid = srv._next_id(kind)
        self._write(self._head(200, "text/event-stream", None, close, self.origin))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(events + 1):
            if stall_after is not None and i >= stall_after:
                return await self._stall()
            if drop_after is not None and i >= drop_after:
                return self._drop()
            if kn["router_cut_after"] is not None and i >= kn["router_cut_after"]:
                self._write(_chunk(ROUTER_CUT_TEXT) + CHUNK_END)
                return self._done(close)
            if kn["end_after"] is not None and i >= kn["end_after"]:
                self._write(CHUNK_END)
                return self._done(close)
            if i == events:
                break
            if i and interval:
                # An absolute schedule (start + i * interval): loop lag under load delays one
                # event, never every later one, so the stream's length measures the relay.
                delay = start + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            text = texts[i % len(texts)] if texts else _token(i, size)
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
                obj = {"choices": [{"finish_reason": None, "index": 0, "delta": delta}],
                       "created": created, "id": rid, "model": model,
                       "system_fingerprint": "b0-fake", "object": "chat.completion.chunk"}
            else:
                obj = {"choices": [{"text": text, "index": 0, "logprobs": None,
                                    "finish_reason": None}],
                       "created": created, "id": rid, "model": model,
                       "system_fingerprint": "b0-fake", "object": "text_completion"}
            # As llama-server writes JSON (nlohmann dump, ensure_ascii false): UTF-8 as it is.
            self._write(_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode()
                               + b"\n\n"))
            srv.tokens_predicted += 1
            if ping_every and (i + 1) % ping_every == 0:
                self._write(_chunk(PING_EVENT))
            if self.write_paused:
                await self._drain()
        prompt_n = _prompt_tokens(body)
        if kind == "chat":
            choice = {"finish_reason": "stop", "index": 0, "delta": {}}
            obj_name = "chat.completion.chunk"
        else:
            choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
            obj_name = "text_completion"
        last = {"choices": [choice], "created": created, "id": rid, "model": model,
                "system_fingerprint": "b0-fake", "object": obj_name,
                "usage": _usage(prompt_n, events, kn["cache_n"]),
                "timings": _timings(prompt_n, events, interval, kn["cache_n"])}
        self._write(_chunk(b"data: " + json.dumps(last).encode() + b"\n\n")
                    + _chunk(DONE_EVENT) + (b"" if kn["end_delay"] else CHUNK_END))
        if kn["end_delay"]:
            await asyncio.sleep(kn["end_delay"])   # a hang-up meanwhile cancels this task
            self._write(CHUNK_END)
        self._done(close)

    def _drop(self):
        """Server-side abrupt end: close without finishing the response (not a disconnect)."""
        self.busy = False
        self.srv.drops += 1
        if not self.closed:
            self.closed = True
            self.transport.close()   # flushes what was written, then FIN; no terminator

    async def _stall(self):
        """Send nothing more; wait for the client to close (bounded by STALL_MAX_SECONDS)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.lost_fut), STALL_MAX_SECONDS)
        except TimeoutError:
            self._drop()


_ROUTES = {
    ("GET", "/health"): _Conn._get_health,
    ("GET", "/v1/health"): _Conn._get_health,
    ("GET", "/v1/models"): _Conn._get_models,
    ("GET", "/models"): _Conn._get_models,
    ("GET", "/slots"): _Conn._get_slots,
    ("GET", "/props"): _Conn._get_props,
    ("GET", "/metrics"): _Conn._get_metrics,
    ("POST", "/v1/chat/completions"): _Conn._post_chat,
    ("POST", "/chat/completions"): _Conn._post_chat,
    ("POST", "/v1/completions"): _Conn._post_completion,
    ("POST", "/completions"): _Conn._post_completion,
    ("POST", "/v1/embeddings"): _Conn._post_embeddings,
    ("POST", "/embeddings"): _Conn._post_embeddings,
}


def _opt_int(v):
    return None if v is None else max(0, int(v))


def _normalize_knobs(kn: dict) -> dict:
    """Types and bounds of the knobs; TypeError/ValueError on a bad value (answered 400)."""
    return {
        "events": max(0, min(int(kn["events"] or 0), MAX_EVENTS)),
        "interval": max(0.0, float(kn["interval"] or 0)),
        "payload_size": max(0, min(int(kn["payload_size"] or 0), MAX_PAYLOAD_SIZE)),
        "ping_every": max(0, int(kn["ping_every"] or 0)),
        "drop_after": _opt_int(kn["drop_after"]),
        "stall_after": _opt_int(kn["stall_after"]),
        "drop_before_head": bool(kn["drop_before_head"]),
        "delay_first_byte": max(0.0, float(kn["delay_first_byte"] or 0)),
        "status": int(kn["status"]) if kn["status"] else None,
        "close_after_response": bool(kn["close_after_response"]),
        "router_cut_after": _opt_int(kn["router_cut_after"]),
        "end_after": _opt_int(kn["end_after"]),
        "end_delay": max(0.0, float(kn["end_delay"] or 0)),
        "texts": _texts(kn["texts"]),
        "cache_n": _opt_int(kn["cache_n"]),
    }


def _texts(v):
    """None, or a non-empty list of strings (each at most MAX_PAYLOAD_SIZE characters)."""
    if v is None:
        return None
    if (not isinstance(v, list) or not v or len(v) > MAX_EVENTS
            or not all(isinstance(t, str) and len(t) <= MAX_PAYLOAD_SIZE for t in v)):
        raise ValueError("texts must be a non-empty list of strings")
    return v


# ---- reply bodies ----------------------------------------------------------------------------
def _token(i: int, size: int) -> str:
    t = "tok%d " % i
    if size <= 0:
        return t
    return (t + "." * size)[:size]


def _prompt_tokens(body: dict) -> int:
    """A deterministic stand-in for tokenization: whitespace-separated words of the prompt."""
    n = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                n += len(c.split())
            elif isinstance(c, list):
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        n += len(part["text"].split())
    for key in ("prompt", "input"):
        p = body.get(key)
        if isinstance(p, str):
            n += len(p.split())
        elif isinstance(p, list):
            n += sum(len(x.split()) for x in p if isinstance(x, str))
    return max(1, n)


def _usage(prompt_n: int, predicted_n: int, cache_n: int | None = None) -> dict:
    out = {"completion_tokens": predicted_n, "prompt_tokens": prompt_n,
           "total_tokens": prompt_n + predicted_n}
    if cache_n is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cache_n}
    return out


def _timings(prompt_n: int, predicted_n: int, interval: float,
             cache_n: int | None = None) -> dict:
    if cache_n is not None:     # llama-server's prompt_n: the tokens it processed
        return {"cache_n": cache_n, **_timings(prompt_n - cache_n, predicted_n, interval)}
    prompt_ms = 0.1 * prompt_n
    predicted_ms = max(interval * predicted_n * 1000.0, 0.1 * predicted_n)
    return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms else 0.0}


def _reply_body(srv: "FakeLlama", kind: str, body: dict, kn: dict) -> bytes:
    model = body.get("model") or srv.model_id
    prompt_n = _prompt_tokens(body)
    if kind == "embed":
        inp = body.get("input")
        items = inp if isinstance(inp, list) and inp else [inp]
        data = [{"embedding": [round((j + 1 + idx) / 10.0, 3) for j in range(EMBEDDING_DIM)],
                 "index": idx, "object": "embedding"} for idx in range(len(items))]
        return json.dumps({"model": model, "object": "list", "data": data,
                           "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n}}).encode()
    events = kn["events"]
    texts = kn["texts"]
    text = "".join(texts[i % len(texts)] if texts else _token(i, kn["payload_size"])
                   for i in range(events))
    interval = kn["interval"]
    if kind == "chat":
        choice = {"finish_reason": "stop", "index": 0,
                  "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        obj = "text_completion"
    return json.dumps({"choices": [choice], "created": int(time.time()), "model": model,
                       "system_fingerprint": "b0-fake", "object": obj,
                       "usage": _usage(prompt_n, events, kn["cache_n"]),
                       "id": srv._next_id(kind),
                       "timings": _timings(prompt_n, events, interval, kn["cache_n"])},
                      ensure_ascii=False).encode()


# ---- the server ------------------------------------------------------------------------------
class FakeLlama:
    """The fake llama-server in the running event loop: `await start()`, `await stop()`."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT, n_slots: int = 4,
                 model_id: str = "demo", n_ctx: int = 4096, metrics: bool = True,
                 record: bool = True, unix_path: str = ""):
        # A host ending in ".sock" is a Unix socket path, as llama-server reads --host: then only
        # that is listened on. unix_path (fake only, for the benchmarks) adds a Unix listener
        # beside the TCP one, so one fake serves direct clients (TCP) and the gateway (Unix).
        if host.endswith(".sock"):
            unix_path, host = host, ""
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.keepalive_timeout = keepalive_timeout
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.metrics = metrics
        self.record = record           # False: keep `requests` empty (benchmarks)
        self.loading = False
        self.defaults: dict = dict(DEFAULT_KNOBS)
        self.slots: list[bool] = [False] * n_slots
        self.requests: list[RecordedRequest] = []
        self.requests_total = 0
        self.disconnects = 0
        self.connections_opened = 0
        self.active_streams = 0
        self.responses = 0
        self.drops = 0
        self.tokens_predicted = 0
        self._conns: set[_Conn] = set()
        self._server = None
        self._unix_server = None
        self._loop = None
        self._stopping = False
        self._ids = 0
        self._waiters: list[asyncio.Future] = []
        self._cond = threading.Condition()
        self._sync_waiters = 0

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        if self.host:
            self._server = await self._loop.create_server(
                lambda: _Conn(self), self.host, self.port, reuse_address=True,
                backlog=LISTEN_BACKLOG)
            self.port = self._server.sockets[0].getsockname()[1]
        if self.unix_path:
            # Bound here, not by asyncio (which would replace a stale socket file): like
            # llama-server, a path that exists fails the bind (EADDRINUSE).
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.unix_path)
            except OSError:
                sock.close()
                if self._server is not None:
                    self._server.close()
                    self._server = None
                raise
            self._unix_server = await self._loop.create_unix_server(
                lambda: _Conn(self), sock=sock, backlog=LISTEN_BACKLOG)

    async def stop(self) -> None:
        """Stop accepting, abort every connection (not counted as disconnects)."""
        servers = [srv for srv in (self._server, self._unix_server) if srv is not None]
        if not servers:
            return
        self._stopping = True
        for srv in servers:
            srv.close()
        if self._unix_server is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        tasks = [c.task for c in list(self._conns) if c.task is not None and not c.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.sleep(0)
        for srv in servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), THREAD_START_TIMEOUT)
            except TimeoutError:
                pass
        self._server = self._unix_server = None
        self._changed()

    async def __aenter__(self) -> "FakeLlama":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ---- waiting for a condition ----
    async def wait_for(self, predicate, timeout: float = 2.0) -> None:
        """In the server's loop: wait until predicate() is true; TimeoutError after `timeout`."""
        deadline = self._loop.time() + timeout
        while not predicate():
            left = deadline - self._loop.time()
            if left <= 0:
                raise TimeoutError("condition not met within %.2f s" % timeout)
            fut = self._loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass

    def wait_until(self, predicate, timeout: float = 2.0) -> None:
        """From another thread (FakeLlamaThread): the same, blocking. Never call it in the loop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._sync_waiters += 1
            try:
                while not predicate():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("condition not met within %.2f s" % timeout)
                    self._cond.wait(min(left, 0.05))
            finally:
                self._sync_waiters -= 1

    def _changed(self) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(None)
        if self._sync_waiters:
            with self._cond:
                self._cond.notify_all()

    # ---- bookkeeping ----
    def _record(self, req: _Request) -> None:
        self.requests_total += 1
        if not self.record:
            return
        if len(self.requests) >= MAX_RECORDED_REQUESTS:
            del self.requests[:MAX_RECORDED_REQUESTS // 2]
        self.requests.append(RecordedRequest(req.method, req.target, req.path, req.headers,
                                             req.body[:RECORD_BODY_CAP], len(req.body)))
        self._changed()

    def _take_slot(self):
        for i, busy in enumerate(self.slots):
            if not busy:
                self.slots[i] = True
                return i
        return None   # all busy: served anyway (llama-server would queue)

    def _next_id(self, kind: str) -> str:
        self._ids += 1
        return "%s-fake%d" % ("chatcmpl" if kind == "chat" else "cmpl", self._ids)


class FakeLlamaThread:
    """The same server in a background thread with its own loop, for synchronous tests.

    `with FakeLlamaThread(keepalive_timeout=0.3) as srv:` gives the FakeLlama (use srv.port,
    srv.defaults, srv.loading, srv.wait_until(...)).
    """

    def __init__(self, **kw):
        self._kw = kw
        self.server: FakeLlama | None = None
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self):
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self.server = FakeLlama(**self._kw)
            loop.run_until_complete(self.server.start())
        except BaseException as e:  # reported to __enter__
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def __enter__(self) -> FakeLlama:
        self._thread = threading.Thread(target=self._run, name="fake-llama", daemon=True)
        self._thread.start()
        if not self._ready.wait(THREAD_START_TIMEOUT):
            raise TimeoutError("fake llama-server did not start")
        if self._error is not None:
            raise self._error
        return self.server

    def call(self, fn, *args):
        """Run fn(*args) in the server's loop and return its result (deadline-bounded)."""
        async def _c():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(_c(), self._loop).result(THREAD_START_TIMEOUT)

    def __exit__(self, *exc) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(
                THREAD_START_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(THREAD_START_TIMEOUT)


# ---- CLI: stand in for llama-server --------------------------------------------------------
def _parse_args(argv):
    p = argparse.ArgumentParser(prog="fake-llama-server", add_help=True)
    p.add_argument("-m", "--model", default="")
    p.add_argument("-a", "--alias", default="")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", default="0")
    p.add_argument("-np", "--parallel", type=int, default=4)
    p.add_argument("--metrics", action="store_true")
    p.add_argument("--unix", default="", help="fake only: also listen on this Unix socket")
    args, _ignored = p.parse_known_args(argv)
    return args


async def _cli_main(args) -> int:
    loop = asyncio.get_running_loop()
    # llama-server reports the alias, else the model path, as the model id.
    srv = FakeLlama(host=args.host, port=args.port, n_slots=max(1, args.parallel),
                    model_id=args.alias or args.model or "demo", n_ctx=args.ctx_size,
                    metrics=args.metrics, record=False, unix_path=args.unix)
    load_s = float(os.environ.get("FAKE_LOAD_SECONDS", "0") or 0)
    exit_after = float(os.environ.get("FAKE_EXIT_AFTER", "0") or 0)
    done = loop.create_future()

    def finish(code):
        if not done.done():
            done.set_result(code)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish, 0)
    srv.loading = load_s > 0
    try:
        await srv.start()
    except OSError as exc:
        print("srv start: couldn't bind HTTP server socket, hostname: %s: %s"
              % (args.host, exc), file=sys.stderr, flush=True)
        return 1
    where = ["http://%s:%d" % (srv.host, srv.port)] if srv.host else []
    where += ["unix://" + srv.unix_path] if srv.unix_path else []
    print("main: server is listening on %s - starting the main loop" % ", ".join(where),
          flush=True)
    if load_s > 0:
        def loaded():
            srv.loading = False
            print("main: model loaded", flush=True)
        loop.call_later(load_s, loaded)
    if exit_after > 0:
        def crash():
            print("fake-llama: FAKE_EXIT_AFTER=%s: exiting with 1" % exit_after,
                  file=sys.stderr, flush=True)
            finish(1)
        loop.call_later(exit_after, crash)
    code = await done
    await srv.stop()
    return code


def main(argv=None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("FAKE_FAIL_START") == "1":
        print("fake-llama: FAKE_FAIL_START=1: failed to load model '%s'" % args.model,
              file=sys.stderr, flush=True)
        return 1
    return asyncio.run(_cli_main(args))


if __name__ == "__main__":
    sys.exit(main())
