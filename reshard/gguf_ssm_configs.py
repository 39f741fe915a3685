"""Transformers configs of state-space and hybrid GGUF files transformers' GGUF loader does not read,
from the keys llama.cpp's converter (`convert_hf_to_gguf.py`) writes for them; which layers are Mamba,
attention, MoE or MLP is told by the tensors each layer has (and the per-layer head counts).

- `mamba2` (Codestral Mamba): `ssm.time_step_rank` is the number of SSM heads.
- `granitehybrid` (Granite 4.0-H: Mamba 2 and attention layers, MoE or dense MLPs, a shared MLP), and a
  `granite` file the converter wrote from an all-attention GraniteMoeHybrid (Granite-4.0-micro: its
  `ssm.*` keys and per-layer key/value head counts tell it): rotary embeddings only where
  `rope.scaling.finetuned` says so; Granite's multipliers.
- `nemotron_h`, `nemotron_h_moe` (Nemotron Nano 2, Nemotron 3 Nano): one mixer per layer (Mamba 2,
  attention, a squared-ReLU MLP or routed experts), per-layer head counts and MLP widths.
- `jamba`: attention and MoE layers every `period` from an `offset`, read back from the layers that
  have them; `ssm.time_step_rank` is Mamba's dt rank.
- `kimi-linear` (Kimi-Linear): Kimi delta-attention layers where the per-layer key/value head count is
  0, MLA (without rotary) where it is 1, DeepSeek-style experts.
- `falcon-h1` (Falcon-H1): attention and Mamba 2 side by side in every layer. llama.cpp's converter
  multiplies Falcon-H1's muP multipliers into the weights and writes none of them, so the config's
  multipliers are all 1: the model llama.cpp runs (equal to the published one up to rounding, exactly
  where the multipliers are powers of two); its gated norm after the gate, as llama.cpp computes it.
"""

from __future__ import annotations

from .errors import SourceError
from .gguf_configs import Keys, granite_scales


def layer_kinds(names, layers: int, kinds: dict[str, str]) -> list[str]:
    """Each layer's kind: the first of `kinds` {tensor suffix: kind} whose tensor the layer has."""
    present = set(names)
    return [next((kind for suffix, kind in kinds.items() if f"blk.{i}.{suffix}" in present), "none")
            for i in range(layers)]


