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

    def __init__(self, arch: str, fields: dict, path, names=(), read=None):
        self.arch, self.fields, self.path, self.names = arch, fields, path, frozenset(names)
        self.read = read  # name -> the float32 values of one of the file's tensors

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
                "num_attention_heads": self("attention.head_count"), **self.norm_eps(),
                "max_position_embeddings": self("context_length"),
                "tie_word_embeddings": "output.weight" not in tensor_names,
                "bos_token_id": self.fields.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": self.fields.get("tokenizer.ggml.eos_token_id"),
                "pad_token_id": self.fields.get("tokenizer.ggml.padding_token_id")}

    def norm_eps(self) -> dict:
        """RMSNorm's epsilon, or LayerNorm's where the file has that instead (Command-R's)."""
        rms = self.fields.get(f"{self.arch}.attention.layer_norm_rms_epsilon")
        if rms is not None:
            return {"rms_norm_eps": float(rms)}
        return {"layer_norm_eps": float(self("attention.layer_norm_epsilon"))}

    def attention(self) -> dict:
        """A decoder's attention and MLP sizes (`head_dim` where the file states a key length) and its
        rotary embedding."""
        kv_heads = self("attention.head_count_kv", self("attention.head_count"))
        if isinstance(kv_heads, list):  # per layer: a hybrid's (Granite 4's, Jamba's)
            raise SourceError(f"{self.path} is a {self.arch} GGUF with a per-layer key/value head count, which "
                              f"reshard cannot read yet; convert the model's safetensors checkpoint instead")
        theta = float(self("rope.freq_base", 10000.0))
        rope = llama3_rope(self, theta, self.head_dim()) if self.tensor("rope_freqs.weight") is not None \
            else _rope(self, theta)
        out = {"num_key_value_heads": kv_heads, "intermediate_size": self("feed_forward_length"), "rope_parameters": rope}
        head_dim = self.fields.get(f"{self.arch}.attention.key_length")
        if head_dim is not None:
            out["head_dim"] = head_dim
        return out

    def per_layer(self, name: str, layers: int) -> list:
        """Key `name` for each of `layers` layers: written per layer (a hybrid's head counts, 0 where a
        layer has no attention) or once for all."""
        value = self(name)
        return list(value) if isinstance(value, list) else [value] * layers

    def head_dim(self) -> int:
        """The width of an attention head: the key length the file states, else hidden size / heads."""
        return self("attention.key_length", self("embedding_length") // self("attention.head_count"))

    def tensor(self, name: str):
        """The values of small tensor `name` (float32 numpy), or None where the file has none."""
        return self.read(name) if self.read is not None and name in self.names else None

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


def glm_dsa(keys: Keys, tensor_names):
    """`GlmMoeDsaConfig` (GLM-5): DeepSeek's MLA and routing, as llama.cpp's DeepseekV2Model writes them,
    with DeepSeek's sparse-attention indexer; a layer computes its own indexer where it has its tensors
    (`full`), else reuses the previous one's (`shared`); MoE layers are those with a router."""
    from transformers import GlmMoeDsaConfig

    common, rope = keys.common(tensor_names), keys("rope.dimension_count")
    layers, names = common["num_hidden_layers"], set(tensor_names)
    experts = {k: v for k, v in keys.experts().items() if k != "num_nextn_predict_layers"}
    return GlmMoeDsaConfig(
        **common, **experts, num_key_value_heads=common["num_attention_heads"], kv_lora_rank=keys("attention.kv_lora_rank"),
        q_lora_rank=keys.fields.get("glm-dsa.attention.q_lora_rank"), qk_rope_head_dim=rope,
        qk_nope_head_dim=keys("attention.key_length_mla") - rope, v_head_dim=keys("attention.value_length_mla"),
        rope_parameters=_rope(keys, float(keys("rope.freq_base", 10000.0))),
        index_n_heads=keys("attention.indexer.head_count"), index_head_dim=keys("attention.indexer.key_length"),
        index_topk=keys("attention.indexer.top_k"),
        indexer_types=["full" if f"blk.{i}.indexer.proj.weight" in names else "shared" for i in range(layers)],
        mlp_layer_types=["sparse" if f"blk.{i}.ffn_gate_inp.weight" in names else "dense" for i in range(layers)],
        architectures=["GlmMoeDsaForCausalLM"])


def exaone_moe(keys: Keys, tensor_names):
    """`ExaoneMoeConfig` (K-EXAONE): EXAONE 4's post-norm layers and sliding-window pattern, experts
    with shared ones and a score-correction bias from `leading_dense_block_count` on; a head size other
    than hidden / heads told by the q norm's length; the multi-token-prediction layers dropped."""
    from transformers import ExaoneMoeConfig

    common, attention = keys.common(tensor_names), keys.attention()
    layers, names = common["num_hidden_layers"], set(tensor_names)
    window = keys.fields.get("exaone-moe.attention.sliding_window")
    pattern = keys.fields.get("exaone-moe.attention.sliding_window_pattern") if window is not None else None
    q_norm = keys.tensor("blk.0.attn_q_norm.weight")
    if "head_dim" not in attention and q_norm is not None:
        attention["head_dim"] = int(q_norm.shape[0])
    return ExaoneMoeConfig(
        **common, **attention, sliding_window=window,
        layer_types=["sliding_attention" if s else "full_attention" for s in (pattern or [False] * layers)[:layers]],
        mlp_layer_types=["sparse" if f"blk.{i}.ffn_gate_inp.weight" in names else "dense" for i in range(layers)],
        first_k_dense_replace=keys("leading_dense_block_count", 0), moe_intermediate_size=keys("expert_feed_forward_length"),
        num_experts=keys("expert_count"), num_experts_per_tok=keys("expert_used_count"),
        num_shared_experts=keys("expert_shared_count", 0), norm_topk_prob=bool(keys("expert_weights_norm", False)),
        routed_scaling_factor=float(keys("expert_weights_scale", 1.0)), n_group=keys("expert_group_count", 1),
        topk_group=keys("expert_group_used_count", 1), architectures=["ExaoneMoeForCausalLM"])


def afmoe(keys: Keys, tensor_names):
    """`AfmoeConfig` (Arcee Trinity): sliding and full attention, every 4th layer full (llama.cpp fixes
    the pattern; no key), embeddings scaled by sqrt(hidden) (llama.cpp always scales them: muP on),
    experts with shared ones and an expert bias from `leading_dense_block_count` on."""
    from transformers import AfmoeConfig

    common = keys.common(tensor_names)
    layers, window = common["num_hidden_layers"], keys.fields.get("afmoe.attention.sliding_window")
    return AfmoeConfig(
        **common, **{**keys.attention(), "head_dim": keys.head_dim()}, sliding_window=window,
        layer_types=["sliding_attention" if window and (i + 1) % 4 else "full_attention" for i in range(layers)],
        global_attn_every_n_layers=4, mup_enabled=True, num_dense_layers=keys("leading_dense_block_count", 0),
        moe_intermediate_size=keys("expert_feed_forward_length"), num_experts=keys("expert_count"),
        num_experts_per_tok=keys("expert_used_count"), num_shared_experts=keys("expert_shared_count", 0),
        route_scale=float(keys("expert_weights_scale", 1.0)), attention_bias="blk.0.attn_q.bias" in tensor_names,
        architectures=["AfmoeForCausalLM"])


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


def ernie4_5_moe(keys: Keys, tensor_names):
    """`Ernie4_5_MoeConfig`: MoE layers from `leading_dense_block_count` on, every
    `interleave_moe_layer_step`-th, to the last; softmax routing (no key)."""
    from transformers import Ernie4_5_MoeConfig

    common = keys.common(tensor_names)
    return Ernie4_5_MoeConfig(
        **common, **keys.attention(), use_bias="blk.0.attn_q.bias" in tensor_names,
        moe_num_experts=keys("expert_count"), moe_k=keys("expert_used_count"),
        moe_intermediate_size=keys("expert_feed_forward_length"), moe_num_shared_experts=keys("expert_shared_count", 0),
        moe_layer_interval=keys("interleave_moe_layer_step", 1), moe_layer_start_index=keys("leading_dense_block_count", 0),
        moe_layer_end_index=common["num_hidden_layers"] - 1, architectures=["Ernie4_5_MoeForCausalLM"])


def hunyuan_moe(keys: Keys, tensor_names):
    """`HunYuanMoEV1Config`: transformers' model sizes routed and shared experts alike by
    `intermediate_size`, so a file whose sizes differ (or with other than one shared expert) is refused."""
    from transformers import HunYuanMoEV1Config

    width, shared = keys("expert_feed_forward_length"), keys("expert_shared_count", 1)
    if width != keys("feed_forward_length") or shared != 1:
        raise SourceError(f"{keys.path} is a hunyuan-moe GGUF with experts {width} wide and {shared} shared expert(s), "
                          f"which transformers' HunYuan model cannot hold; convert the model's safetensors checkpoint instead")
    return HunYuanMoEV1Config(
        **keys.common(tensor_names), **{**keys.attention(), "head_dim": keys.head_dim()},
        attention_bias="blk.0.attn_q.bias" in tensor_names, num_experts=keys("expert_count"),
        moe_topk=keys("expert_used_count"), architectures=["HunYuanMoEV1ForCausalLM"])


def dots1(keys: Keys, tensor_names):
    """`Dots1Config`: DeepSeek-V3's routing (sigmoid, score-correction bias, groups) without MLA."""
    from transformers import Dots1Config

    experts = {k: v for k, v in keys.experts().items() if k != "num_nextn_predict_layers"}
    return Dots1Config(**keys.common(tensor_names), **{**keys.attention(), **experts}, sliding_window=None,
                       attention_bias="blk.0.attn_q.bias" in tensor_names, architectures=["Dots1ForCausalLM"])


def granitemoe(keys: Keys, tensor_names):
    """`GraniteMoeConfig`, or `GraniteMoeSharedConfig` where the file has shared experts; Granite's
    multipliers as for `granite`; `feed_forward_length` is an expert's width."""
    from transformers import GraniteMoeConfig, GraniteMoeSharedConfig

    config = {**keys.common(tensor_names), **keys.attention(), **granite_scales(keys),
              "num_local_experts": keys("expert_count"), "num_experts_per_tok": keys("expert_used_count")}
    shared = keys.fields.get("granitemoe.expert_shared_feed_forward_length")
    if shared is None:
        return GraniteMoeConfig(**config, architectures=["GraniteMoeForCausalLM"])
    return GraniteMoeSharedConfig(**config, shared_intermediate_size=shared, architectures=["GraniteMoeSharedForCausalLM"])


def qwen3next(keys: Keys, tensor_names):
    """`Qwen3NextConfig`: linear-attention layers (gated DeltaNet, sized by the `ssm.*` keys) with
    full attention every `full_attention_interval`-th layer, as llama.cpp lays them out; every layer's
    MLP routed experts with a gated shared expert; a partial rotary embedding."""
    from transformers import Qwen3NextConfig

    common, attention, head_dim = keys.common(tensor_names), keys.attention(), keys.head_dim()
    attention["rope_parameters"]["partial_rotary_factor"] = keys("rope.dimension_count") / head_dim
    interval, value_heads = keys("full_attention_interval", 4), keys("ssm.time_step_rank")
    return Qwen3NextConfig(
        **common, **{**attention, "head_dim": head_dim}, linear_conv_kernel_dim=keys("ssm.conv_kernel"),
        linear_key_head_dim=keys("ssm.state_size"), linear_num_key_heads=keys("ssm.group_count"),
        linear_num_value_heads=value_heads, linear_value_head_dim=keys("ssm.inner_size") // value_heads,
        num_experts=keys("expert_count"), num_experts_per_tok=keys("expert_used_count"),
        moe_intermediate_size=keys("expert_feed_forward_length"),
        shared_expert_intermediate_size=keys("expert_shared_feed_forward_length"), norm_topk_prob=True,
        layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                     for i in range(common["num_hidden_layers"])],
        architectures=["Qwen3NextForCausalLM"])


