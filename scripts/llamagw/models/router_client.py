"""A small HTTP/1.1 client for llama-server's router: its own routes and its /models/sse stream.

RouterClient.request(method, path, body) -> (status, body): one connection per request
(Connection: close) over the Unix socket or loopback TCP, bounded in time (CONNECT_TIMEOUT,
REQUEST_TIMEOUT) and size (MAX_HEAD_BYTES, catalog.MAX_MODELS_BODY). RouterClient.events(path)
-> SSEStream: its head read within REQUEST_TIMEOUT, then each event's `data:` JSON as it arrives
(not bounded in time: the router's SSE is silent while nothing changes; each event bounded by
MAX_EVENT_BYTES). Every GET carries autoload=false (no_autoload): no probe ever loads a model
(ROUTER-MODE.md §5). Every failure is a RouterError. RouterHTTP / EventStream say what the
controller needs (tests inject a fake); error_message() reads the router's error bodies.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Protocol

from llamagw.models.catalog import MAX_MODELS_BODY

# Connect to the router: a Unix connect completes or fails at once; loopback TCP within ms.
CONNECT_TIMEOUT = 5.0
# A router-native route (/models, /models/load, /models/unload) answers in ms: a load returns
# once the child is spawned (after an LRU victim exited: 0.06 s seen). 10 s means it hangs.
REQUEST_TIMEOUT = 10.0
# Response head from the router: ~200 bytes; 64 KiB is the gateway's own request-head bound.
MAX_HEAD_BYTES = 64 * 1024
# One SSE event: a `loaded` event carries the child's /v1/models entry (~1 KB).
MAX_EVENT_BYTES = 1 << 20


class RouterError(Exception):
    """The router did not answer as HTTP should (connection, framing, size, timeout)."""



class RouterHTTP(Protocol):
    """What the controller needs from HTTP (tests inject a fake)."""

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]: ...

    async def events(self, path: str) -> EventStream:
        """Connected to an SSE stream (its 200 head read), or RouterError."""


class EventStream(Protocol):
    def __aiter__(self) -> AsyncIterator[dict]: ...   # each event's `data:` JSON
    async def aclose(self) -> None: ...


def no_autoload(path: str) -> str:
    """A GET path with autoload=false: llama-server loads a model for any GET naming one
    (`?model=`) unless told not to (ROUTER-MODE.md §5)."""
    if "autoload=" in path:
        return path
    return path + ("&" if "?" in path else "?") + "autoload=false"


class RouterClient:
    """A tiny HTTP/1.1 client for the router's own routes: one connection per request
    (`Connection: close`), over the Unix socket (or loopback TCP)."""

    def __init__(self, unix_path: str = "", host: str = "127.0.0.1", port: int = 0, *,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT):
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout

    async def _open(self):
        async with asyncio.timeout(self.connect_timeout):
            if self.unix_path:
                return await asyncio.open_unix_connection(self.unix_path, limit=MAX_HEAD_BYTES)
            return await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES)

    def _head(self, method: str, path: str, body: bytes | None, accept: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close",
                 f"Accept: {accept}"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    async def request(self, method: str, path: str, body: bytes | None = None
                      ) -> tuple[int, bytes]:
        if method == "GET":
            path = no_autoload(path)
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await self._open()
                try:
                    writer.write(self._head(method, path, body, "application/json"))
                    await writer.drain()
                    status, headers = await _read_head(reader)
                    data = await _read_body(reader, headers, MAX_MODELS_BODY)
                    return status, data
                finally:
                    writer.transport.abort()
        except TimeoutError:
            raise RouterError(f"{method} {path}: no answer within {self.request_timeout} s")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            raise RouterError(f"{method} {path}: {exc.__class__.__name__}: {exc}") from None

    async def events(self, path: str) -> SSEStream:
        """Connect to an SSE stream and read its head (bounded by request_timeout); the
        stream itself is not bounded in time: the router's SSE is silent while nothing
        changes. RouterError unless the answer is 200."""
        path = no_autoload(path)
        writer = None
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await self._open()
                writer.write(self._head("GET", path, None, "text/event-stream"))
                await writer.drain()
                status, headers = await _read_head(reader)
        except BaseException as exc:
            if writer is not None:
                writer.transport.abort()
            if isinstance(exc, TimeoutError):
                raise RouterError(f"GET {path}: no answer within {self.request_timeout} s")
            if isinstance(exc, (OSError, asyncio.IncompleteReadError,
                                asyncio.LimitOverrunError, ValueError)):
                raise RouterError(f"GET {path}: {exc.__class__.__name__}: {exc}") from None
            raise
        if status != 200:
            writer.transport.abort()
            raise RouterError(f"GET {path}: status {status}")
        return SSEStream(path, reader, writer, headers)


class SSEStream:
    """An open SSE response: iterate for each event's data (parsed JSON); aclose() drops it."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer, headers: dict):
        self.path = path
        self._reader = reader
        self._writer = writer
        self._headers = headers

    async def __aiter__(self):
        buf = b""
        try:
            async for piece in _body_pieces(self._reader, self._headers):
                buf = (buf + piece).replace(b"\r\n", b"\n")
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    event = _sse_data(block)
                    if event is not None:
                        yield event
                if len(buf) > MAX_EVENT_BYTES:
                    raise RouterError(f"GET {self.path}: an SSE event over {MAX_EVENT_BYTES} "
                                      f"bytes")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as exc:
            raise RouterError(f"GET {self.path}: {exc.__class__.__name__}: {exc}") from None
        finally:
            self._writer.transport.abort()

    async def aclose(self) -> None:
        self._writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body as it arrives: chunked, Content-Length or up to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)
            if size > MAX_MODELS_BODY:
                raise ValueError(f"chunk of {size} bytes")
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        left = int(headers["content-length"])
        if left > MAX_MODELS_BODY:
            raise ValueError(f"body of {left} bytes")
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def _read_body(reader, headers, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for piece in _body_pieces(reader, headers):
        size += len(piece)
        if size > limit:
            raise ValueError(f"body larger than {limit} bytes")
        parts.append(piece)
    return b"".join(parts)


def _sse_data(block: bytes) -> dict | None:
    data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None
    try:
        event = json.loads(b"\n".join(data))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:200]
        if isinstance(err, str):
            return err[:200]
    except ValueError:
        pass
    return body[:200].decode("utf-8", "replace")
