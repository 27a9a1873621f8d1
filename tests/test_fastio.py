"""fastio: the gateway's socket transports and listener.

The transport contract the gateway relies on (asyncio's): bytes in order and whole, each read a
copy made before the shared per-thread buffer is reused; writes queued when the socket is full and
the protocol paused and resumed at the water marks; close() sending what is queued first, abort()
not; connection_lost exactly once and never from inside a call; a half-close kept open when
eof_received says so; a failing protocol callback logged and the connection dropped. Then the
listener (accept batches, EMFILE back-off, a factory that fails) and the gateway's use of both:
client and llama-server connections on SocketTransport, and a Unix connect made without a task.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import struct
import threading

import pytest

from helpers import Stack, aio, chat, eventually, post
from llamagw.net import fastio, recvbuf, upstream


class Collect(asyncio.Protocol):
    """Records every callback, in order."""

    def __init__(self, keep_open_on_eof: bool = False):
        self.parts: list[bytes] = []
        self.calls: list[str] = []
        self.transport = None
        self.keep_open = keep_open_on_eof
        loop = asyncio.get_running_loop()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.in_call = False     # set while the test is inside a transport method

    def connection_made(self, transport):
        self.transport = transport
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.parts.append(data)

    def eof_received(self):
        self.calls.append("eof")
        self.eof.set_result(b"".join(self.parts))
        return self.keep_open

    def pause_writing(self):
        self.calls.append("pause_writing")

    def resume_writing(self):
        self.calls.append("resume_writing")

    def connection_lost(self, exc):
        assert not self.in_call, "connection_lost from inside a transport call"
        self.calls.append("lost")
        self.lost.set_result(exc)


def pair(protocol) -> tuple[fastio.SocketTransport, socket.socket]:
    """A started transport on one end of a socketpair; the other end, blocking, for the test."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    transport = fastio.SocketTransport(asyncio.get_running_loop(), ours, protocol, {"peername": "p"})
    transport.start()
    return transport, theirs


def recv_all(sock: socket.socket) -> bytes:
    out = []
    while chunk := sock.recv(1 << 20):
        out.append(chunk)
    return b"".join(out)


def listen(protos: list, *, failures: list[OSError] = (), factory=None):
    """A fastio Listener on 127.0.0.1 whose protocols (Collect) are appended to protos; its
    accept() fails with `failures` first. Returns the listener and the address."""
    def collect():
        protos.append(Collect())
        return protos[-1]

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    sock = _FlakyListenSocket(lsock, list(failures)) if failures else lsock
    listener = fastio.Listener(asyncio.get_running_loop(), sock, factory or collect, 8)
    return listener, lsock.getsockname()


async def _serve_and_send(payloads: list[bytes], rounds: int = 1) -> list[bytes]:
    """One fastio listener, a client per payload, each sending its payload `rounds` times,
    interleaved (every client writes, then the server reads, again): what each side received."""
    protos: list[Collect] = []
    listener, (_host, port) = listen(protos)
    writers = []
    for _ in payloads:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        writers.append(w)
        await eventually(lambda: len(protos) == len(writers))   # accept order = connect order
    for _ in range(rounds):
        for w, data in zip(writers, payloads):
            w.write(data)
        for w in writers:
            await w.drain()
        await asyncio.sleep(0.01)
    for w in writers:
        w.write_eof()
    got = await asyncio.wait_for(asyncio.gather(*(p.eof for p in protos)), 10)
    for w in writers:
        w.close()
    listener.close()
    return list(got)


# --- reading ---------------------------------------------------------------------------------
@aio
async def test_each_connection_gets_its_own_bytes():
    # Every read of the thread lands in one buffer: each connection still gets exactly its own.
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
    transport, peer = pair(proto)
    peer.sendall(b"first")
    await eventually(lambda: proto.parts)
    peer.sendall(b"second")
    await eventually(lambda: len(proto.parts) == 2)
    assert proto.parts == [b"first", b"second"]
    transport.abort()
    peer.close()


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


@aio
async def test_pause_reading_holds_bytes_until_resumed():
    proto = Collect()
    transport, peer = pair(proto)
    transport.pause_reading()
    assert not transport.is_reading()
    peer.sendall(b"held")
    await asyncio.sleep(0.05)
    assert proto.parts == []
    transport.resume_reading()
    await eventually(lambda: proto.parts == [b"held"])
    transport.abort()
    peer.close()


