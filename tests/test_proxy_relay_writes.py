"""The relay writes once per upstream read: head and body of a small answer together, every SSE
event of one read in one write (each still its own chunk), and a cut stream's error event with
what came before it."""

from __future__ import annotations

import random

import pytest

from helpers import aio
from llamagw.net import upstream
from llamagw.net import relay as proxy
from llamagw.context import RequestContext
from llamagw.net.relay import Exchange


class FakeClient:
    def __init__(self):
        self.writes: list[bytes] = []
        self.gone = False
        self.keep_alive = True
        self.exchange = None
        self.closed_after_write = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close_after_write(self, abort_chunked: bool = False) -> None:
        self.keep_alive = False
        self.closed_after_write = True

    def abort(self) -> None:
        self.gone = True

    def arm(self, when: float) -> None:
        self.armed = when


class FakeTransport:
    def __init__(self):
        self.sent: list[bytes] = []
        self.aborted = False

    def write(self, data):
        self.sent.append(data)

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def setup(method: str = "POST"):
    pool = upstream.UpstreamPool("127.0.0.1", 9, 1.0)
    conn = upstream.UpstreamConnection(pool)
    conn.connection_made(FakeTransport())
    client = FakeClient()
    ctx = RequestContext("127.0.0.1", method, "/v1/chat/completions", "rid1")
    ex = Exchange(client, ctx, head_only=method == "HEAD", http10=False, first_byte_timeout=5.0,
                  idle_timeout=5.0, write_timeout=5.0, account=True)
    ex.conn = conn
    conn.start(ex, method, b"POST / HTTP/1.1\r\n\r\n")
    return conn, client, ctx, ex


def dechunk(data: bytes) -> list[bytes]:
    out = []
    while data:
        line, _, rest = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return out


@aio
async def test_small_answer_is_one_write_head_and_body():
    conn, client, ctx, ex = setup()
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":5}}'
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    assert len(client.writes) == 1
    head, _, got = client.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: %d" % len(body) in head
    assert got == body
    assert ex.done.done() and ctx.outcome == "ok"
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (3, 5)
    assert ctx.bytes_out == len(body)


@aio
async def test_events_of_one_read_leave_in_one_write_each_its_own_chunk():
    conn, client, ctx, ex = setup()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    assert len(client.writes) == 1 and b"transfer-encoding: chunked" in client.writes[0]
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(50)]
    conn.data_received(b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events))
    assert len(client.writes) == 2
    assert dechunk(client.writes[1]) == events        # one chunk per event, as before
    # the next read is written at once, not held for more
    conn.data_received(b"%x\r\n%b\r\n" % (len(events[0]), events[0]))
    assert len(client.writes) == 3 and dechunk(client.writes[2]) == [events[0]]
    conn.data_received(b"0\r\n\r\n")
    assert client.writes[-1] == b"0\r\n\r\n" and ctx.outcome == "ok"


@aio
async def test_cut_mid_read_writes_pieces_then_error_event_without_terminator():
    conn, client, ctx, ex = setup()
    ev = b"data: {\"n\":1}\n\n"
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\nzz\r\n" % (len(ev), ev))
    out = b"".join(client.writes)
    assert len(client.writes) == 1
    body = out.partition(b"\r\n\r\n")[2]
    pieces = dechunk(body)
    assert pieces[0] == ev and b"upstream_closed" in pieces[1]
    assert not body.endswith(b"0\r\n\r\n")
    assert client.closed_after_write and ctx.outcome == "upstream_error"
    assert conn.transport.aborted


@aio
async def test_head_request_writes_only_the_head():
    conn, client, ctx, ex = setup("HEAD")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 10\r\n\r\n")
    assert len(client.writes) == 1 and client.writes[0].endswith(b"\r\n\r\n")
    assert ex.done.done()


