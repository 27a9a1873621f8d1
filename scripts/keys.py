"""The key-management CLI for the gateway's key file (its format: llamagw/limits/keys.py).

    python3 scripts/keys.py [--file PATH] add NAME [--rpm N] [--concurrency N] [--hashed]
    python3 scripts/keys.py [--file PATH] list | revoke NAME | rotate NAME

The file is rewritten atomically with mode 600 (llamagw/limits/keyfile.py); comments and other
lines are kept. A new key is printed once, on stdout, alone on its line. Standard library only.
"""

from __future__ import annotations

import argparse
import sys

from llamagw import config
from llamagw.limits.keyfile import (CliError, _find, _format_line, _join, _read_for_edit,
                                    new_secret, write_atomic)
from llamagw.limits.keys import KEY_ID_RE, MAX_SETTING_VALUE, _DIGITS_RE, KeyFileError


def _positive(text: str) -> int:
    if not _DIGITS_RE.fullmatch(text) or not 1 <= int(text) <= MAX_SETTING_VALUE:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_SETTING_VALUE}")
    return int(text)


def _key_id(text: str) -> str:
    if not KEY_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return text


def _cmd_add(path: str, args) -> int:
    lines, entries = _read_for_edit(path, must_exist=False)
    if any(e.info.key_id == args.name for e in entries):
        raise CliError(f"{path}: a key named {args.name!r} exists (use rotate or revoke)")
    secret = new_secret()
    lines.append(_format_line(args.name, secret, args.hashed, args.rpm, args.concurrency))
    write_atomic(path, _join(lines))
    form = "hashed" if args.hashed else "plaintext"
    print(f"added key {args.name!r} ({form}) to {path}; it is shown once, store it now:",
          file=sys.stderr)
    print(secret)
    return 0


def _cmd_rotate(path: str, args) -> int:
    lines, entries = _read_for_edit(path, must_exist=True)
    entry = _find(entries, args.name, path)
    secret = new_secret()
    lines[entry.lineno - 1] = _format_line(args.name, secret, entry.hashed, entry.info.rpm,
                                           entry.info.concurrency)
    write_atomic(path, _join(lines))
    print(f"rotated key {args.name!r} in {path}; the old key stops working at the next reload; "
          "the new one is shown once, store it now:", file=sys.stderr)
    print(secret)
    return 0


def _cmd_revoke(path: str, args) -> int:
    lines, entries = _read_for_edit(path, must_exist=True)
    entry = _find(entries, args.name, path)
    del lines[entry.lineno - 1]
    write_atomic(path, _join(lines))
    print(f"revoked key {args.name!r} in {path} (takes effect at the next reload)")
    return 0


def _cmd_list(path: str, args) -> int:
    _, entries = _read_for_edit(path, must_exist=True)
    print(f"{'KEY_ID':<24} {'FORM':<9} {'RPM':>8} {'CONCURRENCY':>11}")
    for e in entries:
        rpm = str(e.info.rpm) if e.info.rpm is not None else "default"
        conc = str(e.info.concurrency) if e.info.concurrency is not None else "default"
        form = "hashed" if e.hashed else "plaintext"
        print(f"{e.info.key_id:<24} {form:<9} {rpm:>8} {conc:>11}")
    print(f"{len(entries)} key(s) in {path}", file=sys.stderr)
    return 0


def _default_path() -> str:
    try:
        return config.load_config().auth_keys_file
    except config.ConfigError as exc:
        raise CliError(f"configuration: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keys.py", description="Manage the gateway's API keys.")
    p.add_argument("--file", help="key file (default: AUTH_KEYS_FILE or $DATA_DIR/api_keys.txt)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="make a new key and print it once")
    add.add_argument("name", type=_key_id)
    add.add_argument("--rpm", type=_positive, help="requests per minute for this key")
    add.add_argument("--concurrency", type=_positive, help="requests in flight for this key")
    add.add_argument("--hashed", action="store_true",
                     help="store only sha256:<hex> of the key in the file")
    sub.add_parser("list", help="list key ids and settings (never secrets)")
    rev = sub.add_parser("revoke", help="remove a key")
    rev.add_argument("name", type=_key_id)
    rot = sub.add_parser("rotate", help="new secret for a key, same id and settings")
    rot.add_argument("name", type=_key_id)
    return p


_COMMANDS = {"add": _cmd_add, "list": _cmd_list, "revoke": _cmd_revoke, "rotate": _cmd_rotate}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return 0 if exc.code == 0 else 1
    try:
        path = args.file or _default_path()
        return _COMMANDS[args.command](path, args)
    except (CliError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
