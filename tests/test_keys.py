"""keys.py: key file parsing, file mode, KeyStore (lookup, hot reload), extract_key, the CLI,
and a sweep that no secret ends up in any log, output or written file."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import subprocess
import time
import sys
from pathlib import Path

import pytest

import keys as keys_cli
from llamagw import errors
from llamagw.limits import keys
from llamagw.limits.keys import KeyFileError, KeyInfo, KeyStore, parse_key_file
from llamagw.observe import accesslog

SECRET_A = "sk-alpha-0123456789abcdef"
SECRET_B = "sk-bravo-0123456789abcdef"
SECRET_C = "sk-charlie-0123456789abcd"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("AUTH_KEYS_FILE", "PYTHONPATH")}
    env["DATA_DIR"] = str(tmp_path)
    return env


def sha(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def write_keys(path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    os.chmod(path, mode)


def bump(path, seconds: int = 10) -> None:
    """Move mtime forward so a rewrite within the same tick is still seen."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


@pytest.fixture
def logger():
    lg = logging.getLogger("test.keys")
    lg.setLevel(logging.DEBUG)
    return lg


# --- parsing ----------------------------------------------------------------------------------
def test_parse_plain_hashed_settings_comments_blank_lines():
    text = (
        "\ufeff# a comment\n"
        "\n"
        f"alice:{SECRET_A}\r\n"
        "   # indented comment\n"
        f"bob:sha256:{hashlib.sha256(SECRET_B.encode()).hexdigest().upper()} rpm=30\n"
        f"carol.x_y-z:{SECRET_C}\tconcurrency=2   rpm=7  \n"
    )
    table = parse_key_file(text)
    assert table == {
        sha(SECRET_A): KeyInfo("alice", None, None),
        sha(SECRET_B): KeyInfo("bob", 30, None),
        sha(SECRET_C): KeyInfo("carol.x_y-z", 7, 2),
    }


def test_secret_is_everything_after_first_colon():
    secret = "abc:def:ghi-0123456789"
    table = parse_key_file(f"k:{secret}\n")
    assert table == {sha(secret): KeyInfo("k")}


@pytest.mark.parametrize("line, fragment", [
    (f"{SECRET_A}", "expected key_id:secret"),
    (f"bad id:{SECRET_A}", "key_id"),
    (f"{'x' * 65}:{SECRET_A}", "key_id"),
    (f":{SECRET_A}", "key_id"),
    ("alice:", "empty secret"),
    ("alice:short-secret-15", "shorter than 16"),
    ("alice:sk-0123456789abcdé", "printable ASCII"),
    ("alice:sk-0123456789abc\x07x", "printable ASCII"),
    ("alice:sha256:abcd", "64 hex"),
    (f"alice:sha256:{'g' * 64}", "64 hex"),
    (f"alice:{SECRET_A} rpm=0", "rpm must be a whole number"),
    (f"alice:{SECRET_A} rpm=-1", "rpm must be a whole number"),
    (f"alice:{SECRET_A} rpm=1.5", "rpm must be a whole number"),
    (f"alice:{SECRET_A} concurrency=", "concurrency must be a whole number"),
    (f"alice:{SECRET_A} rpm=99999999999", "rpm must be a whole number"),
    (f"alice:{SECRET_A} burst=3", "unknown setting"),
    (f"alice:{SECRET_A} rpm=3 rpm=4", "given twice"),
    (f"alice:{SECRET_A} tail-of-secret", "expected name=value"),
])
def test_bad_line_names_file_and_line_never_the_secret(line, fragment):
    text = f"# header\n\nok:{SECRET_B}\n{line}\n"
    with pytest.raises(KeyFileError) as info:
        parse_key_file(text, "/etc/keys.txt")
    message = str(info.value)
    assert message.startswith("/etc/keys.txt:4: "), message
    assert fragment in message
    assert info.value.lineno == 4
    for secret in (SECRET_A, SECRET_B, "short-secret-15", "tail-of-secret", "sk-0123456789abc"):
        assert secret not in message


def test_duplicate_key_id_and_duplicate_secret():
    with pytest.raises(KeyFileError, match=r"k:3: duplicate key_id 'a' \(first on line 1\)"):
        parse_key_file(f"a:{SECRET_A}\nb:{SECRET_B}\na:{SECRET_C}\n", "k")
    hashed = hashlib.sha256(SECRET_A.encode()).hexdigest()
    with pytest.raises(KeyFileError, match=r"k:2: duplicate secret \(same as line 1\)") as info:
        parse_key_file(f"a:{SECRET_A}\nb:sha256:{hashed}\n", "k")
    assert SECRET_A not in str(info.value) and hashed not in str(info.value)


def test_file_too_large_is_refused():
    with pytest.raises(KeyFileError, match="larger than"):
        parse_key_file("#" * (keys.MAX_KEY_FILE_BYTES + 1))


# --- file mode --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666])
def test_group_or_other_access_is_refused_with_fix(tmp_path, mode):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"a:{SECRET_A}\n", mode)
    with pytest.raises(KeyFileError) as info:
        keys.check_file_mode(str(path))
    assert f"chmod 600 {path}" in str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyStore(str(path)).load()


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_pass(tmp_path, mode):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"a:{SECRET_A}\n", mode)
    keys.check_file_mode(str(path))
    store = KeyStore(str(path))
    store.load()
    assert len(store) == 1


