"""Edits of the key file for the CLI (scripts/keys.py): read it for editing, format a key line,
find a key by name, rewrite the file atomically with mode 600 (temp file, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import tempfile

from llamagw.limits.keys import (HASHED_PREFIX, KEY_PREFIX, KEY_RANDOM_BYTES, MAX_KEY_FILE_BYTES,
                                 KeyFileError, _Entry, _decode, _parse_entries, _read_key_file)


# --- CLI --------------------------------------------------------------------------------------
class CliError(Exception):
    pass


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def _format_line(key_id: str, secret: str, hashed: bool, rpm: int | None,
                 concurrency: int | None) -> str:
    stored = HASHED_PREFIX + hashlib.sha256(secret.encode("ascii")).hexdigest() if hashed \
        else secret
    parts = [f"{key_id}:{stored}"]
    if rpm is not None:
        parts.append(f"rpm={rpm}")
    if concurrency is not None:
        parts.append(f"concurrency={concurrency}")
    return " ".join(parts)


def _read_for_edit(path: str, must_exist: bool) -> tuple[list[str], list[_Entry]]:
    if not os.path.exists(path):
        if must_exist:
            raise CliError(f"{path}: not found")
        return [], []
    text, _ = _read_key_file_lenient(path)
    entries = _parse_entries(text, path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines, entries


def _read_key_file_lenient(path: str) -> tuple[str, tuple]:
    """Like _read_key_file, but a too-open mode is only a warning: the CLI rewrites with 600."""
    try:
        return _read_key_file(path)
    except KeyFileError as exc:
        if "chmod 600" not in str(exc):
            raise
        print(f"warning: {exc}", file=sys.stderr)
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes", path) from None
        return _decode(data, path), ()


def write_atomic(path: str, text: str) -> None:
    """Temp file in the same directory, mode 600, fsync, rename over, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", suffix=".tmp", dir=directory)
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


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def _find(entries: list[_Entry], name: str, path: str) -> _Entry:
    for entry in entries:
        if entry.info.key_id == name:
            return entry
    raise CliError(f"{path}: no key named {name!r}")
