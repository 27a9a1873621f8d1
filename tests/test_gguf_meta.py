"""gguf_meta: GGUF header reading, checked against files written by the `gguf` package."""

from __future__ import annotations

import hashlib
import os
import struct

import gguf
import numpy as np
import pytest

from llamagw.models import gguf as gguf_meta
from llamagw.models.gguf import ArraySummary, read_gguf_metadata

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
N_TOKENS = 50_000


def write_gguf(path, *, arch="llama", kv=None, tensors=None, file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
               tokens=N_TOKENS, endianess=gguf.GGUFEndian.LITTLE, split_max_tensors=0):
    w = gguf.GGUFWriter(str(path), arch, endianess=endianess, split_max_tensors=split_max_tensors)
    if file_type is not None:
        w.add_file_type(file_type)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, value)
    if tokens:
        w.add_token_list([f"tok{i}" for i in range(tokens)])
        w.add_token_scores([float(i) for i in range(tokens)])
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """Written once per module; tests only read it."""
    return write_gguf(
        tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf",
        kv={"general.name": "Tiny Chat", "llama.context_length": 4096,
            "llama.embedding_length": 64, "tokenizer.chat_template": TEMPLATE,
            "llama.rope.dimension_sections": [8, 8, 16], "general.tags": ["a", "b"],
            "tokenizer.ggml.add_bos_token": True, "llama.rope.freq_base": 10000.0},
        tensors={"token_embd.weight": np.zeros((100, 64), dtype=np.float32),
                 "output_norm.weight": np.zeros((64,), dtype=np.float32),
                 "blk.0.attn_q.weight": np.zeros((64, 32), dtype=np.float16)})


def test_reads_header_fields(model_file):
    info = read_gguf_metadata(str(model_file))
    assert info.name == "tiny-chat"
    assert info.path == str(model_file)
    assert info.size_bytes == os.path.getsize(model_file)
    assert info.modified_at == os.stat(model_file).st_mtime
    assert info.family == "llama"
    assert info.parameter_count == 100 * 64 + 64 + 64 * 32       # 8512, from tensor shapes
    assert info.parameter_size == "9K"
    assert info.quantization_level == "Q8_0"
    assert info.context_length == 4096
    assert info.embedding_length == 64
    assert info.template == TEMPLATE
    assert info.tensor_count == 3
    assert info.gguf_version == 3


def test_metadata_keeps_scalars_and_summarizes_long_arrays(model_file):
    md = read_gguf_metadata(str(model_file)).metadata
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "Tiny Chat"
    assert md["general.file_type"] == 7
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["llama.rope.freq_base"] == 10000.0
    assert md["llama.rope.dimension_sections"] == [8, 8, 16]
    assert md["general.tags"] == ["a", "b"]
    # The token list and scores are never materialized.
    assert md["tokenizer.ggml.tokens"] == ArraySummary("string", N_TOKENS)
    assert md["tokenizer.ggml.scores"] == ArraySummary("float32", N_TOKENS)
    for value in md.values():
        assert not (isinstance(value, list) and len(value) > gguf_meta.INLINE_ARRAY_MAX)


def test_name_can_be_given(model_file):
    assert read_gguf_metadata(str(model_file), name="served").name == "served"