def test_missing_file_at_start_is_an_error(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        KeyStore(str(tmp_path / "nope.txt")).load()


# --- lookup -----------------------------------------------------------------------------------
@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "api_keys.txt"
    hashed = hashlib.sha256(SECRET_B.encode()).hexdigest()
    write_keys(path, f"alice:{SECRET_A} rpm=5\nbob:sha256:{hashed} concurrency=1\n")
    return path


def test_lookup_plain_and_hashed(store_path):
    store = KeyStore(str(store_path))
    store.load()
    assert store.lookup(SECRET_A) == KeyInfo("alice", 5, None)
    assert store.lookup(SECRET_B) == KeyInfo("bob", None, 1)
    assert store.key_ids() == frozenset({"alice", "bob"})
    assert len(store) == 2
    assert store.get("alice") == KeyInfo("alice", 5, None)
    assert store.get("nobody") is None


@pytest.mark.parametrize("presented", [
    "", SECRET_A[:-1], SECRET_A + "x", SECRET_A.upper(), " " + SECRET_A,
    "sha256:" + hashlib.sha256(SECRET_B.encode()).hexdigest(),  # the stored hash is no key
    "sk-alpha-0123456789abcdé", "x" * 100_000,
])
def test_lookup_misses(store_path, presented):
    store = KeyStore(str(store_path))
    store.load()
    assert store.lookup(presented) is None


def test_lookup_compares_digests_with_compare_digest(store_path, monkeypatch):
    calls = []
    real = keys.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    store = KeyStore(str(store_path))
    store.load()
    assert store.lookup(SECRET_A) is not None
    assert calls == [(sha(SECRET_A), sha(SECRET_A))]  # digests, never the secret itself


def test_keyinfo_and_store_never_hold_the_secret(store_path):
    store = KeyStore(str(store_path))
    store.load()
    info = store.lookup(SECRET_A)
    assert SECRET_A not in repr(info)
    assert SECRET_A not in repr(vars(store))


# --- hot reload -------------------------------------------------------------------------------
def test_maybe_reload_polls_at_most_every_interval(store_path, logger):
    store = KeyStore(str(store_path), logger=logger, poll_interval=2.0)
    store.load()
    assert store.maybe_reload(100.0) is False  # first poll: unchanged
    write_keys(store_path, f"alice:{SECRET_A} rpm=5\ncarol:{SECRET_C}\n")
    bump(store_path)
    assert store.maybe_reload(101.9) is False  # too soon: not even a stat
    assert store.lookup(SECRET_C) is None
    assert store.maybe_reload(102.0) is True
    assert store.lookup(SECRET_C) == KeyInfo("carol")
    assert store.lookup(SECRET_B) is None  # removed key stops working at once
    assert store.maybe_reload(104.0) is False  # unchanged since


def test_touch_without_change_reloads_but_reports_no_change(store_path):
    store = KeyStore(str(store_path))
    store.load()
    bump(store_path)
    assert store.maybe_reload(0.0) is False
    assert store.lookup(SECRET_A) is not None


def test_settings_change_is_a_change(store_path):
    store = KeyStore(str(store_path))
    store.load()
    hashed = hashlib.sha256(SECRET_B.encode()).hexdigest()
    write_keys(store_path, f"alice:{SECRET_A} rpm=9\nbob:sha256:{hashed} concurrency=1\n")
    assert store.reload() is True
    assert store.lookup(SECRET_A).rpm == 9


def test_malformed_file_keeps_previous_keys_and_logs_line(store_path, logger, caplog):
    store = KeyStore(str(store_path), logger=logger)
    store.load()
    write_keys(store_path, f"alice:{SECRET_A}\ncarol:{SECRET_C} rpm=x\n")
    bump(store_path)
    with caplog.at_level(logging.ERROR, logger="test.keys"):
        assert store.maybe_reload(10.0) is False
    assert store.lookup(SECRET_A) == KeyInfo("alice", 5, None)  # previous keys in force
    assert store.lookup(SECRET_B) is not None
    assert store.lookup(SECRET_C) is None
    assert store.reload_errors == 1
    logged = caplog.text
    assert f"{store_path}:2:" in logged and "keeping 2 key(s)" in logged
    assert SECRET_A not in logged and SECRET_C not in logged
    # unchanged broken file: no retry, no repeated log line
    caplog.clear()
    assert store.maybe_reload(20.0) is False
    assert caplog.text == ""
    # fixed: applied on the next poll
    write_keys(store_path, f"carol:{SECRET_C} rpm=3\n")
    bump(store_path, 20)
    assert store.maybe_reload(30.0) is True
    assert store.lookup(SECRET_C) == KeyInfo("carol", 3, None)
    assert store.lookup(SECRET_A) is None


def test_reload_refuses_open_mode_then_accepts_after_chmod(store_path, logger, caplog):
    store = KeyStore(str(store_path), logger=logger)
    store.load()
    write_keys(store_path, f"carol:{SECRET_C}\n", 0o644)
    bump(store_path)
    with caplog.at_level(logging.ERROR, logger="test.keys"):
        assert store.maybe_reload(10.0) is False
    assert f"chmod 600 {store_path}" in caplog.text
    assert store.lookup(SECRET_A) is not None and store.lookup(SECRET_C) is None
    os.chmod(store_path, 0o600)  # the mode change alone triggers the next reload
    assert store.maybe_reload(20.0) is True
    assert store.lookup(SECRET_C) is not None and store.lookup(SECRET_A) is None


def test_missing_file_at_runtime_keeps_keys_logged_once(store_path, logger, caplog):
    store = KeyStore(str(store_path), logger=logger)
    store.load()
    os.unlink(store_path)
    with caplog.at_level(logging.ERROR, logger="test.keys"):
        assert store.maybe_reload(10.0) is False
        assert store.maybe_reload(20.0) is False
    assert caplog.text.count("cannot stat") == 1
    assert store.lookup(SECRET_A) is not None
    assert store.reload() is False  # SIGHUP on a missing file: same, keys stay
    assert store.lookup(SECRET_A) is not None
    write_keys(store_path, f"carol:{SECRET_C}\n")
    assert store.maybe_reload(30.0) is True
    assert store.lookup(SECRET_C) is not None and store.lookup(SECRET_A) is None


def test_empty_file_on_reload_keeps_keys_comment_only_revokes_all(store_path):
    store = KeyStore(str(store_path))
    store.load()
    write_keys(store_path, "")
    assert store.reload() is False
    assert len(store) == 2
    write_keys(store_path, "# all keys revoked\n")
    assert store.reload() is True
    assert len(store) == 0 and store.lookup(SECRET_A) is None


def test_reload_on_demand_sees_same_size_same_mtime_rewrite(store_path):
    # SIGHUP path: reload() reads without looking at the stat signature.
    store = KeyStore(str(store_path))
    store.load()
    hashed = hashlib.sha256(SECRET_C.encode()).hexdigest()
    write_keys(store_path, f"alice:{SECRET_A} rpm=5\nbob:sha256:{hashed} concurrency=1\n")
    assert store.reload() is True
    assert store.lookup(SECRET_C) is not None and store.lookup(SECRET_B) is None


def test_atomic_rename_is_detected_by_inode(store_path):
    store = KeyStore(str(store_path))
    store.load()
    st = os.stat(store_path)
    new = store_path.with_name("new.txt")
    hashed = hashlib.sha256(SECRET_C.encode()).hexdigest()
    write_keys(new, f"alice:{SECRET_A} rpm=5\nbob:sha256:{hashed} concurrency=1\n")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    os.replace(new, store_path)
    assert store.maybe_reload(0.0) is True
    assert store.lookup(SECRET_C) is not None


# --- extract_key ------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, expected", [
    ([], None),
    ([("host", "x")], None),
    ([("authorization", f"Bearer {SECRET_A}")], SECRET_A),
    ([("authorization", f"bearer {SECRET_A}")], SECRET_A),
    ([("authorization", f"  BEARER   {SECRET_A} ")], SECRET_A),
    ([("x-api-key", SECRET_A)], SECRET_A),
    ([("x-api-key", f" {SECRET_A} ")], SECRET_A),
    ([("authorization", f"Bearer {SECRET_A}"), ("x-api-key", SECRET_A)], SECRET_A),
    # RFC 6750 2.1 b64token (RFC 9110 token68): the whole alphabet, "=" padding at the end
    ([("authorization", "Bearer AZaz09-._~+/==")], "AZaz09-._~+/=="),
    # another scheme is no Bearer credential: as if absent (RFC 6750 3.1: 401, no error code)
    ([("authorization", f"Basic {SECRET_A}")], None),
    ([("authorization", "Digest username=\"a\", realm=\"b\"")], None),
    ([("authorization", "Negotiate")], None),
    ([("authorization", SECRET_A)], None),    # no scheme: the key reads as an unknown scheme
    ([("authorization", f"Basic {SECRET_B}"), ("x-api-key", SECRET_A)], SECRET_A),
])
def test_extract_key(headers, expected):
    assert keys.extract_key(headers) == expected


