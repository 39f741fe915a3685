"""State-space and hybrid models as llama.cpp's converter writes their GGUFs (`Mamba2Model`,
`GraniteHybridModel`, `NemotronHModel`, `JambaModel` in convert_hf_to_gguf.py): small configs, and the
keys each class writes (it does not call `TextModel.set_gguf_parameters`' for Mamba 2's family: the
context is 2**20, head counts per layer with 0 for a Mamba layer). Their tensors go through
tests/gguf_decoder_files.py's writer: `-exp(A_log)`, `A_log` and `D` as (H, 1), the gated norm as
(groups, width / groups), the convolution squeezed (Jamba keeps A and D as they are)."""

from __future__ import annotations

MAMBA2_LIKE = {"mamba2", "granitehybrid", "nemotron_h", "nemotron_h_moe", "falcon-h1"}
WRITTEN_AS = {"granite-micro": "granite", "olmo3": "olmo2", "ministral3": "mistral3", "mistral-small": "mistral3"}  # a test model -> the GGUF architecture llama.cpp writes it as
BASE = dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)
FALCON_MULTIPLIERS = dict(embedding_multiplier=2.0, lm_head_multiplier=0.5, mlp_multipliers=[0.5, 2.0], key_multiplier=0.5,
                          attention_in_multiplier=2.0, attention_out_multiplier=0.25, ssm_in_multiplier=0.5,
                          ssm_out_multiplier=2.0, ssm_multipliers=[1.0, 0.5, 2.0, 0.25, 4.0])
SCALES = dict(attention_multiplier=0.1, embedding_multiplier=6.0, residual_multiplier=0.5, logits_scaling=4.0)


def ssm_config(arch: str, vocab: int):
    import transformers as tf

    base = {**BASE, "vocab_size": vocab}
    nemotron = {k: v for k, v in base.items() if k != "num_hidden_layers"}
    nemotron.update(head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
                    tie_word_embeddings=False)
    make = {
        "mamba2": lambda: tf.Mamba2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                          state_size=16, n_groups=2, chunk_size=16, pad_token_id=None, bos_token_id=1,
                                          eos_token_id=2, tie_word_embeddings=False),
        "granitehybrid": lambda: tf.GraniteMoeHybridConfig(
            **{**base, "intermediate_size": 32}, **SCALES, layer_types=["mamba", "mamba", "mamba", "attention"],
            mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=16,
            num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=64, position_embedding_type="nope",
            tie_word_embeddings=True),
        "granite-micro": lambda: tf.GraniteMoeHybridConfig(  # Granite-4.0-micro: attention alone, no experts
            **{**base, "num_hidden_layers": 2}, **SCALES, layer_types=["attention", "attention"], mamba_n_heads=8,
            mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, num_local_experts=0, num_experts_per_tok=0,
            shared_intermediate_size=128, position_embedding_type="rope", tie_word_embeddings=True),
        "nemotron_h": lambda: tf.NemotronHConfig(**nemotron, hybrid_override_pattern="M-M*"),
        "nemotron_h_moe": lambda: tf.NemotronHConfig(
            **nemotron, hybrid_override_pattern="ME*E", n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_shared_experts=1, n_group=1,
            topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5),
        "falcon-h1": lambda: tf.FalconH1Config(  # its muP multipliers powers of two: folded exactly
            **{**base, "num_hidden_layers": 2}, head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
            mamba_n_groups=2, mamba_d_state=16, mamba_rms_norm=True, mamba_norm_before_gate=False,
            **FALCON_MULTIPLIERS, tie_word_embeddings=False),
        "jamba": lambda: tf.JambaConfig(**base, num_experts=8, num_experts_per_tok=2, attn_layer_period=4,
                                        attn_layer_offset=3, expert_layer_period=2, expert_layer_offset=1,
                                        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
                                        tie_word_embeddings=False),
    }
    return make[arch]()


def _mamba2_keys(heads: int, inner: int, groups: int, state: int, conv: int) -> dict:
    return {"ssm.conv_kernel": conv, "ssm.inner_size": inner, "ssm.state_size": state, "ssm.time_step_rank": heads,
            "ssm.group_count": groups}