def test_size_label_and_parameter_count_win_over_tensor_shapes(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_size_label("7B")
    w.add_uint64("general.parameter_count", 7_615_616_512)
    w.add_tensor("t", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    info = read_gguf_metadata(str(path))
    assert info.parameter_size == "7B"
    assert info.parameter_count == 7_615_616_512
    assert info.family == "qwen2"


def test_quantization_from_dominant_tensor_type_without_file_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", file_type=None, tokens=0,
                      tensors={"big": np.zeros((64, 64), dtype=np.float16),
                               "small": np.zeros((8,), dtype=np.float32)})
    assert read_gguf_metadata(str(path)).quantization_level == "F16"


def test_unknown_file_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", file_type=999, tokens=0)
    assert read_gguf_metadata(str(path)).quantization_level == "unknown (999)"


def test_big_endian_file(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG, tokens=100,
                      kv={"llama.context_length": 512, "llama.rope.dimension_sections": [1, 2]},
                      tensors={"t": np.zeros((2, 3), dtype=np.float32)})
    info = read_gguf_metadata(str(path))
    assert info.context_length == 512 and info.parameter_count == 6
    assert info.metadata["llama.rope.dimension_sections"] == [1, 2]
    assert info.metadata["tokenizer.ggml.tokens"] == ArraySummary("string", 100)


def test_split_model_sums_shards(tmp_path):
    write_gguf(tmp_path / "m.gguf", tokens=0, split_max_tensors=1,
               kv={"llama.context_length": 128},
               tensors={f"t{i}": np.zeros((4, 8), dtype=np.float32) for i in range(3)})
    shards = sorted(tmp_path.glob("m-*-of-00003.gguf"))
    assert len(shards) == 3
    info = read_gguf_metadata(str(shards[0]))
    assert info.name == "m"
    assert info.size_bytes == sum(os.path.getsize(s) for s in shards)
    assert info.parameter_count == 3 * 32 and info.tensor_count == 3


# --- bad files --------------------------------------------------------------------------------

def test_bad_magic(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(str(path))


@pytest.mark.parametrize("keep", [6, 20, 200, 100_000])
def test_truncated_file(model_file, tmp_path, keep):
    data = model_file.read_bytes()   # ~1 MB of header (50k tokens + scores): cuts land in it
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(str(cut))


def test_unsupported_version(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(ValueError, match="unsupported GGUF version 1"):
        read_gguf_metadata(str(path))


def header(kv_count=1, tensor_count=0):
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


def key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


def test_absurd_string_length_refused_without_allocating(tmp_path):
    path = tmp_path / "s.gguf"
    path.write_bytes(header() + key(b"general.name") + struct.pack("<IQ", 8, 1 << 40))
    with pytest.raises(ValueError, match="MAX_STRING_BYTES"):
        read_gguf_metadata(str(path))


def test_absurd_array_length_refused(tmp_path):
    path = tmp_path / "a.gguf"
    path.write_bytes(header() + key(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 40))
    with pytest.raises(ValueError, match="MAX_ARRAY_LENGTH"):
        read_gguf_metadata(str(path))


def test_absurd_counts_refused(tmp_path):
    path = tmp_path / "c.gguf"
    path.write_bytes(header(kv_count=1 << 40))
    with pytest.raises(ValueError, match="MAX_KV_COUNT"):
        read_gguf_metadata(str(path))
    path.write_bytes(header(kv_count=0, tensor_count=1 << 40))
    with pytest.raises(ValueError, match="MAX_TENSOR_COUNT"):
        read_gguf_metadata(str(path))


def test_unknown_value_type_refused(tmp_path):
    path = tmp_path / "t.gguf"
    path.write_bytes(header() + key(b"x") + struct.pack("<I", 77) + b"\0" * 16)
    with pytest.raises(ValueError, match="unknown GGUF value type 77"):
        read_gguf_metadata(str(path))


def test_too_many_dims_refused(tmp_path):
    path = tmp_path / "d.gguf"
    path.write_bytes(header(kv_count=0, tensor_count=1) + key(b"t") + struct.pack("<I", 9)
                     + b"\0" * 100)
    with pytest.raises(ValueError, match="GGML_MAX_DIMS"):
        read_gguf_metadata(str(path))


def test_header_byte_budget(model_file):
    with pytest.raises(ValueError, match="larger than the limit of 4096 bytes"):
        read_gguf_metadata(str(model_file), max_bytes=4096)
    # The default budget reads it.
    read_gguf_metadata(str(model_file))


def test_array_length_limit_is_enforced(model_file, monkeypatch):
    monkeypatch.setattr(gguf_meta, "MAX_ARRAY_LENGTH", N_TOKENS - 1)
    with pytest.raises(ValueError, match="MAX_ARRAY_LENGTH"):
        read_gguf_metadata(str(model_file))


# --- digest and names -------------------------------------------------------------------------

def test_digest_is_sha256_and_follows_changes(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, tokens=10)
    info = read_gguf_metadata(str(path))
    assert info.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "ab") as f:
        f.write(b"\0" * 32)
    assert info.digest == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("n,label", [
    (7_615_616_512, "7.6B"), (8_000_000_000, "8B"), (1_200_000, "1.20M"),
    (135_000_000, "135M"), (8512, "9K"), (999, "999"), (0, "0"),
])
def test_human_number(n, label):
    assert gguf_meta.human_number(n) == label


def test_file_type_names_match_llama_cpp():
    for member in gguf.LlamaFileType:
        if member.name == "GUESSED":
            continue
        expected = member.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        assert gguf_meta.FILE_TYPE_NAMES.get(member.value) == expected, member


def test_ggml_type_names_match_ggml():
    for member in gguf.GGMLQuantizationType:
        assert gguf_meta.GGML_TYPE_NAMES.get(member.value) == member.name, member


def test_rfc3339():
    assert gguf_meta.rfc3339(1_800_000_000.25) == "2027-01-15T08:00:00.250000000Z"
