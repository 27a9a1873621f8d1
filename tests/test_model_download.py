"""The model downloader (llamagw/models/download.py, hub.py, fetch.py, fetchlock.py and
scripts/fetch_model.py) against the loopback hub and CDN of tests/fakes/fake_hub.py: names, resume,
faults, verification, the token's reach, progress, disk space, locks, and two processes sharing
one folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes.fake_hub import SIGNATURE, FakeHub

from llamagw.models import download, fetch, fetchlock, hub
from llamagw.models.download import DownloadCancelled, DownloadError
from llamagw.models.hub import SourceError

REPO = Path(__file__).resolve().parents[1]
FETCH_MODEL = REPO / "scripts" / "fetch_model.py"
TOKEN = "hf_secret_token_for_tests"
DATA = bytes(range(256)) * 8192                   # 2 MiB
SHA = hashlib.sha256(DATA).hexdigest()
FAST = {"backoff": 0.01}                          # retries in tests: no real backoff
CLI_TIMEOUT = 60


@pytest.fixture
def h():
    with FakeHub(token=TOKEN) as fake:
        fake.add("acme/m-GGUF", "m-Q4_K_M.gguf", DATA)
        fake.add("acme/m-GGUF", "m-Q8_0.gguf", b"GGUF q8")
        fake.add("acme/m-GGUF", "mmproj-m-Q4_K_M.gguf", b"GGUF projector")
        yield fake


def source(h, text="hf://acme/m-GGUF:Q4_K_M", folder=None):
    return fetch.resolve(hub.parse(text), folder or Path("/nonexistent"), endpoint=h.endpoint,
                         token=TOKEN, attempts=2, backoff=0.01)


def cdn_ranges(h) -> list[str | None]:
    return [r[3].get("range") for r in h.requests if r[0] == "cdn"]


# ---- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,kind,name", [
    ("https://host.example/a/b/Model-7B.Q4_K_M.gguf?sig=1", "url", "Model-7B.Q4_K_M.gguf"),
    ("http://host/dl?id=7#name=m.gguf&sha256=" + "AB" * 32, "url", "m.gguf"),
    ("hf://acme/m-GGUF/sub/dir/m-Q4_K_M.gguf", "file", "m-Q4_K_M.gguf"),
    ("hf://acme/m-GGUF:q4_k_m", "quant", None),
])
def test_parse_accepts_the_three_forms(text, kind, name):
    spec = hub.parse(text)
    assert (spec.kind, spec.name) == (kind, name)
    assert "sig=1" not in spec.shown and "#" not in spec.shown


@pytest.mark.parametrize("text,why", [
    ("ftp://host/m.gguf", "a model URL is http(s)://"),
    ("s3://bucket/m.gguf?X-Amz-Signature=secret", "'s3://bucket/m.gguf': a model URL is"),
    ("https://host/dl?id=7", "cannot be the local file name"),
    ("https://host/m.gguf#name=../x.gguf", "cannot be the local file name"),
    ("https://host/m.gguf#sha256=xyz", "unknown or malformed option"),
    ("hf://acme/m-GGUF", "needs a QUANT"),
    ("hf://acme/m-GGUF/../x.gguf", "PATH must be a .gguf file"),
    ("hf://acme/m-GGUF/README.md", "PATH must be a .gguf file"),
    ("hf://ac me/m:Q4", "spaces or control characters"),
    ("hf://-acme/m:Q4", "not a Hugging Face id"),
    ("", "empty"),
])
def test_parse_refuses_what_names_nothing(text, why):
    with pytest.raises(SourceError, match=re.escape(why)):
        hub.parse(text)


def test_a_list_naming_one_file_twice_is_refused():
    with pytest.raises(SourceError, match="both be saved as m.gguf"):
        hub.parse_list("https://a/m.gguf, https://b/m.gguf")
    assert [s.kind for s in hub.parse_list("https://a/m.gguf,,hf://acme/m:Q8")] == ["url", "quant"]


def test_quant_picks_the_one_match_with_the_hubs_size_and_digest(h):
    src = source(h, "hf://acme/m-GGUF:q4_k_m")          # case insensitive; mmproj not counted
    assert (src.filename, src.size, src.sha256) == ("m-Q4_K_M.gguf", len(DATA), SHA)
    assert src.url == f"{h.endpoint}/acme/m-GGUF/resolve/main/m-Q4_K_M.gguf"
    api = [r for r in h.requests if r[0] == "hub"]
    assert api[0][2] == "/api/models/acme/m-GGUF?blobs=true"
    assert api[0][3]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("text,why", [
    ("hf://acme/m-GGUF:Q5_K", "no .gguf file holds 'Q5_K'; the repository's .gguf files: "
                              "m-Q4_K_M.gguf, m-Q8_0.gguf"),
    ("hf://acme/m-GGUF:m-Q", "2 .gguf files hold 'm-Q' (m-Q4_K_M.gguf, m-Q8_0.gguf)"),
    ("hf://acme/m-GGUF/other.gguf", "no file other.gguf in the repository"),
    ("hf://acme/nothing:Q4", "no such repository"),
    ("hf://acme/m-GGUF:Q4_K_M#sha256=" + "0" * 64, "the hub lists sha256"),
])
def test_resolving_to_nothing_or_to_several_is_a_clear_error(h, text, why):
    with pytest.raises(SourceError, match=re.escape(why)):
        source(h, text)
    assert h.cdn_gets == 0


def test_a_missing_token_is_named_in_the_error(h):
    with pytest.raises(DownloadError, match="HTTP 401.*HF_TOKEN"):
        hub.resolve(hub.parse("hf://acme/m-GGUF:Q8_0"), endpoint=h.endpoint, token=None)


# ---- transfers -------------------------------------------------------------------------------
def test_cuts_and_server_errors_are_resumed_with_range(h, tmp_path):
    h.faults = ["cut", "500", "503", "cut"]
    h.cache_hop = True                                     # hub -> hub (307) -> CDN (302)
    logs = []
    path = fetch.ensure(source(h), tmp_path, log=logs.append, **FAST)
    assert path == tmp_path / "m-Q4_K_M.gguf" and path.read_bytes() == DATA
    half, three_quarters = len(DATA) // 2, len(DATA) * 3 // 4
    assert cdn_ranges(h) == [None, f"bytes={half}-", f"bytes={half}-", f"bytes={half}-",
                             f"bytes={three_quarters}-"]
    assert h.cdn_bytes == len(DATA)                        # not a byte twice
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m-Q4_K_M.gguf.download.json",
                                                           "m-Q4_K_M.gguf"]
    record = json.loads((tmp_path / ".m-Q4_K_M.gguf.download.json").read_text())
    assert record["complete"] is True and record["sha256"] == SHA
    assert any("retrying" in line for line in logs)


class _Resp:
    """An HTTP response double: `blocks` from read1, then `error` raised (a reset connection)."""

    def __init__(self, status, headers, blocks, error=None):
        self.status, self.headers, self.blocks, self.error = status, headers, list(blocks), error

    def read1(self, _n):
        if self.blocks:
            return self.blocks.pop(0)
        if self.error:
            raise self.error
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_a_connection_reset_mid_body_keeps_the_bytes_written_before_it(tmp_path, monkeypatch):
    a, b, c = DATA[:1000], DATA[1000:5000], DATA[5000:]
    answers = [
        _Resp(200, {"Content-Length": str(len(DATA))}, [a, b], ConnectionResetError(104, "reset")),
        _Resp(206, {"Content-Range": f"bytes 5000-{len(DATA) - 1}/{len(DATA)}"}, [c]),
    ]
    asked = []

    def fake_open(url, headers=None, **kw):
        asked.append((headers or {}).get("Range"))
        return answers.pop(0)

    monkeypatch.setattr(download, "open_url", fake_open)
    got = download.download_file("https://cdn.example/m.gguf", tmp_path / "m.gguf", sha256=SHA,
                                 backoff=0.01)
    assert asked == [None, "bytes=5000-"]
    assert got.sha256 == SHA and (tmp_path / "m.gguf").read_bytes() == DATA


def test_the_token_goes_to_the_hub_only_and_no_secret_is_logged(h, tmp_path):
    h.cache_hop = True
    logs = []
    fetch.ensure(source(h), tmp_path, log=logs.append, **FAST)
    hub_reqs = [r for r in h.requests if r[0] == "hub"]
    cdn_reqs = [r for r in h.requests if r[0] == "cdn"]
    assert len(hub_reqs) == 3 and cdn_reqs
    assert all(r[3].get("authorization") == f"Bearer {TOKEN}" for r in hub_reqs)
    assert all("authorization" not in r[3] for r in cdn_reqs)
    assert all(SIGNATURE in r[2] for r in cdn_reqs)        # the CDN did get its signed URL
    text = "\n".join(logs)
    assert TOKEN not in text and SIGNATURE not in text and "downloaded 2.1 MB" in text


def test_an_https_token_is_not_sent_over_http():
    auth = download.Auth("t", download.origin("https://hub.example"))
    assert auth.origin == "https://hub.example:443" and "t'" not in repr(auth)
    assert download.origin("http://hub.example") != auth.origin


def test_a_wrong_body_fails_the_checksum_and_leaves_no_model(h, tmp_path):
    h.faults = ["wrong"]
    with pytest.raises(DownloadError, match=f"sha256 [0-9a-f]{{64}}, expected {SHA}"):
        fetch.ensure(source(h), tmp_path, **FAST)
    assert [p.name for p in tmp_path.iterdir()] == [".m-Q4_K_M.gguf.download.json"]
    assert json.loads((tmp_path / ".m-Q4_K_M.gguf.download.json").read_text())["complete"] is \
        False
    # the next try downloads from scratch and succeeds
    assert fetch.ensure(source(h), tmp_path, **FAST).read_bytes() == DATA


def test_a_complete_partial_file_answered_416_is_verified_not_downloaded(h, tmp_path):
    src = source(h)
    fetch.write_record(tmp_path / src.filename, src, complete=False, size=len(DATA), sha256=SHA)
    (tmp_path / ".m-Q4_K_M.gguf.partial").write_bytes(DATA)   # crashed before the rename
    path = fetch.ensure(src, tmp_path, **FAST)
    assert path.read_bytes() == DATA and h.cdn_bytes == 0
    assert cdn_ranges(h) == [f"bytes={len(DATA)}-"]


def test_a_416_inside_the_file_and_an_ignored_range_start_over(h, tmp_path):
    src = source(h)
    fetch.write_record(tmp_path / src.filename, src, complete=False, size=len(DATA), sha256=SHA)
    (tmp_path / ".m-Q4_K_M.gguf.partial").write_bytes(DATA[:1000])
    h.faults = ["416", "norange"]
    path = fetch.ensure(src, tmp_path, **FAST)
    assert path.read_bytes() == DATA
    assert cdn_ranges(h) == ["bytes=1000-", None]


def test_a_partial_file_of_another_source_is_discarded(h, tmp_path):
    (tmp_path / ".m-Q4_K_M.gguf.partial").write_bytes(b"junk from another file")
    fetch.ensure(source(h), tmp_path, **FAST)
    assert cdn_ranges(h) == [None]


def test_too_many_failures_in_a_row_give_up_and_keep_the_partial(h, tmp_path):
    h.faults = ["cut"] + ["500"] * 3
    with pytest.raises(DownloadError, match="gave up after 3 tries in a row"):
        fetch.ensure(source(h), tmp_path, attempts=3, **FAST)
    assert (tmp_path / ".m-Q4_K_M.gguf.partial").stat().st_size == len(DATA) // 2
    assert not (tmp_path / "m-Q4_K_M.gguf").exists()


def test_not_enough_disk_space_fails_before_any_byte(h, tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(DownloadError, match="not enough disk space"):
        fetch.ensure(source(h), tmp_path, disk_margin=free, **FAST)
    assert h.cdn_gets == 0 and not (tmp_path / ".m-Q4_K_M.gguf.partial").exists()


def test_a_size_learnt_from_the_answer_is_checked_against_the_free_space(h, tmp_path):
    h.files["plain.gguf"] = DATA
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(DownloadError, match="not enough disk space"):
        fetch.ensure(source(h, f"{h.cdn}/files/plain.gguf"), tmp_path,
                     disk_margin=free - len(DATA) // 2, **FAST)
    assert not list(tmp_path.glob("*.partial"))        # stopped before writing a byte


def test_progress_reports_total_completed_and_status(h, tmp_path):
    seen = []
    h.faults = ["cut"]
    fetch.ensure(source(h), tmp_path, progress=lambda *a: seen.append(a), **FAST)
    statuses = [s for _, _, s in seen]
    assert statuses[0] == download.STATUS_CONNECTING
    assert download.STATUS_RETRYING in statuses
    assert statuses[-2:] == [download.STATUS_VERIFYING, download.STATUS_DONE]
    assert seen[-1][:2] == (len(DATA), len(DATA))
    done = [c for t, c, s in seen if s == download.STATUS_DOWNLOADING]
    assert done == sorted(done) and all(t == len(DATA) for t, _, _ in seen)


def test_a_cancel_stops_within_a_chunk_and_the_next_try_resumes(h, tmp_path):
    h.rate = 4e6                                          # 0.5 s for the file
    partial = tmp_path / ".m-Q4_K_M.gguf.partial"

    def stop() -> bool:                                   # asked between chunks
        return partial.exists() and partial.stat().st_size >= 100_000

    with pytest.raises(DownloadCancelled):
        fetch.ensure(source(h), tmp_path, cancelled=stop, **FAST)
    have = (tmp_path / ".m-Q4_K_M.gguf.partial").stat().st_size
    assert 0 < have < len(DATA)
    assert not (tmp_path / ".m-Q4_K_M.gguf.lock").exists()
    h.rate = None
    assert fetch.ensure(source(h), tmp_path, **FAST).read_bytes() == DATA
    assert cdn_ranges(h)[-1] == f"bytes={have}-"


def test_a_plain_url_with_a_query_and_a_max_size(h, tmp_path):
    h.files["plain.gguf"] = DATA
    url = f"{h.cdn}/files/plain.gguf?token=abc#sha256={SHA}"
    src = source(h, url)
    assert (src.filename, src.sha256, src.auth) == ("plain.gguf", SHA, None)
    assert fetch.ensure(src, tmp_path, **FAST).read_bytes() == DATA
    with pytest.raises(DownloadError, match="more than 1000"):
        download.download_file(f"{h.cdn}/files/plain.gguf", tmp_path / "x.gguf", max_bytes=1000)


# ---- a model already there ---------------------------------------------------------------------
def test_a_verified_model_is_not_downloaded_again(h, tmp_path):
    fetch.ensure(source(h), tmp_path, **FAST)
    gets = h.cdn_gets
    logs = []
    fetch.ensure(source(h), tmp_path, log=logs.append, **FAST)
    assert h.cdn_gets == gets and logs == []


def test_a_file_put_there_by_hand_is_hashed_once_and_replaced_when_wrong(h, tmp_path):
    (tmp_path / "m-Q4_K_M.gguf").write_bytes(DATA)
    logs = []
    fetch.ensure(source(h), tmp_path, log=logs.append, **FAST)
    assert h.cdn_gets == 0 and "checking its sha256" in logs[0]
    (tmp_path / ".m-Q4_K_M.gguf.download.json").unlink()
    (tmp_path / "m-Q4_K_M.gguf").write_bytes(bytes(len(DATA)))      # same size, wrong bytes
    logs.clear()
    assert fetch.ensure(source(h), tmp_path, log=logs.append, **FAST).read_bytes() == DATA
    assert any("downloading it again" in line for line in logs) and h.cdn_gets == 1


def test_without_a_digest_a_hand_placed_file_is_taken_and_a_changed_url_downloads(h, tmp_path):
    h.files["plain.gguf"] = DATA
    (tmp_path / "plain.gguf").write_bytes(b"GGUF by hand")
    logs = []
    fetch.ensure(source(h, f"{h.cdn}/files/plain.gguf"), tmp_path, log=logs.append)
    assert "not verified" in logs[0] and h.cdn_gets == 0
    fetch.write_record(tmp_path / "plain.gguf", source(h, "https://elsewhere/plain.gguf"),
                       complete=True, size=12, sha256=None)
    fetch.ensure(source(h, f"{h.cdn}/files/plain.gguf"), tmp_path, **FAST)
    assert (tmp_path / "plain.gguf").read_bytes() == DATA


# ---- locks -----------------------------------------------------------------------------------
def test_a_waiter_takes_the_file_another_worker_downloads(h, tmp_path, monkeypatch):
    src = source(h)
    (tmp_path / src.filename).write_bytes(bytes(len(DATA)))   # wrong: the other one replaces it
    hashed = []
    real_hash = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p, **kw: hashed.append(p) or
                        real_hash(p, **kw))
    lock = fetchlock.DownloadLock(fetch.lock_path(tmp_path / src.filename), heartbeat_s=0.05)
    assert lock.acquire()

    def other_worker():
        time.sleep(0.3)
        download.download_file(src.url, tmp_path / src.filename, sha256=SHA, auth=src.auth)
        fetch.write_record(tmp_path / src.filename, src, complete=True, size=len(DATA),
                           sha256=SHA)
        lock.release()

    t = threading.Thread(target=other_worker)
    t.start()
    logs = []
    path = fetch.ensure(src, tmp_path, log=logs.append, log_every=0.1, poll=0.05,
                        stale_after=5, **FAST)
    t.join()
    assert path.read_bytes() == DATA and h.cdn_gets == 1
    assert any(f"{socket.gethostname()} pid {os.getpid()} is downloading it" in x for x in logs)
    assert hashed == [tmp_path / src.filename]              # the wrong file: hashed once
    assert sum("downloading it again" in x for x in logs) == 1


def test_a_dead_holders_lock_on_this_host_is_taken_over_at_once(h, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, ns = fetchlock.host_id()
    (tmp_path / ".m-Q4_K_M.gguf.lock").write_text(json.dumps(
        {"host": host, "ns": ns, "pid": dead.pid, "token": "t", "started": 0}))
    logs = []
    t0 = time.monotonic()
    fetch.ensure(source(h), tmp_path, log=logs.append, stale_after=60, poll=0.05, **FAST)
    assert time.monotonic() - t0 < 30
    assert any("is stale; taking the download over" in x for x in logs)
    assert not (tmp_path / ".m-Q4_K_M.gguf.lock").exists()


def test_a_lock_without_heartbeat_from_another_host_goes_stale(h, tmp_path):
    (tmp_path / ".m-Q4_K_M.gguf.lock").write_text(json.dumps(
        {"host": "other-worker", "ns": "pid:[1]", "pid": 1, "token": "t", "started": 0}))
    t0 = time.monotonic()
    path = fetch.ensure(source(h), tmp_path, stale_after=0.5, poll=0.05, **FAST)
    assert time.monotonic() - t0 >= 0.5 and path.read_bytes() == DATA


def test_a_live_heartbeat_is_never_stale(tmp_path):
    lock = fetchlock.DownloadLock(tmp_path / ".x.lock", heartbeat_s=0.05)
    assert lock.acquire() and not fetchlock.DownloadLock(tmp_path / ".x.lock").acquire()
    watch = fetchlock.LockWatch(tmp_path / ".x.lock", stale_after=0.3)
    ns_before = os.stat(tmp_path / ".x.lock").st_mtime_ns
    end = time.monotonic() + 0.8
    while time.monotonic() < end:
        assert watch.stale() is False
        time.sleep(0.05)
    assert os.stat(tmp_path / ".x.lock").st_mtime_ns != ns_before
    lock.release()
    assert watch.stale() is None


def test_a_holder_whose_lock_was_broken_notices_it(tmp_path):
    lock = fetchlock.DownloadLock(tmp_path / ".x.lock", heartbeat_s=0.05)
    assert lock.acquire()
    fetchlock.LockWatch(tmp_path / ".x.lock").break_lock()        # a waiter's mistake
    other = fetchlock.DownloadLock(tmp_path / ".x.lock", heartbeat_s=10)
    assert other.acquire()
    assert lock.lost.wait(2)
    lock.release()                                                  # not its file any more
    assert (tmp_path / ".x.lock").exists()
    other.release()
    assert not (tmp_path / ".x.lock").exists()


# ---- the program -------------------------------------------------------------------------------
def run_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, str(FETCH_MODEL), *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, env={**os.environ, **(env or {})},
                          **kw)


def test_two_workers_on_one_folder_download_once(h, tmp_path):
    h.rate = 4e6                                          # 0.5 s: they overlap
    env = {"HF_ENDPOINT": h.endpoint, "HF_TOKEN": TOKEN}
    cmd = [sys.executable, str(FETCH_MODEL), "--dir", str(tmp_path), "--progress-every", "0.1",
           "hf://acme/m-GGUF:Q4_K_M"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}) for _ in range(2)]
    outs = [p.communicate(timeout=CLI_TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0] for o in outs] == [f"{tmp_path / 'm-Q4_K_M.gguf'}\n"] * 2
    assert (tmp_path / "m-Q4_K_M.gguf").read_bytes() == DATA
    assert h.cdn_gets == 1 and h.cdn_bytes == len(DATA)
    errs = "".join(o[1] for o in outs)
    assert "is downloading it" in errs                    # the other one waited
    assert "% of 2.1 MB" in errs and "MB/s, ETA" in errs  # progress lines
    assert TOKEN not in errs


def test_cli_exit_codes_and_check(h, tmp_path):
    env = {"HF_ENDPOINT": h.endpoint, "HF_TOKEN": TOKEN}
    proc = run_cli("--check", "https://host/m.gguf?sig=secret, hf://a/b:Q4")
    assert (proc.returncode, proc.stdout) == (0, "https://host/m.gguf,hf://a/b:Q4\nm.gguf,\n")
    proc = run_cli("--check", "hf://a/b")
    assert proc.returncode == 2 and "needs a QUANT" in proc.stderr
    proc = run_cli("--check", "--sha256", "0" * 64, "https://a/m.gguf,https://b/n.gguf")
    assert proc.returncode == 2 and "single SPEC" in proc.stderr
    proc = run_cli("--check", "--one", "https://a/dl?x=1,2#name=m.gguf")
    assert (proc.returncode, proc.stdout) == (0, "https://a/dl\nm.gguf\n")
    proc = run_cli("--check", "--one", "--name", "mine.gguf", "hf://a/b/sub/q.gguf")
    assert (proc.returncode, proc.stdout) == (0, "hf://a/b/sub/q.gguf\nmine.gguf\n")
    proc = run_cli("--check", "--one", "hf://a/b/sub/q.gguf")
    assert (proc.returncode, proc.stdout) == (0, "hf://a/b/sub/q.gguf\nq.gguf\n")
    # --checked: a --check beside it reports a malformed spec; this one exits 2 quietly
    proc = run_cli("--checked", "--dir", str(tmp_path), "hf://a/b")
    assert (proc.returncode, proc.stderr) == (2, "")
    proc = run_cli("--dir", str(tmp_path), "hf://a/b")
    assert proc.returncode == 2 and "needs a QUANT" in proc.stderr
    proc = run_cli("--dir", str(tmp_path), "hf://acme/m-GGUF:gguf", env=env)
    assert proc.returncode == 2 and "3 .gguf files hold" not in proc.stderr \
        and "2 .gguf files hold 'gguf'" in proc.stderr
    h.faults = ["wrong"]
    proc = run_cli("--dir", str(tmp_path), "hf://acme/m-GGUF:Q4_K_M", env=env)
    assert proc.returncode == 1 and "sha256" in proc.stderr and proc.stdout == ""
    proc = run_cli("--dir", str(tmp_path), "--name", "mine.gguf", "--sha256", SHA.upper(),
                   "hf://acme/m-GGUF:Q4_K_M", env=env)
    assert proc.returncode == 0 and proc.stdout == f"{tmp_path / 'mine.gguf'}\n"
