"""GGUF files of llama.cpp's `deepseek2` architecture (DeepSeek-V3, R1, V3.1, Kimi-K2 with sigmoid
routing; DeepSeek-V2, V2.5 and V2-Lite with softmax routing), which transformers' GGUF loader does not read.

Where transformers has no mapping, this module is one, built as llama.cpp's converter
(`convert_hf_to_gguf.py`, `DeepseekV2Model`) writes these files:
- names: the `gguf` package's own table for the architecture (`gguf.get_tensor_name_map`), the one
  llama.cpp's converter names tensors by;
- a MoE layer's experts: one [E, out, in] tensor per projection (`ffn_gate_exps`, `ffn_up_exps`,
  `ffn_down_exps`); transformers' model holds gate and up as one `gate_up_proj`, gate first;
- the score-correction bias as `exp_probs_b.bias`;
- MLA's `kv_b_proj`: files written since llama.cpp's MLA support split it per head into `attn_k_b`
  ([heads, kv_lora_rank, qk_nope], the key part transposed) and `attn_v_b` ([heads, v, kv_lora_rank]);
  older files keep `attn_kv_b` whole. Both make the same [heads * (qk_nope + v), kv_lora_rank] weight;
- the config: from the file's `deepseek2.*` keys (llama.cpp writes the MLA head sizes as
  `key_length_mla`/`value_length_mla`, older files as `key_length`/`value_length`; it writes one key/value
  head, MLA's compressed one, where transformers' config counts the decompressed ones).

`Deepseek2Map` answers as reshard/gguf_conversions.py's `ConversionMap` does (`sources`, `make`).
"""

from __future__ import annotations

import torch

from .errors import SourceError

ARCHITECTURE = "deepseek2"
# llama.cpp's expert_gating_func: 2 is sigmoid routing (DeepSeek-V3); 1, or none written (the files made
# before the key, DeepSeek-V2 and V2.5's), softmax
SIGMOID, SOFTMAX = 2, 1


def config_from_metadata(fields: dict, tensor_names, path) -> object:
    """The transformers config of a `deepseek2` GGUF with key-value `fields` {key: value}:
    `DeepseekV3Config` for sigmoid routing, `DeepseekV2Config` for softmax routing (its experts
    limited to groups where the file counts groups, as llama.cpp routes them)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    def key(name, default=None):
        value = fields.get(f"{ARCHITECTURE}.{name}", default)
        if value is None:
            raise SourceError(f"{path} is a deepseek2 GGUF without {ARCHITECTURE}.{name}; download it again")
        return value

    gating = key("expert_gating_func", SOFTMAX)
    if gating not in (SIGMOID, SOFTMAX):
        raise SourceError(f"{path} is a deepseek2 GGUF with expert_gating_func {gating}, which reshard cannot "
                          f"read yet; convert the model's safetensors checkpoint instead")
    rope = key("rope.dimension_count")
    mtp = key("nextn_predict_layers", 0)
    q_lora = fields.get(f"{ARCHITECTURE}.attention.q_lora_rank")
    config = {
        "vocab_size": key("vocab_size", fields.get("tokenizer.ggml.tokens.count")),
        "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
        "moe_intermediate_size": key("expert_feed_forward_length"),
        "num_hidden_layers": key("block_count") - mtp, "num_nextn_predict_layers": mtp,
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count"),  # MLA decompresses a key/value per head
        "n_shared_experts": key("expert_shared_count"), "n_routed_experts": key("expert_count"),
        "num_experts_per_tok": key("expert_used_count"),
        "routed_scaling_factor": float(key("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "n_group": key("expert_group_count", 1), "topk_group": key("expert_group_used_count", 1),
        "first_k_dense_replace": key("leading_dense_block_count", 0),
        "kv_lora_rank": key("attention.kv_lora_rank"), "q_lora_rank": q_lora,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": fields.get(f"{ARCHITECTURE}.attention.key_length_mla", key("attention.key_length")) - rope,
        "v_head_dim": fields.get(f"{ARCHITECTURE}.attention.value_length_mla", key("attention.value_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "rope_parameters": _rope(fields, float(key("rope.freq_base", 10000.0))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"), "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
    }
    if gating == SIGMOID:
        return DeepseekV3Config(**config, architectures=["DeepseekV3ForCausalLM"])
    grouped = config["n_group"] > 1
    return DeepseekV2Config(**config, topk_method="group_limited_greedy" if grouped else "greedy",
                            architectures=["DeepseekV2ForCausalLM"])


def _rope(fields: dict, theta: float) -> dict:
    """YaRN as DeepSeek-V3's config states it: llama.cpp keeps its factor, original context and
    `0.1 * mscale_all_dim` (as `yarn_log_multiplier`); DeepSeek's mscale equals mscale_all_dim."""
    prefix = f"{ARCHITECTURE}.rope.scaling."
    if fields.get(prefix + "type") != "yarn":
        return {"rope_type": "default", "rope_theta": theta}
    mscale = fields.get(prefix + "yarn_log_multiplier", 0.0) / 0.1
    return {"rope_type": "yarn", "rope_theta": theta, "factor": float(fields[prefix + "factor"]),
            "original_max_position_embeddings": int(fields[prefix + "original_context_length"]),
            "beta_fast": float(fields.get(prefix + "yarn_beta_fast", 32.0)),
            "beta_slow": float(fields.get(prefix + "yarn_beta_slow", 1.0)),
            "mscale": mscale, "mscale_all_dim": mscale}


