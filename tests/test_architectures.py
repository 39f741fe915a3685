"""Architectures beyond conftest's ARCHS and MOE_ARCHS, from safetensors checkpoints as transformers
saves them: state-space and hybrid decoders (Mamba 2, which has no attention heads; Jamba; Granite 4's
GraniteMoeHybrid; Nemotron-H; Qwen3-Next's gated DeltaNet) and Llama 4 (chunked attention, rotary-free
layers, experts computed for every token, and ids its model moves to the embedding weight's device
before the lookup). Streamed (nothing resident) and resident, the runtime equals transformers' own
model: logits bit-identical in float32 and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BUDGETS

from reshard.convert import convert

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)


def config(arch: str):
    import transformers as tf

    attention_free = {k: v for k, v in BASE.items() if k not in ("num_attention_heads", "num_key_value_heads",
                                                                  "intermediate_size", "max_position_embeddings")}
    make = {
        "mamba2": lambda: tf.Mamba2Config(**{**attention_free, "num_hidden_layers": 2}, num_heads=8, head_dim=16,
                                          state_size=16, n_groups=1, chunk_size=16),
        "jamba": lambda: tf.JambaConfig(**BASE, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
                                        attn_layer_offset=3, expert_layer_period=2, expert_layer_offset=1,
                                        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **BASE, layer_types=["mamba", "mamba", "mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=64),
        "nemotron_h": lambda: tf.NemotronHConfig(**{k: v for k, v in BASE.items() if k != "num_hidden_layers"},
                                                 hybrid_override_pattern="M-M*", mamba_num_heads=8, mamba_head_dim=16,
                                                 ssm_state_size=16, n_groups=1, chunk_size=16),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **BASE, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=32),
        "llama4": lambda: tf.Llama4TextConfig(**{**BASE, "intermediate_size": 32}, intermediate_size_mlp=128,
                                              head_dim=16, num_local_experts=8, num_experts_per_tok=1,
                                              interleave_moe_layer_step=2, attention_chunk_size=8),
    }
    return make[arch]()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config(arch)).eval()
            root = tmp_path_factory.mktemp(arch.replace("_", "-"))
            model.save_pretrained(root / "hf")
            convert(str(root / "hf"), root / "out", progress=False)
            made[arch] = (model, root / "out")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["mamba2", "jamba", "granitemoehybrid", "nemotron_h", "qwen3_next", "llama4"])
def test_streamed_and_resident_equal_transformers(converted, arch):
    from runtime import LayeredModel

    model, folder = converted(arch)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128, 64, 12, 200]])  # longer than Llama 4's chunk of 8
    with torch.no_grad():
        want, want_tokens = model(ids).logits, model.generate(ids, max_new_tokens=5, do_sample=False)
    for placement in ("streamed", "resident"):
        with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=CPU_BUDGETS[placement]) as lm:
            assert torch.equal(lm(ids).logits, want), placement
            assert torch.equal(lm.generate(ids, max_new_tokens=5, do_sample=False), want_tokens), placement