@aio
async def test_half_close_kept_open_when_the_protocol_says_so():
    proto = Collect(keep_open_on_eof=True)
    transport, peer = pair(proto)
    peer.sendall(b"request")
    peer.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(proto.eof, 5) == b"request"
    transport.write(b"answer")            # the write side still works
    transport.close()
    assert await asyncio.wait_for(proto.lost, 5) is None
    assert recv_all(peer) == b"answer"
    assert proto.calls == ["made", "eof", "lost"]
    peer.close()


@aio
async def test_eof_closes_when_the_protocol_does_not_keep_it_open():
    proto = Collect()
    _transport, peer = pair(proto)
    peer.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(proto.lost, 5) is None
    assert proto.calls == ["made", "eof", "lost"]
    assert recv_all(peer) == b""           # closed: the peer reads EOF
    peer.close()


@aio
async def test_peer_reset_is_a_connection_lost_with_the_error(caplog):
    lsock = socket.socket()           # TCP: a socketpair cannot be reset
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = socket.create_connection(lsock.getsockname())
    server, _ = lsock.accept()
    lsock.close()
    server.setblocking(False)
    proto = Collect()
    fastio.SocketTransport(asyncio.get_running_loop(), server, proto).start()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()                    # linger 0: RST
    with caplog.at_level(logging.DEBUG, "gateway.io"):
        exc = await asyncio.wait_for(proto.lost, 5)
    assert isinstance(exc, ConnectionResetError)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # a peer gone: no error


# --- writing ---------------------------------------------------------------------------------
@aio
async def test_a_full_socket_queues_writes_and_pauses_then_resumes_the_protocol():
    proto = Collect()
    transport, peer = pair(proto)
    blob = bytes(range(256)) * 4096              # 1 MiB: more than the socket buffers hold
    transport.write(blob)
    assert transport.get_write_buffer_size() > fastio.WRITE_HIGH_WATER
    assert proto.calls == ["made", "pause_writing"]
    transport.write(b"tail")                     # queued behind, in order
    got = bytearray()
    loop = asyncio.get_running_loop()
    while len(got) < len(blob) + 4:
        got += await loop.run_in_executor(None, peer.recv, 1 << 20)
    assert bytes(got) == blob + b"tail"
    await eventually(lambda: transport.get_write_buffer_size() == 0)
    assert proto.calls == ["made", "pause_writing", "resume_writing"]
    transport.abort()
    peer.close()


@aio
async def test_close_sends_what_is_queued_first_and_loses_the_connection_once():
    proto = Collect()
    transport, peer = pair(proto)
    blob = b"x" * (2 << 20)
    transport.write(blob)
    proto.in_call = True
    transport.close()
    transport.close()                            # twice: no second connection_lost
    proto.in_call = False
    assert transport.is_closing()
    loop = asyncio.get_running_loop()
    got = await loop.run_in_executor(None, recv_all, peer)
    assert got == blob
    assert await asyncio.wait_for(proto.lost, 5) is None
    await asyncio.sleep(0.02)
    assert proto.calls.count("lost") == 1
    transport.write(b"after")                    # after the end: dropped, no error
    peer.close()


@aio
async def test_abort_drops_what_is_queued_and_loses_the_connection_from_the_loop():
    proto = Collect()
    transport, peer = pair(proto)
    transport.write(b"y" * (2 << 20))
    proto.in_call = True
    transport.abort()
    transport.abort()
    proto.in_call = False
    assert await asyncio.wait_for(proto.lost, 5) is None
    loop = asyncio.get_running_loop()
    got = await loop.run_in_executor(None, recv_all, peer)
    assert len(got) < 2 << 20                    # the rest was dropped
    assert proto.calls.count("lost") == 1
    peer.close()


@aio
async def test_a_failing_protocol_callback_is_logged_and_the_connection_dropped(caplog):
    class Boom(Collect):
        def data_received(self, data):
            raise RuntimeError("bug")

    proto = Boom()
    _transport, peer = pair(proto)
    with caplog.at_level(logging.ERROR, "gateway.io"):
        peer.sendall(b"anything")
        exc = await asyncio.wait_for(proto.lost, 5)
    assert isinstance(exc, RuntimeError)
    assert any("data_received" in r.getMessage() for r in caplog.records)
    peer.close()


# --- the lingering close ---------------------------------------------------------------------
def tcp_pair(protocol) -> tuple[fastio.SocketTransport, socket.socket]:
    """pair() over TCP (a socketpair sends no reset): the started transport, the client."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = socket.create_connection(lsock.getsockname(), timeout=5)
    server, _ = lsock.accept()
    lsock.close()
    server.setblocking(False)
    transport = fastio.SocketTransport(asyncio.get_running_loop(), server, protocol)
    transport.start()
    return transport, client


def read_to_end(sock: socket.socket) -> bytes | str:
    """What the peer sent up to its end-of-stream, or the name of the error that came instead."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError as exc:
        return type(exc).__name__
    return got