@pytest.mark.parametrize("headers, code", [
    ([("authorization", f"Bearer {SECRET_A}"), ("authorization", f"Bearer {SECRET_B}")],
     "duplicate_authorization"),
    ([("x-api-key", SECRET_A), ("x-api-key", SECRET_A)], "duplicate_authorization"),
    ([("authorization", "Bearer")], "invalid_authorization"),
    ([("authorization", "Bearer ")], "invalid_authorization"),
    ([("authorization", f"Bearer {SECRET_A} extra")], "invalid_authorization"),
    ([("x-api-key", "")], "invalid_authorization"),
    ([("authorization", f"Bearer {SECRET_A}"), ("x-api-key", SECRET_B)],
     "conflicting_authorization"),
    # not b64token: RFC 6750 3.1 invalid_request
    ([("authorization", f"Bearer\t{SECRET_A}")], "invalid_authorization"),
    ([("authorization", f"Bearer {SECRET_A}!")], "invalid_authorization"),
    ([("authorization", f"Bearer {SECRET_A},x=y")], "invalid_authorization"),
    ([("authorization", "Bearer a=b")], "invalid_authorization"),
    ([("authorization", "Bearer ==")], "invalid_authorization"),
    ([("authorization", f"Bearer {SECRET_A}\xe9")], "invalid_authorization"),
    ([("authorization", f"Bearer\xa0{SECRET_A}")], "invalid_authorization"),
    ([("authorization", f"Bearer \"{SECRET_A}\"")], "invalid_authorization"),
    ([("authorization", f"B(earer {SECRET_A}")], "invalid_authorization"),
    ([("authorization", "")], "invalid_authorization"),
])
def test_extract_key_errors_are_400_without_the_key(headers, code):
    with pytest.raises(errors.GatewayError) as info:
        keys.extract_key(headers)
    assert info.value.status == 400
    assert info.value.code == code
    text = str(info.value) + info.value.body().decode() + repr(info.value.headers)
    assert SECRET_A not in text and SECRET_B not in text
    # an ambiguous or malformed credential ends the connection (README: refused and closed)
    assert info.value.close
    # RFC 6750 3.1: the challenge says what was wrong with the request
    challenge = dict(info.value.headers)["www-authenticate"]
    assert challenge.startswith('Bearer realm="api", error="invalid_request", '
                                'error_description="')


@pytest.mark.parametrize("args, expected", [
    (("api",), 'Bearer realm="api"'),
    (("api", "invalid_token", "Invalid API key"),
     'Bearer realm="api", error="invalid_token", error_description="Invalid API key"'),
    # error_description is %x20-21 / %x23-5B / %x5D-7E (RFC 6750 3): anything else is dropped
    (("metrics", "invalid_token", 'a "quoted" \\ caf\xe9\x01'),
     'Bearer realm="metrics", error="invalid_token", error_description="a quoted  caf"'),
])
def test_bearer_challenge(args, expected):
    assert keys.bearer_challenge(*args) == expected


def test_a_secret_no_bearer_token_can_carry_is_named_at_load(tmp_path, caplog):
    path = tmp_path / "keys.txt"
    write_keys(path, f"alice:{SECRET_A}\nodd:odd!secret,0123456789\n")
    store = KeyStore(str(path))
    with caplog.at_level(logging.WARNING, logger="gateway.keys"):
        store.load()
    assert store.lookup("odd!secret,0123456789") is not None   # x-api-key still works
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "'odd'" in warned[0] and "x-api-key" in warned[0]
    assert "odd!secret" not in caplog.text


def test_extract_key_ignores_query_string_like_headers():
    assert keys.extract_key([(":path", f"/v1/models?api_key={SECRET_A}")]) is None


