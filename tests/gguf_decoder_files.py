"""GGUF files of the decoders transformers' GGUF loader does not read (Command-R, Cohere2, ERNIE 4.5,
HunYuan, Seed-OSS, EXAONE 4, GLM-4, Granite, SmolLM3, AFM, OLMo 2, OLMoE, dots.llm1, ...) as llama.cpp's
converter (`convert_hf_to_gguf.py`) writes them from a transformers model, read from its classes:
- keys: `TextModel.set_gguf_parameters`'s (sizes, head counts, `rope.freq_base`, the norm's epsilon,
  expert counts, `key_length` where the config has `head_dim`, rope scaling for linear and YaRN alone),
  `LlamaModel`'s (`vocab_size`, `rope.dimension_count`, Llama 3 scaling as a `rope_freqs` tensor), each
  architecture's own (`ARCH_KEYS`);
- tensors: the `gguf` package's name table over the checkpoint's names; experts stacked one
  [E, out, in] tensor per projection; Granite's joined `input_linear` split into gate and up; q and k
  rows permuted (`LlamaModel.permute`) for the LLaMA-derived classes; a tied head not written.
The model's norms and biases are random (not ones and zeros), so a misplaced norm shows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, MODEL_ARCH_NAMES, get_tensor_name_map

from gguf_ssm_files import MAMBA2_LIKE, WRITTEN_AS, falcon_folded, groups_of, ssm_config, ssm_keys
from gguf_files import gguf_name
from gguf_table_files import random_model, write_file

PERMUTED = {"granite", "granitemoe", "smollm3", "arcee", "granitehybrid", "nemotron_h", "nemotron_h_moe",
            "mistral3"}  # LlamaModel subclasses with undo_permute
NORMS_PLUS_ONE = {"qwen3next"}  # Qwen3NextModel.modify_tensors: norm weights (but the gated one's) + 1
SSM = {"mamba2", "granitehybrid", "granite-micro", "nemotron_h", "nemotron_h_moe", "jamba", "falcon-h1"}  # gguf_ssm_files
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)
SCALES = dict(attention_multiplier=0.1, embedding_multiplier=6.0, residual_multiplier=0.5, logits_scaling=4.0)


def decoder_config(arch: str, vocab: int):
    """A small transformers config of GGUF architecture `arch`, its options the published models use."""
    import transformers as tf

    if arch in SSM:
        return ssm_config(arch, vocab)
    small = {**SMALL, "vocab_size": vocab}
    moe = dict(intermediate_size=32, num_hidden_layers=2)
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    make = {
        "command-r": lambda: tf.CohereConfig(**small, logit_scale=0.25, use_qk_norm=True),
        "cohere2": lambda: tf.Cohere2Config(**{**small, "num_hidden_layers": 4}, logit_scale=0.25, sliding_window=4),
        "ernie4_5": lambda: tf.Ernie4_5Config(**small, head_dim=16, tie_word_embeddings=True),
        "ernie4_5-moe": lambda: tf.Ernie4_5_MoeConfig(
            **{**small, "num_hidden_layers": 3}, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, tie_word_embeddings=False),
        "hunyuan-moe": lambda: tf.HunYuanMoEV1Config(**{**small, **moe}, head_dim=16, num_experts=8, moe_topk=2,
                                                     use_qk_norm=True, tie_word_embeddings=False),
        "hunyuan-dense": lambda: tf.HunYuanDenseV1Config(**small, head_dim=16, tie_word_embeddings=True),
        "seed_oss": lambda: tf.SeedOssConfig(**small, head_dim=32, attention_bias=True, tie_word_embeddings=False),
        "exaone4": lambda: tf.Exaone4Config(**{**small, "num_hidden_layers": 4, "max_position_embeddings": 16384},
                                            sliding_window=4,
                                            layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                            rope_parameters=llama3, tie_word_embeddings=False),
        "glm4": lambda: tf.Glm4Config(**small, head_dim=16, attention_bias=True, tie_word_embeddings=False),
        "granite": lambda: tf.GraniteConfig(**small, **SCALES, tie_word_embeddings=True),
        "granitemoe": lambda: tf.GraniteMoeSharedConfig(**{**small, **moe}, **SCALES, num_local_experts=8,
                                                        num_experts_per_tok=2, shared_intermediate_size=64),
        "smollm3": lambda: tf.SmolLM3Config(**{**small, "num_hidden_layers": 4}, tie_word_embeddings=True),
        "arcee": lambda: tf.ArceeConfig(**small, head_dim=32, tie_word_embeddings=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
        "olmo2": lambda: tf.Olmo2Config(**small, rms_norm_eps=1e-6, tie_word_embeddings=False),
        "olmoe": lambda: tf.OlmoeConfig(**{**small, **moe}, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5),
        "qwen3next": lambda: tf.Qwen3NextConfig(
            **{**small, "num_hidden_layers": 4}, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, tie_word_embeddings=False),
        "llama4": lambda: tf.Llama4TextConfig(
            **{**small, "num_hidden_layers": 4, "max_position_embeddings": 16384, "intermediate_size": 32}, head_dim=16,
            intermediate_size_mlp=128, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
            rope_parameters={**llama3, "rope_theta": 500000.0, "high_freq_factor": 1.0}, tie_word_embeddings=False),
        "olmo3": lambda: tf.Olmo3Config(**{**small, "num_hidden_layers": 4}, sliding_window=4, tie_word_embeddings=False,
                                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "ministral3": lambda: tf.Ministral3Config(**{**small, "max_position_embeddings": 4096}, head_dim=16,
                                                  tie_word_embeddings=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 256,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}),
        "mistral-small": lambda: tf.MistralConfig(**small, head_dim=16, sliding_window=None, tie_word_embeddings=False),
        "lfm2moe": lambda: tf.Lfm2MoeConfig(
            **{**small, "num_hidden_layers": 4}, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_dense_layers=1, norm_eps=1e-5,
            layer_types=["conv", "conv", "full_attention", "conv"], tie_word_embeddings=True),
        "exaone-moe": lambda: tf.ExaoneMoeConfig(
            **{**small, "num_hidden_layers": 4}, sliding_window=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"], first_k_dense_replace=1, moe_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, num_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            tie_word_embeddings=False),
        "afmoe": lambda: tf.AfmoeConfig(
            **{**small, "num_hidden_layers": 4}, head_dim=16, sliding_window=4, global_attn_every_n_layers=4,
            layer_types=["sliding_attention"] * 3 + ["full_attention"], mup_enabled=True, num_dense_layers=1,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, route_scale=2.5,
            tie_word_embeddings=False),
        "dots1": lambda: tf.Dots1Config(**{**small, "num_hidden_layers": 3}, n_routed_experts=8, n_shared_experts=1,
                                        num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                                        sliding_window=None, tie_word_embeddings=False),
    }
    return make[arch]()


def decoder_model(arch: str, vocab: int, types=lambda name: None, seed: int = 0):
    """A random model of `decoder_config(arch)`, its vectors (norms, biases) random around their init."""
    model = random_model(decoder_config(arch, vocab), seed=seed, types=types)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dim() == 1 or name.endswith("_norm.weight"):  # norms around 1, biases around 0
                t.add_(torch.randn(t.shape) * 0.1)
            if arch in NORMS_PLUS_ONE and name.endswith("norm.weight"):  # so that (w + 1) - 1 is w
                t.copy_(torch.round(t * 4096) / 4096)
            if name.endswith(".A_log"):  # so that log(exp(a)) is a, as the file's -exp(a) is read back
                for _ in range(4):
                    t.copy_(torch.log(torch.exp(t)))
                assert torch.equal(torch.log(torch.exp(t)), t)
    if arch == "jamba":  # Jamba computes `dt_proj.weight @ x` (2-D @ 3-D): torch's matmul takes another path, 1e-7
        model.requires_grad_(False)  # apart, while the weight requires grad, even under no_grad; the runtime's never do
    return model


def write_decoder(path: Path, like: Path, arch: str, model, *, types=lambda name: None, edit=None) -> None:
    """`model` as llama.cpp writes a GGUF of `arch`; each weight in the type `types(name)` gives, the rest F32;
    `edit(tensors, metadata)`, where given, changes what is written first (a damaged file)."""
    model_id, arch = arch, WRITTEN_AS.get(arch, arch)
    config = model.config
    hp = config.to_dict()
    layers = getattr(config, "num_hidden_layers", None) or len(config.layers_block_type)
    table = get_tensor_name_map(next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch), layers)
    tensors = []
    for name, t in model.state_dict().items():
        a, kind = t.float().numpy(), types(name) or Q.F32
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer = next((p for b, p in zip(name.split("."), name.split(".")[1:]) if b == "layers" and p.isdigit()), None)
        if arch == "falcon-h1":
            a = falcon_folded(name, a, config)
        if arch == "llama4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            a = np.ascontiguousarray(a.swapaxes(-1, -2))  # Llama4Model.modify_tensors: (in, out) -> (out, in)
        if name.endswith("in_proj_qkvz.weight"):
            tensors += _qkv_and_gate(a, config, layer, kind)
            continue
        if arch in NORMS_PLUS_ONE and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            a = a + np.float32(1)
        elif name.endswith(".A_log"):
            a = (-torch.exp(torch.from_numpy(a))).numpy()  # in torch, as the converter computes it
        elif "conv1d" in name or name.endswith("conv.conv.weight"):
            a = np.ascontiguousarray(a.squeeze())
        if arch in MAMBA2_LIKE and name.endswith((".A_log", ".D")):  # Mamba2Model.modify_tensors: (H,) -> (H, 1)
            a = a.reshape(-1, 1)
        elif arch in MAMBA2_LIKE and name.endswith(("mixer.norm.weight", "mamba.norm.weight")):
            a = a.reshape(groups_of(config), -1)  # the gated norm, per group
        if name.endswith(".experts.gate_up_proj"):  # stacked [E, 2I, H]: gate rows first
            gate, up = np.split(a, 2, axis=1)
            tensors += [(f"blk.{layer}.ffn_gate_exps.weight", gate, kind), (f"blk.{layer}.ffn_up_exps.weight", up, kind)]
            continue
        if name.endswith((".experts.down_proj", ".experts.up_proj")):
            tensors.append((f"blk.{layer}.ffn_{name.rsplit('.', 1)[1][:-5]}_exps.weight", a, kind))
            continue
        shared = "_shexp" if getattr(config, "num_local_experts", 1) else ""  # GraniteMoeModel: no experts, the MLP
        if name.endswith("shared_mlp.input_linear.weight"):  # GraniteMoeModel.modify_tensors' split
            gate, up = np.split(a, 2, axis=0)
            tensors += [(f"blk.{layer}.ffn_gate{shared}.weight", gate, kind), (f"blk.{layer}.ffn_up{shared}.weight", up, kind)]
            continue
        if name.endswith("shared_mlp.output_linear.weight"):
            tensors.append((f"blk.{layer}.ffn_down{shared}.weight", a, kind))
            continue
        if arch in PERMUTED and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            a = np.ascontiguousarray(a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2)
                                     .reshape(a.shape))
        checkpoint = name.replace("e_score_correction_bias", "e_score_correction.bias")
        checkpoint = checkpoint + ".bias" if checkpoint.endswith(".expert_bias") else checkpoint  # LFM2MoeModel's
        stored = gguf_name(table, checkpoint)
        tensors.append((stored, a, kind if a.ndim > 1 and not stored.endswith("_norm.weight") else Q.F32))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = rope.get("full_attention", rope)  # TextModel writes the full-attention layers' (OLMo 3 has two)
    if rope.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors (and EXAONE 4's)
        tensors.append(("rope_freqs.weight", _llama3_factors(rope, hp.get("head_dim") or config.hidden_size
                                                              // config.num_attention_heads), Q.F32))
    if arch == "llama4":  # Llama4Model.__init__: the dense MLP's width is the one TextModel writes
        hp = {**hp, "intermediate_size": hp["intermediate_size_mlp"], "intermediate_size_moe": hp["intermediate_size"]}
    metadata = ssm_keys(arch, model) if model_id in SSM else {**_text_model(hp, rope), **ARCH_KEYS.get(arch, _none)(hp)}
    if edit is not None:
        edit(tensors, metadata)
    write_file(path, like, arch, config.vocab_size, tensors, metadata)


def _text_model(hp: dict, rope: dict) -> dict:
    """`TextModel.set_gguf_parameters`' keys for hyperparameters `hp` (a config's to_dict())."""
    out = {"block_count": hp["num_hidden_layers"], "context_length": hp["max_position_embeddings"],
           "embedding_length": hp["hidden_size"], "feed_forward_length": hp["intermediate_size"],
           "attention.head_count": hp["num_attention_heads"], "attention.head_count_kv": hp["num_key_value_heads"],
           "rope.freq_base": float(rope["rope_theta"])}
    if hp.get("rms_norm_eps") is not None:
        out["attention.layer_norm_rms_epsilon"] = float(hp["rms_norm_eps"])
    if hp.get("layer_norm_eps") is not None:
        out["attention.layer_norm_epsilon"] = float(hp["layer_norm_eps"])
    experts = hp.get("num_local_experts", hp.get("num_experts"))
    if experts is not None:
        out["expert_count"] = experts
    if hp.get("num_experts_per_tok") is not None:
        out["expert_used_count"] = hp["num_experts_per_tok"]
    if hp.get("n_group") is not None:
        out.update({"expert_group_count": hp["n_group"], "expert_group_used_count": hp["topk_group"]})
    if hp.get("head_dim") is not None:
        out.update({"attention.key_length": hp["head_dim"], "attention.value_length": hp["head_dim"]})
    if rope.get("rope_type") == "yarn":
        out.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
                    "rope.scaling.original_context_length": rope["original_max_position_embeddings"]})
    return out


def _llama(hp: dict) -> dict:
    """`LlamaModel.set_gguf_parameters`' own keys."""
    return {"vocab_size": hp["vocab_size"],
            "rope.dimension_count": hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]}


