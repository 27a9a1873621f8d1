"""Recent log lines for the dashboard: a bounded ring fed by the gateway's own logging and by
followers of the llama-server and boot log files; secrets are masked before a line is kept.

Sources: "gateway" (BufferHandler, a logging.Handler), "llama" and "boot" (LogFollower: a
thread that polls $DATA_DIR/logs/llama-*/latest.txt and $DATA_DIR/logs/_boot/latest.txt, the
symlinks entrypoint.sh keeps on the newest file). The event loop never reads a file here.

Each line becomes {"t": epoch seconds, "source", "level", "text"}: text cut to MAX_LINE_CHARS,
ANSI colour codes and other control characters removed, and redact() applied: anything that
looks like a key (sk-...), a Bearer token, or an api-key / x-api-key / token value is masked. A
llama-server line can echo prompt text; the dashboard renders it as text, never as markup.

Public API:
    redact(text) -> str
    LogBuffer(capacity=...).append(source, level, text, t=None) -> dict   thread-safe
                          .tail(n=TAIL_DEFAULT, source=None) -> list[dict]
                          .add_listener(fn)   fn(entry) for each new line, from the appending
                                              thread (the gateway: hub.publish_threadsafe)
    BufferHandler(buffer)                       logging.Handler -> source "gateway"
    LogFollower(buffer, {source: path}).start() / .poll_once() / .stop()
    default_sources(logs_dir) -> {source: path}
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
import threading
import time
from collections.abc import Callable

# --- limits -----------------------------------------------------------------------------------
# 2000 lines in all: the dashboard shows the last 500 and a source filter needs some depth;
# ~2000 x <= 4 KiB bounds the ring at ~8 MiB in the worst case, ~200 KiB typically.
CAPACITY = 2000
# The dashboard's default tail and the most one GET /admin/logs returns.
TAIL_DEFAULT = 500
# 4 KiB a line: llama-server can print a whole prompt or a JSON body on one line.
MAX_LINE_CHARS = 4096
# A follower polls every 0.5 s: live enough for a person, nothing for a disk.
FOLLOW_INTERVAL_S = 0.5
# 256 KiB read per file and poll: a log storm is read over several polls, never all at once.
MAX_READ_BYTES = 256 * 1024
# On first sight of a file, the last 64 KiB of it (~500 lines of llama-server) fill the ring.
BACKFILL_BYTES = 64 * 1024
# Listeners: the live hub, maybe a test; more is a leak.
MAX_LISTENERS = 4

LEVELS = ("debug", "info", "warning", "error", "critical")

_SECRET_RES = (
    # Authorization: Bearer <token> / Basic <token>
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/]+=*"), r"\1\2***"),
    # api_key=..., "x-api-key": "...", access_token: ..., password=..., secret=...
    # (not a bare "token =": llama-server prints "BOS token = 1 '<s>'")
    (re.compile(r"(?i)\b((?:x-)?api[_-]?key|(?:access|auth|refresh|session|csrf|bearer|api)"
                r"[_-]?token|password|passwd|secret)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]+"),
     r"\1\2***"),
    # API keys of this gateway and of OpenAI-style services: sk-..., sk-proj-...
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}"), "sk-***"),
)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LEVEL_RES = (
    ("error", re.compile(r"(?i)\b(error|fatal|failed|failure|panic|traceback|exception)\b"
                         r"|^E\s|\[E\]")),
    ("warning", re.compile(r"(?i)\bwarn(ing)?\b|^W\s|\[W\]")),
    ("debug", re.compile(r"(?i)\bdebug\b|^D\s")),
)


def redact(text: str) -> str:
    """`text` with anything that looks like a secret masked (see _SECRET_RES)."""
    for pattern, replacement in _SECRET_RES:
        text = pattern.sub(replacement, text)
    return text


def clean(text: str) -> str:
    """One displayable, secret-free line: no ANSI codes or control characters (tab kept),
    at most MAX_LINE_CHARS characters, then redacted."""
    if len(text) > 2 * MAX_LINE_CHARS:
        text = text[:2 * MAX_LINE_CHARS]
    text = _CONTROL_RE.sub("", _ANSI_RE.sub("", text)).rstrip()
    text = redact(text)
    if len(text) > MAX_LINE_CHARS:
        text = text[:MAX_LINE_CHARS - 1] + "\u2026"
    return text


def guess_level(text: str) -> str:
    """A level for a line of a file (llama-server and entrypoint.sh lines have none we parse)."""
    for level, pattern in _LEVEL_RES:
        if pattern.search(text):
            return level
    return "info"


class LogBuffer:
    """The last `capacity` lines of every source, oldest first."""

    def __init__(self, capacity: int = CAPACITY, *, clock: Callable[[], float] = time.time):
        self._lines: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._clock = clock
        self._listeners: list[Callable[[dict], None]] = []
        self.appended = 0

    def __len__(self) -> int:
        return len(self._lines)

    def add_listener(self, fn: Callable[[dict], None]) -> None:
        if len(self._listeners) >= MAX_LISTENERS:
            raise RuntimeError(f"at most {MAX_LISTENERS} log listeners")
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def append(self, source: str, level: str, text: str, t: float | None = None) -> dict:
        """Keep one line (cleaned and redacted); tell the listeners. Any thread."""
        entry = {"t": round(self._clock() if t is None else t, 3), "source": source,
                 "level": level if level in LEVELS else "info", "text": clean(text)}
        with self._lock:
            self._lines.append(entry)
            self.appended += 1
        for fn in self._listeners:
            try:
                fn(entry)
            except Exception:        # a listener never breaks logging (and must not log here)
                pass
        return entry

    def tail(self, n: int = TAIL_DEFAULT, source: str | None = None) -> list[dict]:
        """The last n lines (of one source, or all), oldest first; n is capped at the capacity."""
        n = max(0, min(n, self._lines.maxlen or 0))
        if n == 0:
            return []
        with self._lock:
            lines = list(self._lines)
        if source is not None:
            lines = [e for e in lines if e["source"] == source]
        return [dict(e) for e in lines[-n:]]


class BufferHandler(logging.Handler):
    """A logging.Handler that keeps the gateway's own records in a LogBuffer."""

    def __init__(self, buffer: LogBuffer, source: str = "gateway", level: int = logging.INFO):
        super().__init__(level)
        self.buffer = buffer
        self.source = source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            level = record.levelname.lower()
            if level not in LEVELS:
                level = "info"
            self.buffer.append(self.source, level, text, t=record.created)
        except Exception:
            self.handleError(record)


