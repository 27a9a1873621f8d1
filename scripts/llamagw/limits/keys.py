"""API keys: the key file, hot reload, constant-time lookup -> key_id (the CLI: scripts/keys.py).

Key file (AUTH_KEYS_FILE, default $DATA_DIR/api_keys.txt), one key per line:

    # comment lines and blank lines are ignored
    alice:sk-Q0bX...                       plaintext secret (at least 16 characters)
    bob:sha256:9f86d081884c7d65...         SHA-256 of the secret, 64 hex digits
    carol:sk-7Hq... rpm=30 concurrency=2   optional per-key settings after the secret
    dave:sk-Xv2... role=admin models=qwen3-8b,llama-3.2-1b tpm=20000 tpd=2000000

- key_id: [A-Za-z0-9._-]{1,64}. It is what logs, metrics and limits see; it is not secret.
- The secret is everything after the first ':' up to the first space or tab: printable ASCII.
  Sent as `Authorization: Bearer <secret>` it must be an RFC 6750 b64token (A-Z a-z 0-9 - . _ ~
  + /, then '=' padding), as generated keys are; a secret with other characters is loaded with
  a warning naming its key_id, and works as `x-api-key` only.
  A secret that starts with "sha256:" is the hashed form, so a plaintext secret may not start with
  "sha256:" (that is the only ':' ambiguity, and it is refused rather than guessed).
- Plaintext secrets need at least MIN_SECRET_LEN characters: the gateway faces the internet and
  nothing slows down guessing before a key is known, so a short or dictionary secret ("changeme")
  would be found; 16 random characters are >= 75 bits even from a lowercase alphabet. Keys made
  by `keys.py add` are "sk-" + 43 url-safe characters (256 random bits).
- Settings, each at most once, in any order (`keys.py add` / `set` write them in this order):
    rpm=N          requests per minute; concurrency=N  requests in flight: whole numbers from
                   1 to MAX_SETTING_VALUE; without them the gateway's defaults apply
    role=user|admin  admin keys may use the admin API; default user
    models=a,b     the only models the key may use (names as router mode's model names,
                   llamagw.models.preset.check_name); without it, every model
    tpm=N tpd=N    tokens (prompt + completion) per minute / per UTC day, up to
                   MAX_TOKEN_SETTING_VALUE; without them, no token limit
  Unknown settings, a setting given twice and bad values are errors. check_setting() is the one
  rule for a setting's value (the file, the CLI and the admin API all use it).
- The file must not be readable or writable by group or others (chmod 600).

Errors name the file and the line number and never contain the secret (nor the line's text: a
malformed line may be a pasted key). Only SHA-256 digests of the secrets are kept in memory.

CLI (stdlib only): python3 scripts/keys.py [--file PATH] add | set | list | revoke | rotate | usage
(see scripts/keys.py). Edits (llamagw/limits/keyfile.py) rewrite the file atomically with mode 600
and keep comments and other lines. A new key is printed once, on stdout, alone on its line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import re
import stat

from llamagw import errors
from llamagw.models.preset import MAX_MODELS, MAX_NAME_LEN, check_name

# --- limits -----------------------------------------------------------------------------------
# 16: see the module docstring (guessing resistance of a plaintext secret).
MIN_SECRET_LEN = 16
# 512: generated keys are 46 characters; anything near this bound is a mistake, not a key.
MAX_SECRET_LEN = 512
# A presented key longer than this cannot match (no stored secret is longer): skip hashing it.
MAX_PRESENTED_KEY_LEN = MAX_SECRET_LEN
# 1 MiB: a key line is under 200 bytes, so this holds thousands of keys; bounds the read.
MAX_KEY_FILE_BYTES = 1 << 20
# 10,000,000: the same upper bound config.py puts on MAX_REQUESTS_PER_MINUTE.
MAX_SETTING_VALUE = 10_000_000
# 10,000,000,000 for tpm / tpd: one GPU reads prompts at thousands of tokens a second, ~10^8-10^9
# tokens a day, so rpm's bound would forbid a tpd above what one worker does; 10^10 is above any
# real budget and still refuses the value with digits to spare that nobody means.
MAX_TOKEN_SETTING_VALUE = 10_000_000_000
# A key names at most as many models as router mode serves (preset.MAX_MODELS).
MAX_KEY_MODELS = MAX_MODELS
# 2 s: the polling bound; a stat() every 2 s costs nothing.
DEFAULT_POLL_INTERVAL = 2.0
# 32 bytes = 256 random bits (>= 128 asked for), 43 url-safe characters.
KEY_RANDOM_BYTES = 32
KEY_PREFIX = "sk-"

KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
HASHED_PREFIX = "sha256:"
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_FIELD_SEP_RE = re.compile(r"[ \t]+")
_DIGITS_RE = re.compile(r"[0-9]{1,12}")
# name=value settings after the secret, each a KeyInfo field, in the order keys.py writes them.
SETTINGS = ("rpm", "concurrency", "role", "models", "tpm", "tpd")
# Whole-number settings -> their upper bound (the lower is 1).
NUMBER_SETTINGS = {"rpm": MAX_SETTING_VALUE, "concurrency": MAX_SETTING_VALUE,
                   "tpm": MAX_TOKEN_SETTING_VALUE, "tpd": MAX_TOKEN_SETTING_VALUE}
ROLE_USER = "user"
ROLE_ADMIN = "admin"
ROLES = (ROLE_USER, ROLE_ADMIN)

log = logging.getLogger("gateway.keys")


class KeyFileError(Exception):
    """The key file is unusable. str() names the file (and line); it never holds a secret."""

    def __init__(self, message: str, source: str = "<keys>", lineno: int | None = None):
        where = f"{source}:{lineno}" if lineno is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.lineno = lineno


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """A key's id and settings (never its secret). None: the setting is absent (the gateway's
    default for rpm / concurrency, no limit for tpm / tpd, every model for models)."""
    key_id: str
    rpm: int | None = None
    concurrency: int | None = None
    role: str = ROLE_USER
    models: frozenset[str] | None = None
    tpm: int | None = None
    tpd: int | None = None

    @property
    def is_admin(self) -> bool:
        """The key may use the admin API (role=admin)."""
        return self.role == ROLE_ADMIN

    def allows_model(self, model: str) -> bool:
        """The key may use `model` (no models= setting: every model)."""
        return self.models is None or model in self.models


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One parsed key line (internal: the CLI needs line numbers and the form)."""
    lineno: int
    digest: bytes
    hashed: bool
    info: KeyInfo
    bearer_ok: bool = True    # a Bearer token can carry the secret (unknown for hashed: True)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def _is_printable_ascii(text: str) -> bool:
    return all("\x21" <= ch <= "\x7e" for ch in text)