# --- CLI --------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    rc = keys_cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_add_list_rotate_revoke(tmp_path, capsys):
    path = tmp_path / "sub" / "api_keys.txt"
    f = ["--file", str(path)]
    rc, out, err = run_cli(capsys, *f, "add", "alice", "--rpm", "30", "--concurrency", "2")
    assert rc == 0
    key = out.strip()
    assert out == key + "\n"  # the key alone on stdout, once
    assert key.startswith("sk-") and len(key) >= 3 + 43  # 256 random bits, url-safe
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == f"alice:{key} rpm=30 concurrency=2\n"
    store = KeyStore(str(path))
    store.load()
    assert store.lookup(key) == KeyInfo("alice", 30, 2)

    rc, out, err = run_cli(capsys, *f, "add", "bob", "--hashed")
    assert rc == 0
    bob_key = out.strip()
    assert bob_key not in path.read_text()
    assert f"bob:sha256:{hashlib.sha256(bob_key.encode()).hexdigest()}" in path.read_text()

    rc, out, err = run_cli(capsys, *f, "list")
    assert rc == 0
    assert "alice" in out and "bob" in out and "hashed" in out and "30" in out
    assert key not in out + err and bob_key not in out + err

    rc, out, err = run_cli(capsys, *f, "rotate", "alice")
    assert rc == 0
    new_key = out.strip()
    assert new_key != key and new_key.startswith("sk-")
    assert path.read_text().splitlines()[0] == f"alice:{new_key} rpm=30 concurrency=2"
    rc, out, err = run_cli(capsys, *f, "rotate", "bob")
    new_bob = out.strip()
    assert f"bob:sha256:{hashlib.sha256(new_bob.encode()).hexdigest()}" in path.read_text()
    assert store.reload() is True
    assert store.lookup(key) is None and store.lookup(new_key) == KeyInfo("alice", 30, 2)
    assert store.lookup(bob_key) is None and store.lookup(new_bob) == KeyInfo("bob")

    rc, out, err = run_cli(capsys, *f, "revoke", "alice")
    assert rc == 0
    assert "alice" not in path.read_text()
    assert store.reload() is True
    assert store.lookup(new_key) is None and store.key_ids() == frozenset({"bob"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["api_keys.txt"]  # no temp file left


def test_cli_preserves_comments_and_other_lines(tmp_path, capsys):
    path = tmp_path / "api_keys.txt"
    original = f"# team keys\n\nalice:{SECRET_A} rpm=5\n# bob below\nbob:{SECRET_B}\n"
    write_keys(path, original)
    rc, out, _ = run_cli(capsys, "--file", str(path), "rotate", "alice")
    assert rc == 0
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# team keys", ""]
    assert lines[2] == f"alice:{out.strip()} rpm=5"
    assert lines[3:] == ["# bob below", f"bob:{SECRET_B}"]
    rc, _, _ = run_cli(capsys, "--file", str(path), "revoke", "alice")
    assert path.read_text() == f"# team keys\n\n# bob below\nbob:{SECRET_B}\n"
    rc, out, _ = run_cli(capsys, "--file", str(path), "add", "carol")
    assert path.read_text().endswith(f"bob:{SECRET_B}\ncarol:{out.strip()}\n")


@pytest.mark.parametrize("argv, fragment", [
    (["add", "alice"], "exists"),
    (["revoke", "nobody"], "no key named 'nobody'"),
    (["rotate", "nobody"], "no key named 'nobody'"),
    (["add", "bad name"], "must be 1-64 characters"),
    (["add", "zed", "--rpm", "0"], "whole number"),
    (["add", "zed", "--concurrency", "x"], "whole number"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_errors_exit_1(tmp_path, capsys, argv, fragment):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A}\n")
    before = path.read_text()
    rc, out, err = run_cli(capsys, "--file", str(path), *argv)
    assert rc == 1
    assert fragment in err
    assert path.read_text() == before
    assert SECRET_A not in out + err


def test_cli_refuses_to_edit_a_broken_file(tmp_path, capsys):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A}\nbroken line\n")
    before = path.read_text()
    rc, out, err = run_cli(capsys, "--file", str(path), "add", "bob")
    assert rc == 1 and f"{path}:2:" in err
    assert path.read_text() == before and out == ""


def test_cli_missing_file_for_list_is_an_error(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "--file", str(tmp_path / "none.txt"), "list")
    assert rc == 1 and "not found" in err


def test_cli_fixes_open_mode_on_rewrite(tmp_path, capsys, caplog):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A}\n", 0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.keys"):
        rc, out, err = run_cli(capsys, "--file", str(path), "add", "bob")
    assert rc == 0 and "chmod 600" in caplog.text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_cli_program_warns_on_stderr_about_an_open_mode(tmp_path):
    """Run as `python3 scripts/keys.py`: the library's warning reaches the terminal."""
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A} role=admin\n", 0o644)
    done = subprocess.run([sys.executable, str(SCRIPTS / "keys.py"), "--file", str(path), "list"],
                          capture_output=True, text=True, timeout=60, env=_clean_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and f"chmod 600 {path}" in done.stderr
    assert "alice" in done.stdout and "admin" in done.stdout
    assert SECRET_A not in done.stdout + done.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644      # list never rewrites


def test_cli_file_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    rc, out, _ = run_cli(capsys, "add", "alice")
    assert rc == 0
    assert (tmp_path / "api_keys.txt").read_text() == f"alice:{out.strip()}\n"
    other = tmp_path / "elsewhere.txt"
    monkeypatch.setenv("AUTH_KEYS_FILE", str(other))
    rc, out, _ = run_cli(capsys, "add", "bob")
    assert rc == 0 and other.read_text() == f"bob:{out.strip()}\n"


def test_cli_bad_configuration_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PORT", "not-a-port")
    rc, _, err = run_cli(capsys, "list")
    assert rc == 1 and "PORT" in err


# --- no secret anywhere -----------------------------------------------------------------------
def test_no_secret_in_any_log_output_or_written_file(tmp_path, capsys):
    """Write keys, drive every module's logging and output, then look for every secret."""
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        path = tmp_path / "api_keys.txt"
        plain = [SECRET_A, SECRET_B, SECRET_C]
        write_keys(path, f"alice:{SECRET_A} rpm=5\nbob:{SECRET_B}\n")
        store = KeyStore(str(path), logger=logging.getLogger("gateway.keys"))
        store.load()
        # bad lines of every kind, each holding a secret
        for bad in (f"carol:{SECRET_C} rpm=x", f"{SECRET_C}", f"carol:{SECRET_C} {SECRET_C}",
                    f"carol:{SECRET_C} zz={SECRET_C}", f"alice:{SECRET_C}", f"dup:{SECRET_A}",
                    f"c@rol:{SECRET_C}"):
            write_keys(path, f"alice:{SECRET_A} rpm=5\nbob:{SECRET_B}\n{bad}\n")
            assert store.reload() is False
        write_keys(path, f"alice:{SECRET_A} rpm=5\nbob:{SECRET_B}\n", 0o644)
        assert store.reload() is False
        os.chmod(path, 0o600)
        assert store.reload() is False  # same keys back
        # the CLI: add (plain + hashed), rotate, list, revoke, errors
        printed = []
        console = []
        for argv in (["add", "dave"], ["add", "erin", "--hashed", "--rpm", "3"],
                     ["rotate", "dave"], ["rotate", "erin"], ["list"], ["revoke", "bob"],
                     ["add", "alice"], ["rotate", "nobody"]):
            rc = keys_cli.main(["--file", str(path), *argv])
            out, err = capsys.readouterr()
            if argv[0] in ("add", "rotate") and rc == 0:
                assert out.count("\n") == 1
                printed.append(out.strip())   # the one place a new key is shown
            else:
                console.append(out)
            console.append(err)
        assert store.reload() is True
        # the access log, fed a record with everything a careless caller might add
        alog_path = tmp_path / "logs" / "api_access.log"
        alog = accesslog.AccessLog(str(alog_path), max_bytes=1_000_000, backups=1)
        for secret in plain + printed:
            info = store.lookup(secret)
            alog.write({"time": 1.0, "key_id": info.key_id if info else "-",
                        "path": f"/v1/chat/completions?api_key={secret}", "status": 200,
                        "authorization": f"Bearer {secret}", "body": {"prompt": secret},
                        "headers": [("x-api-key", secret)]})
        alog.close()
        assert alog.written == len(plain + printed)

        everything = log_stream.getvalue() + "".join(console)
        for f in tmp_path.rglob("*"):
            if f.is_file() and f != path:
                everything += f.read_text()
        hashed_only = [printed[1], printed[3]]  # erin's keys: the file holds only sha256
        key_file = path.read_text()
        assert "reload failed" in everything and "chmod 600" in everything
        for secret in plain + printed:
            assert secret not in everything, "a secret leaked into logs or output"
        for secret in hashed_only:
            assert secret not in key_file
        assert all(printed.count(k) == 1 for k in printed)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


# --- per-key settings: role, models, tpm, tpd (issues 27, 28) ---------------------------------
def test_parse_role_models_and_token_limits():
    text = (f"alice:{SECRET_A} role=admin models=qwen3-8b,llama-3.2-1b tpm=20000 tpd=2000000\n"
            f"bob:{SECRET_B} tpd=7 role=user rpm=3\n"
            f"carol:{SECRET_C} models=Phi_4+q4.K-M\n")
    table = parse_key_file(text)
    alice = table[sha(SECRET_A)]
    assert alice == KeyInfo("alice", role="admin", models=frozenset({"qwen3-8b", "llama-3.2-1b"}),
                            tpm=20000, tpd=2000000)
    assert alice.is_admin
    assert alice.allows_model("qwen3-8b") and not alice.allows_model("qwen3-8b-other")
    assert table[sha(SECRET_B)] == KeyInfo("bob", rpm=3, role="user", tpd=7)
    assert not table[sha(SECRET_B)].is_admin
    assert table[sha(SECRET_C)].models == frozenset({"Phi_4+q4.K-M"})


def test_defaults_of_the_new_settings():
    info = parse_key_file(f"k:{SECRET_A}\n")[sha(SECRET_A)]
    assert (info.role, info.models, info.tpm, info.tpd) == ("user", None, None, None)
    assert not info.is_admin
    assert info.allows_model("anything")                # no models= : every model
    hash(info)                                          # frozen and hashable (frozenset)


def test_token_limits_take_a_larger_bound_than_rpm():
    big = keys.MAX_TOKEN_SETTING_VALUE
    info = parse_key_file(f"k:{SECRET_A} tpm={big} tpd={big}\n")[sha(SECRET_A)]
    assert info.tpm == info.tpd == big
    with pytest.raises(KeyFileError, match="rpm must be a whole number"):
        parse_key_file(f"k:{SECRET_A} rpm={keys.MAX_SETTING_VALUE + 1}\n")
    with pytest.raises(KeyFileError, match=f"tpd must be a whole number from 1 to {big}"):
        parse_key_file(f"k:{SECRET_A} tpd={big + 1}\n")


@pytest.mark.parametrize("settings, fragment", [
    ("role=root", "role must be one of user, admin"),
    ("role=", "role must be one of"),
    ("role=Admin", "role must be one of"),            # strict: no case folding
    ("role=admin role=admin", "setting role given twice"),
    ("role=admin role=user", "setting role given twice"),
    ("models=", "models must name 1 to"),
    ("models=a,,b", "models: name 2 is not a model name"),
    ("models=,a", "models: name 1 is not a model name"),
    ("models=a,", "models: name 2 is not a model name"),
    ("models=hush/x", "models: name 1 is not a model name"),
    ("models=.hidden", "models: name 1 is not a model name"),
    ("models=a,hush:x", "models: name 2 is not a model name"),
    (f"models={'m' * 129}", "models: name 1 is not a model name"),
    ("models=*", "models: name 1 is not a model name"),
    ("models=a,b,a", "models names a model twice"),
    ("models=a models=b", "setting models given twice"),
    (f"models={','.join(f'm{i}' for i in range(keys.MAX_KEY_MODELS + 1))}", "models must name"),
    ("tpm=0", "tpm must be a whole number"),
    ("tpm=-5", "tpm must be a whole number"),
    ("tpm=1e3", "tpm must be a whole number"),
    ("tpd=", "tpd must be a whole number"),
    ("tpd=99999999999999", "tpd must be a whole number"),
    ("tpm=5 tpm=5", "setting tpm given twice"),
    ("tpd=5 rpm=1 tpd=6", "setting tpd given twice"),
    ("budget=5", "unknown setting (known: rpm, concurrency, role, models, tpm, tpd)"),
    ("Role=admin", "unknown setting"),
])
def test_bad_new_settings_name_file_and_line_never_the_value(settings, fragment):
    text = f"# header\nok:{SECRET_B}\nalice:{SECRET_A} {settings}\n"
    with pytest.raises(KeyFileError) as info:
        parse_key_file(text, "/etc/keys.txt")
    message = str(info.value)
    assert message.startswith("/etc/keys.txt:3: "), message
    assert fragment in message
    for secret in (SECRET_A, SECRET_B, "hush"):     # not even the value after the secret
        assert secret not in message


@pytest.mark.parametrize("name", ["a", "Qwen3-8B", "llama-3.2-1b", "phi_4+q", "9x", "m" * 128,
                                  "", "-a", ".a", "_a", "a b", "a/b", "a:b", "é", "m" * 129, "*"])
def test_models_accepts_exactly_router_modes_model_names(name):
    from llamagw.models import preset
    try:
        keys.check_setting("models", name)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == (preset.check_name(name, "model") is None)


def test_check_setting_returns_typed_values():
    assert keys.check_setting("rpm", "30") == 30
    assert keys.check_setting("tpd", "10000000000") == 10_000_000_000
    assert keys.check_setting("role", "admin") == "admin"
    assert keys.check_setting("models", "b,a") == frozenset({"a", "b"})
    with pytest.raises(ValueError, match="unknown setting"):
        keys.check_setting("burst", "1")


def test_reload_sees_role_and_models_changes_but_not_a_reordering(store_path):
    store = KeyStore(str(store_path))
    store.load()
    hashed = hashlib.sha256(SECRET_B.encode()).hexdigest()
    bob = f"bob:sha256:{hashed} concurrency=1"
    write_keys(store_path, f"alice:{SECRET_A} rpm=5 role=admin models=a,b\n{bob}\n")
    assert store.reload() is True
    assert store.lookup(SECRET_A).is_admin and store.get("alice").models == {"a", "b"}
    write_keys(store_path, f"alice:{SECRET_A} models=b,a role=admin rpm=5\n{bob}\n")
    assert store.reload() is False          # same settings written in another order
    write_keys(store_path, f"alice:{SECRET_A} rpm=5 models=a\n{bob} tpd=100\n")
    assert store.reload() is True
    assert not store.lookup(SECRET_A).is_admin and store.get("alice").models == {"a"}
    assert store.lookup(SECRET_B).tpd == 100
    # a bad value in a reload keeps the keys in force, settings included
    write_keys(store_path, f"alice:{SECRET_A} rpm=5 role=root\n{bob}\n")
    assert store.reload() is False
    assert store.get("alice").models == {"a"} and store.get("bob").tpd == 100


# --- CLI: the new settings ----------------------------------------------------------------------
def list_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    assert lines[0].split() == ["KEY_ID", "FORM", "ROLE", "RPM", "CONCURRENCY", "TPM", "TPD",
                                "MODELS"]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_cli_add_with_every_setting_round_trips(tmp_path, capsys):
    path = tmp_path / "api_keys.txt"
    f = ["--file", str(path)]
    rc, out, err = run_cli(capsys, *f, "add", "ops", "--role", "admin", "--models", "qwen,llama",
                           "--tpm", "1000", "--tpd", "50000", "--rpm", "30", "--concurrency", "2")
    assert rc == 0, err
    key = out.strip()
    # canonical: settings in SETTINGS order, models sorted
    assert path.read_text() == (f"ops:{key} rpm=30 concurrency=2 role=admin models=llama,qwen "
                                "tpm=1000 tpd=50000\n")
    rc, out, err = run_cli(capsys, *f, "add", "plain", "--role", "user", "--hashed")
    assert rc == 0
    plain_key = out.strip()
    assert path.read_text().splitlines()[1] == \
        f"plain:sha256:{hashlib.sha256(plain_key.encode()).hexdigest()}"     # role=user: default
    store = KeyStore(str(path))
    store.load()
    assert store.lookup(key) == KeyInfo("ops", 30, 2, "admin", frozenset({"qwen", "llama"}),
                                        1000, 50000)
    assert store.lookup(plain_key) == KeyInfo("plain")
    rc, out, err = run_cli(capsys, *f, "list")
    assert rc == 0
    rows = list_rows(out)
    assert rows["ops"] == ["ops", "plaintext", "admin", "30", "2", "1000", "50000", "llama,qwen"]
    assert rows["plain"] == ["plain", "hashed", "user", "default", "default", "-", "-", "all"]
    assert key not in out + err and plain_key not in out + err
    # rotate keeps every setting
    rc, out, _ = run_cli(capsys, *f, "rotate", "ops")
    assert rc == 0
    assert store.reload() is True
    assert store.lookup(out.strip()) == store.get("ops") and store.get("ops").tpd == 50000
    assert store.lookup(key) is None


def test_cli_set_changes_settings_keeps_secret_and_other_lines(tmp_path, capsys):
    path = tmp_path / "api_keys.txt"
    hashed = hashlib.sha256(SECRET_C.encode()).hexdigest()
    original = (f"# team keys\n\n  alice:{SECRET_A}\tconcurrency=4  rpm=5\r\n"
                f"# bob below\nbob:{SECRET_B}   tpd=9\ncarol:sha256:{hashed}\n")
    write_keys(path, original)
    f = ["--file", str(path)]
    store = KeyStore(str(path))
    store.load()

    rc, out, err = run_cli(capsys, *f, "set", "alice", "--role", "admin", "--models", "b,a",
                           "--rpm", "60", "--tpm", "500")
    assert rc == 0, err
    assert "alice" in out and "rpm=60 concurrency=4 role=admin models=a,b tpm=500" in out
    lines = path.read_text().split("\n")
    assert lines[:2] == ["# team keys", ""]
    assert lines[2] == f"alice:{SECRET_A} rpm=60 concurrency=4 role=admin models=a,b tpm=500"
    assert "\n".join(lines[3:]) == (f"# bob below\nbob:{SECRET_B}   tpd=9\n"
                                    f"carol:sha256:{hashed}\n")      # untouched, byte for byte
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.reload() is True
    assert store.lookup(SECRET_A) == KeyInfo("alice", 60, 4, "admin", frozenset({"a", "b"}),
                                             500, None)

    # remove settings: back to the defaults
    rc, out, err = run_cli(capsys, *f, "set", "alice", "--no-rpm", "--role", "user",
                           "--all-models", "--no-tpm", "--no-concurrency")
    assert rc == 0, err
    assert path.read_text().split("\n")[2] == f"alice:{SECRET_A}"
    assert "the gateway's defaults" in out
    assert store.reload() is True and store.lookup(SECRET_A) == KeyInfo("alice")

    # a hashed key keeps its hash; a plaintext one its secret
    rc, _, _ = run_cli(capsys, *f, "set", "carol", "--tpd", "1000", "--models", "m1")
    rc2, _, _ = run_cli(capsys, *f, "set", "bob", "--no-tpd", "--concurrency", "1")
    assert rc == rc2 == 0
    assert path.read_text().endswith(f"bob:{SECRET_B} concurrency=1\n"
                                     f"carol:sha256:{hashed} models=m1 tpd=1000\n")
    assert store.reload() is True
    assert store.lookup(SECRET_C) == KeyInfo("carol", models=frozenset({"m1"}), tpd=1000)
    assert store.lookup(SECRET_B) == KeyInfo("bob", concurrency=1)

    rc, out, _ = run_cli(capsys, *f, "list")
    rows = list_rows(out)
    assert rows["carol"] == ["carol", "hashed", "user", "default", "default", "-", "1000", "m1"]
    assert rows["bob"] == ["bob", "plaintext", "user", "default", "1", "-", "-", "all"]
    assert [p.name for p in path.parent.iterdir()] == ["api_keys.txt"]  # no temp file left


@pytest.mark.parametrize("argv, fragment", [
    (["set", "alice"], "nothing to change"),
    (["set", "nobody", "--rpm", "3"], "no key named 'nobody'"),
    (["set", "alice", "--rpm", "3", "--no-rpm"], "not allowed with"),
    (["set", "alice", "--models", "a", "--all-models"], "not allowed with"),
    (["set", "alice", "--models", ""], "models must name"),
    (["set", "alice", "--models", "a,,b"], "is not a model name"),
    (["set", "alice", "--models", "a,a"], "twice"),
    (["set", "alice", "--role", "root"], "invalid choice"),
    (["set", "alice", "--tpd", "0"], "tpd must be a whole number"),
    (["set", "alice", "--tpm", "x"], "tpm must be a whole number"),
    (["add", "zed", "--role", "Admin"], "invalid choice"),
    (["add", "zed", "--models", "a b"], "is not a model name"),
    (["add", "zed", "--tpm", "-1"], "tpm must be a whole number"),
    (["add", "zed", "--no-rpm"], "unrecognized arguments"),
    (["add", "zed", "--all-models"], "unrecognized arguments"),
])
def test_cli_setting_errors_exit_1_and_change_nothing(tmp_path, capsys, argv, fragment):
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A} rpm=5\n")
    before = path.read_text()
    rc, out, err = run_cli(capsys, "--file", str(path), *argv)
    assert rc == 1
    assert fragment in err
    assert path.read_text() == before
    assert SECRET_A not in out + err


