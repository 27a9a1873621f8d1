#!/usr/bin/env python3
"""The gateway's per-request CPU cost without sockets: a profiling aid for the hot path.

    python3 tests/bench/hotpath.py [--requests N] [--repeat R] [--sse [--streams K]]
                                   [--new-connections] [--body-bytes B] [--profile K]
                                   [--no-usage] [--dashboards D]

A real Gateway (auth on, key file, access log, usage ledger, metrics) is driven in-process: one
client connection and one pooled upstream connection with in-memory transports. Each request is fed to
the client protocol, the upstream request is answered with a fixed llama-server-shaped response,
and the answer is awaited on the client transport. No kernel, no other process: the CPU time per
request (process time, the access-log and usage-ledger threads included) is the Python cost
alone, steady enough to compare two commits on a shared machine where `make bench` ratios drift by
10 %. Beside it, the event loop's own thread's CPU time ("loop"): what a request costs the thread
that serves every request, without the writer threads' share. --no-usage runs without the usage
ledger (USAGE_ENABLED=false), so the two figures give the ledger's cost.
--sse relays stream events instead (cost per event, one event per upstream read); --streams K
spreads them over K streams at once, in turn (case c: a thousand streams' objects do not stay
in the CPU's caches). --new-connections costs a whole stream on a new client connection and a
new llama-server connection, opened and closed (case c's burst). --body-bytes B sends a
conversation of about B bytes (a long chat history: messages with newlines, quotes and code)
instead of the one-line chat body. --profile K prints the top K
functions under cProfile. --dashboards D opens D live dashboard streams (GET /admin/live's
subscriptions and its ticker, each drained by a task as the route's writer does, the bytes
dropped): what the live channel costs the proxy (use --requests large enough to span several
seconds of batches and metrics ticks). The figure is the best of R runs
(noise only ever adds).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from llamagw import config  # noqa: E402
from llamagw import app as gateway  # noqa: E402
from llamagw.limits import keys  # noqa: E402
from llamagw.net import upstream  # noqa: E402
from llamagw.observe import accesslog, usage  # noqa: E402

KEY = "sk-hotpath-0123456789abcdef"
BODY = b'{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"stream":true}'
# --body-bytes: one turn of a long conversation (prose, a paragraph break, quoted code).
_TURN = ("Could you look at this function and tell me why the loop never ends?\n\n"
         "```python\ndef f(xs):\n    i = 0\n    while i < len(xs):\n        print(\"x\", xs[i])"
         "\n```\nThanks, and keep the answer short [no lists] please.")


def conversation(size: int) -> bytes:
    """A chat body of at least `size` bytes: alternating user / assistant turns of _TURN."""
    messages: list[dict] = []
    body = BODY
    while len(body) < size:
        messages.append({"role": ("user", "assistant")[len(messages) % 2], "content": _TURN})
        body = json.dumps({"model": "demo", "messages": messages}).encode()
    return body


def request(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Length: %d\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\n\r\n%s" % (len(body), KEY.encode(), body))


_ANSWER = json.dumps({
    "choices": [{"finish_reason": "stop", "index": 0,
                 "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}}],
    "created": 1, "model": "demo", "object": "chat.completion",
    "usage": {"completion_tokens": 5, "prompt_tokens": 3, "total_tokens": 8},
    "id": "chatcmpl-1"}).encode()
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n" % len(_ANSWER)
            + _ANSWER)
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n")
_EVENT = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"tok "}}],'
          b'"created":1,"id":"chatcmpl-1","model":"demo","object":"chat.completion.chunk"}\n\n')
SSE_CHUNK = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)


class MemoryTransport(asyncio.Transport):
    """Collects writes; resolves `written` (a future) on the next write."""

    def __init__(self):
        super().__init__()
        self.written: asyncio.Future | None = None

    def write(self, data) -> None:
        if self.written is not None and not self.written.done():
            self.written.set_result(bytes(data))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _open_pair(gw) -> tuple:
    """An idle pooled llama-server connection and a new client connection, on memory
    transports: (upstream transport, upstream protocol, client transport, client protocol)."""
    up_t = MemoryTransport()
    up = upstream.UpstreamConnection(gw.pool)
    up.connection_made(up_t)
    gw.pool._all.add(up)
    gw.pool.release(up, True)
    cl_t = MemoryTransport()
    client = gw.new_connection()
    client.connection_made(cl_t)
    return up_t, up, cl_t, client


async def _drain(sub) -> None:
    """A dashboard's stream: its frames taken as the live route's writer takes them."""
    with sub:
        async for _chunk in sub.frames():
            pass


async def run(tmp: str, n: int, sse: bool, streams: int = 1, new_conns: bool = False,
              body: bytes = BODY, use_ledger: bool = True, loop_cpu: list | None = None,
              dashboards: int = 0) -> float:
    """Microseconds of process CPU time per request (per event with sse, per stream with
    new_conns); the event loop thread's alone is appended to loop_cpu."""
    loop = asyncio.get_running_loop()
    cfg = config.load_config({
        "AUTH_KEYS_FILE": f"{tmp}/keys", "DATA_DIR": tmp, "RUN_DIR": tmp,
        "MAX_REQUESTS_PER_MINUTE": "10000000", "MAX_CONCURRENT_REQUESTS_PER_KEY": "100000",
        "MAX_CONCURRENT_REQUESTS": "100000", "MAX_QUEUE_SIZE": "100000"})
    store = keys.KeyStore(cfg.auth_keys_file)
    store.load()
    alog = accesslog.AccessLog(f"{tmp}/access.log", max_bytes=1 << 30, backups=1)
    ledger = usage.Ledger(usage.usage_path(tmp, "hotpath")) if use_ledger else None
    gw = gateway.Gateway(cfg, store=store, access_log=alog, ledger=ledger)
    gw.pool.idle_ttl = 1e9
    gw.pool.max_idle = max(gw.pool.max_idle, streams)
    pairs = [_open_pair(gw) for _ in range(streams if sse else 0 if new_conns else 1)]
    drains = [loop.create_task(_drain(gw.admin.hub.subscribe())) for _ in range(dashboards)]
    if dashboards:
        gw.admin.feed.ensure_ticker()       # as GET /admin/live does: batches and metrics
    await asyncio.sleep(0)
    try:
        if sse:
            # Stream k on client connection k takes the idle upstream connection pooled last
            # (LIFO): the one of pairs[-1 - k].
            ups = []
            for k in range(len(pairs)):
                up_t, up = pairs[-1 - k][:2]
                up_t.written = loop.create_future()
                pairs[k][3].data_received(request(STREAM_BODY))
                await up_t.written
                ups.append(up)
            for up in ups:
                up.data_received(SSE_HEAD)
            rounds = max(1, n // len(ups))
            started, loop_started = time.process_time(), time.thread_time()
            for _ in range(rounds):
                for up in ups:
                    up.data_received(SSE_CHUNK)
            spent = time.process_time() - started
            if loop_cpu is not None:
                loop_cpu.append((time.thread_time() - loop_started) / (rounds * len(ups)) * 1e6)
            for k, up in enumerate(ups):
                cl_t = pairs[k][2]
                cl_t.written = loop.create_future()
                up.data_received(b"0\r\n\r\n")
                if not (await cl_t.written).endswith(b"0\r\n\r\n"):
                    raise RuntimeError("the stream did not end")
            return spent / (rounds * len(ups)) * 1e6
        if new_conns:
            return await _new_streams(loop, gw, n, loop_cpu)
        up_t, up, cl_t, client = pairs[0]
        req = request(body)
        started, loop_started = time.process_time(), time.thread_time()
        answer = b""
        for i in range(n):
            up_t.written = loop.create_future()
            client.data_received(req)
            await up_t.written
            cl_t.written = loop.create_future()
            up.data_received(RESPONSE)
            answer = await cl_t.written
            if dashboards and not i % 256:
                await asyncio.sleep(0)      # the futures are done at once: let timers run
        spent = time.process_time() - started
        if loop_cpu is not None:
            loop_cpu.append((time.thread_time() - loop_started) / n * 1e6)
        for _ in range(3):
            await asyncio.sleep(0)     # the last request's epilogue (metrics, access log)
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"unexpected answer {answer[:80]!r}")
        return spent / n * 1e6
    finally:
        gw.admin.hub.close_all()
        if drains:
            await asyncio.wait(drains, timeout=1.0)
        alog.close()
        if ledger is not None:
            ledger.close()