def check_setting(name: str, value: str) -> int | str | frozenset[str]:
    """The value of setting `name` from its text: an int for rpm / concurrency / tpm / tpd, the
    role, or the frozenset of model names. ValueError for an unknown setting or a bad value; the
    message never repeats the value (text after a secret may be the rest of a secret)."""
    if name in NUMBER_SETTINGS:
        bound = NUMBER_SETTINGS[name]
        if not _DIGITS_RE.fullmatch(value) or not 1 <= int(value) <= bound:
            raise ValueError(f"{name} must be a whole number from 1 to {bound}")
        return int(value)
    if name == "role":
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return value
    if name == "models":
        names = value.split(",")
        if value == "" or len(names) > MAX_KEY_MODELS:
            raise ValueError(f"models must name 1 to {MAX_KEY_MODELS} models, comma-separated "
                             "(leave the setting out for every model)")
        for i, model in enumerate(names, start=1):
            if check_name(model, "model") is not None:
                raise ValueError(f"models: name {i} is not a model name (letters, digits, '.', "
                                 "'_', '+', '-', starting with a letter or digit, at most "
                                 f"{MAX_NAME_LEN} characters)")
        if len(set(names)) != len(names):
            raise ValueError("models names a model twice")
        return frozenset(names)
    raise ValueError(f"unknown setting (known: {', '.join(SETTINGS)})")


def _parse_setting(token: str, seen: dict, source: str, lineno: int) -> None:
    name, sep, value = token.partition("=")
    if not sep:
        # Don't echo the token: text after the secret may be the rest of a secret with a space.
        raise KeyFileError("expected name=value settings after the secret "
                           f"(known: {', '.join(SETTINGS)})", source, lineno)
    if name not in SETTINGS:
        raise KeyFileError(f"unknown setting (known: {', '.join(SETTINGS)})", source, lineno)
    if name in seen:
        raise KeyFileError(f"setting {name} given twice", source, lineno)
    try:
        seen[name] = check_setting(name, value)
    except ValueError as exc:
        raise KeyFileError(str(exc), source, lineno) from None


