"""GGUF files of the architectures transformers does not read (DeepSeek's `deepseek2`, GLM-4.5's
`glm4moe`) as llama.cpp's converter (`convert_hf_to_gguf.py`: `DeepseekV2Model`, `Glm4MoeModel`) writes
them from a transformers model: names from the `gguf` package's table, experts stacked into one
[E, out, in] tensor per projection, MLA's `kv_b_proj` split per head into `attn_k_b` (transposed) and
`attn_v_b` (or kept whole, as files before llama.cpp's MLA support), one key/value head in deepseek2's
metadata, YaRN as `yarn_log_multiplier = 0.1 * mscale_all_dim`, GLM's multi-token-prediction layer
counted in `block_count`. Weights written as Q8_0 are first rounded to what Q8_0 holds, in the model
too, so the model is the file's exact reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter, MODEL_ARCH_NAMES, get_tensor_name_map
from gguf.quants import dequantize, quantize

from gguf_files import add_keys, gguf_name

ARCHS = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "glm4_moe": "glm4moe",  # model type -> GGUF
         "gpt_oss": "gpt-oss", "glm_moe_dsa": "glm-dsa", "kimi_linear": "kimi-linear"}

def deepseek_v3_config(*, vocab: int, yarn: bool = True):
    """A small DeepSeek-V3 config: MLA with a q LoRA, 8 routed experts in 2 groups, one dense layer."""
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    return tf.DeepseekV3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                               n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                               first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                               qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
                               routed_scaling_factor=2.5, rope_parameters=rope, tie_word_embeddings=False)


def deepseek_v2_lite_config(*, vocab: int):
    """A small DeepSeek-V2-Lite config: softmax routing without groups, no q LoRA (a plain q_proj)."""
    import transformers as tf

    return tf.DeepseekV2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                               n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
                               kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                               max_position_embeddings=256, tie_word_embeddings=False)


def glm4_moe_config(*, vocab: int):
    """A small GLM-4.5: q/k/v biases, q/k norms, a half-width rotary embedding, one dense layer."""
    import transformers as tf

    return tf.Glm4MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                            routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
                            max_position_embeddings=256, tie_word_embeddings=False)


def gpt_oss_config(*, vocab: int):
    """A small gpt-oss: 4 experts, 2 per token, sliding and full attention, YaRN without truncation."""
    import transformers as tf

    return tf.GptOssConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_local_experts=4, num_experts_per_tok=2, head_dim=16, num_attention_heads=4,
                           num_key_value_heads=2, sliding_window=4, max_position_embeddings=2048,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                            "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                            "beta_slow": 1.0, "truncate": False})


def glm_dsa_config(*, vocab: int):
    """A small GLM-5: DeepSeek's MLA with a q LoRA, 8 routed experts, one dense layer, the DSA indexer."""
    import transformers as tf

    return tf.GlmMoeDsaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32,
                              kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4,
                              index_head_dim=16, index_topk=4, routed_scaling_factor=2.5, max_position_embeddings=256,
                              tie_word_embeddings=False)