async def _new_streams(loop, gw, n: int, loop_cpu: list | None = None) -> float:
    """Microseconds of CPU per stream, each on a new client connection and a new llama-server
    connection (case c): opened, a streaming request, a head and one event, the end, then
    llama-server closes its side and the client closes its own."""
    open_before = len(gw.connections)
    started, loop_started = time.process_time(), time.thread_time()
    for _ in range(n):
        up_t, up, cl_t, client = _open_pair(gw)
        up_t.written = loop.create_future()
        client.data_received(request(STREAM_BODY))
        await up_t.written
        cl_t.written = loop.create_future()
        up.data_received(SSE_HEAD + SSE_CHUNK)
        await cl_t.written
        cl_t.written = loop.create_future()
        up.data_received(b"0\r\n\r\n")
        if not (await cl_t.written).endswith(b"0\r\n\r\n"):
            raise RuntimeError("the stream did not end")
        up.eof_received()
        up.connection_lost(None)
        client.eof_received()
        client.connection_lost(None)
        await asyncio.sleep(0)
    spent = time.process_time() - started
    if loop_cpu is not None:
        loop_cpu.append((time.thread_time() - loop_started) / n * 1e6)
    for _ in range(3):
        await asyncio.sleep(0)
    if len(gw.connections) != open_before:
        raise RuntimeError(f"{len(gw.connections) - open_before} client connection(s) left open")
    return spent / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--sse", action="store_true", help="cost per relayed SSE event")
    p.add_argument("--streams", type=int, default=1,
                   help="with --sse: this many streams at once, one event each in turn")
    p.add_argument("--new-connections", action="store_true",
                   help="cost per stream, each on new client and llama-server connections")
    p.add_argument("--body-bytes", type=int, default=0, metavar="B",
                   help="requests carry a conversation of about B bytes (not with --sse)")
    p.add_argument("--dashboards", type=int, default=0, metavar="D",
                   help="with D live dashboard streams open (each request publishes to them)")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="print the top K functions of one run under cProfile")
    p.add_argument("--no-usage", action="store_true",
                   help="without the usage ledger (USAGE_ENABLED=false)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/keys", "w") as f:
            f.write(f"hotpath:{KEY} rpm=10000000 concurrency=100000\n")
        os.chmod(f"{tmp}/keys", 0o600)
        loop_cpu: list[float] = []
        measure = functools.partial(run, tmp, args.requests, args.sse, args.streams,
                                    args.new_connections,
                                    conversation(args.body_bytes) if args.body_bytes else BODY,
                                    not args.no_usage, loop_cpu, args.dashboards)
        figures = [asyncio.run(measure()) for _ in range(args.repeat)]
        unit = "event" if args.sse else "stream" if args.new_connections else "request"
        print(f"CPU us per {unit}: best {min(figures):.1f}  runs "
              + " ".join(f"{x:.1f}" for x in figures)
              + f"  (loop thread: best {min(loop_cpu):.1f}"
              + (", no usage ledger)" if args.no_usage else ")"))
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(measure())
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
