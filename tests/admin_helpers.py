"""Helpers of the admin API's loopback tests (tests/test_admin_*.py): a Stack whose key file also
holds an admin key, sign-in, and requests that carry a session cookie."""

from __future__ import annotations

import asyncio
import json

from helpers import ALICE, KEY_FILE, IO_TIMEOUT, Stack, get, post, write_key_file

OPS = "sk-ops-0123456789abcdef00000"          # role=admin
OPS2 = "sk-ops2-0123456789abcdef0000"         # role=admin, a second operator
ADMIN_KEY_FILE = KEY_FILE + f"ops:{OPS} role=admin\nops2:{OPS2} role=admin\n"
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy",
                    "x-frame-options")


class Session:
    """A signed-in dashboard: its cookie and CSRF token."""

    def __init__(self, cookie: str, csrf: str, key_id: str):
        self.cookie = cookie
        self.csrf = csrf
        self.key_id = key_id

    def headers(self, csrf: bool = True, extra: bytes = b"") -> bytes:
        out = f"Cookie: {self.cookie}\r\n".encode()
        if csrf:
            out += f"X-CSRF-Token: {self.csrf}\r\n".encode()
        return out + extra


async def admin_stack(s: Stack, text: str = ADMIN_KEY_FILE) -> Stack:
    """Give the running stack a key file with admin keys (reloaded at once)."""
    write_key_file(s.config.auth_keys_file, text)
    s.gw.reload_keys()
    return s


async def sign_in(s: Stack, key: str = OPS, extra: bytes = b"") -> Session:
    r = await s.one(post("/admin/session", {"key": key}, key=None, extra=extra))
    assert r.status == 200, r
    cookie = r.get("set-cookie").split(";")[0]
    body = r.json()
    return Session(cookie, body["csrf"], body["key_id"])


def sget(path: str, session: Session | None, **kw) -> bytes:
    """GET with a session cookie (no key)."""
    return get(path, key=None, extra=session.headers(csrf=False) if session else b"", **kw)


def spost(path: str, body: dict, session: Session | None, *, csrf: bool = True,
          extra: bytes = b"") -> bytes:
    """POST with a session cookie (and its CSRF token), no key."""
    head = session.headers(csrf=csrf, extra=extra) if session else extra
    return post(path, body, key=None, extra=head)


class SSE:
    """A live stream read event by event (chunked framing undone)."""

    def __init__(self, client):
        self.client = client
        self.buffer = b""
        self.status = 0
        self.headers: list = []

    @classmethod
    async def open(cls, s: Stack, session: Session | None = None, key: str | None = None,
                   extra: bytes = b"") -> SSE:
        c = await s.client()
        head = session.headers(csrf=False) if session else b""
        await c.send(get("/admin/live", key=key, extra=head + extra))
        sse = cls(c)
        sse.status, sse.headers, _ = await c.head()
        return sse

    async def _chunk(self, timeout: float) -> bool:
        reader = self.client.reader
        size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return False
        data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
        self.buffer += data[:-2]
        return True

    async def event(self, timeout: float = IO_TIMEOUT) -> tuple[str, object]:
        """The next event (type, data), skipping comments and retry lines; ("", None) at the
        end of the stream."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                kind, data = "", None
                for line in block.decode().split("\n"):
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                if kind:
                    return kind, data
            if not await self._chunk(max(0.01, deadline - loop.time())):
                return "", None

    async def until(self, kind: str, predicate=lambda d: True, timeout: float = IO_TIMEOUT):
        """The data of the next `kind` event that satisfies predicate (others are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got, data = await self.event(max(0.01, deadline - loop.time()))
            if got == "":
                raise AssertionError(f"the stream ended before a {kind} event")
            if got == kind and predicate(data):
                return data


__all__ = ["ALICE", "OPS", "OPS2", "SSE", "Session", "admin_stack", "sget", "sign_in", "spost"]
