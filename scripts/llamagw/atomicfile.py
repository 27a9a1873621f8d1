"""Replace a small text file atomically: a reader sees the old file or the new one, never half.

Used for every file the gateway or its programs rewrite in place (the key file, the router's
generated preset). Stdlib only, blocking: call it from a thread where an event loop runs.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, text: str, prefix: str = ".tmp-", *, make_dirs: bool = False) -> None:
    """Temp file in the same directory, mode 600, fsync, rename over, fsync the directory.
    make_dirs: create a missing directory (mode 700) first; else a missing one is an OSError."""
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is done
