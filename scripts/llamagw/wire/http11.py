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
"""

from __future__ import annotations

import ipaddress
import re

from llamagw.errors import REASONS, ProtocolError

# --- limits: where each number comes from ---------------------------------------------------
# Request-target length; 8 KiB is the common server default (nginx/Apache request-line limits).
MAX_TARGET_LENGTH = 8192
# Whole head, request line and terminator included; 4x nginx's large_client_header_buffers
# (4 x 8k), so real clients with big cookies/tokens fit while a slow flood stays bounded.
MAX_HEADER_BYTES = 65536
# Header fields per head; CPython http.client._MAXHEADERS.
MAX_HEADERS = 100
# Chunk-size line (16 hex digits + extensions); real clients send no extensions at all, this only
# bounds how much an extension flood makes us buffer.
MAX_CHUNK_LINE = 4096
# Trailer section after the last chunk; trailers are rare and discarded, so keep them small.
MAX_TRAILER_BYTES = 16384
# Empty lines tolerated before a request line (RFC 9112 2.2 asks for "at least one").
MAX_LEADING_EMPTY_LINES = 4
# Content-Length digits (leading zeros not counted); 10**18 - 1 fits a signed 64-bit integer, far
# beyond any body limit: a longer value is a valid number too large to allow (413).
MAX_CONTENT_LENGTH_DIGITS = 18
# Chunk-size hex digits (leading zeros not counted); 16 hex digits are 64 bits.
MAX_CHUNK_SIZE_DIGITS = 16
# Longest method token looked at before its space arrives; the longest IANA-registered method
# (UPDATEREDIRECTREF) has 17 characters.
MAX_METHOD_LENGTH = 32
# 1xx interim responses skipped before the final one (llama-server sends at most 100 Continue).
MAX_INTERIM_RESPONSES = 16

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

__all__ = [
    "NEED_DATA", "END_OF_MESSAGE", "Request", "Response", "Data", "EndOfMessage",
    "RequestParser", "ResponseParser", "response_head", "request_head", "chunk",
    "LAST_CHUNK", "CONTINUE_100", "KNOWN_METHODS",
    "MAX_TARGET_LENGTH", "MAX_HEADER_BYTES", "MAX_HEADERS", "MAX_CHUNK_LINE", "MAX_TRAILER_BYTES",
]

# --- grammar (RFC 9110 5.6.2 token, 5.5 field-value; RFC 9112 3.2 Host, 7.1 chunks) -----------
_TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = f"[{_TCHAR}]+"
_VCHAR_OBS = r"\x21-\x7e\x80-\xff"
# name ":" OWS value OWS; value = field-vchars separated by SP/HTAB runs (linear, no ReDoS).
_FIELD = rf"({_TOKEN}):[ \t]*((?:[{_VCHAR_OBS}]+(?:[ \t]+[{_VCHAR_OBS}]+)*)?)[ \t]*"
_FIELD_RE = re.compile(_FIELD)
# Control characters a field line may not hold (HTAB may; CR and LF only as the line ends,
# which _take_block checked).
_CTL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Field names already checked as tokens -> their lower-case form; real traffic uses a few dozen,
# and once full, new names are still checked, just not remembered. Only short names are kept, so
# the memo stays small whatever clients send (a name may be as long as a whole head).
_NAMES: dict[str, str] = {}
_NAMES_MAX = 1024
_NAME_MEMO_LEN = 64
# Host header values already checked (a client sends the same one on every request); bounded in
# count and length like _NAMES.
_GOOD_HOSTS: set[str] = set()
_GOOD_HOSTS_MAX = 256
_HOST_MEMO_LEN = 255
# Parsed heads, reused for a byte-identical head. Parsing is a pure function of the head's text
# and the parser's limits, and Request/Response objects are never mutated, so a head seen before
# gives the same object. A keep-alive client sends the same head again and again (same key, route
# and body length), and llama-server answers with few distinct heads: ~5 us saved per head, ~10 %
# of the gateway's CPU per small request (bench case a). A request head is remembered per client
# connection (the last one only: one client's heads never meet another's); response heads come
# from llama-server (trusted, 127.0.0.1) and are shared, up to _RESPONSE_MEMO_MAX, then the memo
# starts over. Heads longer than HEAD_MEMO_MAX_CHARS are not kept (memory per idle connection).
HEAD_MEMO_MAX_CHARS = 2048
_RESPONSE_MEMO: dict[tuple[str, int, str], "Response"] = {}   # (method, max_headers, head)
_RESPONSE_MEMO_MAX = 64
_TOKEN_RE = re.compile(_TOKEN)
_TOKEN_B_RE = re.compile(_TOKEN.encode())
# The characters of a request-target (RFC 3986 via RFC 9112 3.2): unreserved, sub-delims, ":",
# "@", "/", "?" and "%" (then checked by _BAD_PCT_RE); no "#" (a fragment is never sent). "[" and
# "]" only in the host of an absolute-form target (_URI_CHARS_RE).
_TARGET_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]+")
_URI_CHARS_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]]+")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# absolute-form (RFC 9112 3.2.2): scheme "://" authority path-abempty [ "?" query ]
_ABSOLUTE_RE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?]*)([^?]*)(?:\?(.*))?", re.DOTALL)
_VERSION_RE = re.compile(r"HTTP/([0-9])(?:\.([0-9]))?")
_DIGITS_RE = re.compile(f"[0-9]{{1,{MAX_CONTENT_LENGTH_DIGITS}}}")
_ALL_DIGITS_RE = re.compile(r"[0-9]+")
# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2); an IPv6 literal is then checked
# by the ipaddress module.
_HOST_RE = re.compile(
    r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"   # reg-name / IPv4address
    r"|\[[0-9A-Fa-f:.]+\]"                                    # IPv6 literal
    r"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\])"    # IPvFuture
    r"(?::[0-9]*)?")
_STATUS_LINE_RE = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# One element of a Transfer-Encoding list (RFC 9112 7, RFC 9110 5.6.1), matched from where the
# previous one ended: OWS, then a transfer-coding (token, then ";" name=value parameters) or an
# empty element, OWS, then "," or the end.
_TCODING_RE = re.compile(
    rf"[ \t]*(?:({_TOKEN})((?:[ \t]*;[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|"
    + _QUOTED.decode("latin-1") + r"))*)[ \t]*)?(,|\Z)")
_CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]+)"
    + rb"(?:[ \t]*;[ \t]*" + _TOKEN.encode()
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN.encode() + rb"|" + _QUOTED + rb"))?)*")
# A chunk-size line exactly as chunk() writes one: lowercase hex, no leading zero, no extension
# (the last chunk, "0", is not one of these). take_chunks() passes such chunks through whole.
_CANONICAL_CHUNK_RE = re.compile(rb"([1-9a-f][0-9a-f]{0,%d})\r\n" % (MAX_CHUNK_SIZE_DIGITS - 1))
_VERSIONS = {"HTTP/1.1": (1, 1), "HTTP/1.0": (1, 0)}
_NO_TOKENS: frozenset[str] = frozenset()
_REQUEST_FRAMING_NAMES = frozenset({"host", "content-length", "transfer-encoding", "connection",
                                    "expect"})
_RESPONSE_FRAMING_NAMES = frozenset({"content-length", "transfer-encoding", "connection"})


# --- events ---------------------------------------------------------------------------------
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


# --- shared helpers -------------------------------------------------------------------------
def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, 400, "bad_request")


def _field_error(line: str, err) -> ProtocolError:
    """Say why a field line failed _FIELD_RE (slow path, only on errors)."""
    if line[:1] in (" ", "\t"):
        return err("obsolete line folding (a header line starting with whitespace)")
    colon = line.find(":")
    if colon < 0:
        return err("header line without a colon")
    if colon == 0:
        return err("empty header name")
    name = line[:colon]
    if name[-1] in " \t":
        return err("whitespace between header name and colon")
    if not _TOKEN_RE.fullmatch(name):
        return err("invalid character in header name")
    return err("invalid character in header value")


def _parse_fields(block: str, max_headers: int, err) -> list[tuple[str, str]]:
    """CRLF-separated field lines -> [(lower-case name, value)].

    The block has no bare CR/LF (_take_block checked it), so splitting at CRLF gives the lines.
    One C-level search over the block refuses the control characters a field may not hold; each
    line is then `token ":" OWS value OWS`, its name checked once and remembered (lower-cased).
    """
    if not block:
        return []
    lines = block.split("\r\n")
    if len(lines) > max_headers:
        raise ProtocolError(f"more than {max_headers} header fields", 431, "header_too_large")
    if _CTL_RE.search(block) is not None:
        raise _first_bad_field(lines, err)
    names = _NAMES
    out = []
    for line in lines:
        name, sep, value = line.partition(":")
        low = names.get(name) if sep else None
        if low is None:
            if not sep or not _TOKEN_RE.fullmatch(name):
                raise _field_error(line, err)
            low = name.lower()
            if len(names) < _NAMES_MAX and len(name) <= _NAME_MEMO_LEN:
                names[name] = low
        out.append((low, value.strip(" \t")))
    return out


def _first_bad_field(lines: list[str], err) -> ProtocolError:
    for line in lines:   # slow path: name the first bad line
        if _FIELD_RE.fullmatch(line) is None:
            return _field_error(line, err)
    return err("malformed header section")


def _connection_tokens(values: list[str]) -> frozenset[str]:
    if not values:
        return _NO_TOKENS
    # split at "," and OWS (SP / HTAB) only: str.strip() would also drop a latin-1 \xa0
    return frozenset(t for v in values for t in (p.strip(" \t").lower() for p in v.split(","))
                     if t)


def _expects_continue(value: str) -> bool:
    """True if the Expect list (RFC 9110 10.1.1) has the member 100-continue."""
    low = value.lower()
    return low == "100-continue" or any(m.strip(" \t") == "100-continue"
                                        for m in low.split(","))


def _check_transfer_encoding(values: list[str], err, unsupported) -> None:
    """Accept a Transfer-Encoding whose codings are exactly "chunked" (empty list elements and
    several field lines allowed: RFC 9110 5.6.1, 5.3). Chunked not the final coding: err (the
    length cannot be known, RFC 9112 6.3); chunked last after other codings: unsupported."""
    if len(values) == 1 and values[0].lower() == "chunked":
        return
    value = ",".join(values)
    codings: list[tuple[str, bool]] = []        # (name, has parameters)
    pos = 0
    while True:
        m = _TCODING_RE.match(value, pos)
        if m is None:
            raise err("malformed Transfer-Encoding")
        if m.group(1):
            codings.append((m.group(1).lower(), bool(m.group(2))))
        if not m.group(3):
            break
        pos = m.end()
    if not codings:
        raise err("empty Transfer-Encoding")
    names = [name for name, _ in codings]
    if names[-1] != "chunked":
        raise err("chunked is not the final transfer coding (the body length is unknown)")
    if codings[-1][1]:
        raise err("the chunked coding takes no parameters")
    if names.count("chunked") > 1:
        raise err("chunked applied more than once")
    if len(names) > 1:
        raise unsupported(f"unsupported transfer coding {', '.join(names[:-1])!r}")


def _valid_host(host: str) -> bool:
    """uri-host [ ":" port ] (RFC 9110 7.2); an IPv6 literal must be an IPv6 address."""
    if _HOST_RE.fullmatch(host) is None:
        return False
    if host[:1] == "[" and host[1:2] not in ("v", "V"):
        try:
            ipaddress.IPv6Address(host[1:host.index("]")])
        except ValueError:
            return False
    return True


def _absolute_form(target: str) -> tuple[str, str]:
    """(path, query) of an absolute-form request-target (RFC 9112 3.2.2) for http(s), whose
    authority has a host and no userinfo (RFC 9110 4.2.1, 4.2.4). Raises 400 otherwise."""
    m = _ABSOLUTE_RE.fullmatch(target)
    if m is None:
        raise _bad("request target must be an absolute path or an absolute URI")
    if m.group(1).lower() not in ("http", "https"):
        raise _bad("absolute request target of a scheme other than http or https")
    authority = m.group(2)
    if "@" in authority:
        raise _bad("userinfo in the request target")
    if not authority or authority[0] == ":" or not _valid_host(authority):
        raise _bad("invalid host in the request target")
    path = m.group(3) or "/"
    query = m.group(4) or ""
    if "[" in path or "]" in path or "[" in query or "]" in query:
        raise _bad("invalid character in request target")
    return path, query


# parser states (strings: readable in reprs, cheap dict keys)
_HEAD = "head"              # waiting for a head
_LENGTH = "length"          # Content-Length body, self._remaining bytes left
_CHUNK_SIZE = "chunk_size"  # waiting for a chunk-size line
_CHUNK_DATA = "chunk_data"  # inside a chunk, self._remaining bytes left
_CHUNK_CRLF = "chunk_crlf"  # CRLF after chunk data
_TRAILER = "trailer"        # trailer section after the last chunk
_UNTIL_EOF = "until_eof"    # response body delimited by the connection close
_END = "end"                # message complete, END_OF_MESSAGE not yet returned
_DONE = "done"              # response parser: one response parsed, nothing more to read
_BODY_STATES = frozenset({_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_EOF,
                          _END})


class _Parser:
    """Buffer, framing of bodies and the event loop; subclasses parse heads."""

    __slots__ = ("_buf", "_state", "_eof", "_error", "_remaining", "_body_total", "_max_body",
                 "_max_header_bytes", "_max_headers", "_scan", "_checked", "_first_lf",
                 "_received")

    _STEPS: dict = {}

    def __init__(self, max_body: int, max_header_bytes: int, max_headers: int):
        self._buf = bytearray()
        self._state = _HEAD
        self._eof = False
        self._error: ProtocolError | None = None
        self._remaining = 0
        self._body_total = 0
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._scan = 0        # where to resume the search for the end of a head/trailer
        self._checked = 0     # bytes of the pending head already checked for bare CR/LF
        self._first_lf = -1   # offset of the first LF of the pending head (end of start line)
        self._received = False

    # -- public API --
    def feed(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if data:
            self._buf += data
            self._received = True

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def has_buffered(self) -> bool:
        return len(self._buf) > 0

    @property
    def in_body(self) -> bool:
        return self._state in _BODY_STATES

    def next_event(self):
        if self._error is not None:
            raise self._error
        try:
            steps = self._STEPS
            while True:
                event = steps[self._state](self)
                if event is not None:
                    break
            if event is NEED_DATA and self._eof:
                return self._at_eof()
            return event
        except ProtocolError as exc:
            self._error = exc
            raise

    # -- heads --
    def _find_block_end(self, limit: int, what: str) -> int:
        """Offset of the CRLFCRLF ending a head/trailer at the start of the buffer, or -1.

        Raises 431 once the block cannot fit in `limit` bytes, and 400 on a bare CR or LF seen
        so far, so an endless or LF-only head is refused without waiting for its end.
        """
        buf = self._buf
        idx = buf.find(b"\r\n\r\n", self._scan)
        if idx >= 0:
            if idx + 4 > limit:
                raise ProtocolError(f"{what} larger than {limit} bytes", 431, "header_too_large")
            return idx
        n = len(buf)
        if n >= limit:
            raise ProtocolError(f"{what} larger than {limit} bytes", 431, "header_too_large")
        if n:
            self._check_line_endings(n)
            self._scan = n - 3 if n > 3 else 0
        return -1

    def _check_line_endings(self, n: int) -> None:
        buf = self._buf
        start = self._checked
        p = buf.find(b"\n", start, n)
        while p >= 0:
            if p == 0 or buf[p - 1] != 13:
                raise self._err("bare LF in message head (lines must end with CRLF)")
            if self._first_lf < 0:
                self._first_lf = p
            p = buf.find(b"\n", p + 1, n)
        p = buf.find(b"\r", start, n)
        while p >= 0:
            if p + 1 < n and buf[p + 1] != 10:
                raise self._err("bare CR in message head")
            p = buf.find(b"\r", p + 1, n)
        self._checked = n - 1 if buf[n - 1] == 13 else n

    def _take_block(self, idx: int) -> str:
        """Remove a head/trailer (and its CRLFCRLF) from the buffer; return it decoded."""
        block = self._take_unchecked(idx)
        self._check_line_ends(block)
        return block

    def _take_unchecked(self, idx: int) -> str:
        """_take_block for a head that may be one already parsed (checked then)."""
        buf = self._buf
        block = buf[:idx].decode("latin-1")
        del buf[:idx + 4]
        self._reset_scan()
        return block

    def _check_line_ends(self, block: str) -> None:
        if not (block.count("\r") == block.count("\n") == block.count("\r\n")):
            raise self._err("bare CR or LF in message head (lines must end with CRLF)")

    def _reset_scan(self) -> None:
        self._scan = self._checked = 0
        self._first_lf = -1

    def _err(self, message: str) -> ProtocolError:
        return _bad(message)

    # -- bodies --
    def _take(self, n: int) -> bytes:
        buf = self._buf
        if n >= len(buf):
            data = bytes(buf)
            buf.clear()
            return data
        with memoryview(buf) as view, view[:n] as part:
            data = bytes(part)
        del buf[:n]   # CPython deletes from the front of a bytearray in O(1)
        return data

    def _read_length(self):
        if self._remaining == 0:
            self._state = _END
            return None
        if not self._buf:
            return NEED_DATA
        data = self._take(self._remaining)
        self._remaining -= len(data)
        return Data(data)

    def take_whole_body(self) -> bytes | None:
        """Right after a head: a Content-Length body that is already buffered in full, and its
        END_OF_MESSAGE, in one call (the usual small message: no Data event, three fewer
        next_event() steps). None in any other state; then use next_event() as usual."""
        if self._state is not _LENGTH or self._error is not None:
            return None
        remaining = self._remaining
        if len(self._buf) < remaining:
            return None
        data = self._take(remaining) if remaining else b""
        self._remaining = 0
        self._read_end()
        return data

    def take_chunks(self) -> tuple[bytes, list[int], int] | None:
        """At a chunk boundary of a chunked body: the complete chunks buffered there, taken in
        one call, as long as each is framed exactly as chunk() frames it (a canonical size line,
        then the data, then CRLF) and the body stays within its limit. Returns (framed, spans,
        size): those chunks' bytes as received (the same bytes chunk() would make of their
        data), the [start, end, start, end, ...] offsets of each chunk's data in them, and the
        data's total length. None when there is no such chunk: next_event() then goes on as
        usual, and reports whatever is wrong with the next chunk (the last chunk, an extension,
        a bad CRLF, a body too large) exactly as it would have. Right after a chunk's data
        came by next_event() (a chunk split over reads, or framed otherwise), its CRLF is
        consumed first."""
        if self._error is not None:
            return None
        buf = self._buf
        if self._state is not _CHUNK_SIZE:
            if self._state is not _CHUNK_CRLF or buf[:2] != b"\r\n":
                return None
            del buf[:2]
            self._state = _CHUNK_SIZE
        pos, spans, total = self._scan_chunks(buf)
        if not pos:
            return None
        size = total - self._body_total
        self._body_total = total
        return self._take(pos), spans, size

    def feed_chunks(self, data: bytes) -> tuple[bytes, list[int], int] | None:
        """feed(data) then take_chunks(), with the same result and the same parser state after,
        but without copying in the usual case of a stream: nothing buffered, at a chunk
        boundary. The canonical chunks at the start of data are then returned as data itself
        (or its prefix), and only the bytes after them are buffered."""
        if (self._buf or self._state is not _CHUNK_SIZE or self._error is not None or self._eof
                or type(data) is not bytes):
            self.feed(data)
            return self.take_chunks()
        if not data:
            return None
        self._received = True
        pos, spans, total = self._scan_chunks(data)
        if not pos:
            self._buf += data
            return None
        size = total - self._body_total
        self._body_total = total
        if pos < len(data):
            with memoryview(data) as view, view[pos:] as rest:
                self._buf += rest
            data = data[:pos]
        return data, spans, size

    def _scan_chunks(self, buf) -> tuple[int, list[int], int]:
        """The canonical complete chunks at the start of buf (bytes or the buffer): where they
        end, their data's [start, end, ...] offsets, and the body's total size after them."""
        n = len(buf)
        match = _CANONICAL_CHUNK_RE.match
        total = self._body_total
        limit = self._max_body
        spans: list[int] = []
        pos = 0
        while True:
            m = match(buf, pos)
            if m is None:
                break
            start = m.end()
            end = start + int(m.group(1), 16)
            if end + 2 > n or buf[end] != 13 or buf[end + 1] != 10 or total + end - start > limit:
                break
            total += end - start
            spans.append(start)
            spans.append(end)
            pos = end + 2
        return pos, spans, total

    def _read_chunk_size(self):
        buf = self._buf
        lf = buf.find(b"\n", 0, MAX_CHUNK_LINE + 2)
        if lf < 0:
            if len(buf) >= MAX_CHUNK_LINE + 2:
                raise self._err(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
            return NEED_DATA
        if lf == 0 or buf[lf - 1] != 13:
            raise self._err("chunk-size line not ended by CRLF")
        m = _CHUNK_LINE_RE.fullmatch(bytes(buf[:lf - 1]))
        if m is None:
            raise self._err("invalid chunk-size line")
        digits = m.group(1)
        if len(digits) > MAX_CHUNK_SIZE_DIGITS:
            digits = digits.lstrip(b"0") or b"0"
            if len(digits) > MAX_CHUNK_SIZE_DIGITS:
                raise self._too_large()
        size = int(digits, 16)
        del buf[:lf + 1]
        total = self._body_total + size
        if total > self._max_body:
            raise self._too_large()
        self._body_total = total
        if size:
            self._remaining = size
            self._state = _CHUNK_DATA
        else:
            self._reset_scan()
            self._state = _TRAILER
        return None

    def _read_chunk_data(self):
        if not self._buf:
            return NEED_DATA
        data = self._take(self._remaining)
        self._remaining -= len(data)
        if self._remaining == 0:
            self._state = _CHUNK_CRLF
        return Data(data)

    def _read_chunk_crlf(self):
        buf = self._buf
        if len(buf) < 2:
            if buf and buf[0] != 13:
                raise self._err("chunk data not followed by CRLF")
            return NEED_DATA
        if buf[0] != 13 or buf[1] != 10:
            raise self._err("chunk data not followed by CRLF")
        del buf[:2]
        self._state = _CHUNK_SIZE
        return None

    def _read_trailer(self):
        buf = self._buf
        if buf.startswith(b"\r\n"):
            del buf[:2]
            self._state = _END
            return None
        idx = self._find_block_end(MAX_TRAILER_BYTES, "trailer section")
        if idx < 0:
            return NEED_DATA
        _parse_fields(self._take_block(idx), self._max_headers, self._err)  # checked, discarded
        self._state = _END
        return None

    def _read_until_eof(self):
        if not self._buf:
            return NEED_DATA
        return Data(self._take(len(self._buf)))

    def _too_large(self) -> ProtocolError:
        return ProtocolError(f"request body larger than {self._max_body} bytes", 413,
                             "body_too_large")

    def _at_eof(self):
        raise NotImplementedError


def _steps(cls) -> dict:
    """State -> reader: the whole framing machine on one screen."""
    return {
        _HEAD: cls._read_head,
        _LENGTH: cls._read_length,
        _CHUNK_SIZE: cls._read_chunk_size,
        _CHUNK_DATA: cls._read_chunk_data,
        _CHUNK_CRLF: cls._read_chunk_crlf,
        _TRAILER: cls._read_trailer,
        _UNTIL_EOF: cls._read_until_eof,
        _END: cls._read_end,
        _DONE: cls._read_done,
    }


class RequestParser(_Parser):
    """Server side: bytes from a client -> Request, Data..., END_OF_MESSAGE, repeated.

    After END_OF_MESSAGE the next (pipelined) request is parsed from bytes already buffered.
    """

    __slots__ = ("_max_target", "_empty_lines", "_memo_head", "_memo_request")

    def __init__(self, max_body_size: int, *, max_target_length: int = MAX_TARGET_LENGTH,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_headers: int = MAX_HEADERS):
        super().__init__(max_body_size, max_header_bytes, max_headers)
        self._max_target = max_target_length
        self._empty_lines = 0
        self._memo_head = ""                 # the last head parsed, and what it gave
        self._memo_request: Request | None = None

    def _read_head(self):
        buf = self._buf
        while buf.startswith(b"\r\n"):   # RFC 9112 2.2: ignore a few empty lines first
            self._empty_lines += 1
            if self._empty_lines > MAX_LEADING_EMPTY_LINES:
                raise _bad("too many empty lines before the request line")
            del buf[:2]
            self._reset_scan()
        idx = self._find_block_end(self._max_header_bytes, "request head")
        if idx < 0:
            if buf and self._first_lf < 0:
                self._check_partial_request_line()
            return NEED_DATA
        head = self._take_unchecked(idx)
        if head == self._memo_head:
            request = self._memo_request
        else:
            self._check_line_ends(head)
            request = self._parse_request(head)
            if len(head) <= HEAD_MEMO_MAX_CHARS:
                self._memo_head = head
                self._memo_request = request
        if request.chunked:
            self._body_total = 0
            self._state = _CHUNK_SIZE
        elif request.content_length:
            self._remaining = request.content_length
            self._state = _LENGTH
        else:
            self._state = _END
        return request

    def _check_partial_request_line(self) -> None:
        """Refuse an over-long method or target before its request line is complete."""
        buf = self._buf
        n = len(buf)
        sp = buf.find(b" ", 0, MAX_METHOD_LENGTH + 1)
        if sp < 0:
            if n > MAX_METHOD_LENGTH:
                if _TOKEN_B_RE.fullmatch(bytes(buf[:MAX_METHOD_LENGTH + 1])):
                    raise ProtocolError("method not implemented", 501, "method_not_implemented")
                raise _bad("invalid request method")
            return
        # room for the target, then " HTTP/1.1" and the CR
        if n - sp - 1 > self._max_target + 10:
            if buf.find(b" ", sp + 1, sp + 2 + self._max_target) < 0:
                raise self._too_long()
            raise _bad("malformed request line")

    def _too_long(self) -> ProtocolError:
        return ProtocolError(f"request target longer than {self._max_target} bytes", 414,
                             "uri_too_long")

    def _parse_request(self, head: str) -> Request:
        line, _, block = head.partition("\r\n")
        parts = line.split(" ")
        if len(parts) != 3:
            raise _bad("malformed request line (expected METHOD SP target SP HTTP/1.1)")
        method, target, version_s = parts
        if method not in KNOWN_METHODS and not _TOKEN_RE.fullmatch(method):
            raise _bad("invalid request method")
        if len(target) > self._max_target:
            raise self._too_long()
        version = _VERSIONS.get(version_s)
        if version is None:
            m = _VERSION_RE.fullmatch(version_s)
            if m is not None and m.group(1) == "1" and m.group(2):
                version = (1, 1)     # HTTP/1.2 to 1.9: read as HTTP/1.1 (RFC 9110 2.5)
            elif m is not None and int(m.group(1)) >= 2:
                # HTTP/2, HTTP/3.0 -> 505; HTTP/0.9, HTTP/1 and anything malformed -> 400
                raise ProtocolError(f"{version_s} is not supported; use HTTP/1.1", 505,
                                    "http_version_not_supported")
            else:
                raise _bad("malformed HTTP version")
        if _TARGET_RE.fullmatch(target) is None and (
                target[0] == "/" or _URI_CHARS_RE.fullmatch(target) is None):
            raise _bad("invalid character in request target")
        if "%" in target and _BAD_PCT_RE.search(target) is not None:
            raise _bad("'%' in the request target not followed by two hex digits")
        if method not in KNOWN_METHODS:
            raise ProtocolError(f"method {method} not implemented", 501, "method_not_implemented")
        absolute = None
        if target[0] != "/" and not (target == "*" and method == "OPTIONS"):
            if target == "*":
                raise _bad("request target * is for OPTIONS only")
            absolute = _absolute_form(target)

        headers = _parse_fields(block, self._max_headers, _bad)
        host = None
        hosts = 0
        cl_values: list[str] = []
        te_values: list[str] = []
        connection: list[str] = []
        expect = False
        for name, value in headers:
            if name not in _REQUEST_FRAMING_NAMES:   # one set lookup for the common header
                continue
            if name == "host":
                hosts += 1
                host = value
            elif name == "content-length":
                cl_values.append(value)
            elif name == "transfer-encoding":
                te_values.append(value)
            elif name == "connection":
                connection.append(value)
            elif name == "expect":
                expect = expect or _expects_continue(value)

        if hosts > 1:
            raise _bad("more than one Host header")
        if host is None:
            if version == (1, 1):
                raise _bad("missing Host header")
        elif host not in _GOOD_HOSTS:
            if not _valid_host(host):
                raise _bad("invalid Host header")
            if len(_GOOD_HOSTS) < _GOOD_HOSTS_MAX and len(host) <= _HOST_MEMO_LEN:
                _GOOD_HOSTS.add(host)

        content_length = None
        chunked = False
        if te_values:
            if version == (1, 0):
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if cl_values:
                raise _bad("both Content-Length and Transfer-Encoding")
            _check_transfer_encoding(
                te_values, _bad,
                lambda msg: ProtocolError(msg, 501, "unsupported_transfer_coding"))
            chunked = True
        elif cl_values:
            if len(cl_values) > 1:
                raise _bad("more than one Content-Length header")
            value = cl_values[0]
            if _DIGITS_RE.fullmatch(value) is None:
                if _ALL_DIGITS_RE.fullmatch(value) is None:
                    raise _bad("invalid Content-Length")
                value = value.lstrip("0") or "0"      # many leading zeros, or just too large
                if len(value) > MAX_CONTENT_LENGTH_DIGITS:
                    raise self._too_large()
            content_length = int(value)
            if content_length > self._max_body:
                raise self._too_large()

        tokens = _connection_tokens(connection)
        if version == (1, 1):
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens and "close" not in tokens
        # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored.
        expect_continue = expect and version == (1, 1)
        request = Request(method, target, version, headers, content_length, chunked, keep_alive,
                          expect_continue, host, tokens)
        if absolute is not None:
            request.path, request.query = absolute
        return request

    def _read_end(self):
        self._state = _HEAD
        self._remaining = self._body_total = self._empty_lines = 0
        self._reset_scan()
        return END_OF_MESSAGE

    def _read_done(self):   # never reached: requests go back to _HEAD
        return NEED_DATA

    def _at_eof(self):
        if self._state == _HEAD and not self._buf:
            return NEED_DATA
        raise ProtocolError("connection closed in the middle of a request", 400,
                            "incomplete_request")


RequestParser._STEPS = _steps(RequestParser)


class ResponseParser(_Parser):
    """Client side (llama-server's answers): bytes -> Response, Data..., END_OF_MESSAGE.

    One parser per request/response. 1xx interim responses are skipped. After END_OF_MESSAGE
    next_event() returns NEED_DATA; has_buffered then means the upstream sent bytes past the
    response and the connection must not be reused. Errors are ProtocolError with status 502;
    code "upstream_closed" means the connection closed before any byte arrived (a stale pooled
    connection: safe to retry when the request had no side effects yet).
    """

    __slots__ = ("_method", "_interim")

    def __init__(self, request_method: str, *, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_headers: int = MAX_HEADERS):
        super().__init__(1 << 63, max_header_bytes, max_headers)
        self._method = request_method
        self._interim = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def _err(self, message: str) -> ProtocolError:
        return ProtocolError(f"upstream: {message}", 502, "bad_upstream_response")

    def _read_head(self):
        idx = self._find_block_end(self._max_header_bytes, "response head")
        if idx < 0:
            return NEED_DATA
        head = self._take_unchecked(idx)
        key = (self._method, self._max_headers, head)
        response = _RESPONSE_MEMO.get(key)
        if response is None:
            self._check_line_ends(head)
            response = self._parse_response(head)
            if response is not None and len(head) <= HEAD_MEMO_MAX_CHARS:
                if len(_RESPONSE_MEMO) >= _RESPONSE_MEMO_MAX:
                    _RESPONSE_MEMO.clear()
                _RESPONSE_MEMO[key] = response
        if response is None:                       # 1xx interim: skip, read the next head
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise self._err("too many interim responses")
            return None
        if not response.has_body:
            self._state = _END
        elif response.chunked:
            self._state = _CHUNK_SIZE
        elif response.content_length is not None:
            self._remaining = response.content_length
            self._state = _LENGTH
        else:
            self._state = _UNTIL_EOF
        return response

    def _parse_response(self, head: str) -> Response | None:
        line, _, block = head.partition("\r\n")
        m = _STATUS_LINE_RE.fullmatch(line)
        if m is None:
            raise self._err("malformed status line")
        version = (1, int(m.group(1)))
        status = int(m.group(2))
        if status < 100:
            raise self._err("invalid status code")
        headers = _parse_fields(block, self._max_headers, self._err)
        if status < 200:
            if status == 101:
                raise self._err("unexpected protocol switch (101)")
            return None

        cl_values: list[str] = []
        te_values: list[str] = []
        connection: list[str] = []
        for name, value in headers:
            if name not in _RESPONSE_FRAMING_NAMES:   # one set lookup for the common header
                continue
            if name == "content-length":
                cl_values.append(value)
            elif name == "transfer-encoding":
                te_values.append(value)
            else:
                connection.append(value)
        content_length = None
        chunked = False
        if te_values:
            if cl_values:
                raise self._err("both Content-Length and Transfer-Encoding")
            _check_transfer_encoding(te_values, self._err, self._err)
            chunked = True
        elif cl_values:
            if len(cl_values) > 1:
                raise self._err("more than one Content-Length header")
            if not _DIGITS_RE.fullmatch(cl_values[0]):
                raise self._err("invalid Content-Length")
            content_length = int(cl_values[0])
        has_body = not (self._method == "HEAD" or status == 204 or status == 304)

        tokens = _connection_tokens(connection)
        if version == (1, 1):
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens and "close" not in tokens
        if has_body and not chunked and content_length is None:
            keep_alive = False                      # body delimited by the close
        return Response(status, m.group(3) or "", version, headers, content_length,
                        chunked and has_body, keep_alive, has_body, tokens)

    def _read_end(self):
        self._state = _DONE
        return END_OF_MESSAGE

    def _read_done(self):
        return NEED_DATA

    def _at_eof(self):
        state = self._state
        if state == _UNTIL_EOF:
            self._state = _DONE
            return END_OF_MESSAGE
        if state == _DONE:
            return NEED_DATA
        if state == _HEAD and not self._received:
            raise ProtocolError("upstream closed the connection before responding", 502,
                                "upstream_closed")
        raise ProtocolError("upstream closed the connection in the middle of a response", 502,
                            "upstream_incomplete")


ResponseParser._STEPS = _steps(ResponseParser)


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
