"""Fetch and verify files over HTTP(S): the one piece of code that scripts/llama_bin.py (the
llama.cpp sources) and the model downloader (llamagw.models.fetch) share. Standard library only;
blocking (run it in a thread from asyncio code).

    fetch_bytes(url, max_bytes)           a small document (an index, a hub API answer), bounded
    save_verified(body, dest, sha256)     the same checks and placement for a body in memory
    download_file(url, dest, sha256=...)  a file: streamed to DIR/.NAME.partial, resumed with Range
                                          after a cut, retried with backoff, size and sha256
                                          verified, then renamed to DIR/NAME (atomic: a partial
                                          file is never taken for the real one)

Redirects are followed (a model hub answers with a redirect to its CDN). A bearer token (`Auth`)
is sent only to the origin it was given for (scheme, host and port): never after a redirect to
another host, never over http when given for https. urllib copies a request's ordinary headers
into every redirected request, so the token travels as an "unredirected" header and is added back
by _Redirects only when the new URL has the token's origin. URLs in messages lose their query
string (a CDN's signed URL is a credential for a while).

Progress goes to `progress(total, completed, status)` (total None while unknown; status one of
STATUS_*), at most every PROGRESS_CALLBACK_S and on every status change: what an NDJSON pull
handler streams. `cancelled()` is asked between chunks: a pull whose client went away stops within
one chunk (the partial file is kept for the next try).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

# ---- limits and timings (where the numbers come from) --------------------------------------------
USER_AGENT = "llama-gguf-inference"
# Socket timeout for connect and for each read: a CDN that sends nothing for a minute is stalled;
# the connection is dropped and the download resumed from where it stopped.
READ_TIMEOUT_S = 60.0
# Reads of 1 MiB: a syscall per MiB is nothing next to the network, and a cancel or a deadline is
# noticed within one chunk (~10 ms at 100 MB/s).
CHUNK_BYTES = 1 << 20
# Redirects followed per request: the hub's one to its CDN, plus renamed repositories.
MAX_REDIRECTS = 10
# Tries in a row that bring no new byte before giving up; a try that moves the download forward
# resets the count, so a long download over a flaky link is not lost to many separate cuts.
MAX_ATTEMPTS = 6
# Backoff between tries: 1, 2, 4, 8, 16 s (31 s in all over MAX_ATTEMPTS), capped at BACKOFF_MAX_S;
# a Retry-After from the server is honoured up to the same cap.
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
# Kept free on the target's file system beyond what the download still needs: logs, key files and
# other workers on a shared volume keep writing, and a full disk breaks all of them.
DISK_MARGIN_BYTES = 512 << 20
# How often progress() is called while bytes flow (a pull handler's NDJSON line rate).
PROGRESS_CALLBACK_S = 0.5
# HTTP answers worth another try: timeouts, rate limits, server and gateway errors.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

STATUS_CONNECTING = "connecting"
STATUS_DOWNLOADING = "downloading"
STATUS_RETRYING = "retrying"
STATUS_HASHING = "checking the partial file"
STATUS_VERIFYING = "verifying sha256 digest"
STATUS_DONE = "success"

Progress = Callable[[int | None, int, str], None]   # (total, completed, status)
Log = Callable[[str], None]


class DownloadError(Exception):
    """A download that cannot complete; str() says why. `retryable`: a later try may succeed
    (network, server errors); otherwise the same request will fail again (404, bad checksum)."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status                # the HTTP status, when an HTTP answer failed it
        self.retry_after = retry_after      # the server's Retry-After header, if any


class DownloadCancelled(DownloadError):
    """cancelled() said stop; the partial file is kept."""


@dataclasses.dataclass(frozen=True)
class Auth:
    """A bearer token and the one origin (scheme://host:port) it may be sent to."""

    token: str
    origin: str

    def __repr__(self) -> str:          # never the token, even in a traceback
        return f"Auth(origin={self.origin!r})"