def default_sources(logs_dir: str) -> dict[str, str]:
    """{"boot": .../_boot/latest.txt, "llama": .../llama-<type>/latest.txt} (the first llama-*
    folder, sorted; absent files are fine: the follower waits for them)."""
    sources = {"boot": os.path.join(logs_dir, "_boot", "latest.txt")}
    llama = sorted(glob.glob(os.path.join(glob.escape(logs_dir), "llama-*", "latest.txt")))
    sources["llama"] = llama[0] if llama else os.path.join(logs_dir, "llama-gpu", "latest.txt")
    return sources


class _Followed:
    __slots__ = ("ident", "offset", "partial")

    def __init__(self, ident: tuple, offset: int):
        self.ident = ident
        self.offset = offset
        self.partial = b""


class LogFollower:
    """A thread that appends the new lines of some files to a LogBuffer.

    The path is resolved at each poll (a latest.txt symlink moves to a new file on restart:
    the new file is read from its start). A file that shrank (truncated) is read again from its
    start. At first sight only its last BACKFILL_BYTES are read. Lines come from complete
    newline-terminated text; a partial last line waits for the next poll (up to MAX_LINE_CHARS)."""

    def __init__(self, buffer: LogBuffer, sources: dict[str, str], *,
                 interval_s: float = FOLLOW_INTERVAL_S, backfill_bytes: int = BACKFILL_BYTES):
        self.buffer = buffer
        self.sources = dict(sources)
        self.interval_s = interval_s
        self.backfill_bytes = backfill_bytes
        self._state: dict[str, _Followed] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def poll_once(self) -> int:
        """Read what is new in every source; return the number of lines appended."""
        n = 0
        for source, path in self.sources.items():
            try:
                n += self._poll(source, path)
            except OSError:
                self.errors += 1
        return n

    def _poll(self, source: str, path: str) -> int:
        try:
            st = os.stat(path)                # follows the symlink
        except FileNotFoundError:
            return 0
        ident = (st.st_dev, st.st_ino)
        state = self._state.get(source)
        first = state is None
        if state is None or state.ident != ident:
            start = max(0, st.st_size - self.backfill_bytes) if first else 0
            state = self._state[source] = _Followed(ident, start)
            skip_partial = start > 0
        else:
            skip_partial = False
            if st.st_size < state.offset:     # truncated: read it again
                state.offset, state.partial = 0, b""
        if st.st_size == state.offset:
            return 0
        with open(path, "rb") as fh:
            fh.seek(state.offset)
            data = fh.read(MAX_READ_BYTES)
        state.offset += len(data)
        data = state.partial + data
        lines = data.split(b"\n")
        state.partial = lines.pop()
        if len(state.partial) > MAX_LINE_CHARS * 4:   # a line with no end: keep its start
            lines.append(state.partial)
            state.partial = b""
        if skip_partial and lines:
            lines = lines[1:]                 # the first line of a backfill starts mid-line
        n = 0
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            if text.strip():
                self.buffer.append(source, guess_level(text), text)
                n += 1
        return n
