"""Random GGUF files of the architectures transformers loads through its newer GGUF path (its
`integrations.gguf` conversion mappings): Qwen3.5 (dense and MoE: Gated DeltaNet linear attention
with full attention every few layers) and LFM2 (short convolutions). The tensors are named and laid
out as llama.cpp's converter writes them: names from the `gguf` package's table, Qwen3.5's norms stored as `w + 1`,
`ssm_a` as `-exp(A_log)`, convolution kernels squeezed to 2D, a MoE layer's experts one
[E, out, in] tensor per projection, and a multi-token-prediction block after the last layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter, MODEL_ARCH_NAMES, get_tensor_name_map

from gguf_files import add_keys, gguf_name, write_random_tensors

SQUEEZED = ("ssm_conv1d.weight", "shortconv.conv.weight", "ffn_gate_inp_shexp.weight")  # stored without their size-1 axis


def qwen35_config(*, moe: bool, layers: int, hidden: int, vocab: int):
    """A small Qwen3.5 text config (every other layer full attention) whose matrices' input widths
    are `hidden` (a multiple of 256, so K-quant blocks fit) or 256."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=32, linear_value_head_dim=64, linear_conv_kernel_dim=4,
                  full_attention_interval=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                                   "mrope_section": [3, 3, 2], "mrope_interleaved": True})
    if moe:
        return tf.Qwen3_5MoeTextConfig(**common, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                                       num_experts=8, num_experts_per_tok=2)
    return tf.Qwen3_5TextConfig(**common, intermediate_size=256)


def lfm2_config(*, layers: int, hidden: int, vocab: int):
    import transformers as tf

    return tf.Lfm2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=512, block_auto_adjust_ff_dim=False,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["conv" if i % 2 == 0 else "full_attention" for i in range(layers)],
                         max_position_embeddings=4096, tie_word_embeddings=False)


def gguf_tensors(config, family: str, quantized, mtp: bool) -> list:
    """[(GGUF name, numpy shape, type)] for `config`'s model as llama.cpp names and shapes it: each
    matrix whose input width allows it in `quantized(name, in_features)`'s type, the rest F32;
    `mtp` adds a multi-token-prediction block as `blk.{layers}`."""
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    table = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == _arch(config, family)),
                                config.num_hidden_layers)
    out = []
    for name, p in model.state_dict().items():
        index = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("mlp.experts.gate_up_proj"):
            ggufs = [f"blk.{index}.ffn_gate_exps.weight", f"blk.{index}.ffn_up_exps.weight"]
        elif name.endswith("mlp.experts.down_proj"):
            ggufs = [f"blk.{index}.ffn_down_exps.weight"]
        else:  # the `gguf` package's own table, the one llama.cpp's converter names tensors by
            ggufs = [gguf_name(table, name)]
        shape = tuple(p.shape)
        if len(ggufs) == 2:
            shape = (shape[0], shape[1] // 2, shape[2])
        for gguf in ggufs:
            squeezed = tuple(n for n in shape if n != 1) if gguf.endswith(SQUEEZED) else shape
            qtype = quantized(gguf, squeezed[-1]) if len(squeezed) >= 2 else Q.F32
            out.append((gguf, squeezed, qtype))
    if mtp:  # transformers has no module for it and drops it (`mtp.*`)
        n, hidden = config.num_hidden_layers, config.hidden_size
        out += [(f"blk.{n}.nextn.eh_proj.weight", (hidden, 2 * hidden), Q.Q8_0),
                (f"blk.{n}.attn_norm.weight", (hidden,), Q.F32)]
    return out


def write_random_hybrid(path: Path, like: Path, config, family: str, *, quantized, mtp: bool = False,
                        types: dict | None = None, seed: int = 0) -> int:
    """A random GGUF of `config`'s model (`family` "qwen35" or "lfm2"; Qwen3.5-MoE's GGUF architecture
    is "qwen35moe") with `like`'s tokenizer cut to the config's vocabulary; returns its size."""
    arch = _arch(config, family)
    writer = GGUFWriter(path, arch)
    add_keys(writer, like, config.vocab_size, arch, _metadata(config, family, mtp))
    tensors = gguf_tensors(config, family, quantized, mtp)
    rng = np.random.default_rng(seed + 1)
    values = {n: -np.exp(0.5 * rng.standard_normal(shape)).astype(np.float32)  # ssm_a = -exp(A_log) < 0
              for n, shape, _ in tensors if n.endswith(".ssm_a")}
    return write_random_tensors(writer, path, tensors, types, seed, values)


def _arch(config, family: str) -> str:
    """The GGUF architecture of `config` (`family` "qwen35" or "lfm2"): Qwen3.5-MoE's is "qwen35moe"."""
    return "qwen35moe" if family == "qwen35" and hasattr(config, "num_experts") else family


def _metadata(config, family: str, mtp: bool) -> dict:
    """The `{arch}.*` keys llama.cpp writes for `config` (those transformers reads back)."""
    common = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
              "attention.head_count": config.num_attention_heads, "rope.freq_base": 1e6}
    if family == "lfm2":
        return {**common, "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
                "attention.head_count_kv": [config.num_key_value_heads if t == "full_attention" else 0
                                            for t in config.layer_types],
                "attention.layer_norm_rms_epsilon": float(config.norm_eps), "shortconv.l_cache": config.conv_L_cache}
    rope = config.rope_parameters
    out = {**common, "block_count": config.num_hidden_layers + int(mtp), "nextn_predict_layers": int(mtp),
           "attention.head_count_kv": config.num_key_value_heads, "attention.key_length": config.head_dim,
           "attention.value_length": config.head_dim, "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
           "full_attention_interval": config.layer_types.index("full_attention") + 1, "ssm.conv_kernel": config.linear_conv_kernel_dim,
           "ssm.state_size": config.linear_key_head_dim, "ssm.group_count": config.linear_num_key_heads,
           "ssm.time_step_rank": config.linear_num_value_heads,
           "ssm.inner_size": config.linear_num_value_heads * config.linear_value_head_dim,
           "rope.dimension_sections": [*rope["mrope_section"], 0],
           "rope.dimension_count": int(config.head_dim * rope["partial_rotary_factor"])}
    if hasattr(config, "num_experts"):
        out.update({"expert_feed_forward_length": config.moe_intermediate_size,
                    "expert_shared_feed_forward_length": config.shared_expert_intermediate_size,
                    "expert_count": config.num_experts, "expert_used_count": config.num_experts_per_tok})
    else:
        out["feed_forward_length"] = config.intermediate_size
    return out
