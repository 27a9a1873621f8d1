"""llama-server on a Unix socket (BACKEND_SOCKET, entrypoint.sh's default): requests, the Host
header, connect failures (502), a full listen backlog retried until accepted or until the connect
deadline (504), and the setting's checks. Streaming, pooling, backpressure and client aborts over
a Unix socket are covered by the transport-parametrized tests in test_gateway_proxy.py."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from helpers import Stack, aio, chat, get, post
from llamagw import config
from llamagw.net import upstream

# Connects that may queue before a Unix listener's backlog is full: listen(0) takes one or two.
MAX_FILLERS = 64


def full_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A Unix listener that accepts nothing, its backlog filled: the next connect gets EAGAIN."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(0)
    fillers = []
    for _ in range(MAX_FILLERS):
        f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        f.setblocking(False)
        try:
            f.connect(path)
        except BlockingIOError:
            f.close()
            return lsock, fillers
        fillers.append(f)
    raise AssertionError("the backlog never filled")


@aio
async def test_requests_reach_llama_server_over_the_socket(tmp_path):
    async with Stack(tmp_path, backend_unix=True) as s:
        assert s.fake.port == 0      # nothing on TCP: the socket is the only way in
        assert s.gw.pool.address == "unix:" + s.env["BACKEND_SOCKET"]
        c = await s.client()
        r = await c.request(post("/v1/chat/completions", chat()))
        assert r.status == 200 and b"choices" in r.body
        assert s.fake.requests[-1].header("host") == "localhost"
        assert (await c.request(get("/v1/models"))).status == 200
        assert s.fake.connections_opened == 1     # kept alive and reused


@aio
async def test_missing_socket_file_is_502(tmp_path):
    env = {"BACKEND_SOCKET": str(tmp_path / "absent.sock")}
    async with Stack(tmp_path, env, start_fake=False, backend_port=1) as s:
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 502 and r.error()["code"] == "upstream_unavailable"


@aio
async def test_socket_file_nobody_listens_on_is_502(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)          # a file left by a killed llama-server: connect is refused
    stale.close()
    async with Stack(tmp_path, {"BACKEND_SOCKET": path}, start_fake=False, backend_port=1) as s:
        started = time.monotonic()
        r = await s.one(post("/v1/chat/completions", chat()))
        assert r.status == 502 and r.error()["code"] == "upstream_unavailable"
        assert time.monotonic() - started < 0.5        # refused at once, not retried


@aio
async def test_full_backlog_is_retried_until_accepted(tmp_path):
    path = str(tmp_path / "busy.sock")
    lsock, fillers = full_listener(path)
    pool = upstream.UpstreamPool("127.0.0.1", 1, 2.0, unix_path=path)
    try:
        task = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.15)
        assert not task.done()          # EAGAIN: waiting, not failed
        assert pool.connecting == 1
        lsock.setblocking(False)
        accepted = []
        started = time.monotonic()
        while not task.done():          # the server catches up: the retry gets in
            try:
                accepted.append(lsock.accept()[0])
            except BlockingIOError:
                pass
            await asyncio.sleep(0.002)
            assert time.monotonic() - started < 1.0
        conn = task.result()
        assert isinstance(conn, upstream.UpstreamConnection) and not conn.closed
        assert pool.connecting == 0 and pool.open_count == 1
        pool.close()
        for a in accepted:
            a.close()
    finally:
        for f in fillers:
            f.close()
        lsock.close()


@aio
async def test_full_backlog_past_the_connect_deadline_is_504(tmp_path):
    path = str(tmp_path / "wedged.sock")
    lsock, fillers = full_listener(path)
    try:
        env = {"BACKEND_SOCKET": path, "BACKEND_CONNECT_TIMEOUT": "0.3"}
        async with Stack(tmp_path, env, start_fake=False, backend_port=1) as s:
            started = time.monotonic()
            r = await s.one(post("/v1/chat/completions", chat()))
            assert r.status == 504 and r.error()["code"] == "upstream_connect_timeout"
            assert 0.25 <= time.monotonic() - started < 1.0
            assert s.gw.pool.connecting == 0
    finally:
        for f in fillers:
            f.close()
        lsock.close()


def test_backend_socket_setting():
    assert config.load_config({}).backend_socket == ""          # TCP unless set
    assert config.load_config({"BACKEND_SOCKET": " /run/l.sock "}).backend_socket == "/run/l.sock"
    longest = "/" + "a" * (config.UNIX_PATH_MAX - 1)
    assert config.load_config({"BACKEND_SOCKET": longest}).backend_socket == longest
    for bad in ("relative.sock", "./l.sock", longest + "a"):
        with pytest.raises(config.ConfigError) as err:
            config.load_config({"BACKEND_SOCKET": bad})
        assert err.value.var == "BACKEND_SOCKET"
    assert len(os.fsencode(longest)) == 107