def llama4(keys: Keys, tensor_names):
    """`Llama4TextConfig` (Llama 4 Scout, Maverick: the text model): `feed_forward_length` is the
    dense layers' width, `expert_feed_forward_length` the experts' and the shared expert's. What
    llama.cpp does not write it fixes as transformers' defaults have it (chunked attention of 8192,
    rotary-free every 4th layer, attention temperature), q/k norms off for 128 experts (Maverick),
    and all of it off where the file says `sliding_window` 0."""
    from transformers import Llama4TextConfig

    common, attention, experts = keys.common(tensor_names), keys.attention(), keys("expert_count")
    dense_width = attention.pop("intermediate_size")
    plain = keys.fields.get("llama4.attention.sliding_window") == 0
    local = {"attention_chunk_size": None, "no_rope_layers": [1] * common["num_hidden_layers"]} if plain else {}
    return Llama4TextConfig(
        **common, **{**attention, "head_dim": keys.head_dim()}, **local,
        intermediate_size=keys("expert_feed_forward_length"), intermediate_size_mlp=dense_width,
        num_local_experts=experts, num_experts_per_tok=keys("expert_used_count"),
        interleave_moe_layer_step=keys("interleave_moe_layer_step", 1), use_qk_norm=experts != 128,
        architectures=["Llama4ForCausalLM"])