def _parse_line(line: str, source: str, lineno: int) -> _Entry | None:
    text = line.strip(" \t\r")
    if not text or text.startswith("#"):
        return None
    fields = _FIELD_SEP_RE.split(text)
    head, settings = fields[0], fields[1:]
    key_id, sep, secret = head.partition(":")
    if not sep:
        raise KeyFileError("expected key_id:secret", source, lineno)
    if not KEY_ID_RE.fullmatch(key_id):
        raise KeyFileError("key_id must be 1-64 characters from A-Z a-z 0-9 . _ -",
                           source, lineno)
    if secret.startswith(HASHED_PREFIX):
        hexdigits = secret[len(HASHED_PREFIX):]
        if not _HEX64_RE.fullmatch(hexdigits):
            raise KeyFileError("hashed form is sha256:<64 hex digits> (a plaintext secret may "
                               "not start with 'sha256:')", source, lineno)
        digest, hashed = bytes.fromhex(hexdigits), True
    else:
        if not secret:
            raise KeyFileError("empty secret", source, lineno)
        if not _is_printable_ascii(secret):
            raise KeyFileError("secret must be printable ASCII", source, lineno)
        if len(secret) < MIN_SECRET_LEN:
            raise KeyFileError(f"secret shorter than {MIN_SECRET_LEN} characters "
                               "(make one with: keys.py add NAME)", source, lineno)
        if len(secret) > MAX_SECRET_LEN:
            raise KeyFileError(f"secret longer than {MAX_SECRET_LEN} characters", source, lineno)
        digest, hashed = _digest(secret), False
    seen: dict = {}
    for token in settings:
        _parse_setting(token, seen, source, lineno)
    info = KeyInfo(key_id, **seen)
    return _Entry(lineno, digest, hashed, info, hashed or bearer_token_ok(secret))


def _parse_entries(text: str, source: str) -> list[_Entry]:
    if len(text) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes", source)
    if text.startswith("\ufeff"):
        text = text[1:]
    entries: list[_Entry] = []
    by_id: dict[str, int] = {}
    by_digest: dict[bytes, int] = {}
    # split on "\n" only: str.splitlines() also splits on \x1c, \x85, \u2028 ...
    for lineno, line in enumerate(text.split("\n"), start=1):
        entry = _parse_line(line, source, lineno)
        if entry is None:
            continue
        key_id = entry.info.key_id
        if key_id in by_id:
            raise KeyFileError(f"duplicate key_id {key_id!r} (first on line {by_id[key_id]})",
                               source, lineno)
        if entry.digest in by_digest:
            raise KeyFileError(f"duplicate secret (same as line {by_digest[entry.digest]})",
                               source, lineno)
        by_id[key_id] = lineno
        by_digest[entry.digest] = lineno
        entries.append(entry)
    return entries


def parse_key_file(text: str, source: str = "<keys>") -> dict[bytes, KeyInfo]:
    """Parse key file text -> {sha256 digest of the secret: KeyInfo}. Raises KeyFileError."""
    return {e.digest: e.info for e in _parse_entries(text, source)}


def check_file_mode(path: str) -> None:
    """Refuse a key file that group or others may read or write (mode & 0o077)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError("not found (create a key with: keys.py add NAME)", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot stat: {exc.strerror}", path) from None
    _check_stat(st, path)


def _check_stat(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError("not a regular file", path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(f"mode {mode:04o} lets group or others access the keys; "
                           f"fix: chmod 600 {path}", path)


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise KeyFileError("not valid UTF-8", path, lineno) from None


def _read_key_file(path: str) -> tuple[str, tuple]:
    """Check mode, read the file (bounded). Returns (text, signature). Raises KeyFileError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError("not found (create a key with: keys.py add NAME)", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open: {exc.strerror}", path) from None
    try:
        st = os.fstat(fd)
        _check_stat(st, path)
        chunks, total = [], 0
        while total <= MAX_KEY_FILE_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"cannot read: {exc.strerror}", path) from None
    finally:
        os.close(fd)
    if total > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes", path)
    return _decode(b"".join(chunks), path), _signature(st)


def _signature(st: os.stat_result) -> tuple:
    # inode catches atomic renames, mtime_ns/size catch in-place edits, mode catches a chmod fix.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


