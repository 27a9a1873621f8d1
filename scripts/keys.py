"""The key-management CLI for the gateway's key file (its format: llamagw/limits/keys.py).

    python3 scripts/keys.py [--file PATH] add NAME [--rpm N] [--concurrency N] [--role admin|user]
                                         [--models a,b] [--tpm N] [--tpd N] [--hashed]
    python3 scripts/keys.py [--file PATH] set NAME [--rpm N | --no-rpm]
                                         [--concurrency N | --no-concurrency] [--role admin|user]
                                         [--models a,b | --all-models] [--tpm N | --no-tpm]
                                         [--tpd N | --no-tpd]
    python3 scripts/keys.py [--file PATH] list | revoke NAME | rotate NAME
    python3 scripts/keys.py usage [KEY_ID] [--since 7d] [--until T] [--by day|hour|model|key]
                                  [--dir USAGE_DIR] [--csv]

Edits go through llamagw/limits/keyfile.py: the file is rewritten atomically with mode 600;
comments and other lines are kept. A new key is printed once, on stdout, alone on its line; no
other command prints a secret. `set` changes settings and keeps the secret. `usage` adds up the
usage ledger of every worker ($DATA_DIR/usage/*.sqlite, llamagw/observe/usage.py). Standard
library only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from llamagw import config
from llamagw.limits.keyfile import (KeyEditError, add_key, format_settings, list_keys,
                                    revoke_key, rotate_key, update_key)
from llamagw.limits.keys import (KEY_ID_RE, NUMBER_SETTINGS, ROLES, KeyFileError, KeyInfo,
                                 check_setting)

# What `usage --since` defaults to: a week, the example.
DEFAULT_SINCE = "7d"
USAGE_GROUPS = ("day", "hour", "model", "key")


def _setting(name: str):
    """An argparse type that checks a value as the key file does (keys.check_setting)."""
    def parse(text: str):
        try:
            return check_setting(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name      # argparse names the option's type in its messages
    return parse


def _key_id(text: str) -> str:
    if not KEY_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return text


def _cell(text: str) -> str:
    """Text for a terminal: a model name in the ledger is the client's text, so control
    characters (escape sequences) are shown escaped, never sent to the terminal."""
    return text if text.isprintable() else repr(text)[1:-1]


def _print_table(headers: list[str], rows: list[list[str]], numbers: range) -> None:
    """Columns sized to their longest cell; the columns in `numbers` right-aligned, the others
    left-aligned; no trailing spaces."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        cells = [c.rjust(w) if i in numbers else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def _cmd_add(path: str, args) -> int:
    info = KeyInfo(args.name, rpm=args.rpm, concurrency=args.concurrency,
                   role=args.role or "user", models=args.models, tpm=args.tpm, tpd=args.tpd)
    secret = add_key(path, info, hashed=args.hashed)
    form = "hashed" if args.hashed else "plaintext"
    print(f"added key {args.name!r} ({form}) to {path}; it is shown once, store it now:",
          file=sys.stderr)
    print(secret)
    return 0


def _cmd_set(path: str, args) -> int:
    changes: dict[str, object] = {}
    for name in NUMBER_SETTINGS:
        if getattr(args, f"no_{name}"):
            changes[name] = None
        elif getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.role is not None:
        changes["role"] = args.role
    if args.all_models:
        changes["models"] = None
    elif args.models is not None:
        changes["models"] = args.models
    if not changes:
        raise KeyEditError("nothing to change (give at least one setting; see set --help)")
    info = update_key(path, args.name, changes)
    settings = " ".join(format_settings(info)) or "the gateway's defaults"
    print(f"updated key {args.name!r} in {path} (takes effect at the next reload): {settings}")
    return 0


def _cmd_rotate(path: str, args) -> int:
    secret = rotate_key(path, args.name)
    print(f"rotated key {args.name!r} in {path}; the old key stops working at the next reload; "
          "the new one is shown once, store it now:", file=sys.stderr)
    print(secret)
    return 0


def _cmd_revoke(path: str, args) -> int:
    revoke_key(path, args.name)
    print(f"revoked key {args.name!r} in {path} (takes effect at the next reload)")
    return 0


def _cmd_list(path: str, args) -> int:
    listed = list_keys(path)
    rows = []
    for k in listed:
        i = k.info
        rows.append([
            i.key_id, "hashed" if k.hashed else "plaintext", i.role,
            "default" if i.rpm is None else str(i.rpm),
            "default" if i.concurrency is None else str(i.concurrency),
            "-" if i.tpm is None else str(i.tpm),
            "-" if i.tpd is None else str(i.tpd),
            "all" if i.models is None else ",".join(sorted(i.models))])
    _print_table(["KEY_ID", "FORM", "ROLE", "RPM", "CONCURRENCY", "TPM", "TPD", "MODELS"], rows,
                 numbers=range(3, 7))
    print(f"{len(listed)} key(s) in {path}", file=sys.stderr)
    return 0


