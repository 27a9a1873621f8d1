"""Shared helpers for the gateway loopback tests: a fake llama-server and a Gateway in one event
loop, and a raw HTTP/1.1 client over asyncio sockets that sees the bytes exactly as sent.

Tests are plain sync functions wrapping a coroutine with `aio` (pytest-asyncio is not used):

    @aio
    async def test_x(tmp_path):
        async with Stack(tmp_path) as s:
            c = await s.client()
            r = await c.request(b"GET /ping HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")

Every wait has a deadline: IO_TIMEOUT per read, TEST_TIMEOUT per test.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import time

from llamagw.wire.events import _Headers

# Per read / connect deadline in the raw client; the gateway timeouts below are shorter.
IO_TIMEOUT = 3.0
# Whole-test deadline (a hang fails the test instead of the suite).
TEST_TIMEOUT = 15.0

# Secrets of the test key file (>= 16 chars, keys.MIN_SECRET_LEN).
ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"
CAROL = "sk-carol-0123456789abcdef"
KEY_FILE = (f"alice:{ALICE}\n"
            f"bob:{BOB} rpm=3\n"
            f"carol:{CAROL} concurrency=1\n")

# Gateway deadlines for tests: short, so each rule is proven in well under a second.
FAST_ENV = {
    "CLIENT_HEADER_TIMEOUT": "0.5",
    "KEEPALIVE_TIMEOUT": "0.5",
    "CLIENT_BODY_TIMEOUT": "1.0",
    "CLIENT_BODY_IDLE_TIMEOUT": "0.4",
    "CLIENT_WRITE_TIMEOUT": "0.5",
    "REQUEST_TIMEOUT": "1.0",
    "STREAM_IDLE_TIMEOUT": "1.0",
    "BACKEND_CONNECT_TIMEOUT": "0.5",
    "QUEUE_TIMEOUT": "0.5",
    "GRACEFUL_TIMEOUT": "1.0",
    "MAX_REQUEST_BODY_SIZE": "100000",
}


def aio(fn):
    """Run an async test function with asyncio.run under TEST_TIMEOUT."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def main():
            return await asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT)
        return asyncio.run(main())
    return wrapper


def auth(secret: str = ALICE) -> bytes:
    return b"Authorization: Bearer " + secret.encode() + b"\r\n"


def post(path: str, body: dict | bytes, *, key: str | None = ALICE, extra: bytes = b"",
         version: bytes = b"HTTP/1.1") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"POST " + path.encode() + b" " + version + b"\r\nHost: gw\r\n"
            + (auth(key) if key else b"") + b"Content-Type: application/json\r\n"
            + b"Content-Length: %d\r\n" % len(data) + extra + b"\r\n" + data)


def get(path: str, *, key: str | None = ALICE, extra: bytes = b"", method: bytes = b"GET",
        version: bytes = b"HTTP/1.1") -> bytes:
    return (method + b" " + path.encode() + b" " + version + b"\r\nHost: gw\r\n"
            + (auth(key) if key else b"") + extra + b"\r\n")


def chat(**fake) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}
    if fake.pop("stream", False):
        body["stream"] = True
    if fake:
        body["fake"] = fake
    return body


