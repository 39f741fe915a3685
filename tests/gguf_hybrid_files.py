"""Random GGUF files of the architectures transformers loads through its newer GGUF path (its
`integrations.gguf` conversion mappings): Qwen3.5 (dense and MoE: Gated DeltaNet linear attention
with full attention every few layers) and LFM2 (short convolutions). The tensors are named and laid
out as llama.cpp's converter writes them: `blk.N.*` leaf names, Qwen3.5's norms stored as `w + 1`,
`ssm_a` as `-exp(A_log)`, convolution kernels squeezed to 2D, a MoE layer's experts one
[E, out, in] tensor per projection, and a multi-token-prediction block after the last layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType, GGUFWriter

from gguf_files import SKIP_KEYS, vocab_overrides, write_random_tensors

U32, F32, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL

# transformers' parameter under `model.layers.N.` -> llama.cpp's tensor under `blk.N.`
LAYER_NAMES = {
    "qwen35": {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
        "linear_attn.in_proj_a.weight": "ssm_alpha.weight", "linear_attn.in_proj_b.weight": "ssm_beta.weight",
        "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.norm.weight": "ssm_norm.weight",
        "linear_attn.out_proj.weight": "ssm_out.weight", "linear_attn.A_log": "ssm_a",
        "linear_attn.dt_bias": "ssm_dt.bias",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.experts.down_proj": "ffn_down_exps.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    },
    "lfm2": {
        "operator_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.out_proj.weight": "attn_output.weight",
        "self_attn.q_layernorm.weight": "attn_q_norm.weight", "self_attn.k_layernorm.weight": "attn_k_norm.weight",
        "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
        "feed_forward.w2.weight": "ffn_down.weight", "conv.in_proj.weight": "shortconv.in_proj.weight",
        "conv.out_proj.weight": "shortconv.out_proj.weight", "conv.conv.weight": "shortconv.conv.weight",
    },
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight", "model.embedding_norm.weight": "token_embd_norm.weight"}
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
    out = []
    for name, p in model.state_dict().items():
        if name.startswith("model.layers."):
            index, leaf = name[len("model.layers."):].split(".", 1)
            ggufs = ([f"blk.{index}.ffn_gate_exps.weight", f"blk.{index}.ffn_up_exps.weight"]
                     if leaf == "mlp.experts.gate_up_proj" else [f"blk.{index}.{LAYER_NAMES[family][leaf]}"])
        else:
            ggufs = [TOP_NAMES[name]]
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
    arch = "qwen35moe" if family == "qwen35" and hasattr(config, "num_experts") else family
    reader = GGUFReader(like)
    writer = GGUFWriter(path, arch)
    kept = {k: f for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.")) and not k.startswith(SKIP_KEYS)}
    overrides = vocab_overrides(reader, config.vocab_size)
    for key, field in kept.items():
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, overrides.get(key, field.contents()), field.types[0], sub_type=sub_type)
    for key, value in _metadata(config, family, mtp).items():
        kind = GGUFValueType.ARRAY if isinstance(value, list) else F32 if isinstance(value, float) else U32
        writer.add_key_value(f"{arch}.{key}", value, kind, sub_type=U32 if isinstance(value, list) else None)
    tensors = gguf_tensors(config, family, quantized, mtp)
    rng = np.random.default_rng(seed + 1)
    values = {n: -np.exp(0.5 * rng.standard_normal(shape)).astype(np.float32)  # ssm_a = -exp(A_log) < 0
              for n, shape, _ in tensors if n.endswith(".ssm_a")}
    return write_random_tensors(writer, path, tensors, types, seed, values)


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
