"""HTTP/1.1 message framing shared by both parsers: the buffer, bodies and the event loop.

_Parser holds the received bytes, finds the end of a head or trailer (bounded: 431 past the
limit, 400 on a bare CR or LF seen so far, before the head is complete), frames a body by
Content-Length, chunked coding (trailers checked and discarded) or the connection's close, and
runs the state machine (_steps) that next_event() drives. Subclasses (wire/request.py,
wire/response.py) parse heads (_read_head), say what ends a message (_read_end, _read_done) and
what EOF means (_at_eof). A ProtocolError is sticky: the parser stays broken. The fast paths
take_whole_body(), take_chunks() and feed_chunks() take a whole small body, or runs of
canonically framed chunks, in one call, with the same result as the next_event() steps.
"""

from __future__ import annotations

from llamagw.errors import ProtocolError
from llamagw.wire.events import NEED_DATA, Data
from llamagw.wire.grammar import (
    _CANONICAL_CHUNK_RE, _CHUNK_LINE_RE, MAX_CHUNK_LINE, MAX_CHUNK_SIZE_DIGITS, MAX_TRAILER_BYTES,
    _bad, _parse_fields,
)

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
