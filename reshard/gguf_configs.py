"""Transformers configs of GGUF files whose architecture transformers' GGUF loader does not read,
from the `{arch}.*` keys llama.cpp's converter (`convert_hf_to_gguf.py`) writes for them.

- `deepseek2` (DeepSeek-V3, R1, V3.1, Kimi-K2 with sigmoid routing; DeepSeek-V2, V2.5, V2-Lite with
  softmax routing): llama.cpp writes MLA's head sizes as `key_length_mla`/`value_length_mla` (older
  files as `key_length`/`value_length`) and one key/value head, MLA's compressed one, where
  transformers' config counts the decompressed ones; YaRN's `mscale_all_dim` as
  `yarn_log_multiplier = 0.1 * mscale_all_dim`.
- `glm4moe` (GLM-4.5, 4.6, 4.7, 4.5-Air): the multi-token-prediction layer counted in `block_count`;
  the rotary width as `rope.dimension_count`; attention biases and q/k norms told by their tensors.
- `gpt-oss` (gpt-oss-20b, 120b): sliding and full attention alternating as transformers' default has
  them; YaRN's factor and original context.
"""

from __future__ import annotations

from .errors import SourceError

# llama.cpp's expert_gating_func: 2 is sigmoid routing; 1, or none written (files made before the
# key: DeepSeek-V2 and V2.5's), softmax
SIGMOID, SOFTMAX = 2, 1


class Keys:
    """The `{arch}.*` fields of one file, each missing one that is needed said in one line."""

    def __init__(self, arch: str, fields: dict, path):
        self.arch, self.fields, self.path = arch, fields, path

    def __call__(self, name: str, default=None):
        value = self.fields.get(f"{self.arch}.{name}", default)
        if value is None:
            raise SourceError(f"{self.path} is a {self.arch} GGUF without {self.arch}.{name}; download it again")
        return value

    def common(self, tensor_names) -> dict:
        """What every architecture's config takes from the same keys."""
        mtp = self("nextn_predict_layers", 0)
        return {"vocab_size": self("vocab_size", self.fields.get("tokenizer.ggml.tokens.count")),
                "hidden_size": self("embedding_length"), "num_hidden_layers": self("block_count") - mtp,
                "num_attention_heads": self("attention.head_count"),
                "rms_norm_eps": float(self("attention.layer_norm_rms_epsilon")),
                "max_position_embeddings": self("context_length"),
                "tie_word_embeddings": "output.weight" not in tensor_names,
                "bos_token_id": self.fields.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": self.fields.get("tokenizer.ggml.eos_token_id"),
                "pad_token_id": self.fields.get("tokenizer.ggml.padding_token_id")}

    def experts(self) -> dict:
        """A MoE's routed and shared experts, and its routing."""
        return {"moe_intermediate_size": self("expert_feed_forward_length"),
                "n_shared_experts": self("expert_shared_count"), "n_routed_experts": self("expert_count"),
                "num_experts_per_tok": self("expert_used_count"),
                "routed_scaling_factor": float(self("expert_weights_scale", 1.0)),
                "norm_topk_prob": bool(self("expert_weights_norm", False)),
                "n_group": self("expert_group_count", 1), "topk_group": self("expert_group_used_count", 1),
                "first_k_dense_replace": self("leading_dense_block_count", 0),
                "intermediate_size": self("feed_forward_length"),
                "num_nextn_predict_layers": self("nextn_predict_layers", 0)}