def lfm2moe(keys: Keys, tensor_names):
    """`Lfm2MoeConfig` (LFM2-8B-A1B): short-convolution layers where the per-layer key/value head count
    is 0, attention where it is not; experts from `leading_dense_block_count` on, sigmoid routing with
    an expert bias; its final norm written as `token_embd_norm`."""
    from transformers import Lfm2MoeConfig

    common = keys.common(tensor_names)
    kv = keys.per_layer("attention.head_count_kv", common["num_hidden_layers"])
    return Lfm2MoeConfig(
        **{k: v for k, v in common.items() if k != "rms_norm_eps"}, norm_eps=common["rms_norm_eps"],
        intermediate_size=keys("feed_forward_length"), moe_intermediate_size=keys("expert_feed_forward_length"),
        num_key_value_heads=max(kv), layer_types=["full_attention" if k else "conv" for k in kv],
        num_dense_layers=keys("leading_dense_block_count", 0), num_experts=keys("expert_count"),
        num_experts_per_tok=keys("expert_used_count"), conv_L_cache=keys("shortconv.l_cache"),
        rope_parameters={"rope_type": "default", "rope_theta": float(keys("rope.freq_base", 10000.0))},
        use_expert_bias="blk.%d.exp_probs_b.bias" % (keys("leading_dense_block_count", 0)) in tensor_names,
        conv_bias=any(n.endswith("shortconv.in_proj.bias") for n in tensor_names),
        architectures=["Lfm2MoeForCausalLM"])


