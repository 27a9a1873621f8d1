"""Edits of the key file, for the CLI (scripts/keys.py) and the admin API: list the keys, add,
change the settings of, rotate and revoke a key. Every edit reads the file, changes one line,
checks the whole new text with the gateway's own parser, and rewrites the file atomically with
mode 600 (temp file, fsync, rename): comments, blank lines and the other keys' lines are kept as
they are. The changed line is written in canonical form (settings in keys.SETTINGS order, a
default left out, models sorted).

An edit that finds the file changed between its read and its write (another `keys.py`, the admin
API, an editor) writes nothing and raises KeyEditError: no edit is silently lost.

Synchronous file I/O: the gateway calls these from a thread (asyncio.to_thread), never on the
event loop. KeyEditError and KeyFileError messages name the file and never hold a secret.

Public API:
    list_keys(path) -> list[ListedKey]                       (info, hashed)
    add_key(path, info, *, hashed=False) -> str              the new secret, to show once
    update_key(path, key_id, changes) -> KeyInfo             changes: {setting: value | None}
    rotate_key(path, key_id) -> str                          the new secret, same settings
    revoke_key(path, key_id) -> None
    format_settings(info) -> list[str]                       ["rpm=30", "role=admin", ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Mapping

from llamagw.atomicfile import write_atomic
from llamagw.limits.keys import (_FIELD_SEP_RE, HASHED_PREFIX, KEY_PREFIX, KEY_RANDOM_BYTES,
                                 MAX_KEY_FILE_BYTES, ROLE_USER, SETTINGS, KeyFileError, KeyInfo,
                                 _Entry, _decode, _parse_entries, _read_key_file, _signature,
                                 check_setting)


log = logging.getLogger("gateway.keys")


class KeyEditError(Exception):
    """An edit that cannot be made (no such key, name taken, file changed meanwhile)."""


@dataclasses.dataclass(frozen=True)
class ListedKey:
    info: KeyInfo
    hashed: bool          # the file holds only sha256:<hex> of the secret


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def format_settings(info: KeyInfo) -> list[str]:
    """The settings of `info` as name=value tokens, in SETTINGS order, defaults left out."""
    parts = []
    for name in SETTINGS:
        value = getattr(info, name)
        if value is None or (name == "role" and value == ROLE_USER):
            continue
        if name == "models":
            value = ",".join(sorted(value))
        parts.append(f"{name}={value}")
    return parts


def _stored(secret: str, hashed: bool) -> str:
    return HASHED_PREFIX + hashlib.sha256(secret.encode("ascii")).hexdigest() if hashed \
        else secret


def _format_line(head: str, info: KeyInfo) -> str:
    """`head` is key_id:stored-secret, as found in the file or made by _stored()."""
    return " ".join([head, *format_settings(info)])


def _read_for_edit(path: str, must_exist: bool) -> tuple[list[str], list[_Entry]]:
    if not os.path.exists(path):
        if must_exist:
            raise KeyEditError(f"{path}: not found")
        return [], []
    text, _ = _read_key_file_lenient(path)
    entries = _parse_entries(text, path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines, entries


def _read_key_file_lenient(path: str) -> tuple[str, tuple]:
    """Like _read_key_file, but a too-open mode is only a warning: an edit rewrites with 600."""
    try:
        return _read_key_file(path)
    except KeyFileError as exc:
        if "chmod 600" not in str(exc):
            raise
        log.warning("%s", exc)
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes", path) from None
        return _decode(data, path), ()


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def _find(entries: list[_Entry], name: str, path: str) -> _Entry:
    for entry in entries:
        if entry.info.key_id == name:
            return entry
    raise KeyEditError(f"{path}: no key named {name!r}")


def _current_signature(path: str) -> tuple | None:
    try:
        return _signature(os.stat(path))
    except FileNotFoundError:
        return None


def _edit(path: str, must_exist: bool,
          change: Callable[[list[str], list[_Entry]], object]) -> object:
    """Read, let `change` edit the lines in place (it returns the edit's result), check the new
    text parses, and write it unless the file changed since it was read."""
    before = _current_signature(path)
    lines, entries = _read_for_edit(path, must_exist)
    if _current_signature(path) != before:
        raise KeyEditError(f"{path}: changed while being read; nothing written, try again")
    result = change(lines, entries)
    text = _join(lines)
    _parse_entries(text, path)      # never write a file the gateway would refuse
    if _current_signature(path) != before:
        raise KeyEditError(f"{path}: changed by someone else during the edit; nothing written, "
                           "try again")
    write_atomic(path, text, prefix=".keys-", make_dirs=True)
    return result


def _head(line: str) -> str:
    """key_id:stored-secret of a key line (what an edit of its settings keeps as it is)."""
    return _FIELD_SEP_RE.split(line.strip(" \t\r"))[0]


def list_keys(path: str) -> list[ListedKey]:
    """The keys in the file, in file order. KeyEditError when there is no file."""
    _, entries = _read_for_edit(path, must_exist=True)
    return [ListedKey(e.info, e.hashed) for e in entries]


def add_key(path: str, info: KeyInfo, *, hashed: bool = False) -> str:
    """Append a new key with `info`'s id and settings (the file is made if missing); return its
    secret, which exists nowhere else (with hashed=True the file holds only its SHA-256)."""
    secret = new_secret()

    def change(lines: list[str], entries: list[_Entry]) -> None:
        if any(e.info.key_id == info.key_id for e in entries):
            raise KeyEditError(f"{path}: a key named {info.key_id!r} exists "
                               "(use set, rotate or revoke)")
        lines.append(_format_line(f"{info.key_id}:{_stored(secret, hashed)}", info))

    _edit(path, False, change)
    return secret


def update_key(path: str, key_id: str, changes: Mapping[str, object]) -> KeyInfo:
    """Change settings of a key, keeping its secret: {setting: new value, or None to remove it
    (role: back to user)}. Values are checked as in the file (keys.check_setting); models is an
    iterable of names. Returns the key's new KeyInfo."""
    values: dict[str, object] = {}
    for name, value in changes.items():
        if name not in SETTINGS:
            raise KeyEditError(f"unknown setting {name!r} (known: {', '.join(SETTINGS)})")
        if value is None:
            values[name] = ROLE_USER if name == "role" else None
            continue
        if name == "models" and not isinstance(value, str):
            value = list(value)
            if not all(isinstance(m, str) for m in value):
                raise KeyEditError("models must be a list of model names")
            text = ",".join(value)
        else:
            text = str(value)
        try:
            values[name] = check_setting(name, text)
        except ValueError as exc:
            raise KeyEditError(str(exc)) from None

    def change(lines: list[str], entries: list[_Entry]) -> KeyInfo:
        entry = _find(entries, key_id, path)
        info = dataclasses.replace(entry.info, **values)
        lines[entry.lineno - 1] = _format_line(_head(lines[entry.lineno - 1]), info)
        return info

    return _edit(path, True, change)


def rotate_key(path: str, key_id: str) -> str:
    """A new secret for a key, same id, settings and form; return the secret. The old secret
    stops working at the gateway's next reload."""
    secret = new_secret()

    def change(lines: list[str], entries: list[_Entry]) -> None:
        entry = _find(entries, key_id, path)
        head = f"{key_id}:{_stored(secret, entry.hashed)}"
        lines[entry.lineno - 1] = _format_line(head, entry.info)

    _edit(path, True, change)
    return secret


def revoke_key(path: str, key_id: str) -> None:
    """Remove a key's line (it stops working at the gateway's next reload)."""
    def change(lines: list[str], entries: list[_Entry]) -> None:
        del lines[_find(entries, key_id, path).lineno - 1]

    _edit(path, True, change)