def _cmd_usage(path: str, args) -> int:
    from llamagw.observe import usage     # sqlite3 only for this command
    now = time.time()
    try:
        since = usage.parse_time(args.since, now=now)
        until = usage.parse_time(args.until, now=now) if args.until else None
    except ValueError as exc:
        raise KeyEditError(f"--since/--until: {exc}") from None
    folder = args.dir or usage.usage_dir(_config().data_dir)
    group = args.by
    rows = usage.query(folder, since=since, until=until, group=group, key_id=args.key_id)
    if args.csv:
        sys.stdout.write(usage.to_csv(rows, group))
        return 0
    field = usage.GROUP_FIELD[group]
    table, totals = [], [0, 0, 0, 0]
    for row in rows:
        counts = [row["requests"], row["prompt_tokens"], row["completion_tokens"], row["errors"]]
        totals = [a + b for a, b in zip(totals, counts)]
        table.append([_cell(str(row[field])) or "-", *_numbers(counts)])
    table.append(["total", *_numbers(totals)])
    _print_table([field.upper(), "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS",
                  "TOTAL_TOKENS", "ERRORS"], table, numbers=range(1, 6))
    span = f"since {usage.iso_utc(int(since))}" + (
        f" until {usage.iso_utc(int(until))}" if until is not None else "")
    who = f"key {args.key_id!r}" if args.key_id else "all keys"
    print(f"usage of {who} {span}, from {folder}", file=sys.stderr)
    return 0


def _numbers(counts: list[int]) -> list[str]:
    requests, prompt, completion, errors = counts
    return [str(requests), str(prompt), str(completion), str(prompt + completion), str(errors)]


def _config() -> config.Config:
    try:
        return config.load_config()
    except config.ConfigError as exc:
        raise KeyEditError(f"configuration: {exc}") from None


def _add_settings(p: argparse.ArgumentParser, removable: bool) -> None:
    helps = {"rpm": "requests per minute", "concurrency": "requests in flight",
             "tpm": "tokens (prompt + completion) per minute",
             "tpd": "tokens (prompt + completion) per UTC day"}
    for name, what in helps.items():
        target = p.add_mutually_exclusive_group() if removable else p
        target.add_argument(f"--{name}", type=_setting(name), help=f"{what} for this key")
        if removable:
            target.add_argument(f"--no-{name}", action="store_true",
                                help=f"remove {name} (back to the default)")
    p.add_argument("--role", choices=ROLES, help="admin: may use the admin API (default user)")
    models = p.add_mutually_exclusive_group() if removable else p
    models.add_argument("--models", type=_setting("models"), metavar="A,B",
                        help="the only models this key may use (default: all)")
    if removable:
        models.add_argument("--all-models", action="store_true",
                            help="remove the models list: every model")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keys.py", description="Manage the gateway's API keys.")
    p.add_argument("--file", help="key file (default: AUTH_KEYS_FILE or $DATA_DIR/api_keys.txt)")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="make a new key and print it once")
    add.add_argument("name", type=_key_id)
    _add_settings(add, removable=False)
    add.add_argument("--hashed", action="store_true",
                     help="store only sha256:<hex> of the key in the file")
    set_ = sub.add_parser("set", help="change a key's settings, keep its secret")
    set_.add_argument("name", type=_key_id)
    _add_settings(set_, removable=True)
    sub.add_parser("list", help="list key ids and settings (never secrets)")
    rev = sub.add_parser("revoke", help="remove a key")
    rev.add_argument("name", type=_key_id)
    rot = sub.add_parser("rotate", help="new secret for a key, same id and settings")
    rot.add_argument("name", type=_key_id)
    use = sub.add_parser("usage", help="requests and tokens from the usage ledger")
    use.add_argument("key_id", nargs="?", type=_key_id, help="only this key")
    use.add_argument("--since", default=DEFAULT_SINCE,
                     help="7d, 24h, 30m, an epoch or ISO-8601 time (default: %(default)s)")
    use.add_argument("--until", help="end of the span, same forms (default: now)")
    use.add_argument("--by", choices=USAGE_GROUPS, default="day",
                     help="one row per day (UTC), hour, model or key (default: %(default)s)")
    use.add_argument("--dir", help="usage folder or one ledger file (default: $DATA_DIR/usage)")
    use.add_argument("--csv", action="store_true", help="CSV instead of a table")
    return p


_COMMANDS = {"add": _cmd_add, "set": _cmd_set, "list": _cmd_list, "revoke": _cmd_revoke,
             "rotate": _cmd_rotate, "usage": _cmd_usage}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return 0 if exc.code == 0 else 1
    try:
        if args.command == "usage":
            path = ""              # the key file is not read
        else:
            path = args.file or _config().auth_keys_file
        return _COMMANDS[args.command](path, args)
    except (KeyEditError, KeyFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Warnings of the library (a key file open to others, a ledger file skipped) on stderr.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    sys.exit(main())