def test_keyfile_api_for_the_admin_routes(tmp_path):
    from llamagw.limits import keyfile
    path = str(tmp_path / "api_keys.txt")
    secret = keyfile.add_key(path, KeyInfo("ops", role="admin", models=frozenset({"m"})))
    assert [(k.info.key_id, k.info.is_admin, k.hashed) for k in keyfile.list_keys(path)] == \
        [("ops", True, False)]
    info = keyfile.update_key(path, "ops", {"tpd": 10, "models": ["x", "y"], "role": None})
    assert info == KeyInfo("ops", role="user", models=frozenset({"x", "y"}), tpd=10)
    assert parse_key_file(open(path).read()) == {sha(secret): info}
    with pytest.raises(keyfile.KeyEditError, match="unknown setting 'burst'"):
        keyfile.update_key(path, "ops", {"burst": 3})
    with pytest.raises(keyfile.KeyEditError, match="tpm must be a whole number"):
        keyfile.update_key(path, "ops", {"tpm": 0})
    with pytest.raises(keyfile.KeyEditError, match="models must be a list of model names"):
        keyfile.update_key(path, "ops", {"models": ["x", 3]})
    with pytest.raises(keyfile.KeyEditError, match="a key named 'ops' exists"):
        keyfile.add_key(path, KeyInfo("ops"))
    before = open(path).read()
    for bad in (KeyInfo("x", rpm=0), KeyInfo("x", role="root"), KeyInfo("x", models=frozenset()),
                KeyInfo("bad id")):
        with pytest.raises(KeyFileError, match=f"{path}:2: "):   # checked as the gateway reads
            keyfile.add_key(path, bad)
    assert open(path).read() == before
    new = keyfile.rotate_key(path, "ops")
    assert parse_key_file(open(path).read()) == {sha(new): info}
    keyfile.revoke_key(path, "ops")
    assert keyfile.list_keys(path) == []