class KeyStore:
    """The keys in force. One event loop owns it; lookups read an immutable snapshot."""

    def __init__(self, path: str, *, logger: logging.Logger | None = None,
                 poll_interval: float = DEFAULT_POLL_INTERVAL):
        self.path = path
        self.poll_interval = poll_interval
        self._log = logger or log
        self._table: dict[bytes, tuple[bytes, KeyInfo]] = {}
        self._by_id: dict[str, KeyInfo] = {}
        self._signature: tuple | None = None
        self._next_poll: float | None = None
        self._stat_error: str | None = None
        self.reloads = 0          # successful loads that changed the keys
        self.reload_errors = 0    # failed reloads (previous keys stayed in force)

    # -- loading -------------------------------------------------------------------------------
    def _read(self) -> tuple[dict[bytes, KeyInfo], tuple]:
        text, sig = _read_key_file(self.path)
        entries = _parse_entries(text, self.path)
        for e in entries:
            if not e.bearer_ok:
                self._log.warning(
                    "keys: %s:%d: the secret of key %r has characters a Bearer token cannot "
                    "carry (RFC 6750: A-Z a-z 0-9 - . _ ~ + / then = padding): clients must "
                    "send it as x-api-key (keys.py rotate makes a new one that fits)",
                    self.path, e.lineno, e.info.key_id)
        return {e.digest: e.info for e in entries}, sig

    def _install(self, table: dict[bytes, KeyInfo]) -> tuple[set[str], set[str], bool]:
        old = {info.key_id: (d, info) for d, (_, info) in self._table.items()}
        new = {info.key_id: (d, info) for d, info in table.items()}
        changed = old != new
        self._table = {d: (d, info) for d, info in table.items()}
        self._by_id = {info.key_id: info for info in table.values()}
        return set(new) - set(old), set(old) - set(new), changed

    def load(self) -> None:
        """Strict load (at start): raises KeyFileError; a missing file is an error."""
        table, sig = self._read()
        self._install(table)
        self._signature = sig
        self._stat_error = None
        self._log.info("keys: loaded %d key(s) from %s", len(table), self.path)

    def reload(self) -> bool:
        """Re-read the file, all or nothing. Errors are logged and the previous keys stay in
        force. Returns True if the set of keys or their settings changed."""
        try:
            table, sig = self._read()
            if sig[2] == 0 and self._table:
                # An empty file is most likely an editor that truncated it and is still writing.
                # To revoke every key on purpose, leave a comment line in the file.
                raise KeyFileError("file is empty (being written?); to revoke all keys keep a "
                                   "comment line in it", self.path)
        except KeyFileError as exc:
            self.reload_errors += 1
            try:
                self._signature = _signature(os.stat(self.path))  # don't retry until it changes
            except OSError:
                self._signature = None
            self._log.error("keys: reload failed, keeping %d key(s) in force: %s",
                            len(self._table), exc)
            return False
        self._signature = sig
        self._stat_error = None
        added, removed, changed = self._install(table)
        if changed:
            self.reloads += 1
            self._log.info("keys: reloaded %s: %d key(s); added %s; removed %s", self.path,
                           len(table), sorted(added) or "none", sorted(removed) or "none")
        return changed

    def maybe_reload(self, now: float) -> bool:
        """Poll: stat the file at most every poll_interval seconds, reload if it changed."""
        if self._next_poll is not None and now < self._next_poll:
            return False
        self._next_poll = now + self.poll_interval
        try:
            sig = _signature(os.stat(self.path))
        except OSError as exc:
            message = f"{self.path}: cannot stat: {exc.strerror}"
            if message != self._stat_error:  # log once per distinct problem
                self._stat_error = message
                self._log.error("keys: %s; keeping %d key(s) in force", message,
                                len(self._table))
            self._signature = None
            return False
        self._stat_error = None
        if sig == self._signature:
            return False
        return self.reload()

    # -- queries -------------------------------------------------------------------------------
    def lookup(self, presented: str) -> KeyInfo | None:
        """The KeyInfo of a presented secret, or None. Hashes first, then compares digests with
        hmac.compare_digest, so the time taken does not depend on how much of a secret matched."""
        if not presented or len(presented) > MAX_PRESENTED_KEY_LEN or not presented.isascii():
            return None
        digest = _digest(presented)
        entry = self._table.get(digest)  # the dict probe sees the digest, never the secret
        if entry is None:
            return None
        stored, info = entry
        return info if hmac.compare_digest(stored, digest) else None

    def get(self, key_id: str) -> KeyInfo | None:
        """The settings of a key_id in force (for limits after a reload)."""
        return self._by_id.get(key_id)

    def holds(self, key_id: str, digest: bytes) -> bool:
        """The key whose secret has this SHA-256 is in force under `key_id` (still the same
        secret after a reload: a rotated key answers False). For the dashboard's sessions."""
        entry = self._table.get(digest)
        return entry is not None and entry[1].key_id == key_id

    def key_ids(self) -> frozenset[str]:
        return frozenset(self._by_id)

    def __len__(self) -> int:
        return len(self._table)