class Resp(_Headers):
    """A response as the raw client read it; get() / get_all() as on the parser's messages."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, raw: bytes,
                 complete: bool, interim: list[int]):
        self.status = status
        self.headers = headers
        self.body = body
        self.raw = raw            # head + body bytes exactly as received
        self.complete = complete  # framing ended properly (CL reached / chunked terminator)
        self.interim = interim    # 1xx statuses seen before this response

    def json(self):
        return json.loads(self.body)

    def error(self) -> dict:
        """The OpenAI error envelope, checked for shape."""
        data = self.json()
        assert set(data) == {"error"}, data
        assert set(data["error"]) == {"message", "type", "code"}, data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
        return data["error"]

    def __repr__(self) -> str:
        return f"Resp({self.status}, {self.headers}, {self.body[:200]!r})"


class RawClient:
    """One TCP connection to the gateway; reads responses with exact HTTP/1.1 framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> "RawClient":
        if rcvbuf is None:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), IO_TIMEOUT)
            return cls(r, w)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)),
                               IO_TIMEOUT)
        r, w = await asyncio.open_connection(sock=sock, limit=rcvbuf)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), IO_TIMEOUT)

    async def line(self, timeout: float = IO_TIMEOUT) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        return data

    async def exactly(self, n: int, timeout: float = IO_TIMEOUT) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def head(self, timeout: float = IO_TIMEOUT) -> tuple[int, list, bytes]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = []
        for text in lines[1:]:
            if text:
                name, _, value = text.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        return status, headers, raw

    async def response(self, *, head_request: bool = False, timeout: float = IO_TIMEOUT) -> Resp:
        """Read one full response (skipping 1xx) within `timeout`."""
        return await asyncio.wait_for(self._response(head_request), timeout)

    async def _response(self, head_request: bool) -> Resp:
        interim = []
        while True:
            status, headers, raw = await self.head()
            if 100 <= status < 200:
                interim.append(status)
                continue
            break
        resp = Resp(status, headers, b"", raw, True, interim)
        te = resp.get("transfer-encoding")
        cl = resp.get("content-length")
        if head_request or status in (204, 304):
            return resp
        if te is not None:
            assert te.lower() == "chunked", te
            body = bytearray()
            resp.complete = False
            while True:
                try:
                    size_line = await self.reader.readuntil(b"\r\n")
                except asyncio.IncompleteReadError as exc:
                    resp.raw += exc.partial
                    break
                resp.raw += size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    resp.raw += await self.reader.readuntil(b"\r\n")
                    resp.complete = True
                    break
                data = await self.reader.readexactly(size + 2)
                resp.raw += data
                body += data[:-2]
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = await self.reader.readexactly(int(cl))
            resp.raw += resp.body
        else:   # close-delimited
            resp.body = await self.reader.read()
            resp.raw += resp.body
        return resp

    async def request(self, data: bytes, **kw) -> Resp:
        await self.send(data)
        return await self.response(**kw)

    async def closed(self, timeout: float = IO_TIMEOUT) -> bool:
        """True if the peer closes (EOF or reset) within timeout with no more bytes; False on
        timeout. Extra bytes fail the assertion."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        assert data == b"", f"unexpected bytes before close: {data[:200]!r}"
        return True

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


def write_key_file(path: str, text: str = KEY_FILE) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class Stack:
    """FakeLlama + Gateway on 127.0.0.1 port 0 in the running loop."""

    def __init__(self, tmp_path, env: dict | None = None, *, fake_kw: dict | None = None,
                 with_keys: bool = True, access_log: bool = False, backend_port: int | None = None,
                 start_fake: bool = True, backend_unix: bool = False, usage: bool = False,
                 key_file: str = KEY_FILE):
        from llamagw import config as config_mod
        from fakes.fake_llama import FakeLlama
        self.tmp = str(tmp_path)
        fake_kw = dict(fake_kw or {})
        self.env = dict(FAST_ENV)
        self.env.update({"DATA_DIR": os.path.join(self.tmp, "data"),
                         "RUN_DIR": os.path.join(self.tmp, "run"),
                         "AUTH_KEYS_FILE": os.path.join(self.tmp, "keys.txt")})
        if backend_unix:   # as entrypoint.sh wires it: llama-server on a Unix socket only
            self.env["BACKEND_SOCKET"] = os.path.join(self.tmp, "llama-server.sock")
            fake_kw["host"] = self.env["BACKEND_SOCKET"]
        self.fake = FakeLlama(**fake_kw) if start_fake else None
        self.env.update(env or {})
        self.with_keys = with_keys
        self.want_access_log = access_log
        self.want_usage = usage          # the usage ledger, as amain wires it (issue 28)
        self.key_file = key_file
        self.ledger = None
        self.backend_port = backend_port
        self._config_mod = config_mod
        self.gw = None
        self.access = None
        self.store = None
        self.clients: list[RawClient] = []

    async def __aenter__(self) -> "Stack":
        from llamagw.observe import accesslog
        from llamagw import app as gateway
        from llamagw.limits import keys
        os.makedirs(self.env["RUN_DIR"], exist_ok=True)
        os.makedirs(self.env["DATA_DIR"], exist_ok=True)
        if self.fake is not None:
            await self.fake.start()
        port = self.backend_port if self.backend_port is not None else self.fake.port
        if port:   # 0: the fake listens on a Unix socket only (BACKEND_SOCKET)
            self.env.setdefault("PORT_BACKEND", str(port))
        self.config = self._config_mod.load_config(self.env)
        if self.with_keys:
            write_key_file(self.config.auth_keys_file, self.key_file)
            self.store = keys.KeyStore(self.config.auth_keys_file)
            self.store.load()
        if self.want_access_log:
            os.makedirs(self.config.logs_dir, exist_ok=True)
            self.access = accesslog.AccessLog(self.config.access_log_path, max_bytes=1 << 20,
                                              backups=1)
        if self.want_usage:
            from llamagw.observe import usage
            self.ledger = usage.Ledger(usage.usage_path(self.config.data_dir, "test"),
                                       journal_mode=self.config.usage_journal_mode)
        self.gw = gateway.Gateway(self.config, store=self.store, access_log=self.access,
                                  ledger=self.ledger)
        await self.gw.seed_token_budget()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await self.gw.start(sock)
        self.port = self.gw.port
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            c.abort()
        if self.gw is not None:
            await self.gw.shutdown(0.2)
        if self.fake is not None:
            await self.fake.stop()
        if self.access is not None:
            self.access.close()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)

    async def usage_rows(self) -> list[dict]:
        """Every row of this gateway's ledger file, oldest first (pending rows written first)."""
        import sqlite3
        assert await asyncio.to_thread(self.ledger.sync), "the ledger writer did not answer"
        def read():
            conn = sqlite3.connect(self.ledger.path)
            conn.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
            finally:
                conn.close()
        return await asyncio.to_thread(read)

    async def client(self, **kw) -> RawClient:
        c = await RawClient.connect(self.port, **kw)
        self.clients.append(c)
        return c

    async def one(self, data: bytes, **kw) -> Resp:
        """One request on a new connection."""
        c = await self.client()
        try:
            return await c.request(data, **kw)
        finally:
            c.abort()

    def access_records(self) -> list[dict]:
        self.access.close()
        with open(self.config.access_log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


async def eventually(predicate, timeout: float = 2.0, step: float = 0.01) -> None:
    """Poll predicate() in the running loop until true; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.2f s" % timeout)
        await asyncio.sleep(step)
