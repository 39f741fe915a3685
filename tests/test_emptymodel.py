"""A model is built on `meta` without its large weights ever taking host memory (reshard/emptymodel.py)."""

from __future__ import annotations

import torch

from reshard.emptymodel import LARGE, large_tensors_on_meta
from reshard.plan import build_empty_model


def test_a_model_whose_experts_no_host_could_hold_is_built():
    """DeepSeek-V3's layout with 4096 experts: one stacked expert tensor is 480 GB in float32, more than any
    host reserves (accelerate's empty-weights context alone allocates it first, and fails); built here, its
    weights on meta and its rotary table computed in host memory as transformers computes it."""
    import transformers as tf

    config = tf.DeepseekV3Config(vocab_size=1024, hidden_size=7168, intermediate_size=256, moe_intermediate_size=4096,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4096,
                                 n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, kv_lora_rank=16,
                                 q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    model = build_empty_model(config, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.device.type == "meta" and experts.numel() * 4 > 400e9
    rotary = model.model.rotary_emb.inv_freq
    assert rotary.device.type == "cpu" and torch.equal(rotary, 1.0 / (config.rope_parameters["rope_theta"] ** (
        torch.arange(0, 8, 2, dtype=torch.int64).float() / 8)))


def test_only_large_factory_calls_go_to_meta():
    with large_tensors_on_meta():
        small, exact = torch.zeros(1024), torch.empty(LARGE // 4)
        large, full = torch.empty(2, LARGE // 4, dtype=torch.float32), torch.full((LARGE // 2,), 1.0, dtype=torch.float16)
        asked = torch.empty(LARGE // 4, device="cpu")
    assert small.device.type == "cpu" and asked.device.type == "cpu"
    assert exact.device.type == "meta" and large.device.type == "meta" and full.device.type == "meta"