# --- request headers --------------------------------------------------------------------------
# The protection spaces of the Bearer challenges (RFC 9110 11.5): the API keys, and METRICS_KEY.
AUTH_REALM = "api"
METRICS_REALM = "metrics"
# RFC 6750 2.1: credentials = "Bearer" 1*SP b64token (RFC 9110 11.4 calls the same syntax
# token68); the scheme is case-insensitive. Keys made by `keys.py add` are of this alphabet.
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]; auth-scheme = token
_CREDENTIALS_RE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)(?: +(.*))?", re.DOTALL)
# RFC 6750 3: error_description is %x20-21 / %x23-5B / %x5D-7E; anything else is dropped.
_NOT_DESCRIPTION_RE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_BEARER_USAGE = ("Authorization must be 'Bearer <key>', the key of the characters "
                 "A-Z a-z 0-9 - . _ ~ + / (then = padding); send other keys as x-api-key")


def bearer_challenge(realm: str, error: str | None = None, description: str | None = None
                     ) -> str:
    """A WWW-Authenticate value for the Bearer scheme (RFC 6750 3): the realm, and for a request
    that presented a token, the error code (3.1) and a description of it."""
    challenge = f'Bearer realm="{realm}"'
    if error:
        challenge += f', error="{error}"'
        if description:
            challenge += f', error_description="{_NOT_DESCRIPTION_RE.sub("", description)}"'
    return challenge


def _bad_credentials(message: str, code: str) -> errors.GatewayError:
    """400 for an ambiguous or malformed credential (RFC 6750 3.1 invalid_request). The
    connection closes after it, like every other refusal of a malformed request: who sent it is
    in doubt, and so is the next request on the same connection."""
    return errors.GatewayError(400, message, code, close=True, headers=[
        ("www-authenticate", bearer_challenge(AUTH_REALM, "invalid_request", message))])


def bearer_token_ok(secret: str) -> bool:
    """True if `secret` can be sent as a Bearer token (RFC 6750 b64token)."""
    return _TOKEN68_RE.fullmatch(secret) is not None


def extract_key(headers: list[tuple[str, str]]) -> str | None:
    """The presented key from `Authorization: Bearer <key>` or `x-api-key: <key>`, or None if
    neither is present. headers are (lower-case name, value) pairs. Query strings are never
    consulted. An Authorization header of another scheme (Basic, Digest, ...) is not a Bearer
    credential and counts as absent (RFC 6750 3.1: a 401 without an error code follows). Raises
    GatewayError(400, close) for a duplicate header, a malformed Authorization header or Bearer
    token (not b64token), or for both headers with different keys. Error messages never contain
    the header value."""
    auth: list[str] = []
    api: list[str] = []
    for n, v in headers:          # one pass (this runs for every request)
        if n == "authorization":
            auth.append(v)
        elif n == "x-api-key":
            api.append(v)
    if len(auth) > 1:
        raise _bad_credentials("more than one Authorization header", "duplicate_authorization")
    if len(api) > 1:
        raise _bad_credentials("more than one x-api-key header", "duplicate_authorization")
    key = None
    if auth:
        value = auth[0].strip(" \t")
        if value[:7].lower() == "bearer ":          # the usual case, one regex
            key = value[7:].lstrip(" ")
        else:
            m = _CREDENTIALS_RE.fullmatch(value)
            if m is None:
                raise _bad_credentials("malformed Authorization header", "invalid_authorization")
            if m.group(1).lower() == "bearer":
                key = m.group(2) or ""
        if key is not None and _TOKEN68_RE.fullmatch(key) is None:
            raise _bad_credentials(_BEARER_USAGE, "invalid_authorization")
    if api:
        other = api[0].strip(" \t")
        if not other or " " in other or "\t" in other:
            raise _bad_credentials("x-api-key must hold one key", "invalid_authorization")
        if key is not None and not hmac.compare_digest(key.encode("utf-8", "surrogateescape"),
                                                       other.encode("utf-8", "surrogateescape")):
            raise _bad_credentials("Authorization and x-api-key hold different keys",
                                   "conflicting_authorization")
        key = other
    return key