@aio
async def test_a_whole_small_answer_is_pooled_but_bytes_past_it_close_the_connection():
    for extra, pooled in ((b"", True), (b"HTTP/1.1 200 OK\r\n", False)):
        conn, client, ctx, ex = setup()
        body = b'{"ok":true}'
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%b%b" % (len(body), body, extra))
        assert client.writes[0].endswith(b"\r\n\r\n" + body) and ctx.outcome == "ok"
        assert conn.pool.idle_count == (1 if pooled else 0)
        assert conn.transport.aborted is (not pooled)


@aio
async def test_a_body_split_over_reads_still_relays_in_order():
    conn, client, ctx, ex = setup()
    body = b'{"usage":{"prompt_tokens":2,"completion_tokens":7}}'
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(body), body[:10]))
    conn.data_received(body[10:])
    assert b"".join(client.writes).endswith(b"\r\n\r\n" + body)
    assert ctx.outcome == "ok" and (ctx.prompt_tokens, ctx.completion_tokens) == (2, 7)


def _odd_chunk(data: bytes, kind: int) -> bytes:
    """data as one chunk framed otherwise than chunk() does (still valid HTTP/1.1)."""
    return (b"%X" % len(data) if kind == 0 else b"0%x" % len(data) if kind == 1
            else b"%x;ext=1" % len(data)) + b"\r\n" + data + b"\r\n"


def _relay_stream(reads: list[bytes], bulk: bool):
    conn, client, ctx, ex = setup()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    assert ex.bulk is True       # a chunked SSE relay to a chunked client takes whole chunks
    ex.bulk = bulk
    for data in reads:
        conn.data_received(data)
    return client.writes, ctx, bytes(ex.tail)


@aio
@pytest.mark.parametrize("seed", range(6))
async def test_whole_chunks_relay_writes_exactly_what_one_event_per_chunk_writes(seed):
    # A stream of events of varied sizes, cut into reads (seed 0: all in one read, past twice
    # the SSE tail; seed 1: reads of a few bytes; seed 2: a small read, then one past the
    # tail's size; the others at random places, with some chunks framed otherwise than chunk()
    # frames them): taken whole (on_chunks) or one chunk at a time (on_data), the
    # client gets the same writes, and the same bytes and token counts are accounted.
    rng = random.Random(seed)
    events = [b'data: {"n":%d,"pad":"%s"}\n\n' % (i, b"x" * rng.randrange(0, 700))
              for i in range(150)]
    events += [b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":150}}\n\n',
               b"data: [DONE]\n\n"]
    odd = 0.1 if seed > 2 else 0.0
    raw = b"".join(_odd_chunk(e, rng.randrange(3)) if rng.random() < odd else b"%x\r\n%b\r\n"
                   % (len(e), e) for e in events) + b"0\r\n\r\n"
    assert len(raw) > 2 * proxy.SSE_TAIL_BYTES
    if seed == 0:
        reads = [raw]
    elif seed == 2:
        reads = [raw[:5000], raw[5000:]]
    else:
        cuts = sorted(rng.sample(range(1, len(raw)), len(raw) // (8 if seed == 1 else 900)))
        reads = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    whole, ctx_whole, tail_whole = _relay_stream(reads, bulk=True)
    each, ctx_each, tail_each = _relay_stream(reads, bulk=False)
    assert whole == each
    if seed == 0:                 # one read: one chunk per event, none split
        assert dechunk(b"".join(whole[1:])) == events
    assert b"".join(dechunk(b"".join(whole[1:]))) == b"".join(events)
    for ctx, tail in ((ctx_whole, tail_whole), (ctx_each, tail_each)):
        assert ctx.outcome == "ok" and ctx.bytes_out == sum(map(len, events))
        assert (ctx.prompt_tokens, ctx.completion_tokens) == (4, 150)
        # the kept tail is the stream's end, whole and in order
        assert len(tail) >= proxy.SSE_TAIL_BYTES and b"".join(events).endswith(tail)