def ssm_keys(arch: str, model) -> dict:
    """The `{arch}.*` keys the converter class of `arch` writes for `model`."""
    c = model.config
    if arch == "mamba2":
        return {"context_length": 2 ** 20, "embedding_length": c.hidden_size, "feed_forward_length": 0,
                "attention.head_count": 0, "block_count": c.num_hidden_layers,
                "attention.layer_norm_rms_epsilon": float(c.layer_norm_epsilon),
                **_mamba2_keys(c.num_heads, c.num_heads * c.head_dim, c.n_groups, c.state_size, c.conv_kernel)}
    if arch in ("granitehybrid", "granite"):  # "granite": written from an all-attention GraniteMoeHybrid
        attention = [t in ("attention", "full_attention") for t in c.layer_types]
        return {"block_count": c.num_hidden_layers, "context_length": 2 ** 20, "embedding_length": c.hidden_size,
                "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
                "attention.head_count_kv": [c.num_key_value_heads if a else 0 for a in attention],
                "rope.freq_base": float(c.rope_parameters["rope_theta"]),
                "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "expert_count": c.num_local_experts,
                "expert_used_count": c.num_experts_per_tok, "vocab_size": c.vocab_size,
                "rope.dimension_count": c.hidden_size // c.num_attention_heads,
                "attention.scale": float(c.attention_multiplier), "embedding_scale": float(c.embedding_multiplier),
                "residual_scale": float(c.residual_multiplier), "logit_scale": float(c.logits_scaling),
                "expert_shared_feed_forward_length": c.shared_intermediate_size,
                "rope.scaling.finetuned": not any(not a for a in attention),
                **_mamba2_keys(c.mamba_n_heads, c.mamba_n_heads * c.mamba_d_head, c.mamba_n_groups, c.mamba_d_state,
                               c.mamba_d_conv)}
    if arch.startswith("nemotron_h"):
        kinds = c.layers_block_type
        moe = arch == "nemotron_h_moe"
        out = {"block_count": len(kinds), "context_length": 2 ** 20, "embedding_length": c.hidden_size,
               "feed_forward_length": [(c.moe_intermediate_size if moe and k == "moe" else c.intermediate_size)
                                       if k in ("mlp", "moe") else 0 for k in kinds],
               "attention.head_count": c.num_attention_heads,
               "attention.head_count_kv": [c.num_key_value_heads if k == "full_attention" else 0 for k in kinds],
               "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
               "attention.layer_norm_epsilon": float(c.layer_norm_epsilon), "vocab_size": c.vocab_size,
               "rope.dimension_count": c.hidden_size // c.num_attention_heads, "rope.scaling.finetuned": False,
               **_mamba2_keys(c.mamba_num_heads, c.mamba_num_heads * c.mamba_head_dim, c.n_groups, c.ssm_state_size,
                              c.conv_kernel)}
        if moe:
            out.update({"expert_used_count": c.num_experts_per_tok, "expert_feed_forward_length": c.moe_intermediate_size,
                        "expert_shared_feed_forward_length": c.moe_shared_expert_intermediate_size,
                        "expert_count": c.n_routed_experts, "expert_shared_count": c.n_shared_experts,
                        "expert_weights_norm": bool(c.norm_topk_prob),
                        "expert_weights_scale": float(c.routed_scaling_factor), "expert_group_count": c.n_group,
                        "expert_group_used_count": c.topk_group})
        return out
    if arch == "falcon-h1":
        return {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                "attention.key_length": c.head_dim, "attention.value_length": c.head_dim, "vocab_size": c.vocab_size,
                "rope.freq_base": float(c.rope_parameters["rope_theta"]),
                "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
                **_mamba2_keys(c.mamba_n_heads, c.mamba_d_ssm, c.mamba_n_groups, c.mamba_d_state, c.mamba_d_conv)}
    if arch == "jamba":
        n = c.num_hidden_layers
        attention = [i >= c.attn_layer_offset and (i - c.attn_layer_offset) % c.attn_layer_period == 0 for i in range(n)]
        return {"block_count": n, "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
                "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
                "attention.head_count_kv": [c.num_key_value_heads if a else 0 for a in attention],
                "ssm.conv_kernel": c.mamba_d_conv, "ssm.inner_size": c.mamba_expand * c.hidden_size,
                "ssm.state_size": c.mamba_d_state, "ssm.time_step_rank": c.mamba_dt_rank,
                "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "expert_count": c.num_experts,
                "expert_used_count": c.num_experts_per_tok}
    raise KeyError(arch)


def groups_of(config) -> int:
    """The gated norm's groups (Mamba 2's n_groups, as each config names it)."""
    for name in ("n_groups", "mamba_n_groups"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise KeyError("n_groups")


def falcon_folded(name: str, a, config):
    """FalconH1Model.modify_tensors' muP folding of weight `name` (the first rule its name matches)."""
    c = config
    rules = (("down_proj", c.mlp_multipliers[1]), ("gate_proj", c.mlp_multipliers[0]),
             ("k_proj", c.key_multiplier * c.attention_in_multiplier), ("q_proj", c.attention_in_multiplier),
             ("v_proj", c.attention_in_multiplier), ("o_proj", c.attention_out_multiplier),
             ("out_proj", c.ssm_out_multiplier), ("in_proj", c.ssm_in_multiplier), ("lm_head", c.lm_head_multiplier),
             ("embed_tokens", c.embedding_multiplier))
    scale = next((m for key, m in rules if key in name), None)
    if scale is None:
        return a
    a = a * scale
    if "in_proj" in name:  # z, x, B, C, dt row blocks each by its own multiplier
        inner, gn = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
        bounds = [0, inner, 2 * inner, 2 * inner + gn, 2 * inner + 2 * gn, a.shape[0]]
        for m, lo, hi in zip(c.ssm_multipliers, bounds, bounds[1:]):
            a[lo:hi] *= m
    return a