def deepseek2(keys: Keys, tensor_names):
    """`DeepseekV3Config` for sigmoid routing, `DeepseekV2Config` for softmax routing (its experts
    limited to groups where the file counts groups, as llama.cpp routes them)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    gating = keys("expert_gating_func", SOFTMAX)
    if gating not in (SIGMOID, SOFTMAX):
        raise SourceError(f"{keys.path} is a deepseek2 GGUF with expert_gating_func {gating}, which reshard cannot "
                          f"read yet; convert the model's safetensors checkpoint instead")
    rope = keys("rope.dimension_count")
    config = {
        **keys.common(tensor_names), **keys.experts(),
        "num_key_value_heads": keys("attention.head_count"),  # MLA decompresses a key/value per head
        "kv_lora_rank": keys("attention.kv_lora_rank"),
        "q_lora_rank": keys.fields.get("deepseek2.attention.q_lora_rank"),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": keys.fields.get("deepseek2.attention.key_length_mla", keys("attention.key_length")) - rope,
        "v_head_dim": keys.fields.get("deepseek2.attention.value_length_mla", keys("attention.value_length")),
        "rope_parameters": _rope(keys, float(keys("rope.freq_base", 10000.0))),
    }
    if gating == SIGMOID:
        return DeepseekV3Config(**config, architectures=["DeepseekV3ForCausalLM"])
    grouped = config["n_group"] > 1
    return DeepseekV2Config(**config, topk_method="group_limited_greedy" if grouped else "greedy",
                            architectures=["DeepseekV2ForCausalLM"])


def glm4moe(keys: Keys, tensor_names):
    """`Glm4MoeConfig`: sigmoid routing with a score-correction bias, a partial rotary embedding."""
    from transformers import Glm4MoeConfig

    head_dim = keys("attention.key_length")
    return Glm4MoeConfig(
        **keys.common(tensor_names), **keys.experts(), head_dim=head_dim,
        num_key_value_heads=keys("attention.head_count_kv"),
        attention_bias="blk.0.attn_q.bias" in tensor_names, use_qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        rope_parameters={"rope_type": "default", "rope_theta": float(keys("rope.freq_base", 10000.0)),
                         "partial_rotary_factor": keys("rope.dimension_count") / head_dim},
        architectures=["Glm4MoeForCausalLM"])


def gpt_oss(keys: Keys, tensor_names):
    """`GptOssConfig`: gpt-oss's YaRN does not round its correction range (`truncate` False, as its
    own config says; llama.cpp computes it so and writes no key for it)."""
    from transformers import GptOssConfig

    rope = _rope(keys, float(keys("rope.freq_base", 150000.0)))
    if rope["rope_type"] == "yarn":
        rope = {k: v for k, v in rope.items() if not k.startswith("mscale")} | {"truncate": False}
    return GptOssConfig(
        **keys.common(tensor_names), head_dim=keys("attention.key_length"),
        intermediate_size=keys("expert_feed_forward_length", keys.fields.get("gpt-oss.feed_forward_length")),
        num_key_value_heads=keys("attention.head_count_kv"), num_local_experts=keys("expert_count"),
        num_experts_per_tok=keys("expert_used_count"), sliding_window=keys("attention.sliding_window"),
        rope_parameters=rope, architectures=["GptOssForCausalLM"])


def _rope(keys: Keys, theta: float) -> dict:
    """YaRN as DeepSeek-V3's config states it: llama.cpp keeps its factor, original context and
    `0.1 * mscale_all_dim` (as `yarn_log_multiplier`); DeepSeek's mscale equals mscale_all_dim."""
    prefix = f"{keys.arch}.rope.scaling."
    fields = keys.fields
    if fields.get(prefix + "type") != "yarn":
        return {"rope_type": "default", "rope_theta": theta}
    mscale = fields.get(prefix + "yarn_log_multiplier", 0.0) / 0.1
    return {"rope_type": "yarn", "rope_theta": theta, "factor": float(fields[prefix + "factor"]),
            "original_max_position_embeddings": int(fields[prefix + "original_context_length"]),
            "beta_fast": float(fields.get(prefix + "yarn_beta_fast", 32.0)),
            "beta_slow": float(fields.get(prefix + "yarn_beta_slow", 1.0)),
            "mscale": mscale, "mscale_all_dim": mscale}
