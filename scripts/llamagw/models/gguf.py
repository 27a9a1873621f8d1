"""Read a GGUF file's header (metadata key/values and tensor shapes) without loading tensors.

Standard library only. The reader walks the header with a bounded cursor: every count, string
length and array length is checked against a named limit before anything is allocated, and
big arrays (the tokenizer's token, score and merge lists) are skipped without being
materialized; they appear in `metadata` as an ArraySummary (element type and length).

GGUF layout (llama.cpp `ggml/include/gguf.h`, `docs` of the gguf Python package):
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    string = u64 length + UTF-8 bytes; array = element_type u32 + count u64 + elements.
Byte order is little-endian; big-endian files exist (s390x) and are detected from the version.

Public API:
    read_gguf_metadata(path, *, name=None, max_bytes=MAX_HEADER_BYTES) -> ModelInfo
    ModelInfo.digest (sha256 of the file, cached by path, size and mtime; reading a multi-GB
    file takes a while: call file_digest() in a worker thread before serving if that matters)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import struct
import threading
import time
from typing import Any, BinaryIO

# --- limits (each refuses an absurd header instead of allocating for it) ---------------------
# Real headers are a few MB (a 256k-token vocabulary plus merges is ~10 MB); 256 MiB leaves
# two orders of magnitude and still bounds a hostile file.
MAX_HEADER_BYTES = 256 * 1024 * 1024
# Largest real metadata strings are chat templates (tens of KB); 16 MiB is absurd already.
MAX_STRING_BYTES = 16 * 1024 * 1024
# Vocabularies reach ~262k tokens, merge lists ~1M; 2^24 elements is far past both.
MAX_ARRAY_LENGTH = 1 << 24
# Real files carry < 100 keys (arrays count as one key).
MAX_KV_COUNT = 65_536
# Large MoE models have a few thousand tensors; a million is absurd.
MAX_TENSOR_COUNT = 1_000_000
# GGML_MAX_DIMS in ggml.h.
MAX_TENSOR_DIMS = 4
# Arrays up to this many elements are kept whole in `metadata` (e.g. rope sections, per-layer
# head counts); longer ones become an ArraySummary. Ollama's /api/show hides such lists too.
INLINE_ARRAY_MAX = 64
# Strings inside a kept array (e.g. general.tags) longer than this are not worth keeping inline.
INLINE_STRING_MAX = 1024
# Split models ("-00001-of-00003.gguf"): llama.cpp's gguf-split caps shards well below this.
MAX_SPLIT_COUNT = 1024
# Read buffer for the header walk.
READ_CHUNK = 1 << 20
# Digest cache entries (one per model file, a handful in router mode).
DIGEST_CACHE_MAX = 64

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is obsolete (llama.cpp refuses it too)

# GGUF value types (gguf.h enum gguf_type): id -> (name, struct code or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
    4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
    12: ("float64", "d"),
}
TYPE_STRING = 8
TYPE_ARRAY = 9

# general.file_type (llama.h enum llama_ftype) -> the name Ollama and llama.cpp show.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}

# ggml_type (ggml.h) -> name; used when general.file_type is absent (the dominant weight type).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclasses.dataclass(frozen=True)
class ArraySummary:
    """A metadata array too long to keep: its element type and length only."""
    element_type: str
    length: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    size_bytes: int
    modified_at: float                 # file mtime, seconds since the epoch
    family: str                        # general.architecture
    parameter_count: int               # general.parameter_count, else summed tensor shapes
    parameter_size: str                # general.size_label, else e.g. "7.6B" / "1.2M"
    quantization_level: str            # from general.file_type, else the dominant tensor type
    context_length: int | None         # {arch}.context_length
    embedding_length: int | None       # {arch}.embedding_length
    template: str                      # tokenizer.chat_template ("" when absent)
    metadata: dict[str, Any]           # scalars as-is; long arrays as ArraySummary
    tensor_count: int
    gguf_version: int

    @property
    def digest(self) -> str:
        """sha256 hex of the (first) file; cached by (path, size, mtime)."""
        return file_digest(self.path)


def read_gguf_metadata(path: str, *, name: str | None = None,
                       max_bytes: int = MAX_HEADER_BYTES) -> ModelInfo:
    """Parse the header of the GGUF at `path`. Raises ValueError on a bad or truncated file."""
    st = os.stat(path)
    with open(path, "rb") as f:
        header = _read_header(f, path, max_bytes)
    kv = header["kv"]
    tensors = header["tensors"]
    size = st.st_size

    # Split models: add the other shards' sizes and tensors.
    split_count = kv.get("split.count")
    if isinstance(split_count, int) and split_count > 1:
        size, tensors = _read_shards(path, split_count, size, tensors, max_bytes)

    arch = kv.get("general.architecture")
    family = arch if isinstance(arch, str) else ""
    param_count = kv.get("general.parameter_count")
    if not isinstance(param_count, int) or param_count <= 0:
        param_count = sum(_prod(dims) for _, dims, _ in tensors)
    size_label = kv.get("general.size_label")
    parameter_size = size_label if isinstance(size_label, str) and size_label else \
        human_number(param_count)
    template = kv.get("tokenizer.chat_template")

    if name is None:
        name = _default_name(path)
    return ModelInfo(
        name=name,
        path=path,
        size_bytes=size,
        modified_at=st.st_mtime,
        family=family,
        parameter_count=param_count,
        parameter_size=parameter_size,
        quantization_level=_quantization(kv, tensors),
        context_length=_int_or_none(kv.get(f"{family}.context_length")),
        embedding_length=_int_or_none(kv.get(f"{family}.embedding_length")),
        template=template if isinstance(template, str) else "",
        metadata=kv,
        tensor_count=len(tensors),
        gguf_version=header["version"],
    )


def human_number(n: int) -> str:
    """Parameter count as Ollama shows it: 7615616512 -> "7.6B", 1200000 -> "1.20M"."""
    for unit, scale, decimals in (("B", 1_000_000_000, 1), ("M", 1_000_000, 2)):
        if n >= scale:
            value = n / scale
            if value == int(value):
                return f"{int(value)}{unit}"
            return f"{value:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{round(n / 1000)}K"
    return str(n)


# --- digest -----------------------------------------------------------------------------------

_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_digest(path: str) -> str:
    """sha256 hex of a file, cached by (path, size, mtime_ns). Safe to call from a thread."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _digest_lock:
        if len(_digest_cache) >= DIGEST_CACHE_MAX:
            _digest_cache.pop(next(iter(_digest_cache)))
        _digest_cache[key] = digest
    return digest


