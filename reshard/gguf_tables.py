"""GGUF files whose architecture transformers' GGUF loader does not read (`deepseek2`: DeepSeek-V3,
R1, Kimi-K2, DeepSeek-V2; `glm-dsa`: GLM-5; `glm4moe`: GLM-4.5 to 4.7; `gpt-oss`, whose files transformers' own mapping
misnames; `qwen3next`, `llama4`, the text decoders of Qwen's vision-language files, and the decoders in
`CONFIGS`), mapped here as llama.cpp's converter
(`convert_hf_to_gguf.py`) writes them:
- names: the `gguf` package's own table for the architecture (`gguf.get_tensor_name_map`), the one
  llama.cpp's converter names tensors by;
- a MoE layer's experts: one [E, out, in] tensor per projection (`ffn_gate_exps`, `ffn_up_exps`,
  `ffn_down_exps`); transformers' model holds gate and up as one `gate_up_proj`, gate first;
- the score-correction bias as `exp_probs_b.bias`;
- q and k rows permuted (`LlamaModel.permute`) for the LLaMA-derived classes (`PERMUTED_QK`), undone
  as transformers' Llama processor undoes it;
- Qwen3-Next's norms as `w + 1` (but the gated one's), `A_log` as `ssm_a = -exp(A_log)`, `dt_bias` as
  `ssm_dt.bias`, the convolution squeezed, and `in_proj_qkvz` (per key head [q, k, v, z]) regrouped
  into `attn_qkv` (every q head, then k, then v) and `attn_gate` (z);
- Llama 4's experts, which transformers holds as (in, out) matrices ([E, H, 2I] gate and up): llama.cpp
  transposes them;
- a `rope_freqs` tensor (Llama 3 scaling): read into the config, not a parameter;
- Mamba 2's `A_log` as `ssm_a = -exp(A_log)`, `A` and `D` as (H, 1), its gated norm as (groups, width /
  groups), convolutions squeezed (reshaped back to the model's shapes); `dt_bias` as `ssm_dt.bias`;
- gpt-oss's experts, which transformers holds as (in, out) matrices with gate and up interleaved
  (`gate_up_proj` [E, H, 2I], columns g0 u0 g1 u1 ...): llama.cpp writes them as (out, in) tensors of
  their own, biases alike; the attention sinks as `attn_sinks.weight`;
- MLA's `kv_b_proj` (deepseek2): files written since llama.cpp's MLA support split it per head into
  `attn_k_b` ([heads, kv_lora_rank, qk_nope], the key part transposed) and `attn_v_b`
  ([heads, v, kv_lora_rank]); older files keep `attn_kv_b` whole. Both make the same weight;
- blocks after the model's last layer (a multi-token-prediction layer llama.cpp keeps) are dropped,
  as transformers' models have no module for them;
- the tokenizer: transformers' GGUF tokenizer builder, with the pre-tokenizer splits its table lacks
  for these files' `tokenizer.ggml.pre` (DeepSeek-V3's, GLM-4's), as llama.cpp's llama-vocab.cpp
  splits them (`PRE_TOKENIZER_SPLITS`);
- the config: reshard/gguf_configs.py.

`TableMap` answers as reshard/gguf_conversions.py's `ConversionMap` does (`sources`, `make`).
"""

from __future__ import annotations

import torch