@dataclasses.dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


def origin(url: str) -> str:
    """scheme://host:port, lowercased, the port explicit."""
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    port = u.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{(u.hostname or '').lower()}:{port}"


def shown(url: str) -> str:
    """A URL fit for a log line: no query string, no fragment, no user info."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host = f"{host}:{u.port}"
    return urllib.parse.urlunsplit((u.scheme, host, u.path, "", ""))


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# ---- HTTP ------------------------------------------------------------------------------------------
class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def __init__(self, auth: Auth | None):
        super().__init__()
        self.auth = auth

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.auth and origin(new.full_url) == self.auth.origin:
            new.add_unredirected_header("Authorization", f"Bearer {self.auth.token}")
        return new


def open_url(url: str, headers: Mapping[str, str] | None = None, *, auth: Auth | None = None,
             timeout: float = READ_TIMEOUT_S):
    """GET url, redirects followed; the response (the caller closes it). HTTP errors raise
    urllib.error.HTTPError, network errors OSError."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{shown(url)}: only http and https URLs are fetched")
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if auth and origin(url) == auth.origin:
        req.add_unredirected_header("Authorization", f"Bearer {auth.token}")
    opener = urllib.request.build_opener(_Redirects(auth))
    return opener.open(req, timeout=timeout)


def describe(exc: BaseException, url: str) -> DownloadError:
    """A DownloadError for an exception raised by open_url or a read."""
    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        hint = ""
        if exc.code in (401, 403):
            hint = " (a private or gated repository needs HF_TOKEN with access to it)"
        return DownloadError(f"GET {shown(url)}: HTTP {exc.code} {exc.reason}{hint}",
                             retryable=exc.code in RETRY_STATUSES, status=exc.code,
                             retry_after=exc.headers.get("Retry-After") if exc.headers else None)
    if isinstance(exc, urllib.error.URLError):
        # a certificate that does not verify will not verify on the next try either
        lasting = isinstance(exc.reason, ssl.SSLCertVerificationError)
        return DownloadError(f"GET {shown(url)}: {exc.reason}", retryable=not lasting)
    if isinstance(exc, ValueError):                     # a malformed URL
        return DownloadError(f"GET {shown(url)}: {exc}")
    return DownloadError(f"GET {shown(url)}: {type(exc).__name__}: {exc}", retryable=True)


def fetch_bytes(url: str, max_bytes: int, headers: Mapping[str, str] | None = None, *,
                auth: Auth | None = None, timeout: float = READ_TIMEOUT_S) -> bytes:
    """GET url; its body, at most max_bytes. One try; DownloadError says whether to retry."""
    try:
        with open_url(url, headers, auth=auth, timeout=timeout) as resp:
            body = resp.read(max_bytes + 1)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise describe(exc, url) from None
    if len(body) > max_bytes:
        raise DownloadError(f"GET {shown(url)}: body larger than {max_bytes} bytes")
    return body


def retry_delay(failures: int, retry_after: str | None = None,
                initial: float = BACKOFF_INITIAL_S) -> float:
    """Seconds before try failures+1: doubling from `initial`, or the server's Retry-After
    (seconds), both capped at BACKOFF_MAX_S."""
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), BACKOFF_MAX_S)
    return min(initial * 2 ** max(failures - 1, 0), BACKOFF_MAX_S)


def with_retries(what: Callable[[], bytes], *, attempts: int = MAX_ATTEMPTS,
                 backoff: float = BACKOFF_INITIAL_S, log: Log | None = None,
                 deadline: float | None = None,
                 cancelled: Callable[[], bool] | None = None) -> bytes:
    """what() until it succeeds, raises a non-retryable DownloadError, or attempts run out."""
    for n in range(1, attempts + 1):
        try:
            return what()
        except DownloadError as exc:
            delay = retry_delay(n, exc.retry_after, backoff)
            late = deadline is not None and time.monotonic() + delay > deadline
            if not exc.retryable or n == attempts or late:
                raise
            if log:
                log(f"{exc}; try {n + 1} of {attempts} in {delay:g} s")
            _sleep(delay, cancelled)
    raise AssertionError("unreachable")