# --- the header walk --------------------------------------------------------------------------

class _Cursor:
    """Sequential reader over a file with a byte budget; raises ValueError when exhausted."""

    def __init__(self, f: BinaryIO, path: str, max_bytes: int):
        self.f = f
        self.path = path
        self.max_bytes = max_bytes
        self.buf = b""
        self.pos = 0          # position inside buf
        self.consumed = 0     # bytes of the file consumed so far
        self.endian = "<"

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} (at byte {self.consumed})")

    def _ensure(self, n: int) -> None:
        if self.consumed + n > self.max_bytes:
            raise self._fail(f"GGUF header larger than the limit of {self.max_bytes} bytes")
        have = len(self.buf) - self.pos
        if have >= n:
            return
        parts = [self.buf[self.pos:]]
        need = n - have
        while need > 0:
            chunk = self.f.read(max(need, READ_CHUNK))
            if not chunk:
                raise self._fail("truncated GGUF file")
            parts.append(chunk)
            need -= len(chunk)
        self.buf = b"".join(parts)
        self.pos = 0

    def take(self, n: int) -> bytes:
        self._ensure(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        self.consumed += n
        return out

    def skip(self, n: int) -> None:
        self._ensure_budget(n)
        have = len(self.buf) - self.pos
        if n <= have:
            self.pos += n
        else:
            # Jump over the rest with a seek; check the file is long enough.
            rest = n - have
            here = self.f.tell()
            end = self.f.seek(0, os.SEEK_END)
            if here + rest > end:
                raise self._fail("truncated GGUF file")
            self.f.seek(here + rest)
            self.buf = b""
            self.pos = 0
        self.consumed += n

    def _ensure_budget(self, n: int) -> None:
        if self.consumed + n > self.max_bytes:
            raise self._fail(f"GGUF header larger than the limit of {self.max_bytes} bytes")

    def unpack(self, code: str) -> Any:
        size = struct.calcsize(code)
        self._ensure(size)
        (value,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += size
        self.consumed += size
        return value

    def u32(self) -> int:
        return self.unpack("I")

    def u64(self) -> int:
        return self.unpack("Q")

    def string_length(self, what: str) -> int:
        n = self.u64()
        if n > MAX_STRING_BYTES:
            raise self._fail(f"{what}: string of {n} bytes exceeds MAX_STRING_BYTES "
                             f"({MAX_STRING_BYTES})")
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` strings (a token list) without decoding them: the hot loop of a read."""
        unpack_len = struct.Struct(self.endian + "Q").unpack_from
        for _ in range(count):
            if len(self.buf) - self.pos < 8:
                self._ensure(8)
            (n,) = unpack_len(self.buf, self.pos)
            if n > MAX_STRING_BYTES:
                raise self._fail(f"{what}: string of {n} bytes exceeds MAX_STRING_BYTES "
                                 f"({MAX_STRING_BYTES})")
            total = 8 + n
            if self.consumed + total > self.max_bytes:
                raise self._fail(f"GGUF header larger than the limit of {self.max_bytes} bytes")
            if len(self.buf) - self.pos >= total:
                self.pos += total
                self.consumed += total
            else:
                self.pos += 8
                self.consumed += 8
                self.skip(n)

    def string(self, what: str) -> str:
        raw = self.take(self.string_length(what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")


def _read_header(f: BinaryIO, path: str, max_bytes: int) -> dict[str, Any]:
    cur = _Cursor(f, path, max_bytes)
    try:
        magic = cur.take(4)
    except ValueError:
        raise ValueError(f"{path}: not a GGUF file (shorter than the magic)") from None
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    raw_version = cur.take(4)
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        be_version = struct.unpack(">I", raw_version)[0]
        if be_version in SUPPORTED_VERSIONS:
            cur.endian = ">"
            version = be_version
        else:
            raise ValueError(f"{path}: unsupported GGUF version {version} "
                             f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = cur.u64()
    kv_count = cur.u64()
    if tensor_count > MAX_TENSOR_COUNT:
        raise ValueError(f"{path}: tensor count {tensor_count} exceeds MAX_TENSOR_COUNT "
                         f"({MAX_TENSOR_COUNT})")
    if kv_count > MAX_KV_COUNT:
        raise ValueError(f"{path}: metadata count {kv_count} exceeds MAX_KV_COUNT "
                         f"({MAX_KV_COUNT})")

    kv: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("metadata key")
        vtype = cur.u32()
        kv[key] = _read_value(cur, vtype, key)

    tensors: list[tuple[str, tuple[int, ...], int]] = []
    for _ in range(tensor_count):
        tname = cur.string("tensor name")
        n_dims = cur.u32()
        if n_dims > MAX_TENSOR_DIMS:
            raise ValueError(f"{path}: tensor {tname!r} has {n_dims} dimensions "
                             f"(GGML_MAX_DIMS is {MAX_TENSOR_DIMS})")
        dims = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        cur.u64()  # data offset: not needed
        tensors.append((tname, dims, ggml_type))
    return {"version": version, "kv": kv, "tensors": tensors}


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype == TYPE_STRING:
        return cur.string(key)
    if vtype == TYPE_ARRAY:
        return _read_array(cur, key)
    spec = VALUE_TYPES.get(vtype)
    if spec is None:
        raise cur._fail(f"{key}: unknown GGUF value type {vtype}")
    return cur.unpack(spec[1])


def _read_array(cur: _Cursor, key: str) -> Any:
    etype = cur.u32()
    count = cur.u64()
    if count > MAX_ARRAY_LENGTH:
        raise cur._fail(f"{key}: array of {count} elements exceeds MAX_ARRAY_LENGTH "
                        f"({MAX_ARRAY_LENGTH})")
    spec = VALUE_TYPES.get(etype)
    if spec is None:
        raise cur._fail(f"{key}: unknown GGUF array element type {etype}")
    ename, code = spec
    if etype == TYPE_ARRAY:
        # Nested arrays: walk them without keeping anything.
        for _ in range(count):
            _read_array(cur, key)
        return ArraySummary("array", count)
    keep = count <= INLINE_ARRAY_MAX
    if etype == TYPE_STRING:
        if not keep:
            cur.skip_strings(count, key)
            return ArraySummary(ename, count)
        items = []
        for _ in range(count):
            n = cur.string_length(key)
            if keep and n <= INLINE_STRING_MAX:
                items.append(cur.take(n).decode("utf-8", errors="replace"))
            else:
                keep = False
                cur.skip(n)
        return items if keep else ArraySummary(ename, count)
    size = struct.calcsize(code)
    if not keep:
        cur.skip(size * count)
        return ArraySummary(ename, count)
    raw = cur.take(size * count)
    return list(struct.unpack(f"{cur.endian}{count}{code}", raw))


def _read_shards(path: str, split_count: int, size: int,
                 tensors: list[tuple[str, tuple[int, ...], int]], max_bytes: int):
    m = _SPLIT_RE.match(os.path.basename(path))
    if m is None or split_count > MAX_SPLIT_COUNT:
        return size, tensors
    directory = os.path.dirname(path)
    tensors = list(tensors)
    for no in range(2, split_count + 1):
        shard = os.path.join(directory, f"{m['prefix']}-{no:05d}-of-{split_count:05d}.gguf")
        try:
            size += os.stat(shard).st_size
            with open(shard, "rb") as f:
                tensors.extend(_read_header(f, shard, max_bytes)["tensors"])
        except FileNotFoundError:
            continue
    return size, tensors


def _quantization(kv: dict[str, Any], tensors) -> str:
    ftype = kv.get("general.file_type")
    if isinstance(ftype, int) and not isinstance(ftype, bool):
        return FILE_TYPE_NAMES.get(ftype, f"unknown ({ftype})")
    # No file type: name the type holding most of the weights.
    weight: dict[int, int] = {}
    for _, dims, ggml_type in tensors:
        weight[ggml_type] = weight.get(ggml_type, 0) + _prod(dims)
    if not weight:
        return "unknown"
    top = max(weight, key=lambda t: weight[t])
    return GGML_TYPE_NAMES.get(top, f"unknown ({top})")


def _default_name(path: str) -> str:
    base = os.path.basename(path)
    m = _SPLIT_RE.match(base)
    if m:
        return m["prefix"]
    return base[:-5] if base.lower().endswith(".gguf") else base


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n if dims else 0


def rfc3339(seconds: float) -> str:
    """An mtime as RFC 3339 UTC with nanoseconds, as Ollama writes modified_at."""
    whole = int(seconds // 1)
    frac_ns = min(int(round((seconds - whole) * 1_000_000_000)), 999_999_999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac_ns:09d}Z"