async def answer_with_the_request_unread(linger: bool) -> tuple[socket.socket, bytes | str]:
    """The client sends a request the server never reads; the server answers and closes (with
    linger_on_close or without): the client and what it reads to the end."""
    proto = Collect()
    transport, client = tcp_pair(proto)
    transport.pause_reading()
    client.sendall(b"x" * 10000)              # on loopback: in the server's socket on return
    transport.write(b"answer")
    if linger:
        transport.linger_on_close()
    transport.close()
    assert await asyncio.wait_for(proto.lost, 5) is None
    assert proto.calls == ["made", "lost"]    # nothing changes for the protocol
    return client, await asyncio.get_running_loop().run_in_executor(None, read_to_end, client)


@aio
async def test_a_lingering_close_lets_a_client_still_sending_read_the_answer_and_the_end():
    # closed at once with the request unread, the socket resets: ECONNRESET after the answer
    client, got = await answer_with_the_request_unread(linger=False)
    assert got == "ConnectionResetError"
    client.close()
    # lingering: the answer, then the end-of-stream; what the client sends meanwhile is dropped
    client, got = await answer_with_the_request_unread(linger=True)
    assert got == b"answer"
    assert fastio.lingering_closes() == 1
    client.sendall(b"more")
    await asyncio.sleep(0.05)
    client.sendall(b"more")                   # no reset came back
    client.close()                            # its end-of-stream ends the linger
    await eventually(lambda: fastio.lingering_closes() == 0)


@aio
async def test_a_lingering_close_ends_at_its_deadline_or_byte_cap(monkeypatch):
    monkeypatch.setattr(fastio, "LINGER_TIMEOUT", 0.2)
    started = asyncio.get_running_loop().time()
    client, got = await answer_with_the_request_unread(linger=True)
    assert got == b"answer"
    await eventually(lambda: fastio.lingering_closes() == 0, 2.0)   # the client never closes
    assert asyncio.get_running_loop().time() - started >= 0.2 - 0.01
    client.close()
    # a client sending more than LINGER_MAX_BYTES: closed once that much is dropped
    monkeypatch.setattr(fastio, "LINGER_TIMEOUT", 60.0)
    monkeypatch.setattr(fastio, "LINGER_MAX_BYTES", 20000)
    client, got = await answer_with_the_request_unread(linger=True)   # 10,000 of them
    assert fastio.lingering_closes() == 1
    client.sendall(b"y" * 5000)
    await asyncio.sleep(0.05)
    assert fastio.lingering_closes() == 1
    client.sendall(b"y" * 5001)
    await eventually(lambda: fastio.lingering_closes() == 0, 2.0)
    client.close()


@aio
async def test_lingering_closes_are_capped_and_abort_never_lingers(monkeypatch):
    monkeypatch.setattr(fastio, "MAX_LINGERING", 1)
    first, got = await answer_with_the_request_unread(linger=True)
    assert got == b"answer" and fastio.lingering_closes() == 1
    second, got = await answer_with_the_request_unread(linger=True)   # past the cap: plain
    assert got == "ConnectionResetError" and fastio.lingering_closes() == 1
    first.close()
    second.close()
    await eventually(lambda: fastio.lingering_closes() == 0)
    proto = Collect()
    transport, client = tcp_pair(proto)
    transport.linger_on_close()
    transport.abort()                           # abort is abort: closed now
    assert await asyncio.wait_for(proto.lost, 5) is None
    assert fastio.lingering_closes() == 0
    client.close()


# --- the listener ----------------------------------------------------------------------------
@aio
async def test_listener_sets_nodelay_and_peername_and_stops_on_close():
    protos: list[Collect] = []
    listener, addr = listen(protos)
    _r, w = await asyncio.open_connection(*addr)
    await eventually(lambda: protos)
    t = protos[0].transport
    assert t.get_extra_info("peername") == w.get_extra_info("sockname")
    assert t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    listener.close()
    assert listener.sockets == []
    with pytest.raises(OSError):
        await asyncio.open_connection(*addr)
    w.close()
    t.abort()