# ---- files -----------------------------------------------------------------------------------------
def partial_path(dest: Path) -> Path:
    """Where dest is downloaded to: a hidden name in the same folder (a folder scan skips it, and
    the final rename stays on one file system)."""
    return dest.with_name(f".{dest.name}.partial")


def sha256_file(path: Path, *, upto: int | None = None, cancelled=None) -> "hashlib._Hash":
    """The sha256 state after the first `upto` bytes of path (all of it when None)."""
    h = hashlib.sha256()
    left = upto
    with open(path, "rb") as fh:
        while left is None or left > 0:
            block = fh.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
            if cancelled and cancelled():
                raise DownloadCancelled(f"{path}: cancelled while hashing")
    return h


def check_disk(folder: Path, needed: int, margin: int = DISK_MARGIN_BYTES) -> None:
    """DownloadError when folder's file system has less than needed + margin bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise DownloadError(f"not enough disk space in {folder}: {mb(needed)} still to download "
                            f"plus a margin of {mb(margin)}, {mb(free)} free")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                    # some network file systems refuse fsync on a folder
    finally:
        os.close(fd)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range value "bytes A-B/T" or "bytes */T"."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.partition("-")[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


class _Meter:
    """Throttled progress: the callback every PROGRESS_CALLBACK_S, a log line every log_every s."""

    def __init__(self, name: str, progress: Progress | None, log: Log | None, log_every: float):
        self.name, self.progress, self.log, self.log_every = name, progress, log, log_every
        self.status = ""
        self.t_cb = self.t_log = time.monotonic()
        self.done_at_log = 0

    def __call__(self, total: int | None, done: int, status: str) -> None:
        now = time.monotonic()
        changed = status != self.status
        if self.progress and (changed or now - self.t_cb >= PROGRESS_CALLBACK_S):
            self.progress(total, done, status)
            self.t_cb = now
        self.status = status
        if changed and status == STATUS_DOWNLOADING:
            self.t_log, self.done_at_log = now, done     # the rate counts from the first byte
        elif self.log and status == STATUS_DOWNLOADING and now - self.t_log >= self.log_every:
            self.log(progress_line(self.name, total, done,
                                   (done - self.done_at_log) / (now - self.t_log)))
            self.t_log, self.done_at_log = now, done


def progress_line(name: str, total: int | None, done: int, rate: float) -> str:
    """'NAME: 45.2% of 2002.0 MB, 85.3 MB/s, ETA 13 s' (or 'NAME: 905.1 MB, 85.3 MB/s')."""
    speed = f"{rate / 1e6:.1f} MB/s"
    if not total:
        return f"{name}: {mb(done)}, {speed}"
    eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "?"
    return f"{name}: {100 * done / total:.1f}% of {mb(total)}, {speed}, ETA {eta}"


@dataclasses.dataclass
class _Transfer:
    """The partial file being written: its descriptor, bytes written (`have`), their sha256 state,
    and the file's size once known. Kept across tries, updated in place: a try that fails half-way
    leaves it exact."""

    fd: int
    have: int
    hasher: "hashlib._Hash"
    total: int | None
    folder: Path
    disk_margin: int
    disk_checked: bool = False

    def check_room(self) -> None:
        """Once the size is known, before the bytes come: is there room for the rest?"""
        if self.total is not None and not self.disk_checked:
            check_disk(self.folder, self.total - self.have, self.disk_margin)
            self.disk_checked = True

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.have, self.hasher = 0, hashlib.sha256()

    def append(self, block: bytes) -> None:
        _write_all(self.fd, block, self.have)
        self.hasher.update(block)
        self.have += len(block)


def download_file(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
                  auth: Auth | None = None, max_bytes: int | None = None,
                  progress: Progress | None = None, log: Log | None = None,
                  log_every: float = 5.0, cancelled: Callable[[], bool] | None = None,
                  deadline: float | None = None, attempts: int = MAX_ATTEMPTS,
                  backoff: float = BACKOFF_INITIAL_S, disk_margin: int = DISK_MARGIN_BYTES,
                  on_verified: Callable[[Downloaded], None] | None = None) -> Downloaded:
    """Download url to dest (see the module doc); size and sha256, when given, must match.

    Resumes from dest's partial file if there is one (the caller decides whether it belongs to
    this url; a wrong one fails the checksum or the size and is deleted). deadline: a
    time.monotonic() value. on_verified(result) runs after the checks, before the rename (a caller
    records what it got). Raises DownloadError; on a size or checksum mismatch the partial file
    is deleted, otherwise it is kept for the next try.
    """
    dest = Path(dest)
    part = partial_path(dest)
    meter = _Meter(dest.name, progress, log, log_every)
    sha256 = sha256.lower() if sha256 else None
    if size is not None and max_bytes is not None and size > max_bytes:
        raise DownloadError(f"{dest.name}: {size} bytes, more than the {max_bytes} allowed")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        t = _Transfer(fd, os.fstat(fd).st_size, hashlib.sha256(), size, dest.parent, disk_margin)
        if size is not None and t.have > size:
            t.restart()
        if t.have:
            meter(size, t.have, STATUS_HASHING)
            if log:
                log(f"{dest.name}: resuming at {mb(t.have)} of {mb(size) if size else '?'}")
            t.hasher = sha256_file(part, upto=t.have, cancelled=cancelled)
        t.check_room()
        _transfer(url, t, auth=auth, meter=meter, log=log, cancelled=cancelled,
                  deadline=deadline, max_bytes=max_bytes, attempts=attempts, backoff=backoff)
        if t.total is not None and t.have != t.total:
            t.restart()
            raise DownloadError(f"{dest.name}: got {t.have} bytes, expected {t.total}")
        meter(t.total, t.have, STATUS_VERIFYING)
        got = t.hasher.hexdigest()
        if sha256 and got != sha256:
            t.restart()
            raise DownloadError(f"{dest.name}: sha256 {got}, expected {sha256} "
                                f"(the download is discarded)")
        os.fsync(fd)
        result = Downloaded(dest, t.have, got)
        if on_verified:
            on_verified(result)
    except BaseException:
        empty = os.fstat(fd).st_size == 0
        os.close(fd)
        if empty:                   # nothing worth resuming: leave no trace
            part.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    meter(result.size, result.size, STATUS_DONE)
    return result


def _transfer(url: str, t: _Transfer, *, auth, meter, log, cancelled, deadline, max_bytes,
              attempts, backoff) -> None:
    """Tries until t holds the whole file, with backoff between tries."""
    failures = 0
    while True:
        before = t.have
        try:
            if _one_try(url, t, auth, meter, cancelled, deadline, max_bytes):
                return
            raise DownloadError(f"GET {shown(url)}: connection closed at {mb(t.have)} of "
                                f"{mb(t.total) if t.total else '?'}", retryable=True)
        except DownloadError as exc:
            if isinstance(exc, DownloadCancelled) or not exc.retryable:
                raise
            failures = 1 if t.have > before else failures + 1
            if failures >= attempts:
                raise DownloadError(f"{exc} (gave up after {failures} tries in a row "
                                    f"without progress)", retryable=True) from None
            delay = retry_delay(failures, exc.retry_after, backoff)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise DownloadError(f"{exc} (no time left to retry)", retryable=True) from None
            if log:
                log(f"{meter.name}: {exc}; retrying in {delay:g} s (at {mb(t.have)})")
            meter(t.total, t.have, STATUS_RETRYING)
            _sleep(delay, cancelled)


def save_verified(body: bytes, dest: Path, sha256: str | None = None) -> Downloaded:
    """A body already in memory, placed at dest the way download_file places a download: the
    digest checked first, then written beside dest and renamed."""
    dest = Path(dest)
    got = hashlib.sha256(body).hexdigest()
    if sha256 and got != sha256.lower():
        raise DownloadError(f"{dest.name}: sha256 {got}, expected {sha256.lower()} "
                            f"(the download is discarded)")
    part = partial_path(dest)
    part.write_bytes(body)
    os.replace(part, dest)
    return Downloaded(dest, len(body), got)


def _sleep(delay: float, cancelled) -> None:
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0:
        if cancelled and cancelled():
            raise DownloadCancelled("cancelled")
        time.sleep(min(left, 0.2))


def _one_try(url: str, t: _Transfer, auth, meter, cancelled, deadline, max_bytes) -> bool:
    """One GET from t.have on; whether t now holds the whole file."""
    headers = {"Range": f"bytes={t.have}-"} if t.have else {}
    meter(t.total, t.have, STATUS_CONNECTING)
    try:
        resp = open_url(url, headers, auth=auth)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:                   # nothing from t.have on: complete, or not ours
            _, known = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if known is not None and known == t.have and t.total in (None, known):
                t.total = known
                return True
            at = t.have
            t.restart()
            raise DownloadError(f"GET {shown(url)}: HTTP 416 at byte {at} (the file is "
                                f"{known if known is not None else '?'} bytes): starting over",
                                retryable=True) from None
        err = describe(exc, url)
        exc.close()
        raise err from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise describe(exc, url) from None
    with resp:
        if resp.status == 206:
            first, whole = _content_range(resp.headers.get("Content-Range"))
            if first != t.have:
                at = t.have
                t.restart()
                raise DownloadError(f"GET {shown(url)}: asked for byte {at}, got a range from "
                                    f"{first}: starting over", retryable=True)
        elif resp.status == 200:
            if t.have:                         # the server ignored Range: start over
                t.restart()
            length = resp.headers.get("Content-Length")
            whole = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"GET {shown(url)}: HTTP {resp.status}", status=resp.status)
        if whole is not None:
            if t.total is not None and whole != t.total:
                t.restart()
                raise DownloadError(f"GET {shown(url)}: the file is {whole} bytes, expected "
                                    f"{t.total}")
            t.total = whole
        if t.total is not None and max_bytes is not None and t.total > max_bytes:
            raise DownloadError(f"GET {shown(url)}: {t.total} bytes, more than {max_bytes}")
        t.check_room()
        meter(t.total, t.have, STATUS_DOWNLOADING)
        while True:
            if cancelled and cancelled():
                raise DownloadCancelled(f"GET {shown(url)}: cancelled at {mb(t.have)}")
            if deadline is not None and time.monotonic() > deadline:
                raise DownloadError(f"GET {shown(url)}: not done by the deadline "
                                    f"({mb(t.have)} of {mb(t.total) if t.total else '?'})")
            try:
                block = resp.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"GET {shown(url)}: {type(exc).__name__} at {mb(t.have)}",
                                    retryable=True) from None
            if not block:
                break
            if max_bytes is not None and t.have + len(block) > max_bytes:
                t.restart()
                raise DownloadError(f"GET {shown(url)}: more than {max_bytes} bytes")
            if t.total is not None and t.have + len(block) > t.total:
                t.restart()
                raise DownloadError(f"GET {shown(url)}: more bytes than the {t.total} announced")
            t.append(block)
            meter(t.total, t.have, STATUS_DOWNLOADING)
    return t.total is None or t.have == t.total


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite at the byte's own offset: two writers of the same file (a lock broken by mistake)
    write the same bytes to the same places instead of interleaving appends."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
