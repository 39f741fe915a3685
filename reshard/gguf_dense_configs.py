"""Transformers configs of dense decoders whose GGUF architecture transformers' GGUF loader does not
read, from the keys llama.cpp's converter (`convert_hf_to_gguf.py`) writes for them; what a file does
not carry comes from the tensors it has (biases, q/k norms, a separate head) or from transformers'
defaults, which are the values the converter's source configs had.

- `command-r` (Command-R, R+, Aya): LayerNorm epsilon, logit scale, per-head q/k norms on R+.
- `cohere2` (Command-R7B, Command-A): sliding and full attention every 4th layer, as llama.cpp and
  transformers both lay them out (no key).
- `ernie4_5` (ERNIE-4.5-0.3B), `hunyuan-dense`, `seed_oss` (Seed-OSS-36B): head sizes, biases.
  HunYuan's NTK-alpha base is written already scaled: a plain rotary embedding of that base.
- `exaone4` (EXAONE 4.0): post-norm layers, a per-layer sliding-window pattern.
- `glm4` (GLM-4-0414, GLM-Z1): a partial rotary embedding, gate and up joined as one `ffn_up`.
- `granite` (Granite 3.x), `smollm3`, `arcee` (AFM): LLaMA-style files (q/k rows permuted, undone in
  reshard/gguf_tables.py); Granite's four multipliers; SmolLM3's rotary-free layers every 4th, as
  transformers' default has them.
- `olmo2` (OLMo 2, and OLMo 3 with its sliding-window layers): post-norm layers, q/k norms over the
  whole projection.
- `mistral3` (Ministral 3; the text model of Mistral Small 3.x, Magistral, Devstral): LLaMA-style.
"""

from __future__ import annotations

from .errors import SourceError
from .gguf_configs import Keys, granite_scales

# architectures whose q and k rows llama.cpp's converter permutes (its LlamaModel's `undo_permute`)
PERMUTED_QK = frozenset({"granite", "granitemoe", "smollm3", "arcee", "granitehybrid", "nemotron_h", "nemotron_h_moe",
                         "mistral3"})


