"""Models that arrive by themselves: put a model (hub.Source) into a folder, once, whatever the
number of workers that start together on the same (network) folder.

    ensure(source, folder) -> FOLDER/NAME

The files, all in FOLDER (hidden ones are skipped by the router's folder scan):

    NAME                  the model; appears only by an atomic rename of a verified download
    .NAME.partial         the download in progress (download.partial_path): resumed by whoever
                          downloads next, never read as a model
    .NAME.lock            who downloads (fetchlock): the others wait for NAME to appear
    .NAME.download.json   the record: {"source", "sha256", "size", "complete"}. Written at the
                          start ("complete": false) and before the final rename (true)

A NAME already there is used without downloading when it is "verified": a complete record for the
same source (or the same sha256) and the file's size; or, without a record, its sha256 matches the
expected one (hashed once, then recorded); or, with no record and no digest known, it is taken as
it is (a file someone put there by hand; logged). A NAME that fails this is downloaded again and
replaced by a rename (a running llama-server keeps its mapping of the old file).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from llamagw.models import download, fetchlock, hub
from llamagw.models.download import DownloadCancelled, DownloadError, Log, Progress

STATUS_WAITING = "waiting for another worker's download"
STATUS_CHECKING = "checking the file already there"
# A waiter looks at the lock and at the partial file this often.
WAIT_POLL_S = 1.0
# Largest record read (its JSON is ~300 bytes).
MAX_RECORD_BYTES = 64 << 10


def record_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.download.json")


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


def read_record(dest: Path) -> dict | None:
    try:
        with open(record_path(dest), "rb") as fh:
            doc = json.loads(fh.read(MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_record(dest: Path, source: hub.Source, *, complete: bool, size: int | None,
                 sha256: str | None) -> None:
    doc = {"source": source.spec.shown, "file": dest.name, "size": size, "sha256": sha256,
           "complete": complete, "host": fetchlock.host_id()[0], "time": round(time.time())}
    path = record_path(dest)
    tmp = path.with_name(f"{path.name}.{doc['host']}.{os.getpid()}.tmp")  # unique on a shared volume
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def _same_source(rec: dict, source: hub.Source) -> bool:
    if source.sha256:
        return rec.get("sha256") == source.sha256
    return rec.get("source") == source.spec.shown


def present(dest: Path, source: hub.Source, *, log: Log | None = None,
            progress: Progress | None = None, cancelled=None,
            rejected: set | None = None) -> bool:
    """Whether dest is there and verified (see the module doc); False means: download it.

    rejected: the identities (inode, size, mtime) of files found wrong, not looked at again (a
    waiter asks every second while someone replaces a wrong file: no re-hashing, no re-logging).
    """
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    size, ident = st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)
    if rejected is not None and ident in rejected:
        return False
    ok = _verified(dest, size, source, log or (lambda _msg: None), progress, cancelled)
    if not ok and rejected is not None:
        rejected.add(ident)
    return ok


def _verified(dest: Path, size: int, source: hub.Source, say: Log, progress, cancelled) -> bool:
    if source.size is not None and size != source.size:
        say(f"{dest.name}: {size} bytes, the source has {source.size}: downloading it again")
        return False
    rec = read_record(dest)
    if rec and rec.get("complete") and rec.get("size") == size and _same_source(rec, source):
        return True
    if source.sha256:
        say(f"{dest.name}: already there, unrecorded: checking its sha256")
        if progress:
            progress(size, 0, STATUS_CHECKING)
        got = download.sha256_file(dest, cancelled=cancelled).hexdigest()
        if got != source.sha256:
            say(f"{dest.name}: sha256 {got}, expected {source.sha256}: downloading it again")
            return False
        write_record(dest, source, complete=True, size=size, sha256=got)
        return True
    if rec is None:
        say(f"{dest.name}: already there; not verified (no sha256 known, no download record)")
        return True
    say(f"{dest.name}: the file there came from {rec.get('source')}: downloading it again")
    return False


def recall(spec: hub.Spec, folder: Path) -> hub.Source | None:
    """A model downloaded earlier for this spec (its record), for a boot while the hub is down."""
    try:
        records = sorted(Path(folder).glob(".*.download.json"))
    except OSError:
        return None
    for path in records[:1024]:
        name = path.name[1:-len(".download.json")]
        rec = read_record(path.with_name(name))
        if rec and rec.get("complete") and rec.get("source") == spec.shown and \
                hub.FILE_RE.match(name) and (Path(folder) / name).is_file():
            return hub.Source(spec, "", name, rec.get("sha256"), rec.get("size"), None)
    return None


def resolve(spec: hub.Spec, folder: Path, *, endpoint: str, token: str | None,
            log: Log | None = None, **retry) -> hub.Source:
    """hub.resolve, or, when the hub cannot be reached, what an earlier download recorded. With
    such a record the hub is asked once (no retries): a boot while the hub is down is not held up
    by the backoff."""
    found = recall(spec, folder) if spec.kind != "url" else None
    if found is not None:
        retry = {**retry, "attempts": 1}
    try:
        return hub.resolve(spec, endpoint=endpoint, token=token, log=log, **retry)
    except DownloadError as exc:
        if found is None or not exc.retryable:
            raise
        if log:
            log(f"{spec.shown}: {exc}; using {found.filename}, downloaded earlier")
        return found


def ensure(source: hub.Source, folder: Path, *, progress: Progress | None = None,
           log: Log | None = None, log_every: float = 5.0,
           cancelled: Callable[[], bool] | None = None, deadline: float | None = None,
           stale_after: float = fetchlock.STALE_AFTER_S,
           heartbeat: float = fetchlock.HEARTBEAT_S, poll: float = WAIT_POLL_S,
           **transfer) -> Path:
    """FOLDER/NAME, verified, downloaded by this process or by another one sharing the folder.

    transfer: download_file's keyword arguments (attempts, backoff, disk_margin). Raises
    DownloadError (DownloadCancelled when cancelled() said stop) or hub.SourceError."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / source.filename
    lock = fetchlock.DownloadLock(lock_path(dest), heartbeat_s=heartbeat)
    watch = fetchlock.LockWatch(lock.path, stale_after=stale_after)
    said_wait, rejected = 0.0, set()
    while True:
        if present(dest, source, log=log, progress=progress, cancelled=cancelled,
                   rejected=rejected):
            return dest
        if not source.url:
            raise DownloadError(f"{dest.name}: not in {folder} and the hub cannot be reached")
        if cancelled and cancelled():
            raise DownloadCancelled(f"{dest.name}: cancelled")
        if deadline is not None and time.monotonic() > deadline:
            raise DownloadError(f"{dest.name}: not there by the deadline")
        if lock.acquire():
            try:
                if present(dest, source, rejected=rejected):  # done while we looked away
                    return dest
                return _download(source, dest, lock, progress=progress, log=log,
                                 log_every=log_every, cancelled=cancelled, deadline=deadline,
                                 **transfer)
            except DownloadCancelled:
                if not lock.lost.is_set():
                    raise
                if log:
                    log(f"{dest.name}: another worker took the download over; waiting for it")
            finally:
                lock.release()
            continue
        state = watch.stale()
        if state:
            if log:
                log(f"{dest.name}: the lock of {watch.holder} is stale; taking the download over")
            watch.break_lock()
            continue
        if state is None:
            continue                                    # just released: look again
        now = time.monotonic()
        say = log if log and now - said_wait >= log_every else None
        if say:
            said_wait = now
        if progress or say:
            _report_wait(dest, source, watch.holder, progress, say)
        end = now + poll
        while (left := end - time.monotonic()) > 0:     # a cancel is noticed within 0.2 s
            if cancelled and cancelled():
                raise DownloadCancelled(f"{dest.name}: cancelled")
            time.sleep(min(left, 0.2))