def _granite(hp: dict) -> dict:
    out = {k: v for k, v in _llama(hp).items()}
    out.update({"attention.scale": float(hp["attention_multiplier"]), "embedding_scale": float(hp["embedding_multiplier"]),
                "residual_scale": float(hp["residual_multiplier"]), "logit_scale": float(hp["logits_scaling"])})
    return out


def _none(hp: dict) -> dict:
    return {}


def _hunyuan_moe(hp: dict) -> dict:
    return {"expert_shared_feed_forward_length": hp["intermediate_size"],
            "expert_feed_forward_length": hp["intermediate_size"], "expert_used_count": hp["moe_topk"],
            "expert_shared_count": 1}


def _ernie_moe(hp: dict) -> dict:
    return {"expert_count": hp["moe_num_experts"], "expert_used_count": hp["moe_k"],
            "interleave_moe_layer_step": hp["moe_layer_interval"], "leading_dense_block_count": hp["moe_layer_start_index"],
            "expert_feed_forward_length": hp["moe_intermediate_size"], "expert_shared_count": hp["moe_num_shared_experts"],
            "expert_shared_feed_forward_length": hp["intermediate_size"] // hp["num_key_value_heads"]}


def _exaone4(hp: dict) -> dict:
    return {"vocab_size": hp["vocab_size"], "attention.sliding_window": hp["sliding_window"],
            "attention.sliding_window_pattern": [t == "sliding_attention" for t in hp["layer_types"]]}


def _dots1(hp: dict) -> dict:
    return {"expert_count": hp["n_routed_experts"], "expert_feed_forward_length": hp["moe_intermediate_size"],
            "leading_dense_block_count": hp["first_k_dense_replace"], "expert_shared_count": hp["n_shared_experts"],
            "expert_weights_scale": float(hp["routed_scaling_factor"]), "expert_weights_norm": hp["norm_topk_prob"],
            "expert_gating_func": 2}


def _qkv_and_gate(a: np.ndarray, config, layer: str, kind) -> list:
    """Qwen3NextModel.modify_tensors' split of `in_proj_qkvz` (per key head [q, k, v, z]) into
    `attn_qkv` (every q head, then k, then v) and `attn_gate` (z)."""
    nk, hk, hv = config.linear_num_key_heads, config.linear_key_head_dim, config.linear_value_head_dim
    r = config.linear_num_value_heads // nk
    split = [hk, hk, r * hv, r * hv]
    d = a.T.reshape(a.shape[1], nk, sum(split))
    q, k, v, z = np.split(d, np.cumsum(split)[:-1], axis=-1)
    qkv = np.concatenate([t.reshape(a.shape[1], -1) for t in (q, k, v)], axis=-1).T
    return [(f"blk.{layer}.attn_qkv.weight", np.ascontiguousarray(qkv), kind),
            (f"blk.{layer}.attn_gate.weight", np.ascontiguousarray(z.reshape(a.shape[1], -1).T), kind)]


def _qwen3next(hp: dict) -> dict:
    head_dim, rope = hp["head_dim"], hp["rope_parameters"]
    return {"expert_feed_forward_length": hp["moe_intermediate_size"],
            "expert_shared_feed_forward_length": hp["shared_expert_intermediate_size"],
            "ssm.conv_kernel": hp["linear_conv_kernel_dim"], "ssm.state_size": hp["linear_key_head_dim"],
            "ssm.group_count": hp["linear_num_key_heads"], "ssm.time_step_rank": hp["linear_num_value_heads"],
            "ssm.inner_size": hp["linear_value_head_dim"] * hp["linear_num_value_heads"], "full_attention_interval": 4,
            "rope.dimension_count": int(head_dim * rope.get("partial_rotary_factor", 0.25))}


def _llama4(hp: dict) -> dict:
    return {**_llama(hp), "interleave_moe_layer_step": hp["interleave_moe_layer_step"],
            "expert_feed_forward_length": hp["intermediate_size_moe"]}


def _lfm2moe(hp: dict) -> dict:
    return {"attention.head_count_kv": [hp["num_key_value_heads"] if t == "full_attention" else 0 for t in hp["layer_types"]],
            "attention.layer_norm_rms_epsilon": float(hp["norm_eps"]), "expert_count": hp["num_experts"],
            "expert_feed_forward_length": hp["moe_intermediate_size"], "leading_dense_block_count": hp["num_dense_layers"],
            "expert_gating_func": 2, "vocab_size": hp["vocab_size"], "shortconv.l_cache": hp["conv_L_cache"]}


def _exaone_moe(hp: dict) -> dict:
    """ExaoneMoEModel's keys: Exaone4Model's, the experts' (its shared experts' width their sum)."""
    return {**_exaone4(hp), "expert_count": hp["num_experts"], "expert_feed_forward_length": hp["moe_intermediate_size"],
            "expert_shared_count": hp["num_shared_experts"],
            "expert_shared_feed_forward_length": hp["moe_intermediate_size"] * hp["num_shared_experts"],
            "expert_weights_scale": float(hp["routed_scaling_factor"]), "expert_weights_norm": bool(hp["norm_topk_prob"]),
            "leading_dense_block_count": hp["first_k_dense_replace"], "nextn_predict_layers": 0, "rope.scaling.type": "none"}


def _afmoe(hp: dict) -> dict:
    """AfmoeModel's keys: LlamaModel's, the experts', the window (its pattern is llama.cpp's own)."""
    return {**_llama(hp), "expert_shared_count": hp["num_shared_experts"],
            "expert_feed_forward_length": hp["moe_intermediate_size"], "leading_dense_block_count": hp["num_dense_layers"],
            "expert_weights_scale": float(hp["route_scale"]), "attention.sliding_window": hp["sliding_window"]}


def _olmo2(hp: dict) -> dict:
    if hp.get("sliding_window") is None:
        return {}
    return {"attention.sliding_window": hp["sliding_window"], "rope.freq_base_swa":
            float(hp["rope_parameters"]["sliding_attention"]["rope_theta"]),
            "attention.sliding_window_pattern": [t == "sliding_attention" for t in hp["layer_types"]]}


def _mistral3(hp: dict) -> dict:
    """Ministral3Model's keys: YaRN's betas, and for a ministral3 config mscale_all_dim and Llama 4's beta."""
    out, rope = _llama(hp), hp["rope_parameters"]
    if hp["model_type"] == "ministral3":
        out.update({"rope.scaling.yarn_beta_fast": float(rope["beta_fast"]), "rope.scaling.yarn_beta_slow": float(rope["beta_slow"]),
                    "rope.scaling.yarn_log_multiplier": float(rope["mscale_all_dim"]),
                    "attention.temperature_scale": float(rope["llama_4_scaling_beta"])})
    return out


ARCH_KEYS = {  # each converter class's set_gguf_parameters, beyond TextModel's
    "command-r": lambda hp: {"logit_scale": float(hp["logit_scale"]), "rope.scaling.type": "none"},
    "cohere2": lambda hp: {"logit_scale": float(hp["logit_scale"]), "attention.sliding_window": hp["sliding_window"],
                           "vocab_size": hp["vocab_size"], "rope.scaling.type": "none",
                           "rope.dimension_count": hp["hidden_size"] // hp["num_attention_heads"]},
    "ernie4_5-moe": _ernie_moe, "hunyuan-moe": _hunyuan_moe, "exaone4": _exaone4, "dots1": _dots1,
    "glm4": lambda hp: {"rope.dimension_count": int(hp["head_dim"] * hp["rope_parameters"].get("partial_rotary_factor", 0.5))},
    "granite": _granite, "granitemoe": lambda hp: {**_granite(hp),
                                                   "expert_shared_feed_forward_length": hp["shared_intermediate_size"]},
    "smollm3": _llama, "arcee": _llama, "qwen3next": _qwen3next, "llama4": _llama4, "olmo2": _olmo2,
    "mistral3": _mistral3, "lfm2moe": _lfm2moe, "exaone-moe": _exaone_moe, "afmoe": _afmoe,
}


def _llama3_factors(rope: dict, dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors' per-frequency factors (its context from the top-level
    config, absent in transformers 5's: 8192)."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0), 8192
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
