"""Transformers configs of the text decoders of vision-language GGUFs. llama.cpp's converter writes
a Qwen2-VL or Qwen2.5-VL model's language model as `qwen2vl`, Qwen3-VL's as `qwen3vl` and
Qwen3-VL-MoE's as `qwen3vlmoe`, and the vision tower apart, as an `mmproj` file (which a hub
download leaves out: reshard/hub.py). The folder holds the plain model each equals on text, Qwen2,
Qwen3 or Qwen3-MoE, as for their safetensors checkpoints (reshard/multimodal.py `EQUIVALENT`, which
says why); the keys for images (`rope.dimension_sections`, `n_deepstack_layers`) are not needed.
tests/test_formats_gguf_vl.py checks the logits on text against transformers' vision-language models.
"""

from __future__ import annotations

from .gguf_configs import Keys
from .multimodal import ALWAYS


def qwen2vl(keys: Keys, names):
    from transformers import Qwen2Config

    return Qwen2Config(**keys.common(names), **keys.attention(), architectures=["Qwen2ForCausalLM"])


def qwen3vl(keys: Keys, names):
    from transformers import Qwen3Config

    return Qwen3Config(**keys.common(names), **{**keys.attention(), "head_dim": keys.head_dim()},
                       architectures=["Qwen3ForCausalLM"])


def qwen3vlmoe(keys: Keys, names):
    """`Qwen3MoeConfig` (what Qwen3-VL-MoE does whatever its config says: reshard/multimodal.py
    `ALWAYS`); a layer without a router (none published) a dense MLP."""
    from transformers import Qwen3MoeConfig

    common = keys.common(names)
    return Qwen3MoeConfig(
        **common, **{**keys.attention(), "head_dim": keys.head_dim()}, num_experts=keys("expert_count"),
        num_experts_per_tok=keys("expert_used_count"), moe_intermediate_size=keys("expert_feed_forward_length"),
        **ALWAYS["qwen3_vl_moe_text"], decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(common["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in names],
        architectures=["Qwen3MoeForCausalLM"])