def kimi_linear_config(*, vocab: int):
    """A small Kimi-Linear: three delta-attention layers, then MLA; a dense first layer, then experts."""
    import transformers as tf

    return tf.KimiLinearConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                               layer_types=["linear_attention"] * 3 + ["full_attention"],
                               mlp_layer_types=["dense", "sparse", "sparse", "sparse"], qk_rope_head_dim=8,
                               qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32, num_experts=8,
                               num_experts_per_token=2, num_shared_experts=1, routed_scaling_factor=2.5,
                               linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4, pad_token_id=None,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def random_model(config, seed: int = 0, types=lambda name: None):
    """A random float32 model of `config` (its score-correction biases, expert biases and attention
    sinks random too), each weight `types(name)` gives a GGML type (Q8_0, or MXFP4 as gpt-oss's
    experts are published) rounded to it along the rows it is written with (an (in, out) expert's columns)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("e_score_correction_bias", "_proj_bias", ".sinks")):
                t.copy_(torch.rand(t.shape) * 0.1)
            elif (qtype := types(name)) is not None:
                rows = t.transpose(-1, -2) if _transposed(model, name) else t
                rounded = torch.from_numpy(dequantize(quantize(rows.contiguous().numpy(), qtype), qtype))
                rows.copy_(rounded.reshape(rows.shape))
    return model


def _transposed(model, name: str) -> bool:
    """Whether parameter `name` belongs to experts transformers holds as (in, out) matrices (gpt-oss's, Llama 4's)."""
    from reshard.plan import holds_inward

    owner = name.rsplit(".", 1)[0]
    return owner.endswith(".experts") and holds_inward(model.get_submodule(owner))


def write_mapped(path: Path, like: Path, model, *, types=lambda name: None, split_kv_b: bool = True,
                 mtp: bool = False) -> int:
    """`model` (a transformers DeepSeek, GLM-4.5 or gpt-oss) as llama.cpp writes its GGUF, with `like`'s
    tokenizer cut to the model's vocabulary; each weight in the type `types(transformers name)` gives,
    the rest F32; `mtp` adds a multi-token-prediction layer after the last (GLM's files keep theirs).
    Returns the file's size."""
    config = model.config
    arch = ARCHS[config.model_type]
    gguf_arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    table = get_tensor_name_map(gguf_arch, config.num_hidden_layers + int(mtp))
    tensors = []  # (GGUF name, float32 array, type)
    for name, t in model.state_dict().items():
        a, kind = t.float().numpy(), types(name) or Q.F32
        base = name.rsplit(".", 1)[0]
        if _transposed(model, name):  # gpt-oss: (in, out) experts, gate and up interleaved, written (out, in)
            suffix = ".bias" if name.endswith("_bias") else ".weight"
            a = a if suffix == ".bias" else np.ascontiguousarray(a.swapaxes(-1, -2))
            if "gate_up_proj" in name:
                tensors += [(table.get_name(f"{base}.gate_proj") + suffix, np.ascontiguousarray(a[:, ::2]), kind),
                            (table.get_name(f"{base}.up_proj") + suffix, np.ascontiguousarray(a[:, 1::2]), kind)]
            else:
                tensors.append((table.get_name(f"{base}.down_proj") + suffix, a, kind))
        elif name.endswith("self_attn.conv1d.weight"):  # Kimi: transformers joins q, k, v; llama.cpp keeps each (1, d, 1, k)
            for x, part in zip("qkv", np.split(a, 3, axis=0)):
                tensors.append((f"blk.{_layer(name)}.ssm_conv1d_{x}.weight", part.reshape(1, part.shape[0], 1, -1), Q.F32))
        elif name.endswith(".A_log"):  # KimiLinearModel.modify_tensors: -exp, in torch
            tensors.append((gguf_name(table, name), (-torch.exp(torch.from_numpy(a))).numpy(), Q.F32))
        elif name.endswith(".sinks"):
            tensors.append((table.get_name(name) + ".weight", a, Q.F32))
        elif name.endswith("mlp.experts.gate_up_proj"):  # llama.cpp stacks each projection's experts
            gate, up = np.split(a, 2, axis=1)
            tensors += [(table.get_name(f"{base}.gate_proj") + ".weight", gate, kind),
                        (table.get_name(f"{base}.up_proj") + ".weight", up, kind)]
        elif name.endswith("mlp.experts.down_proj"):
            tensors.append((table.get_name(name) + ".weight", a, kind))
        elif name.endswith("e_score_correction_bias"):
            tensors.append((gguf_name(table, name[:-len("_bias")]) + ".bias", a, Q.F32))
        elif name.endswith("kv_b_proj.weight") and split_kv_b:
            heads, nope = config.num_attention_heads, config.qk_nope_head_dim
            kv_b = a.reshape(heads, nope + config.v_head_dim, -1)
            k_b, v_b = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(kv_b[:, nope:])
            tensors += [(table.get_name(base.replace("kv_b", "k_b")) + ".weight", k_b, Q.F32),
                        (table.get_name(base.replace("kv_b", "v_b")) + ".weight", v_b, Q.F32)]
        else:
            tensors.append((gguf_name(table, name), a, kind))
    if mtp:  # llama.cpp's names for the next-token layer's own tensors, and a norm as every layer has
        n, hidden = config.num_hidden_layers, config.hidden_size
        tensors += [(f"blk.{n}.nextn.eh_proj.weight", np.ones((hidden, 2 * hidden), np.float32), Q.F32),
                    (f"blk.{n}.attn_norm.weight", np.ones(hidden, np.float32), Q.F32)]
    metadata = (_deepseek2(config, split_kv_b) if arch == "deepseek2" else _glm4moe(config, mtp) if arch == "glm4moe"
                else _glm_dsa(config, mtp) if arch == "glm-dsa" else _kimi_linear(config) if arch == "kimi-linear"
                else _gpt_oss(config))
    write_file(path, like, arch, config.vocab_size, tensors, metadata)
    return path.stat().st_size


def write_file(path: Path, like: Path, arch: str, vocab: int, tensors, metadata: dict) -> None:
    """A GGUF of `arch` at `path`: `like`'s tokenizer cut to `vocab` tokens, `metadata` {key: value}
    as `{arch}.key` (a list as an array of its items' type), `tensors` [(name, float32 array, GGML type)]."""
    writer = GGUFWriter(path, arch)
    add_keys(writer, like, vocab, arch, metadata)
    for name, a, kind in tensors:
        data = quantize(a, kind) if kind != Q.F32 else a.astype(np.float32)
        writer.add_tensor(name, data, raw_dtype=kind if kind != Q.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gpt_oss(config) -> dict:
    """The `gpt-oss.*` keys llama.cpp's converter writes for `config`."""
    rope = config.rope_parameters
    return {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
            "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
            "attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
            "rope.freq_base": float(rope["rope_theta"]), "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            "expert_count": config.num_local_experts, "expert_used_count": config.num_experts_per_tok,
            "expert_feed_forward_length": config.intermediate_size, "attention.sliding_window": config.sliding_window,
            "rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
            "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
            "vocab_size": config.vocab_size}


def _glm4moe(config, mtp: bool) -> dict:
    """The `glm4moe.*` keys llama.cpp's converter writes for `config`."""
    return {"block_count": config.num_hidden_layers + int(mtp), "nextn_predict_layers": int(mtp),
            "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
            "feed_forward_length": config.intermediate_size, "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_key_value_heads, "attention.key_length": config.head_dim,
            "attention.value_length": config.head_dim,
            "rope.freq_base": float(config.rope_parameters["rope_theta"]),
            "rope.dimension_count": int(config.head_dim * config.rope_parameters["partial_rotary_factor"]),
            "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            "expert_used_count": config.num_experts_per_tok, "expert_count": config.n_routed_experts,
            "expert_feed_forward_length": config.moe_intermediate_size, "expert_shared_count": config.n_shared_experts,
            "leading_dense_block_count": config.first_k_dense_replace, "expert_gating_func": 2,
            "expert_weights_scale": float(config.routed_scaling_factor), "expert_weights_norm": config.norm_topk_prob}


def _layer(name: str) -> str:
    return name.split(".")[2]


def _kimi_linear(config) -> dict:
    """KimiLinearModel's keys: TextModel's, per-layer key/value heads (1 for MLA, 0 for delta attention),
    MLA's sizes as DeepseekV2Model writes them, the delta attention's head size and kernel."""
    rope, kinds = config.qk_rope_head_dim, config.layer_types
    out = {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
           "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
           "attention.head_count": config.num_attention_heads,
           "attention.head_count_kv": [1 if k == "full_attention" else 0 for k in kinds],
           "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "expert_count": config.num_local_experts,
           "expert_used_count": config.num_experts_per_tok, "expert_group_used_count": config.topk_group,
           "vocab_size": config.vocab_size, "ssm.conv_kernel": config.linear_conv_kernel_dim,
           "kda.head_dim": config.linear_head_dim, "attention.kv_lora_rank": config.kv_lora_rank,
           "rope.dimension_count": rope, "attention.key_length": config.kv_lora_rank + rope,
           "attention.value_length": config.v_head_dim, "attention.key_length_mla": config.qk_nope_head_dim + rope,
           "attention.value_length_mla": config.v_head_dim, "expert_feed_forward_length": config.moe_intermediate_size,
           "expert_shared_count": config.n_shared_experts,
           "leading_dense_block_count": config.mlp_layer_types.index("sparse"),
           "expert_weights_scale": float(config.routed_scaling_factor)}
    if config.q_lora_rank is not None:
        out["attention.q_lora_rank"] = config.q_lora_rank
    return out


def _glm_dsa(config, mtp: bool) -> dict:
    """GlmMoeDsaModel's keys: DeepseekV2Model's (no gating key: GLM's config has no scoring function),
    the indexer's, the multi-token-prediction layer counted in `block_count`."""
    out = {k: v for k, v in _deepseek2(config, True).items() if k != "expert_gating_func"}
    out.update({"block_count": config.num_hidden_layers + int(mtp), "nextn_predict_layers": int(mtp),
                "attention.indexer.head_count": config.index_n_heads, "attention.indexer.key_length": config.index_head_dim,
                "attention.indexer.top_k": config.index_topk})
    return out


def _deepseek2(config, split_kv_b: bool) -> dict:
    """The `deepseek2.*` keys llama.cpp's converter writes for `config`."""
    rope = config.qk_rope_head_dim
    out = {"block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
           "embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
           "attention.head_count": config.num_attention_heads, "attention.head_count_kv": 1,
           "rope.freq_base": float((config.rope_parameters or {}).get("rope_theta", 10000.0)),
           "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
           "expert_used_count": config.num_experts_per_tok, "leading_dense_block_count": config.first_k_dense_replace,
           "vocab_size": config.vocab_size, "attention.kv_lora_rank": config.kv_lora_rank,
           "expert_feed_forward_length": config.moe_intermediate_size, "expert_count": config.n_routed_experts,
           "expert_shared_count": config.n_shared_experts,
           "expert_weights_scale": float(config.routed_scaling_factor), "rope.dimension_count": rope}
    if config.q_lora_rank is not None:
        out["attention.q_lora_rank"] = config.q_lora_rank
    if config.norm_topk_prob:
        out["expert_weights_norm"] = True
    if config.model_type == "deepseek_v3":  # sigmoid routing; llama.cpp reads no key as softmax (V2's)
        out["expert_gating_func"] = 2
    if config.n_group:
        out.update({"expert_group_count": config.n_group, "expert_group_used_count": config.topk_group})
    if split_kv_b:  # MLA files: the compressed head's sizes, and the decompressed ones as *_mla
        out.update({"attention.key_length": config.kv_lora_rank + rope, "attention.value_length": config.kv_lora_rank,
                    "attention.key_length_mla": config.qk_nope_head_dim + rope,
                    "attention.value_length_mla": config.v_head_dim})
    else:
        out.update({"attention.key_length": config.qk_nope_head_dim + rope, "attention.value_length": config.v_head_dim})
    params = config.rope_parameters or {}
    if params.get("rope_type") == "yarn":
        out.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(params["factor"]),
                    "rope.scaling.original_context_length": params["original_max_position_embeddings"],
                    "rope.scaling.yarn_log_multiplier": 0.1 * params["mscale_all_dim"]})
    return out