class Deepseek2Map:
    """Which GGUF tensors make each parameter of a DeepSeek-V3 model, and how."""

    def __init__(self, model, names):
        import gguf

        config = model.config
        self.heads, self.nope = config.num_attention_heads, config.qk_nope_head_dim
        layers = config.num_hidden_layers + getattr(config, "num_nextn_predict_layers", 0)
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, layers)
        present = set(names)
        self.sources: dict[str, list[str]] = {}
        self.kinds: dict[str, str] = {}  # parameter -> "experts" (gate, up joined) or "kv_b" (from k_b, v_b)
        for param in model.state_dict():
            base = param.rsplit(".", 1)[0]
            if param.endswith(".mlp.experts.gate_up_proj"):
                made = [table.get_name(f"{base}.gate_proj") + ".weight", table.get_name(f"{base}.up_proj") + ".weight"]
                self.kinds[param] = "experts"
            elif param.endswith(".mlp.experts.down_proj"):
                made = [table.get_name(param) + ".weight"]
            elif param.endswith(".e_score_correction_bias"):
                made = [table.get_name(param[:-len("_bias")]) + ".bias"]
            elif param.endswith("kv_b_proj.weight") and table.get_name(base) + ".weight" not in present:
                made = [table.get_name(base.replace("kv_b_proj", name)) + ".weight" for name in ("k_b_proj", "v_b_proj")]
                self.kinds[param] = "kv_b"
            else:
                made = [table.get_name(param, try_suffixes=(".weight", ".bias")) or param]
            if all(m in present for m in made):
                self.sources[param] = made
        claimed = {n for made in self.sources.values() for n in made}
        for name in names:  # left for the conversion's check to name, but the MTP block llama.cpp may keep
            if name not in claimed and not _block_at_or_after(name, config.num_hidden_layers):
                self.sources[name] = [name]

    def make(self, key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameter `key` from its GGUF tensors {GGUF name: values}, in `sources[key]`'s order."""
        values = [tensors[n] for n in self.sources[key]]
        kind = self.kinds.get(key)
        if kind == "experts":  # [E, I, H] gate and up -> [E, 2I, H]
            return torch.cat(values, dim=1)
        if kind == "kv_b":  # per head: the key part (stored transposed), then the value part
            k_b, v_b = values
            if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != self.heads or k_b.shape[2] != self.nope:
                raise SourceError(f"{self.sources[key][0]} has shape {list(k_b.shape)}, not [heads, kv_lora_rank, "
                                  f"qk_nope_head_dim]; is the file's metadata the one of these weights?")
            return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])
        (value,) = values
        return value


def _block_at_or_after(name: str, layers: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= layers


def metadata_fields(reader) -> dict:
    """{key: value} of a GGUFReader's key-value fields, but the tokenizer's long arrays (their lengths)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "merges", "token_type", "scores")):
            out[name + ".count"] = len(field.data)
            continue
        try:
            out[name] = field.contents()
        except (ValueError, TypeError):  # a field gguf cannot decode is not one the config needs
            continue
    return out

