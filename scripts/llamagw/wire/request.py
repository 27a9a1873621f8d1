"""Server side HTTP/1.1: bytes from a client -> Request, Data..., END_OF_MESSAGE, repeated.

RequestParser validates a request head strictly (RFC 9112: request line, method, target, version,
Host, Content-Length / Transfer-Encoding, Connection, Expect) and frames its body with
wire/framing.py; pipelined requests are parsed from the bytes already buffered. Violations raise
ProtocolError with the status to answer (400, 413, 414, 431, 501, 505), sticky. An over-long
method or target is refused before its line is complete. The last head parsed on a connection
is remembered and a byte-identical one reuses its Request (heads are never mutated); Host values
already checked are remembered in a bounded set shared by all connections.
"""

from __future__ import annotations

import ipaddress
import re

from llamagw.errors import ProtocolError
from llamagw.wire.events import END_OF_MESSAGE, NEED_DATA, Request
from llamagw.wire.framing import _CHUNK_SIZE, _END, _HEAD, _LENGTH, _Parser, _steps
from llamagw.wire.grammar import (
    _DIGITS_RE, _TARGET_RE, _TOKEN, _TOKEN_RE, HEAD_MEMO_MAX_CHARS, KNOWN_METHODS,
    MAX_CONTENT_LENGTH_DIGITS, MAX_HEADER_BYTES, MAX_HEADERS, MAX_LEADING_EMPTY_LINES,
    MAX_METHOD_LENGTH, MAX_TARGET_LENGTH, _bad, _check_transfer_encoding, _connection_tokens,
    _parse_fields,
)

# Host header values already checked (a client sends the same one on every request); bounded in
# count and length like _NAMES (wire/grammar.py).
_GOOD_HOSTS: set[str] = set()
_GOOD_HOSTS_MAX = 256
_HOST_MEMO_LEN = 255
_TOKEN_B_RE = re.compile(_TOKEN.encode())
_URI_CHARS_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]]+")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# absolute-form (RFC 9112 3.2.2): scheme "://" authority path-abempty [ "?" query ]
_ABSOLUTE_RE = re.compile(r"([A-Za-z][A-Za-z0-9+\-.]*)://([^/?]*)([^?]*)(?:\?(.*))?", re.DOTALL)
_VERSION_RE = re.compile(r"HTTP/([0-9])(?:\.([0-9]))?")
_ALL_DIGITS_RE = re.compile(r"[0-9]+")
# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2); an IPv6 literal is then checked
# by the ipaddress module.
_HOST_RE = re.compile(
    r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"   # reg-name / IPv4address
    r"|\[[0-9A-Fa-f:.]+\]"                                    # IPv6 literal
    r"|\[v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+\])"    # IPvFuture
    r"(?::[0-9]*)?")
_VERSIONS = {"HTTP/1.1": (1, 1), "HTTP/1.0": (1, 0)}
_REQUEST_FRAMING_NAMES = frozenset({"host", "content-length", "transfer-encoding", "connection",
                                    "expect"})


def _expects_continue(value: str) -> bool:
    """True if the Expect list (RFC 9110 10.1.1) has the member 100-continue."""
    low = value.lower()
    return low == "100-continue" or any(m.strip(" \t") == "100-continue"
                                        for m in low.split(","))


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