def granite_scales(keys: Keys) -> dict:
    """Granite's multipliers; one the file lacks is 1.0, transformers' default (the converter writes
    each that is not zero)."""
    return {"attention_multiplier": float(keys("attention.scale", 1.0)),
            "embedding_multiplier": float(keys("embedding_scale", 1.0)),
            "residual_multiplier": float(keys("residual_scale", 1.0)), "logits_scaling": float(keys("logit_scale", 1.0))}



def olmoe(keys: Keys, tensor_names):
    """`OlmoeConfig`: softmax routing without renormalising the chosen weights (neither writes a key)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(**keys.common(tensor_names), **keys.attention(), num_experts=keys("expert_count"),
                       num_experts_per_tok=keys("expert_used_count"), architectures=["OlmoeForCausalLM"])


def _rope(keys: Keys, theta: float) -> dict:
    """YaRN as DeepSeek-V3's config states it: llama.cpp keeps its factor, original context and
    `0.1 * mscale_all_dim` (as `yarn_log_multiplier`); DeepSeek's mscale equals mscale_all_dim."""
    prefix = f"{keys.arch}.rope.scaling."
    fields = keys.fields
    if fields.get(prefix + "type") == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(fields[prefix + "factor"])}
    if fields.get(prefix + "type") != "yarn":
        return {"rope_type": "default", "rope_theta": theta}
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": float(fields[prefix + "factor"]),
            "original_max_position_embeddings": int(fields[prefix + "original_context_length"]),
            "beta_fast": float(fields.get(prefix + "yarn_beta_fast", 32.0)),
            "beta_slow": float(fields.get(prefix + "yarn_beta_slow", 1.0))}
    if prefix + "yarn_log_multiplier" in fields:
        mscale = fields[prefix + "yarn_log_multiplier"] / 0.1
        rope.update(mscale=mscale, mscale_all_dim=mscale)
    return rope


def llama3_rope(keys: Keys, theta: float, head_dim: int) -> dict:
    """Llama 3's rotary scaling, which llama.cpp's converter keeps as a `rope_freqs` tensor of
    per-frequency factors alone (no key): its factor is their largest; its context (8192) and
    frequency bounds (low 1, high 4 as Llama 3.1 and EXAONE 4 publish, or 1 and 1 as Llama 4 Scout)
    the published ones whose factors equal the tensor's."""
    import torch

    freqs = keys.tensor("rope_freqs.weight")
    if freqs is None:
        return {"rope_type": "default", "rope_theta": theta}
    factors = torch.from_numpy(freqs).float()
    factor, context = float(factors.max()), 8192
    wavelen = 2 * torch.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    for high in (4.0, 1.0):
        smooth = (context / wavelen - 1.0) / (high - 1.0) if high != 1.0 else torch.zeros_like(wavelen)
        want = torch.where(wavelen < context / high, torch.ones_like(wavelen), torch.where(
            wavelen > context, torch.full_like(wavelen, factor), 1 / ((1 - smooth) / factor + smooth)))
        if factors.shape == want.shape and torch.allclose(factors, want, rtol=1e-5):
            return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
                    "high_freq_factor": high, "original_max_position_embeddings": context}
    raise SourceError(f"{keys.path}: its rope_freqs are not Llama 3's scaling with factor {factor}; "
                      f"convert the model's safetensors checkpoint instead")
