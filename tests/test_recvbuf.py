"""The shared receive buffer (recvbuf.RecvBufferProtocol): each connection gets exactly its own
bytes although every read of a thread lands in one buffer, a read is copied out before the next
one reuses the buffer, each thread has its own buffer, and the gateway's protocols use it."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

import connection
import recvbuf
import upstream
from conftest import Stack, aio, chat, post


class Collect(recvbuf.RecvBufferProtocol):
    def __init__(self):
        self.parts: list[bytes] = []
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.parts.append(data)

    def eof_received(self):
        self.done.set_result(b"".join(self.parts))


async def _serve_and_send(payloads: list[bytes], rounds: int = 1) -> list[bytes]:
    """One server, a client per payload, each sending its payload `rounds` times, interleaved
    (every client writes, then the server reads, again): what each server side received."""
    loop = asyncio.get_running_loop()
    protos: list[Collect] = []

    def factory():
        p = Collect()
        protos.append(p)
        return p

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writers = []
    for _ in payloads:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        writers.append(w)
    for _ in range(rounds):
        for w, data in zip(writers, payloads):
            w.write(data)
        for w in writers:
            await w.drain()
        await asyncio.sleep(0.01)
    for w in writers:
        w.write_eof()
    got = await asyncio.wait_for(asyncio.gather(*(p.done for p in protos)), 10)
    for w in writers:
        w.close()
    server.close()
    await server.wait_closed()
    # protos are in accept order, the same as connect order here (connects were sequential).
    return list(got)


@aio
async def test_each_connection_gets_its_own_bytes():
    payloads = [bytes([65 + i]) * (1000 + 37 * i) for i in range(8)]
    got = await _serve_and_send(payloads, rounds=20)
    assert got == [p * 20 for p in payloads]


@aio
async def test_a_body_larger_than_the_buffer_arrives_whole():
    big = bytes(range(256)) * ((3 * recvbuf.RECV_BUFFER_BYTES) // 256 + 7)
    got = await _serve_and_send([big, b"small"])
    assert got == [big, b"small"]


@aio
async def test_bytes_handed_over_survive_the_next_read():
    proto = Collect()
    view = proto.get_buffer(-1)
    view[:5] = b"first"
    proto.buffer_updated(5)
    view = proto.get_buffer(-1)
    view[:6] = b"second"
    proto.buffer_updated(6)
    assert proto.parts == [b"first", b"second"]


def test_each_thread_has_its_own_buffer():
    seen = {}

    def grab(name):
        seen[name] = recvbuf.thread_buffer()

    threads = [threading.Thread(target=grab, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["a"].obj is not seen["b"].obj
    assert recvbuf.thread_buffer().obj is recvbuf.thread_buffer().obj   # kept for the thread
    assert len(recvbuf.thread_buffer()) == recvbuf.RECV_BUFFER_BYTES


def test_the_gateway_protocols_read_into_the_shared_buffer():
    assert issubclass(connection.ClientConnection, asyncio.BufferedProtocol)
    assert issubclass(upstream.UpstreamConnection, asyncio.BufferedProtocol)


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_streams_relayed_side_by_side_stay_apart(tmp_path, unix):
    # Many streams through the gateway at once: every read of both sides goes through the one
    # buffer, and each client still gets its own stream (one completion id): 12 events, the
    # closing one and [DONE].
    env = {"MAX_CONCURRENT_REQUESTS_PER_KEY": "32", "MAX_CONCURRENT_REQUESTS": "32"}
    async with Stack(tmp_path, env, backend_unix=unix) as st:
        async def one():
            c = await st.client()
            r = await c.request(post("/v1/chat/completions",
                                     chat(stream=True, events=12, interval=0.005)))
            c.close()
            return r

        resps = await asyncio.gather(*(one() for _ in range(16)))
    ids = set()
    for r in resps:
        assert r.status == 200 and r.complete
        events = [e for e in r.body.split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 14 and events[-1] == b"data: [DONE]"
        stream_ids = {json.loads(e[6:])["id"] for e in events[:-1]}
        assert len(stream_ids) == 1
        ids |= stream_ids
    assert len(ids) == 16
