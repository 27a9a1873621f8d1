"""Who downloads a file when many workers share one folder (a network volume): a lock file.

    FOLDER/.NAME.lock   created with O_CREAT|O_EXCL by the one worker that downloads NAME; holds
                        {"host", "ns", "pid", "token", "started"}; its mtime is the heartbeat,
                        refreshed every HEARTBEAT_S while the download runs; removed at the end.

Why not fcntl/flock: on NFS a POSIX lock lives in a separate lock manager (NLM for v3, leases for
v4) that many volume providers and FUSE file systems implement partly or not at all: the call may
fail, succeed on every client at once, or leave the lock of a crashed client held until a lease
or the server's grace period ends, with no way to see who holds it. An exclusive create is one
atomic operation of the file system itself on NFSv3+ and on FUSE volumes; the file says who holds
it (the boot logs name the host), and the heartbeat tells a live holder from a dead one.

Stale rule. A waiter records the lock's (token, mtime) and, by its own monotonic clock, when they
last changed: unchanged for STALE_AFTER_S, the holder is dead (or hung) and the lock is broken.
Clocks of different hosts are never compared, only "has it changed". A holder on this very host
and pid namespace whose process is gone is dead at once (a worker restarted on the same volume).
Breaking: rename the lock to a unique name, then delete it (of several waiters that decide at the
same moment, one rename succeeds). The race left: a waiter renames a lock that another waiter had
just re-created. The holder checks its token at every heartbeat; a holder whose lock was taken
stops downloading (DownloadLock.lost) and waits like everyone else, so two downloads overlap for at
most one heartbeat, and both write the same bytes at the same offsets (download._write_all).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

# The holder touches the lock this often.
HEARTBEAT_S = 5.0
# A lock unchanged this long is stale. NFS clients cache file attributes (acregmax, 60 s by
# default), so a live holder's heartbeat may look frozen for a minute; twice that is safe.
STALE_AFTER_S = 120.0
# Largest lock file read: its JSON is ~150 bytes.
MAX_LOCK_BYTES = 4096


def host_id() -> tuple[str, str]:
    """(host name, pid namespace): pids are comparable only when both are equal (containers on
    one machine with host networking share the host name, not the pid namespace)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return socket.gethostname(), ns


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str = ""
    ns: str = ""
    pid: int = 0
    token: str = ""
    started: float = 0.0

    def __str__(self) -> str:
        return f"{self.host or '?'} pid {self.pid or '?'}"


def read_holder(path: Path) -> tuple[Holder, float] | None:
    """(holder, mtime) of a lock file, None when there is none. A lock being written (empty) or
    unreadable gives an empty Holder: it is still a lock."""
    try:
        mtime = os.stat(path).st_mtime
        with open(path, "rb") as fh:
            raw = fh.read(MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    except OSError:
        return Holder(), 0.0
    try:
        doc = json.loads(raw)
        holder = Holder(str(doc["host"]), str(doc.get("ns", "")), int(doc["pid"]),
                        str(doc["token"]), float(doc.get("started", 0)))
    except (ValueError, KeyError, TypeError):
        holder = Holder()
    return holder, mtime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True             # EPERM: it exists, it is someone else's
    return True


class DownloadLock:
    """The lock on one file's download. acquire() does not wait; see LockWatch for waiting."""

    def __init__(self, path: Path, *, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self.token = ""
        self.lost = threading.Event()       # set when the file is gone or someone else's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        token = secrets.token_hex(8)
        host, ns = host_id()
        body = json.dumps({"host": host, "ns": ns, "pid": os.getpid(), "token": token,
                           "started": time.time()}).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.token = token
        self.lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="download-lock", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            seen = read_holder(self.path)
            if seen is None or (seen[0].token and seen[0].token != self.token):
                self.lost.set()
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost.set()
                return
            except OSError:
                pass            # a hiccup of the volume: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        seen = read_holder(self.path)
        if seen is not None and seen[0].token == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.token = ""


class LockWatch:
    """A waiter's view of someone else's lock: is it stale yet?"""

    def __init__(self, path: Path, *, stale_after: float = STALE_AFTER_S):
        self.path = Path(path)
        self.stale_after = stale_after
        self.seen: tuple[str, float] | None = None
        self.since = time.monotonic()
        self.holder = Holder()

    def stale(self) -> bool | None:
        """None: there is no lock (any more); True: stale; False: a live holder."""
        got = read_holder(self.path)
        if got is None:
            self.seen = None
            return None
        holder, mtime = got
        self.holder = holder
        now = time.monotonic()
        if (holder.token, mtime) != self.seen:
            self.seen, self.since = (holder.token, mtime), now
        if holder.pid and (holder.host, holder.ns) == host_id() and holder.pid != os.getpid() \
                and not _alive(holder.pid):
            return True
        return now - self.since >= self.stale_after

    def break_lock(self) -> None:
        """Move the stale lock out of the way (a unique name first: one breaker wins)."""
        host, _ = host_id()
        aside = self.path.with_name(f"{self.path.name}.stale.{host}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            aside.unlink()
        except FileNotFoundError:
            pass
        self.seen = None
        self.since = time.monotonic()