def test_an_edit_racing_another_writer_writes_nothing(tmp_path, monkeypatch):
    from llamagw.limits import keyfile
    path = tmp_path / "api_keys.txt"
    write_keys(path, f"alice:{SECRET_A}\n")
    other = f"alice:{SECRET_A}\nbob:{SECRET_B}\n"
    real_join = keyfile._join

    def join_while_someone_writes(lines):
        write_keys(path, other)         # another keys.py / the admin API / an editor
        bump(path)
        return real_join(lines)

    monkeypatch.setattr(keyfile, "_join", join_while_someone_writes)
    with pytest.raises(keyfile.KeyEditError, match="changed by someone else"):
        keyfile.update_key(str(path), "alice", {"rpm": 3})
    assert path.read_text() == other            # their write stands, ours is not half-applied


# --- CLI: usage -----------------------------------------------------------------------------------
DAY1 = 1_778_320_800.0      # 2026-05-09T10:00:00Z
DAY2 = DAY1 + 86_400        # 2026-05-10T10:00:00Z
OLD = DAY1 - 30 * 86_400    # 2026-04-09T10:00:00Z


def _record(t, key_id, model, prompt, completion, status=200, outcome="ok"):
    from llamagw.observe.usage import UsageRecord
    return UsageRecord(time=t, request_id="r", key_id=key_id, model=model,
                       route="/v1/chat/completions", status=status, outcome=outcome,
                       prompt_tokens=prompt, completion_tokens=completion)


