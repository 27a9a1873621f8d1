"""A small asyncio raw-socket HTTP/1.1 load client for the benchmarks (one worker process).

    echo '<spec json>' | python3 tests/bench/loadclient.py      -> one JSON object on stdout

It opens `connections` keep-alive connections to host:port and, on each, sends the same request
again and again until `requests_per_conn` are done or `duration` seconds have passed (the stream
in progress is finished). Each response is timed: connect, first response byte (TTFB), first SSE
event (or, mode "tokens", first event carrying content), end. It is built on asyncio Protocols
and does the least work per read (a bytes.count per chunk in mode "count") so that it is not the
bottleneck; it reports its own CPU time so the harness can show that.

Spec fields: host, port (or unix, a Unix socket path to connect to instead), request (the raw
request bytes, latin-1 text), connections, requests_per_conn (0 = unbounded), duration (s, 0 =
unbounded; one of the two must bound it), start_at (time.time() at which to start, so several
workers start together), mode ("count" | "tokens"), connect_parallel, timeout (s, a hard deadline
for the whole run).

Standard library only; no import from scripts/ (it measures the gateway from outside).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

# Connects in progress at once per worker: the fake llama-server listens with asyncio's default
# backlog of 100, so a burst of thousands of SYNs would overflow it and cost 1 s SYN retries.
DEFAULT_CONNECT_PARALLEL = 64
# A response body larger than this is an error here (the benchmark streams are < 1 MB).
MAX_BODY_BYTES = 16 * 1024 * 1024
# Errors kept verbatim in the result (the rest are only counted).
MAX_ERROR_SAMPLES = 5
# Hard cap on the whole run when the spec gives none.
DEFAULT_TIMEOUT = 300.0
# Reconnects of one logical client (the server closing idle keep-alive connections): bounds a
# server that closes every connection at once. 100,000 is far above any run's request count.
MAX_RECONNECTS = 100_000
# Mode "tokens": keep at most this much of a body to read `usage` from the last events.
TOKENS_BODY_CAP = 4 * 1024 * 1024

_TERMINATOR = b"\r\n0\r\n\r\n"
_EVENT = b"data: "
_CONTENT = b'"content":"'


class Conn(asyncio.Protocol):
    """One connection; `state` (requests done so far) outlives it when the server closes an idle
    keep-alive connection and the client reconnects, as HTTP clients do."""

    def __init__(self, runner: "Runner", done: asyncio.Future, state: list):
        self.r = runner
        self.done = done
        self.transport = None
        self.state = state
        self._reset()

    def _reset(self):
        self.head = b""
        self.head_done = False
        self.status = 0
        self.chunked = False
        self.length = -1
        self.got = 0
        self.events = 0
        self.carry = b""
        self.tail = b""
        self.body = []
        self.body_size = 0
        self.t_sent = 0.0
        self.t_first = None
        self.t_event = None

    # --- protocol ---
    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        self._reset()
        self.t_sent = time.perf_counter()
        self.transport.write(self.r.request)

    def data_received(self, data: bytes):
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        if not self.head_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail("response head too large")
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head_done = True
            lines = head.split(b"\r\n")
            try:
                self.status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail("bad status line %r" % lines[0][:80])
                return
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
            if not self.chunked and self.length < 0:
                self._fail("response without framing (status %d)" % self.status)
                return
        self.body_piece(data, now)

    def body_piece(self, data: bytes, now: float):
        if not data and not (self.length == 0 and not self.chunked):
            return
        self.got += len(data)
        if self.got > MAX_BODY_BYTES:
            self._fail("body over %d bytes" % MAX_BODY_BYTES)
            return
        if self.r.mode == "tokens":
            if self.body_size < TOKENS_BODY_CAP:
                self.body.append(data)
                self.body_size += len(data)
            if self.t_event is None:
                joined = b"".join(self.body)
                i = joined.find(_CONTENT)
                while i >= 0:
                    j = i + len(_CONTENT)
                    if j < len(joined) and joined[j:j + 1] != b'"':
                        self.t_event = now
                        break
                    i = joined.find(_CONTENT, j)
        else:
            buf = self.carry + data
            n = buf.count(_EVENT)
            if n:
                self.events += n
                if self.t_event is None:
                    self.t_event = now
            self.carry = buf[-(len(_EVENT) - 1):] if len(buf) >= len(_EVENT) else buf
        if self.chunked:
            # A chunk ends "<data>\r\n" and SSE data ends "\n\n", so these 7 bytes at the end
            # of what arrived can only be the last-chunk marker (or a whole empty body).
            self.tail = (self.tail + data)[-len(_TERMINATOR):]
            finished = self.tail == _TERMINATOR or (self.got == 5 and self.tail == b"0\r\n\r\n")
        else:
            finished = self.got >= self.length
        if finished:
            self.finish(now)

    def finish(self, now: float):
        r = self.r
        rec = [self.t_sent - r.t0, (self.t_first or now) - self.t_sent,
               (self.t_event - self.t_sent) if self.t_event is not None else None,
               now - self.t_sent, self.status]
        if r.mode == "tokens":
            rec.append(_completion_tokens(b"".join(self.body), self.chunked))
        else:
            rec.append(self.events)
        r.records.append(rec)
        if self.status != 200:
            r.error("HTTP %d" % self.status)
        self.state[0] += 1
        if r.more(self.state[0], now):
            self.send()
        else:
            self.transport.close()
            if not self.done.done():
                self.done.set_result("done")

    def _fail(self, msg: str):
        self.r.error(msg)
        self.r.failed += 1
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            if self.t_first is None and self.state[0] > 0:
                # The server closed an idle keep-alive connection (llama-server does after a
                # stream) as the next request went out: reconnect and send it again.
                self.r.reconnects += 1
                self.done.set_result("reconnect")
                return
            if self.head_done or self.t_first is not None:
                self.r.error("connection lost mid-response: %s" % (exc or "EOF"))
            else:
                self.r.error("connection closed before a response: %s" % (exc or "EOF"))
            self.r.failed += 1
            self.done.set_result("failed")


def _completion_tokens(raw: bytes, chunked: bool) -> int:
    """completion_tokens from the last `usage` in an SSE body; else the count of content events."""
    if chunked:
        out, i = [], 0
        while i < len(raw):
            j = raw.find(b"\r\n", i)
            if j < 0:
                break
            size = int(raw[i:j].split(b";")[0], 16)
            if size == 0:
                break
            out.append(raw[j + 2:j + 2 + size])
            i = j + 2 + size + 2
        raw = b"".join(out)
    usage = None
    content_events = 0
    for block in raw.split(b"\n\n"):
        if not block.startswith(_EVENT) or block == b"data: [DONE]":
            continue
        try:
            ev = json.loads(block[len(_EVENT):])
        except ValueError:
            continue
        if ev.get("usage"):
            usage = ev["usage"]
        for choice in ev.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                content_events += 1
    if usage and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return content_events


class Runner:
    def __init__(self, spec: dict):
        self.host = spec["host"]
        self.port = int(spec["port"])
        self.unix = spec.get("unix", "")     # non-empty: connect to this Unix socket instead
        self.request = spec["request"].encode("latin-1")
        self.connections = int(spec["connections"])
        self.requests_per_conn = int(spec.get("requests_per_conn", 1))
        self.duration = float(spec.get("duration", 0))
        self.start_at = float(spec.get("start_at", 0))
        self.mode = spec.get("mode", "count")
        self.connect_parallel = int(spec.get("connect_parallel", DEFAULT_CONNECT_PARALLEL))
        self.timeout = float(spec.get("timeout", DEFAULT_TIMEOUT))
        if self.requests_per_conn <= 0 and self.duration <= 0:
            raise SystemExit("loadclient: requests_per_conn or duration must bound the run")
        self.records: list[list] = []
        self.errors: dict[str, int] = {}
        self.failed = 0
        self.reconnects = 0
        self.connect_times: list[float] = []
        self.deadline = None
        self.t0 = 0.0

    def error(self, msg: str):
        self.errors[msg] = self.errors.get(msg, 0) + 1

    def more(self, n_done: int, now: float) -> bool:
        return (self.requests_per_conn <= 0 or n_done < self.requests_per_conn) and (
            self.deadline is None or now < self.deadline)

    async def one(self, sem: asyncio.Semaphore):
        loop = asyncio.get_running_loop()
        state = [0]
        for _ in range(MAX_RECONNECTS):
            done = loop.create_future()
            async with sem:
                t = time.perf_counter()
                try:
                    if self.unix:
                        await loop.create_unix_connection(lambda: Conn(self, done, state),
                                                          self.unix)
                    else:
                        await loop.create_connection(lambda: Conn(self, done, state),
                                                     self.host, self.port)
                except OSError as exc:
                    self.error("connect: %s" % exc)
                    self.failed += 1
                    return
                self.connect_times.append(time.perf_counter() - t)
            if await done != "reconnect" or not self.more(state[0], time.perf_counter()):
                return
        self.error("gave up after %d reconnects" % MAX_RECONNECTS)

    async def run(self) -> dict:
        delay = self.start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sem = asyncio.Semaphore(self.connect_parallel)
        self.t0 = time.perf_counter()
        wall0 = time.time()
        if self.duration > 0:
            self.deadline = self.t0 + self.duration
        tasks = [asyncio.ensure_future(self.one(sem)) for _ in range(self.connections)]
        _, pending = await asyncio.wait(tasks, timeout=self.timeout)
        timed_out = len(pending)
        for t in pending:
            t.cancel()
        if pending:
            self.error("timeout: %d connection(s) unfinished after %.0f s"
                       % (len(pending), self.timeout))
        wall = time.perf_counter() - self.t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_start": wall0, "wall": wall, "records": self.records,
            "connect_times": self.connect_times, "failed": self.failed + timed_out,
            "reconnects": self.reconnects,
            "errors": dict(list(self.errors.items())[:MAX_ERROR_SAMPLES]),
            "error_count": sum(self.errors.values()),
            "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
        }


def main() -> int:
    spec = json.loads(sys.stdin.read())
    result = asyncio.run(Runner(spec).run())
    sys.stdout.write(json.dumps(result, separators=(",", ":")))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
