"""The events the HTTP/1.1 parsers hand back (sans-IO, plain objects).

next_event() returns a head (Request on the server side, Response on the client side), then Data
pieces of the body (already de-chunked), then END_OF_MESSAGE; NEED_DATA when nothing more can be
done without more bytes. Heads are immutable by contract (never mutated once returned: the
parsers share identical heads through their memos); header names are lower-case, get() takes a
lower-case name. Events are compared by identity (`is NEED_DATA`) or exact type (`type(event) is
Data`) on the hot path. Public names are re-exported by wire/http11.py.
"""

from __future__ import annotations


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")


class _Headers:
    __slots__ = ()
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        """First value of a header; `name` must be lower-case."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


class Request(_Headers):
    __slots__ = ("method", "target", "path", "query", "version", "headers", "content_length",
                 "chunked", "keep_alive", "expect_continue", "host", "connection_tokens")

    def __init__(self, method, target, version, headers, content_length, chunked, keep_alive,
                 expect_continue, host, connection_tokens):
        self.method: str = method
        self.target: str = target
        path, sep, query = target.partition("?")
        self.path: str = path
        self.query: str = query
        self.version: tuple[int, int] = version
        self.headers: list[tuple[str, str]] = headers
        self.content_length: int | None = content_length
        self.chunked: bool = chunked
        self.keep_alive: bool = keep_alive
        self.expect_continue: bool = expect_continue
        self.host: str | None = host
        self.connection_tokens: frozenset[str] = connection_tokens

    def __repr__(self) -> str:
        return (f"Request({self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]},"
                f" {len(self.headers)} headers)")


class Response(_Headers):
    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked",
                 "keep_alive", "has_body", "connection_tokens")

    def __init__(self, status, reason, version, headers, content_length, chunked, keep_alive,
                 has_body, connection_tokens):
        self.status: int = status
        self.reason: str = reason
        self.version: tuple[int, int] = version
        self.headers: list[tuple[str, str]] = headers
        self.content_length: int | None = content_length   # as declared (also for HEAD/204/304)
        self.chunked: bool = chunked                          # body framed as chunked
        self.keep_alive: bool = keep_alive
        self.has_body: bool = has_body                        # False for HEAD, 1xx, 204, 304
        self.connection_tokens: frozenset[str] = connection_tokens

    def __repr__(self) -> str:
        return f"Response({self.status} {self.reason!r}, {len(self.headers)} headers)"


class Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self) -> str:
        return f"Data({len(self.data)} bytes)"


class EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = EndOfMessage()