@pytest.fixture
def usage_data(tmp_path, monkeypatch):
    """Two workers' ledger files under $DATA_DIR/usage, written by the gateway's own Ledger."""
    from llamagw.observe.usage import Ledger, usage_path
    workers = {
        "worker-1": [_record(DAY1, "alice", "m1", 10, 5),
                     _record(DAY1 + 60, "alice", "m2", 3, None, status=500, outcome="error"),
                     _record(DAY2, "bob", "m1", 100, 50),
                     _record(OLD, "alice", "m1", 1000, 1000)],
        "worker-2": [_record(DAY1 + 120, "alice", "m1", 7, 8),
                     _record(DAY2 + 60, "alice", "esc\x1b[2Jm", 1, 1, outcome="cut")],
    }
    for host, records in workers.items():
        ledger = Ledger(usage_path(str(tmp_path), host), retention_days=None)
        for rec in records:
            ledger.record(rec)
        assert ledger.close() and ledger.written == len(records)
    assert sorted(p.name for p in (tmp_path / "usage").iterdir()) == \
        ["worker-1.sqlite", "worker-2.sqlite"]
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    return tmp_path


def table_rows(out: str, first: str) -> dict[str, list[int]]:
    lines = out.splitlines()
    assert lines[0].split() == [first, "REQUESTS", "PROMPT_TOKENS", "COMPLETION_TOKENS",
                                "TOTAL_TOKENS", "ERRORS"]
    rows = {}
    for line in lines[1:]:
        *name, requests, prompt, completion, total, errs = line.split()
        rows[" ".join(name)] = [int(requests), int(prompt), int(completion), int(total), int(errs)]
    return rows