from . import gguf_configs
from . import gguf_dense_configs as dense
from . import gguf_ssm_configs as ssm
from . import gguf_vl_configs as vl
from .errors import SourceError
from .plan import holds_inward

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# tokenizer.ggml.pre -> the regexes text is split by, in order (llama.cpp's llama-vocab.cpp; each
# split's pieces kept), where transformers' own GGUF table has none
PRE_TOKENIZER_SPLITS = {
    "deepseek-v3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
    "glm4": (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    # digits one by one, then GPT-2's splits
    **dict.fromkeys(("command-r", "smollm", "exaone", "refact", "starcoder", "codeshell"), (r"\p{N}", _GPT2)),
    # Qwen2's splits, digits one by one
    **dict.fromkeys(("hunyuan", "grok-2", "seed-coder"), (
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)),
}
PRE_TOKENIZER_SPLITS["hunyuan-dense"] = PRE_TOKENIZER_SPLITS["deepseek-v3"]
# Kimi-K2's own pattern (its tokenizer's; llama.cpp hand-codes it): letters that are not Han split apart from Han
PRE_TOKENIZER_SPLITS["kimi-k2"] = (
    r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",)
CONFIGS = {  # GGUF architecture -> its config from the file's metadata
    "deepseek2": gguf_configs.deepseek2, "glm4moe": gguf_configs.glm4moe, "gpt-oss": gguf_configs.gpt_oss,
    "glm-dsa": gguf_configs.glm_dsa, "exaone-moe": gguf_configs.exaone_moe, "afmoe": gguf_configs.afmoe,
    "ernie4_5-moe": gguf_configs.ernie4_5_moe, "hunyuan-moe": gguf_configs.hunyuan_moe, "dots1": gguf_configs.dots1,
    "granitemoe": gguf_configs.granitemoe, "olmoe": gguf_configs.olmoe,
    "command-r": dense.command_r, "cohere2": dense.cohere2, "ernie4_5": dense.ernie4_5,
    "hunyuan-dense": dense.hunyuan_dense, "seed_oss": dense.seed_oss, "exaone4": dense.exaone4, "glm4": dense.glm4,
    "granite": dense.granite, "smollm3": dense.smollm3, "arcee": dense.arcee, "olmo2": dense.olmo2,
    "mistral3": dense.mistral3, "lfm2moe": gguf_configs.lfm2moe,
    "qwen3next": gguf_configs.qwen3next, "llama4": gguf_configs.llama4,
    "kimi-linear": ssm.kimi_linear, "mamba2": ssm.mamba2, "granitehybrid": ssm.granite_hybrid, "nemotron_h": ssm.nemotron_h,
    "nemotron_h_moe": ssm.nemotron_h, "jamba": ssm.jamba, "falcon-h1": ssm.falcon_h1,
    "qwen2vl": vl.qwen2vl, "qwen3vl": vl.qwen3vl, "qwen3vlmoe": vl.qwen3vlmoe,
}
# transformers' parameter names -> the names in the checkpoints llama.cpp's converter read, where they differ
CHECKPOINT_NAMES = ((".router.weight", ".router.layer.weight"),  # granitemoe
                    (".gate.moe_statics.", ".moe_statics."),  # ernie4_5-moe
                    (".forget_gate.", "."),  # kimi-linear
                    (".dt_bias", ".dt_proj.bias"),  # qwen3next, the Mamba 2 hybrids, kimi-linear
                    (".mlp.gate.", ".block_sparse_moe.gate."),  # kimi-linear
                    ("model.", "backbone."))  # nemotron_h
NORMS_PLUS_ONE = frozenset({"qwen3next"})  # architectures whose norms llama.cpp stores as w + 1
DERIVED = ("rope_freqs.weight",)  # tensors the converter writes from the config (read back into it)


def mapped_here(architecture: str) -> bool:
    return architecture in CONFIGS


def config_from_metadata(architecture: str, fields: dict, tensor_names, path, read=None):
    """The transformers config of a GGUF of `architecture` with key-value `fields` {key: value};
    `read(name)` gives a tensor's float32 values (a `rope_freqs` the config is made from)."""
    build = CONFIGS[architecture]
    if architecture in ("granite", "granitemoe") and f"{architecture}.ssm.inner_size" in fields:
        build = ssm.granite_hybrid  # written from an all-attention Granite 4 hybrid (Granite-4.0-micro)
    return build(gguf_configs.Keys(architecture, fields, path, tensor_names, read), tensor_names)


def split_pre_tokens(tokenizer, pre: str | None) -> None:
    """Give `tokenizer` (byte-level BPE, from transformers' GGUF builder) the splits of `pre` where
    transformers' table has none for it; else leave it as built."""
    from tokenizers import Regex, pre_tokenizers

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as known
    except ImportError:
        known = {}
    if pre not in PRE_TOKENIZER_SPLITS or pre in known:
        return
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def metadata_fields(reader) -> dict:
    """{key: value} of a GGUFReader's key-value fields, but the tokenizer's long arrays (their lengths)."""
    from gguf import GGUFValueType

    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "merges", "token_type", "scores")):
            out[name + ".count"] = len(field.data)
            continue
        try:
            value = field.contents()
        except (ValueError, TypeError):  # a field gguf cannot decode is not one a config needs
            continue
        if field.types and field.types[-1] == GGUFValueType.FLOAT32:  # the config's decimal, not float32's
            value = [_decimal(v) for v in value] if isinstance(value, list) else _decimal(value)
        out[name] = value
    return out