def biases(names) -> dict:
    """Which projections carry biases, told by the first layer's tensors."""
    return {"attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names}


def command_r(keys: Keys, names):
    from transformers import CohereConfig

    return CohereConfig(**keys.common(names), **keys.attention(), logit_scale=float(keys("logit_scale")),
                        use_qk_norm="blk.0.attn_q_norm.weight" in names, architectures=["CohereForCausalLM"])


def cohere2(keys: Keys, names):
    from transformers import Cohere2Config

    head_dim = keys("embedding_length") // keys("attention.head_count")
    if keys("rope.dimension_count", head_dim) != head_dim:
        raise SourceError(f"{keys.path} is a cohere2 GGUF whose rotary embedding covers part of each head, which "
                          f"transformers' Cohere2 model does not; convert the model's safetensors checkpoint instead")
    return Cohere2Config(**keys.common(names), **keys.attention(), logit_scale=float(keys("logit_scale")),
                         sliding_window=keys("attention.sliding_window"), architectures=["Cohere2ForCausalLM"])


def ernie4_5(keys: Keys, names):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(**keys.common(names), **keys.attention(), use_bias="blk.0.attn_q.bias" in names,
                          architectures=["Ernie4_5ForCausalLM"])


def hunyuan_dense(keys: Keys, names):
    from transformers import HunYuanDenseV1Config

    return HunYuanDenseV1Config(**keys.common(names), **{**keys.attention(), "head_dim": keys.head_dim()},
                                attention_bias="blk.0.attn_q.bias" in names, architectures=["HunYuanDenseV1ForCausalLM"])


def seed_oss(keys: Keys, names):
    from transformers import SeedOssConfig

    return SeedOssConfig(**keys.common(names), **keys.attention(), **biases(names),
                         attention_out_bias="blk.0.attn_output.bias" in names, architectures=["SeedOssForCausalLM"])


def exaone4(keys: Keys, names):
    from transformers import Exaone4Config

    common = keys.common(names)
    layers, window = common["num_hidden_layers"], keys.fields.get("exaone4.attention.sliding_window")
    pattern = keys.fields.get("exaone4.attention.sliding_window_pattern")
    if window is None:
        pattern = [False] * layers
    elif pattern is None:  # the converter's own default: every 4th layer full
        pattern = [(i + 1) % 4 != 0 for i in range(layers)]
    layer_types = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    return Exaone4Config(**common, **keys.attention(), sliding_window=window, layer_types=layer_types,
                         architectures=["Exaone4ForCausalLM"])


def glm4(keys: Keys, names):
    from transformers import Glm4Config

    attention, head_dim = keys.attention(), keys.head_dim()
    attention["rope_parameters"]["partial_rotary_factor"] = keys("rope.dimension_count", head_dim // 2) / head_dim
    return Glm4Config(**keys.common(names), **{**attention, "head_dim": head_dim},
                      attention_bias="blk.0.attn_q.bias" in names, architectures=["Glm4ForCausalLM"])


def granite(keys: Keys, names):
    from transformers import GraniteConfig

    return GraniteConfig(**keys.common(names), **keys.attention(), **granite_scales(keys), **biases(names),
                         architectures=["GraniteForCausalLM"])


def smollm3(keys: Keys, names):
    from transformers import SmolLM3Config

    return SmolLM3Config(**keys.common(names), **keys.attention(), **biases(names), architectures=["SmolLM3ForCausalLM"])


def arcee(keys: Keys, names):
    from transformers import ArceeConfig

    return ArceeConfig(**keys.common(names), **keys.attention(), **biases(names), architectures=["ArceeForCausalLM"])


def olmo2(keys: Keys, names):
    """`Olmo2Config`, or `Olmo3Config` where the file has sliding-window layers (OLMo 3 is written as
    `olmo2` too): the window, each layer's kind, and the sliding layers' own rotary base."""
    from transformers import Olmo2Config, Olmo3Config

    common, attention = keys.common(names), keys.attention()
    window = keys.fields.get("olmo2.attention.sliding_window")
    if window is None:
        return Olmo2Config(**common, **attention, attention_bias="blk.0.attn_q.bias" in names,
                           architectures=["Olmo2ForCausalLM"])
    full = attention.pop("rope_parameters")
    local = {"rope_type": "default", "rope_theta": float(keys("rope.freq_base_swa", full["rope_theta"]))}
    pattern = keys("attention.sliding_window_pattern")
    return Olmo3Config(**common, **attention, attention_bias="blk.0.attn_q.bias" in names, sliding_window=window,
                       layer_types=["sliding_attention" if s else "full_attention" for s in pattern],
                       rope_parameters={"full_attention": full, "sliding_attention": local},
                       architectures=["Olmo3ForCausalLM"])


def mistral3(keys: Keys, names):
    """`Ministral3Config` (Ministral 3: YaRN with its attention scale, Llama 4's temperature scaling of
    queries) where the file has `attention.temperature_scale`, else `MistralConfig` (the text model of
    Mistral Small 3.x, Magistral, Devstral, which llama.cpp writes as `mistral3` with no YaRN keys).
    llama.cpp writes Ministral 3's `mscale_all_dim` as `yarn_log_multiplier` as it is (DeepSeek's is
    scaled by 0.1) and no `mscale`, which Ministral 3 publishes equal to it."""
    from transformers import Ministral3Config, MistralConfig

    common, attention = keys.common(names), keys.attention()
    rope, beta = attention["rope_parameters"], keys.fields.get("mistral3.attention.temperature_scale")
    if beta is None:
        return MistralConfig(**common, **attention, sliding_window=None, architectures=["MistralForCausalLM"])
    if rope["rope_type"] == "yarn":
        scale = keys.fields.get("mistral3.rope.scaling.yarn_log_multiplier")
        rope.update({"mscale": scale, "mscale_all_dim": scale} if scale is not None else {})
    rope["llama_4_scaling_beta"] = float(beta)
    return Ministral3Config(**common, **attention, architectures=["Ministral3ForCausalLM"])
