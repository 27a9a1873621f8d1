"""Incremental Server-Sent Events splitter (pure, no I/O).

Feed it the body bytes of a text/event-stream as they arrive, in pieces of any size; it returns the
`data` payload of each complete event. Events may be split across reads or several may arrive in one
read. Comment lines (`: ping`) and other fields (event:, id:, retry:) are skipped; multi-line data is
joined with "\n" as the SSE spec says. Line ends may be LF, CRLF or CR.
"""

from __future__ import annotations

# One event larger than this is not something llama-server sends (a chunk is a few hundred bytes;
# a final chunk with timings a few KB); refuse rather than grow without bound.
MAX_EVENT_BYTES = 1 << 20


class SSEError(ValueError):
    pass


class SSESplitter:
    __slots__ = ("_buf", "_data", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf:
            # The previous piece ended in CR, already taken as a line end: drop the LF of a CRLF.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # Normalise CRLF and lone CR to LF. A CR at the very end ends its line now; if the next
            # piece starts with LF, that LF belongs to this CR.
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[bytes] = []
        start = 0
        data = self._data
        while True:
            nl = buf.find(b"\n", start)
            if nl == -1:
                break
            line = buf[start:nl]
            start = nl + 1
            if not line:                         # blank line: dispatch the event
                if data:
                    out.append(b"\n".join(data))
                    data.clear()
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":...") and other fields are ignored
        rest = buf[start:]
        if len(rest) + sum(len(d) for d in data) > MAX_EVENT_BYTES:
            raise SSEError("SSE event exceeds the size limit")
        self._buf = rest
        return out

    def pending(self) -> bool:
        """True if an incomplete event is buffered (the stream was cut mid-event)."""
        return bool(self._buf.strip(b"\r\n")) or bool(self._data)