class TableMap:
    """Which GGUF tensors make each parameter of a model, and how."""

    def __init__(self, architecture: str, model, names):
        import gguf

        config = model.config
        self.arch, self.config = architecture, config
        self.heads, self.kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
        self.nope = getattr(config, "qk_nope_head_dim", None)
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture)
        layers = config.num_hidden_layers
        self.table = gguf.get_tensor_name_map(arch, layers + (getattr(config, "num_nextn_predict_layers", 0) or 0))
        self.present, self.permuted = set(names), architecture in dense.PERMUTED_QK
        self.shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
        self.sources: dict[str, list[str]] = {}
        # parameter -> how its tensors make it: "experts" (gate, up joined), "joined" (gate, up rows of one
        # matrix), "kv_b" (from k_b, v_b), "q"/"k" (rows permuted by the converter), "interleaved"
        # (gpt-oss's gate and up, row by row, transposed; "bias": not transposed), "transposed" (gpt-oss's
        # down experts), "inward experts"/"inward" (Llama 4's, transposed), "conv3" (Kimi's q/k/v convolutions
        # joined), "qkvz" (Qwen3-Next's regrouped
        # rows), "minus one" (a norm stored as w + 1), "log -x" (A_log stored as -exp(A_log)); none: as stored,
        # reshaped to the parameter's shape
        self.kinds: dict[str, str] = {}
        for param in self.shapes:
            made = self._made_of(model, param)
            if all(m in self.present for m in made):
                self.sources[param] = made
        claimed = {n for made in self.sources.values() for n in made}
        for name in names:  # left for the conversion's check to name, but the blocks after the last layer
            if name not in claimed and name not in DERIVED and not _block_at_or_after(name, layers):
                self.sources[name] = [name]

    def _made_of(self, model, param: str) -> list[str]:
        """The GGUF tensors parameter `param` is made of (its kind noted in `kinds`)."""
        table, base = self.table, param.rsplit(".", 1)[0]
        layer = _layer_of(param)
        if base.endswith(".experts") and getattr(model.get_submodule(base), "is_transposed", False):  # gpt-oss
            suffix = ".bias" if param.endswith("_bias") else ".weight"
            if ".gate_up_proj" in param:
                self.kinds[param] = "interleaved" if suffix == ".weight" else "interleaved bias"
                return [table.get_name(f"{base}.{p}") + suffix for p in ("gate_proj", "up_proj")]
            self.kinds[param] = "transposed" if suffix == ".weight" else "bias"
            return [table.get_name(f"{base}.down_proj") + suffix]
        inward = holds_inward(model.get_submodule(base))  # Llama 4: (in, out) matrices, gate and up joined by columns
        if param.endswith(".experts.gate_up_proj"):  # llama.cpp stacks each projection's experts
            if f"blk.{layer}.ffn_gate_up_exps.weight" in self.present:  # written joined (--fuse-gate-up-exps)
                if inward:
                    self.kinds[param] = "inward"
                return [f"blk.{layer}.ffn_gate_up_exps.weight"]
            self.kinds[param] = "inward experts" if inward else "experts"
            return [f"blk.{layer}.ffn_gate_exps.weight", f"blk.{layer}.ffn_up_exps.weight"]
        if param.endswith(".experts.up_proj"):  # experts without a gate (Nemotron-H's squared ReLU)
            return [f"blk.{layer}.ffn_up_exps.weight"]
        if param.endswith(".experts.down_proj"):
            if inward:
                self.kinds[param] = "inward"
            return [f"blk.{layer}.ffn_down_exps.weight"]
        if param.endswith(".linear_attn.in_proj_qkvz.weight") and f"blk.{layer}.attn_qkv.weight" in self.present:
            self.kinds[param] = "qkvz"  # Qwen3-Next: llama.cpp regroups q, k, v by kind (older files keep ssm_in)
            return [f"blk.{layer}.attn_qkv.weight", f"blk.{layer}.attn_gate.weight"]
        if param.endswith("self_attn.conv1d.weight") and f"blk.{layer}.ssm_conv1d_q.weight" in self.present:
            self.kinds[param] = "conv3"  # Kimi-Linear's q, k and v convolutions, joined by transformers
            return [f"blk.{layer}.ssm_conv1d_{x}.weight" for x in "qkv"]
        if param.endswith(".A_log"):
            self.kinds[param] = "log -x"  # stored as -exp(A_log)
        elif self.arch in NORMS_PLUS_ONE and param.endswith("norm.weight") and not param.endswith("linear_attn.norm.weight"):
            self.kinds[param] = "minus one"  # stored as w + 1 (the model computes x * (1 + w))
        if param.endswith("shared_mlp.input_linear.weight"):  # Granite's shared MLP, gate rows first
            self.kinds[param] = "joined"
            shared = "_shexp" if f"blk.{layer}.ffn_gate_shexp.weight" in self.present else ""  # no experts: the MLP
            return [f"blk.{layer}.ffn_gate{shared}.weight", f"blk.{layer}.ffn_up{shared}.weight"]
        if param.endswith("shared_mlp.output_linear.weight") and f"blk.{layer}.ffn_down_shexp.weight" not in self.present:
            return [f"blk.{layer}.ffn_down.weight"]
        if param.endswith(".e_score_correction_bias"):
            return [(self._name(param[:-len("_bias")]) or param) + ".bias"]
        if param.endswith(".expert_bias"):  # LFM2-MoE's routing bias, the converter's `expert_bias.bias`
            return [(self._name(param) or param) + ".bias"]
        if param.endswith("kv_b_proj.weight") and table.get_name(base) + ".weight" not in self.present:
            self.kinds[param] = "kv_b"
            return [table.get_name(base.replace("kv_b_proj", name)) + ".weight" for name in ("k_b_proj", "v_b_proj")]
        if param.endswith(".sinks"):
            return [table.get_name(param) + ".weight"]
        if self.permuted and param.endswith((".q_proj.weight", ".q_proj.bias", ".k_proj.weight", ".k_proj.bias")):
            self.kinds[param] = "q" if ".q_proj." in param else "k"
        return [table.get_name(param, try_suffixes=(".weight", ".bias")) or self._name(param) or param]

    def _qkvz(self, qkv: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Qwen3-Next's `in_proj_qkvz` from llama.cpp's `attn_qkv` (q of every key head, then k, then v)
        and `attn_gate` (z): transformers' rows are per key head [q, k, v, z]."""
        c = self.config
        nk, hk = c.linear_num_key_heads, c.linear_key_head_dim
        width = qkv.shape[1:]
        q, k, v = qkv.split([nk * hk, nk * hk, qkv.shape[0] - 2 * nk * hk])
        parts = [t.reshape(nk, -1, *width) for t in (q, k, v, z)]
        return torch.cat(parts, dim=1).reshape(-1, *width)

    def _name(self, param: str) -> str | None:
        """`param`'s GGUF name, or under the checkpoint name the converter read (CHECKPOINT_NAMES's
        renamings applied one after another)."""
        found = self.table.get_name(param, try_suffixes=(".weight", ".bias"))
        for ours, theirs in CHECKPOINT_NAMES:
            if found is None and ours in param:
                param = param.replace(ours, theirs)
                found = self.table.get_name(param, try_suffixes=(".weight", ".bias"))
        return found

    def transposed(self, key: str) -> bool:
        """Whether transformers holds parameter `key` as (in, out) matrices: `make(..., stored=True)`
        gives them as the file's (out, in) rows."""
        return self.kinds.get(key) in ("interleaved", "transposed", "inward experts", "inward")

    def make(self, key: str, tensors: dict[str, torch.Tensor], stored: bool = False) -> torch.Tensor:
        """Parameter `key` from its GGUF tensors {GGUF name: values}, in `sources[key]`'s order; a
        `transposed` one with `stored` as the file's (out, in) rows."""
        values = [tensors[n] for n in self.sources[key]]
        kind = self.kinds.get(key)
        if kind == "experts":  # [E, I, H] gate and up -> [E, 2I, H]
            return torch.cat(values, dim=1)
        if kind == "joined":  # [I, H] gate and up -> [2I, H]
            return torch.cat(values, dim=0)
        if kind in ("inward experts", "inward"):  # Llama 4: [E, I, H] gate and up -> [E, H, 2I]; [E, H, I] -> [E, I, H]
            value = torch.cat(values, dim=1)
            return value if stored else value.transpose(1, 2)
        if kind == "conv3":  # (1, d, 1, kernel) each -> (3d, 1, kernel)
            return torch.cat([t.reshape(t.shape[1], 1, t.shape[-1]) for t in values])
        if kind == "qkvz":  # all q heads, all k, all v; z -> per key head [q, k, v, z]
            return self._qkvz(*values)
        if kind in ("interleaved", "interleaved bias"):  # [E, I(, H)] gate and up -> rows g0 u0 g1 u1 ...
            rows = torch.stack(values, dim=2).flatten(1, 2)
            return rows if stored or kind == "interleaved bias" else rows.transpose(1, 2)
        if kind == "transposed":
            (value,) = values
            return value if stored else value.transpose(1, 2)
        if kind == "kv_b":  # per head: the key part (stored transposed), then the value part
            k_b, v_b = values
            if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != self.heads or k_b.shape[2] != self.nope:
                raise SourceError(f"{self.sources[key][0]} has shape {list(k_b.shape)}, not [heads, kv_lora_rank, "
                                  f"qk_nope_head_dim]; is the file's metadata the one of these weights?")
            return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])
        (value,) = values
        if kind in ("q", "k"):  # llama.cpp's LlamaModel.permute, undone (as transformers' Llama processor does)
            heads = self.heads if kind == "q" else self.kv_heads
            return value.reshape(heads, value.shape[0] // heads // 2, 2, *value.shape[1:]).transpose(1, 2) \
                .reshape(value.shape)
        if kind == "minus one":
            value = value - 1
        elif kind == "log -x":
            value = a_log(value)
        shape = self.shapes.get(key)
        if not stored and shape is not None and value.shape != shape and value.numel() == _numel(shape):
            return value.reshape(shape)  # a vector kept as (1, E) or (E,)
        return value


def a_log(a: torch.Tensor) -> torch.Tensor:
    """`A_log` from llama.cpp's `ssm_a` = -exp(A_log) (float32): the value whose -exp is `a` exactly, so
    the model's A is the file's. float32 exp maps several values below 1 in size to one: where log(-a)
    is not one of them, the next floats are tried (exp is monotone)."""
    a = a.float()
    out = torch.log(-a)
    for _ in range(16):
        made = -torch.exp(out)
        if torch.equal(made, a):
            break
        out = torch.where(made > a, torch.nextafter(out, torch.full_like(out, float("inf"))),
                          torch.where(made < a, torch.nextafter(out, torch.full_like(out, float("-inf"))), out))
    return out


def _decimal(value: float) -> float:
    """The shortest decimal a float32 key holds (1e-05, not 9.99999974737875e-06): what the converter's
    source config said, as transformers reads it from there."""
    import numpy as np

    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer_of(param: str) -> str | None:
    """The decoder layer index in a parameter name ("model.layers.3.mlp..." -> "3")."""
    parts = param.split(".")
    for before, part in zip(parts, parts[1:]):
        if before == "layers" and part.isdigit():
            return part
    return None


def _block_at_or_after(name: str, layers: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= layers