@pytest.mark.parametrize("batch", [None, 50], ids=["default", "bounded"])
@aio
async def test_a_burst_of_connections_is_taken_in_one_wake_up_up_to_the_batch(monkeypatch, batch):
    if batch is not None:
        monkeypatch.setattr(fastio, "ACCEPT_BATCH", batch)
    burst = 300
    assert fastio.ACCEPT_BATCH >= burst or batch is not None
    protos: list[Collect] = []
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    listener = fastio.Listener(asyncio.get_running_loop(), lsock,
                               lambda: protos.append(Collect()) or protos[-1], 1024)
    # Blocking connects, the loop not running: all of them wait in the listen queue at once.
    clients = [socket.create_connection(lsock.getsockname(), timeout=5) for _ in range(burst)]
    try:
        listener._accept_ready()           # one wake-up of the listener
        assert len(protos) == (batch or burst)
        if batch is not None:              # the rest are left for the next wake-ups
            await eventually(lambda: len(protos) == burst)
    finally:
        listener.close()
        for c in clients:
            c.close()
        for p in protos:
            p.transport.abort()


class _FlakyListenSocket:
    """A listening socket whose accept() fails as told first, then works."""

    def __init__(self, sock: socket.socket, failures: list[OSError]):
        self._sock = sock
        self.failures = failures

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def accept(self):
        if self.failures:
            raise self.failures.pop(0)
        return self._sock.accept()


@aio
async def test_out_of_descriptors_stops_accepting_for_a_while_then_resumes(monkeypatch):
    monkeypatch.setattr(fastio, "ACCEPT_RETRY_DELAY", 0.1)
    loop = asyncio.get_running_loop()
    protos: list[Collect] = []
    listener, addr = listen(protos, failures=[OSError(errno.EMFILE, "Too many open files")])
    started = loop.time()
    _r, w = await asyncio.open_connection(*addr)
    await eventually(lambda: protos, timeout=3)
    assert loop.time() - started >= 0.09           # waited, did not spin on the error
    listener.close()
    w.close()
    protos[0].transport.abort()


@aio
async def test_a_factory_that_fails_closes_that_connection_only(caplog):
    protos: list[Collect] = []
    fail = [True]

    def factory():
        if fail.pop() if fail else False:
            raise RuntimeError("factory bug")
        protos.append(Collect())
        return protos[-1]

    listener, addr = listen(protos, factory=factory)
    with caplog.at_level(logging.ERROR, "gateway.io"):
        r1, w1 = await asyncio.open_connection(*addr)
        assert await asyncio.wait_for(r1.read(), 5) == b""      # closed
    _r2, w2 = await asyncio.open_connection(*addr)
    await eventually(lambda: protos)
    assert any("accepted connection" in r.getMessage() for r in caplog.records)
    listener.close()
    for w in (w1, w2):
        w.close()
    protos[0].transport.abort()


# --- the gateway's use -----------------------------------------------------------------------
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
        assert all(type(c.transport) is fastio.SocketTransport for c in st.gw.connections)
        assert all(type(c.transport) is fastio.SocketTransport for c in st.gw.pool._all)
    ids = set()
    for r in resps:
        assert r.status == 200 and r.complete
        events = [e for e in r.body.split(b"\n\n") if e.startswith(b"data: ")]
        assert len(events) == 14 and events[-1] == b"data: [DONE]"
        stream_ids = {json.loads(e[6:])["id"] for e in events[:-1]}
        assert len(stream_ids) == 1
        ids |= stream_ids
    assert len(ids) == 16


@aio
async def test_a_unix_connect_is_made_at_once_without_a_task(tmp_path):
    path = str(tmp_path / "l.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    loop = asyncio.get_running_loop()
    pool = upstream.UpstreamPool("127.0.0.1", 1, 2.0, unix_path=path, max_connecting=1)
    conn = pool.connect_now(loop)                 # no await
    assert conn is not None and not conn.reused and pool.open_count == 1
    assert type(conn.transport) is fastio.SocketTransport
    pool._connecting = 1                          # a connect in flight: wait for a place
    assert pool.connect_now(loop) is None
    pool._connecting = 0
    assert upstream.UpstreamPool("127.0.0.1", 1, 2.0).connect_now(loop) is None   # TCP
    missing = upstream.UpstreamPool("127.0.0.1", 1, 2.0, unix_path=str(tmp_path / "none"))
    assert missing.connect_now(loop) is None and missing.open_count == 0
    pool.close()
    lsock.close()


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@aio
async def test_a_fresh_connection_closed_unanswered_is_502_not_retried(tmp_path, unix):
    # Over the Unix socket the callback path connects at once (connect_now), over TCP the task
    # connects: either way a new connection that dies without a byte is not "stale", so it is
    # not retried (only a reused pooled connection is).
    async with Stack(tmp_path, backend_unix=unix) as s:
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", chat(drop_before_head=True)))
        assert r.status == 502 and r.error()["code"] == "upstream_closed"
        assert s.fake.connections_opened == 1
        r = await (await s.client()).request(post("/v1/chat/completions", chat()))
        assert r.status == 200 and s.fake.connections_opened == 2
