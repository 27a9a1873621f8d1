"""Client side HTTP/1.1 (llama-server's answers): bytes -> Response, Data..., END_OF_MESSAGE.

One ResponseParser per request/response; 1xx interim responses are skipped (bounded). The head is
checked as strictly as a request's (RFC 9112), the body framed by wire/framing.py (HEAD, 204 and
304 have none; no length and no chunking: until the close). Errors are ProtocolError with status
502; "upstream_closed" means closed before any byte (a stale pooled connection). Response heads
come from llama-server (trusted, 127.0.0.1) and repeat: parsed heads are shared across
connections in a bounded memo (see HEAD_MEMO_MAX_CHARS in wire/grammar.py).
"""

from __future__ import annotations

import re

from llamagw.errors import ProtocolError
from llamagw.wire.events import END_OF_MESSAGE, NEED_DATA, Response
from llamagw.wire.framing import (
    _CHUNK_SIZE, _DONE, _END, _HEAD, _LENGTH, _UNTIL_EOF, _Parser, _steps,
)
from llamagw.wire.grammar import (
    _DIGITS_RE, HEAD_MEMO_MAX_CHARS, MAX_HEADER_BYTES, MAX_HEADERS, MAX_INTERIM_RESPONSES,
    _check_transfer_encoding, _connection_tokens, _parse_fields,
)

# Response heads already parsed, shared by all connections; emptied when full.
_RESPONSE_MEMO: dict[tuple[str, int, str], "Response"] = {}   # (method, max_headers, head)
_RESPONSE_MEMO_MAX = 64
_STATUS_LINE_RE = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_RESPONSE_FRAMING_NAMES = frozenset({"content-length", "transfer-encoding", "connection"})


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