def mamba2_sizes(keys: Keys) -> dict:
    """Mamba 2 mixers' sizes, as transformers' hybrid configs name them (`mamba_` prefix)."""
    heads, inner = keys("ssm.time_step_rank"), keys("ssm.inner_size")
    return {"mamba_n_heads": heads, "mamba_d_head": inner // heads, "mamba_n_groups": keys("ssm.group_count"),
            "mamba_d_state": keys("ssm.state_size"), "mamba_d_conv": keys("ssm.conv_kernel"),
            "mamba_expand": inner // keys("embedding_length")}


def _has(names, suffix: str) -> bool:
    return any(n.endswith(suffix) for n in names)


def mamba2(keys: Keys, names):
    from transformers import Mamba2Config

    common = keys.common(names)
    sizes = mamba2_sizes(keys)
    return Mamba2Config(
        vocab_size=common["vocab_size"], hidden_size=common["hidden_size"], num_hidden_layers=common["num_hidden_layers"],
        num_heads=sizes["mamba_n_heads"], head_dim=sizes["mamba_d_head"], n_groups=sizes["mamba_n_groups"],
        state_size=sizes["mamba_d_state"], conv_kernel=sizes["mamba_d_conv"], expand=sizes["mamba_expand"],
        layer_norm_epsilon=float(keys("attention.layer_norm_rms_epsilon")), use_bias=_has(names, "ssm_in.bias"),
        use_conv_bias=_has(names, "ssm_conv1d.bias"), tie_word_embeddings=common["tie_word_embeddings"],
        bos_token_id=common["bos_token_id"], eos_token_id=common["eos_token_id"], pad_token_id=common["pad_token_id"],
        architectures=["Mamba2ForCausalLM"])


def granite_hybrid(keys: Keys, names):
    """`GraniteMoeHybridConfig` of a `granitehybrid` file, or of a `granite`/`granitemoe` one the
    converter wrote from an all-attention GraniteMoeHybrid."""
    from transformers import GraniteMoeHybridConfig

    common = keys.common(names)
    layers = common["num_hidden_layers"]
    kinds = layer_kinds(names, layers, {"attn_q.weight": "full_attention", "ssm_in.weight": "linear_attention"})
    kv_heads = max(keys.per_layer("attention.head_count_kv", layers))
    experts = keys("expert_count", 0) or 0
    return GraniteMoeHybridConfig(
        **common, **granite_scales(keys), **mamba2_sizes(keys), num_key_value_heads=kv_heads,
        intermediate_size=keys("feed_forward_length"), shared_intermediate_size=keys("expert_shared_feed_forward_length"),
        rope_parameters={"rope_type": "default", "rope_theta": float(keys("rope.freq_base", 10000.0))},
        position_embedding_type="rope" if keys("rope.scaling.finetuned", False) else "nope",
        num_local_experts=experts, num_experts_per_tok=keys("expert_used_count", 0) or 0, layer_types=kinds,
        mamba_conv_bias=_has(names, "ssm_conv1d.bias") or "linear_attention" not in kinds,
        mamba_proj_bias=_has(names, "ssm_in.bias"), attention_bias=_has(names, "attn_q.bias"),
        architectures=["GraniteMoeHybridForCausalLM"])


def nemotron_h(keys: Keys, names):
    """`NemotronHConfig`: each layer one mixer, told by its tensors; MoE files' routing (sigmoid with
    a score-correction bias, groups) from the expert keys."""
    from transformers import NemotronHConfig

    common = keys.common(names)
    layers = common.pop("num_hidden_layers")
    kinds = layer_kinds(names, layers, {"ssm_in.weight": "linear_attention", "attn_q.weight": "full_attention",
                                        "ffn_gate_inp.weight": "moe", "ffn_up.weight": "mlp"})
    kv_heads = max(keys.per_layer("attention.head_count_kv", layers))
    mlp = [w for w, kind in zip(keys.per_layer("feed_forward_length", layers), kinds) if kind == "mlp"]
    sizes, eps = mamba2_sizes(keys), common.pop("rms_norm_eps", None) or common.pop("layer_norm_eps", None)
    config = dict(
        **common, layers_block_type=kinds, num_key_value_heads=kv_heads, head_dim=keys.head_dim(), layer_norm_epsilon=eps,
        mamba_num_heads=sizes["mamba_n_heads"], mamba_head_dim=sizes["mamba_d_head"], n_groups=sizes["mamba_n_groups"],
        ssm_state_size=sizes["mamba_d_state"], conv_kernel=sizes["mamba_d_conv"],
        use_conv_bias=_has(names, "ssm_conv1d.bias") or "linear_attention" not in kinds,
        mamba_proj_bias=_has(names, "ssm_in.bias"), mlp_bias=_has(names, "ffn_up.bias"),
        architectures=["NemotronHForCausalLM"])
    if mlp:
        config["intermediate_size"] = mlp[0]
    if "moe" in kinds:
        config.update(
            n_routed_experts=keys("expert_count"), num_experts_per_tok=keys("expert_used_count"),
            moe_intermediate_size=keys("expert_feed_forward_length"),
            moe_shared_expert_intermediate_size=keys("expert_shared_feed_forward_length"),
            n_shared_experts=keys("expert_shared_count", 1), norm_topk_prob=bool(keys("expert_weights_norm", True)),
            routed_scaling_factor=float(keys("expert_weights_scale", 1.0)), n_group=keys("expert_group_count", 1),
            topk_group=keys("expert_group_used_count", 1), moe_latent_size=keys.fields.get(f"{keys.arch}.moe_latent_size"))
    return NemotronHConfig(**config)


def jamba(keys: Keys, names):
    """`JambaConfig`: attention layers (those with key/value heads) and MoE layers (those with a
    router) must each repeat with a period from an offset, which is how transformers places them."""
    from transformers import JambaConfig

    common = keys.common(names)
    layers = common["num_hidden_layers"]
    kv = keys.per_layer("attention.head_count_kv", layers)
    attention = [i for i in range(layers) if kv[i]]
    moe = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in set(names)]
    (attn_period, attn_offset), (moe_period, moe_offset) = _period(keys, attention, layers), _period(keys, moe, layers)
    return JambaConfig(
        **common, intermediate_size=keys("feed_forward_length"),
        num_key_value_heads=max(kv) if attention else common["num_attention_heads"],
        num_experts=keys("expert_count"), num_experts_per_tok=keys("expert_used_count"),
        attn_layer_period=attn_period, attn_layer_offset=attn_offset, expert_layer_period=moe_period,
        expert_layer_offset=moe_offset, mamba_d_state=keys("ssm.state_size"), mamba_d_conv=keys("ssm.conv_kernel"),
        mamba_expand=keys("ssm.inner_size") // common["hidden_size"], mamba_dt_rank=keys("ssm.time_step_rank"),
        mamba_conv_bias=_has(names, "ssm_conv1d.bias"), mamba_proj_bias=_has(names, "ssm_in.bias"),
        use_mamba_kernels=False, architectures=["JambaForCausalLM"])