SPAN = ["--since", "2026-05-01", "--until", "2026-05-11"]


def test_cli_usage_by_model_adds_up_every_worker(usage_data, capsys):
    rc, out, err = run_cli(capsys, "usage", *SPAN, "--by", "model")
    assert rc == 0, err
    rows = table_rows(out, "MODEL")
    assert rows == {
        "esc\\x1b[2Jm": [1, 1, 1, 2, 1],                 # a cut stream counts as an error
        "m1": [3, 117, 63, 180, 0],                       # worker-1 (2) + worker-2 (1)
        "m2": [1, 3, 0, 3, 1],                            # unknown completion counts 0
        "total": [5, 121, 64, 185, 2],
    }
    assert "\x1b" not in out + err                     # client text never reaches the terminal
    assert str(usage_data / "usage") in err and "all keys" in err


def test_cli_usage_by_day_and_key_and_one_key(usage_data, capsys):
    rc, out, _ = run_cli(capsys, "usage", *SPAN, "--by", "day")
    assert rc == 0
    assert table_rows(out, "DAY") == {"2026-05-09": [3, 20, 13, 33, 1],
                                      "2026-05-10": [2, 101, 51, 152, 1],
                                      "total": [5, 121, 64, 185, 2]}
    rc, out, _ = run_cli(capsys, "usage", *SPAN, "--by", "key")
    assert table_rows(out, "KEY_ID") == {"alice": [4, 21, 14, 35, 2], "bob": [1, 100, 50, 150, 0],
                                         "total": [5, 121, 64, 185, 2]}
    rc, out, err = run_cli(capsys, "usage", "alice", "--since", "2026-04-01", "--until",
                           "2026-05-11", "--by", "model")
    assert rc == 0
    assert table_rows(out, "MODEL") == {"esc\\x1b[2Jm": [1, 1, 1, 2, 1],
                                        "m1": [3, 1017, 1013, 2030, 0],   # the old row is in
                                        "m2": [1, 3, 0, 3, 1], "total": [5, 1021, 1014, 2035, 2]}
    assert "key 'alice'" in err


def test_cli_usage_defaults_to_the_last_week_by_day(usage_data, capsys):
    from llamagw.observe.usage import Ledger, usage_path
    ledger = Ledger(usage_path(str(usage_data), "worker-3"), retention_days=None)
    ledger.record(_record(time.time() - 60, "carol", "m9", 4, 6))
    ledger.record(_record(time.time() - 8 * 86_400, "carol", "m9", 1000, 1000))  # outside
    assert ledger.close()
    rc, out, _ = run_cli(capsys, "usage")
    assert rc == 0
    rows = table_rows(out, "DAY")
    assert rows.pop("total") == [1, 4, 6, 10, 0]      # DAY1 / DAY2 rows are older than 7 days
    assert list(rows.values()) == [[1, 4, 6, 10, 0]]


def test_cli_usage_csv_and_dir(usage_data, capsys, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(usage_data / "elsewhere"))
    rc, out, _ = run_cli(capsys, "usage", "bob", *SPAN, "--by", "key", "--csv",
                         "--dir", str(usage_data / "usage"))
    assert rc == 0
    assert out == "key_id,requests,prompt_tokens,completion_tokens,errors\r\nbob,1,100,50,0\r\n"


def test_cli_usage_without_a_ledger_prints_zeros(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    rc, out, _ = run_cli(capsys, "usage", "--by", "model")
    assert rc == 0
    assert table_rows(out, "MODEL") == {"total": [0, 0, 0, 0, 0]}
    assert not (tmp_path / "usage").exists()          # reading makes no folder


@pytest.mark.parametrize("argv, fragment", [
    (["usage", "--since", "yesterday"], "not a time"),
    (["usage", "--until", "-5"], "not a time"),
    (["usage", "--by", "week"], "invalid choice"),
    (["usage", "bad id!"], "must be 1-64 characters"),
])
def test_cli_usage_errors_exit_1(usage_data, capsys, argv, fragment):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1 and fragment in err and out == ""
