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
- `olmo2` (OLMo 2): post-norm layers, q/k norms over the whole projection.
"""

from __future__ import annotations

from .errors import SourceError
from .gguf_configs import Keys, granite_scales

# architectures whose q and k rows llama.cpp's converter permutes (its LlamaModel's `undo_permute`)
PERMUTED_QK = frozenset({"granite", "granitemoe", "smollm3", "arcee", "granitehybrid", "nemotron_h", "nemotron_h_moe"})


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
    from transformers import Olmo2Config

    if keys.fields.get("olmo2.attention.sliding_window") is not None:
        raise SourceError(f"{keys.path} is an olmo2 GGUF with sliding-window layers (OLMo 3), which reshard cannot "
                          f"read yet; convert the model's safetensors checkpoint instead")
    return Olmo2Config(**keys.common(names), **keys.attention(), attention_bias="blk.0.attn_q.bias" in names,
                       architectures=["Olmo2ForCausalLM"])
