"""Sans-IO HTTP/1.1: parse requests and responses from bytes, serialize heads and chunks.

No sockets, no asyncio, nothing here ever waits. A parser takes bytes through feed() and hands
back events through next_event(): a head (Request / Response), Data pieces of the body (already
de-chunked), END_OF_MESSAGE, or NEED_DATA when it cannot go on without more bytes. Violations
raise errors.ProtocolError carrying the status to answer (400, 413, 414, 431, 501, 505); the
error is sticky, the parser stays broken and the connection is to be closed.

Design (after python-hyper/h11 `_readers.py`): heads are found with bytearray.find(b"\\r\\n\\r\\n")
and split, never walked byte by byte; the body is cut from the buffer in slices. Bytes past the
end of one message stay buffered for the next (pipelining). The caller feeds what it read and
drains next_event() after every feed, so the buffer holds at most one read plus one bounded head.

Strictness: request smuggling lives in lenient parsers, so anything RFC 9112 lets a server reject
is rejected: bare CR/LF, obs-fold, whitespace before a colon, duplicate Host / Content-Length,
Content-Length with Transfer-Encoding, codings other than "chunked", characters outside RFC 3986
in the request-target. What the RFCs require a server to accept is accepted: the absolute-form
of the request-target (RFC 9112 3.2.2), HTTP/1.x of a higher minor version as HTTP/1.1 (RFC 9110
2.5), empty elements in a list field (RFC 9110 5.6.1), leading zeros in lengths.

The public face of the HTTP/1.1 layer: the names below are what the rest of the package uses
(`from llamagw.wire import http11`, then http11.RequestParser, http11.NEED_DATA, ...). The code
lives in: wire/grammar.py (limits, RFC grammar, field-section parsing), wire/events.py (the event
objects), wire/framing.py (buffer, body framing, the state machine), wire/request.py
(RequestParser), wire/response.py (ResponseParser); the serializers (status/request line,
fields, chunks) are here.
"""

from __future__ import annotations

from llamagw.errors import REASONS, ProtocolError
from llamagw.wire.events import (
    END_OF_MESSAGE, NEED_DATA, Data, EndOfMessage, Request, Response,
)
from llamagw.wire.grammar import (
    _TARGET_RE, _TOKEN_RE, HEAD_MEMO_MAX_CHARS, KNOWN_METHODS, MAX_CHUNK_LINE, MAX_HEADER_BYTES,
    MAX_HEADERS, MAX_INTERIM_RESPONSES, MAX_TARGET_LENGTH, MAX_TRAILER_BYTES,
)
from llamagw.wire.request import RequestParser
from llamagw.wire.response import ResponseParser

__all__ = [
    "NEED_DATA", "END_OF_MESSAGE", "Request", "Response", "Data", "EndOfMessage",
    "RequestParser", "ResponseParser", "ProtocolError", "response_head", "request_head", "chunk",
    "LAST_CHUNK", "CONTINUE_100", "KNOWN_METHODS",
    "MAX_TARGET_LENGTH", "MAX_HEADER_BYTES", "MAX_HEADERS", "MAX_CHUNK_LINE", "MAX_TRAILER_BYTES",
    "MAX_INTERIM_RESPONSES", "HEAD_MEMO_MAX_CHARS",
]


# --- serializers (hot path) -----------------------------------------------------------------
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_STATUS_LINES: dict[int, str] = {s: f"HTTP/1.1 {s} {r}\r\n" for s, r in REASONS.items()}
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 1024   # memo of validated header names; real traffic uses a few dozen


def _fields(headers: list[tuple[str, str]]) -> str:
    if not headers:
        return ""
    text = "\r\n".join(map(": ".join, headers)) + "\r\n"
    # Each field adds exactly one CR and one LF: any other CR, LF or NUL is response splitting.
    k = len(headers)
    if text.count("\r") != k or text.count("\n") != k or "\x00" in text:
        raise ValueError("CR, LF or NUL in a header name or value")
    for name, _ in headers:
        if name not in _GOOD_NAMES:
            if not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
                _GOOD_NAMES.add(name)
    return text


def response_head(status: int, headers: list[tuple[str, str]], version: bytes = b"HTTP/1.1"
                  ) -> bytes:
    """Status line + fields + CRLF. Raises ValueError on CR/LF/NUL (or non-latin-1) in fields."""
    line = _STATUS_LINES.get(status) if version == b"HTTP/1.1" else None
    if line is None:
        if not (isinstance(status, int) and 100 <= status <= 999):
            raise ValueError(f"invalid status code {status!r}")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise ValueError(f"invalid HTTP version {version!r}")
        line = f"{version.decode()} {status} {REASONS.get(status, 'Unknown')}\r\n"
    return (line + _fields(headers) + "\r\n").encode("latin-1")


_REQUEST_LINES: dict[tuple[str, str], str] = {}
_REQUEST_LINES_MAX = 256   # memo of validated request lines; the route table has a few dozen


def request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """Request line (HTTP/1.1) + fields + CRLF. Raises ValueError on anything malformed."""
    line = _REQUEST_LINES.get((method, target))
    if line is None:
        if not _TOKEN_RE.fullmatch(method):
            raise ValueError(f"invalid method {method!r}")
        if not _TARGET_RE.fullmatch(target):
            raise ValueError("invalid request target")
        line = f"{method} {target} HTTP/1.1\r\n"
        if len(_REQUEST_LINES) < _REQUEST_LINES_MAX:
            _REQUEST_LINES[(method, target)] = line
    return (line + _fields(headers) + "\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data gives b"" (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)