def _report_wait(dest: Path, source: hub.Source, holder, progress, log) -> None:
    try:
        have = download.partial_path(dest).stat().st_size
    except OSError:
        have = 0
    total = source.size
    if total is None:
        rec = read_record(dest)
        total = rec.get("size") if rec and isinstance(rec.get("size"), int) else None
    if progress:
        progress(total, have, STATUS_WAITING)
    if log:
        done = f"{100 * have / total:.1f}% of {download.mb(total)}" if total else \
            download.mb(have)
        log(f"{dest.name}: {holder} is downloading it ({done} so far); waiting")


def _download(source: hub.Source, dest: Path, lock: fetchlock.DownloadLock, *, progress, log,
              log_every, cancelled, deadline, **transfer) -> Path:
    rec = read_record(dest)
    part = download.partial_path(dest)
    if part.exists() and not (rec and not rec.get("complete") and
                              rec.get("source") == source.spec.shown and
                              rec.get("sha256") in (None, source.sha256) and
                              rec.get("size") in (None, source.size)):
        if log:
            log(f"{dest.name}: discarding a partial download from another source")
        part.unlink(missing_ok=True)
    write_record(dest, source, complete=False, size=source.size, sha256=source.sha256)
    if log:
        size = download.mb(source.size) if source.size is not None else "size unknown"
        log(f"{dest.name}: downloading from {source.spec.shown} ({size})")

    def stop() -> bool:
        return lock.lost.is_set() or bool(cancelled and cancelled())

    def verified(got: download.Downloaded) -> None:
        write_record(dest, source, complete=True, size=got.size, sha256=got.sha256)

    t0 = time.monotonic()
    got = download.download_file(source.url, dest, sha256=source.sha256, size=source.size,
                                 auth=source.auth, progress=progress, log=log,
                                 log_every=log_every, cancelled=stop, deadline=deadline,
                                 on_verified=verified, **transfer)
    took = max(time.monotonic() - t0, 1e-6)
    if log:
        log(f"{dest.name}: downloaded {download.mb(got.size)} in {took:.1f} s "
            f"({got.size / took / 1e6:.1f} MB/s), sha256 {got.sha256}")
    return dest