def _period(keys: Keys, chosen: list[int], layers: int) -> tuple[int, int]:
    """(period, offset) placing exactly the `chosen` layers of `layers`."""
    if not chosen:
        return layers + 1, layers
    offset = chosen[0]
    period = chosen[1] - chosen[0] if len(chosen) > 1 else max(layers, offset + 1)
    if [i for i in range(layers) if i >= offset and (i - offset) % period == 0] != chosen:
        raise SourceError(f"{keys.path} is a jamba GGUF whose layers {chosen} do not repeat with one period, as "
                          f"transformers' Jamba places them; convert the model's safetensors checkpoint instead")
    return period, offset



def kimi_linear(keys: Keys, names):
    """`KimiLinearConfig`: the linear-attention heads counted by `ssm_a`'s length (1, 1, H, 1); MLA sizes
    as deepseek2 writes them; the chosen experts' weights renormalised, as Kimi's config says (no key)."""
    from transformers import KimiLinearConfig

    common, present = keys.common(names), set(names)
    layers, heads, rope = common["num_hidden_layers"], common["num_attention_heads"], keys("rope.dimension_count")
    kv = keys.per_layer("attention.head_count_kv", layers)
    linear = next((i for i in range(layers) if not kv[i]), None)
    a = keys.tensor(f"blk.{linear}.ssm_a") if linear is not None else None
    return KimiLinearConfig(
        **common, num_key_value_heads=heads, intermediate_size=keys("feed_forward_length"),
        layer_types=["full_attention" if k else "linear_attention" for k in kv],
        mlp_layer_types=["sparse" if f"blk.{i}.ffn_gate_inp.weight" in present else "dense" for i in range(layers)],
        q_lora_rank=keys.fields.get("kimi-linear.attention.q_lora_rank"), kv_lora_rank=keys("attention.kv_lora_rank"),
        qk_rope_head_dim=rope, qk_nope_head_dim=keys("attention.key_length_mla") - rope,
        v_head_dim=keys("attention.value_length_mla"), moe_intermediate_size=keys("expert_feed_forward_length"),
        num_local_experts=keys("expert_count"), num_experts_per_tok=keys("expert_used_count"),
        n_shared_experts=keys("expert_shared_count", 0), routed_scaling_factor=float(keys("expert_weights_scale", 1.0)),
        n_group=keys("expert_group_count", 1), topk_group=keys("expert_group_used_count", 1), norm_topk_prob=True,
        linear_head_dim=keys("kda.head_dim"), linear_num_heads=int(a.size) if a is not None else heads,
        linear_conv_kernel_dim=keys("ssm.conv_kernel"), architectures=["KimiLinearForCausalLM"])


def falcon_h1(keys: Keys, names):
    from transformers import FalconH1Config

    sizes = mamba2_sizes(keys)
    return FalconH1Config(
        **keys.common(names), **{**keys.attention(), "head_dim": keys.head_dim()},
        mamba_d_ssm=keys("ssm.inner_size"), mamba_n_heads=sizes["mamba_n_heads"], mamba_d_head=sizes["mamba_d_head"],
        mamba_n_groups=sizes["mamba_n_groups"], mamba_d_state=sizes["mamba_d_state"], mamba_d_conv=sizes["mamba_d_conv"],
        mamba_rms_norm=_has(names, "ssm_norm.weight"), mamba_norm_before_gate=False,
        mamba_conv_bias=_has(names, "ssm_conv1d.bias"), mamba_proj_bias=_has(names, "ssm_in.bias"),
        projectors_bias=_has(names, "ssm_out.bias"), attention_bias=_has(names, "attn_q.bias"),
        mlp_bias=_has(names, "ffn_up.bias"), lm_head_multiplier=1.0, embedding_multiplier=1.0, mlp_multipliers=[1.0, 1.0],
        key_multiplier=1.0, attention_out_multiplier=1.0, attention_in_multiplier=1.0, ssm_multipliers=[1.0] * 5,
        ssm_in_multiplier=1.0, ssm_out_multiplier=1.0, architectures=["FalconH1ForCausalLM"])
