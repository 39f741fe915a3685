"""Split a transformers model into layer groups, from the model itself.

The model is built on `meta` from its config (no weights, no memory); its decoder-layer
list is the `ModuleList` with `num_hidden_layers` entries. Parameters outside it go to the
group that runs before the layers (`embed`) or after them (`norm`, and `head` for the
output embeddings), by where their module is registered relative to the layer list.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .emptymodel import large_tensors_on_meta
from .errors import SourceError
from .multimodal import register_text_causal_lm


@dataclass
class PlannedGroup:
    name: str  # "embed", "layers.<i>", "norm", "head"
    kind: str  # "pre", "layer", "post"
    params: dict[str, torch.Size] = field(default_factory=dict)  # param name -> shape
    aliases: dict[str, str] = field(default_factory=dict)  # tied param name -> the param it shares
    buffers: dict[str, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)  # persistent buffers a checkpoint may hold
    experts: dict[str, dict] = field(default_factory=dict)  # experts module -> {"num_experts", "tensors"}


@dataclass
class Plan:
    groups: list[PlannedGroup]
    layers_path: str  # e.g. "model.layers"
    tied: dict[str, str]  # alias param name -> owning param name


# NVIDIA ModelOpt's quantization beside config.json: older exports say it only there
MODELOPT_CONFIG = "hf_quant_config.json"
# model types that need their own code, read as the transformers model type they are (transformers' own
# Kimi-K2.5 config reads its `kimi_k2` language model as `deepseek_v3`): Kimi-K2 and K2-Thinking
NATIVE = {"kimi_k2": "deepseek_v3"}


def read_config(folder, name, *, trust_remote_code: bool = False):
    """The transformers config in `folder` (`name` is what the user gave, for messages), with an older
    ModelOpt export's MODELOPT_CONFIG as its `quantization_config`; custom code only with `trust_remote_code`
    (without it, a model type of `NATIVE` is read as transformers' own)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
        native = NATIVE.get(raw.get("model_type")) if not trust_remote_code else None
        if native is not None:
            kept = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
            config = CONFIG_MAPPING[native].from_dict(kept)
        else:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SourceError(f"{name} needs its own Python code to load; pass --trust-remote-code "
                              f"if you trust it") from None
        raise SourceError(f"transformers cannot read the config of {name}: {str(e).splitlines()[0]}") from None
    beside = Path(folder) / MODELOPT_CONFIG
    if getattr(config, "quantization_config", None) is None and beside.is_file():  # an older ModelOpt export
        try:
            config.quantization_config = {"quant_method": "modelopt", **json.loads(beside.read_text())["quantization"]}
        except (ValueError, KeyError, TypeError):
            pass  # not ModelOpt's: the weights say the rest (a packed one would not fit its parameter)
    return config


def build_empty_model(config, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The causal-LM model for `config` with its parameters on `meta` (buffers stay real).

    `dtype` goes to transformers, which builds the model under it as the default dtype and then
    runs the model's own `_init_weights` on the buffers, as `from_pretrained(dtype=...)` does: so
    every buffer (rotary tables, embedding scales) has the value and dtype transformers gives it.
    Without `dtype`, transformers uses the config's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    _check_decoder_only(config)
    register_text_causal_lm(config)
    config = copy.deepcopy(config)  # from_config records the dtype it builds in on the config
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with init_empty_weights(include_buffers=False), large_tensors_on_meta():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise SourceError(f"this model needs its own code; pass --trust-remote-code if you trust it ({e})") from None
        raise SourceError(
            f"transformers cannot build a causal language model for model type "
            f"{getattr(config, 'model_type', '?')!r}: {str(e).splitlines()[0]}") from None
    _check_decoder_only(config, model)
    model.tie_weights()  # init_empty_weights re-creates parameters, which unties them
    return model.eval()


def _check_decoder_only(config, model: nn.Module | None = None) -> None:
    """Refuse encoder-decoder models, and encoders that transformers wraps as a causal LM
    (BERT-likes: `is_decoder` false in their config and no attention module that is causal)."""
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise SourceError(f"model type {kind!r} is an encoder-decoder model; only decoder-only causal LMs can be converted")
    if model is not None and getattr(config, "is_decoder", None) is False and not any(
            getattr(m, "is_causal", None) is True for m in model.modules()):
        raise SourceError(f"model type {kind!r} is an encoder (is_decoder is false, no causal attention); "
                          f"only decoder-only causal LMs can be converted")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer `ModuleList`: `num_hidden_layers` long, the largest such list."""
    config = model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config.get_text_config(), "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and n
    ]
    if not candidates:
        raise SourceError(
            f"{type(model).__name__} has no list of {n} decoder layers; only decoder-only models "
            f"whose layers sit in one ModuleList can be streamed")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def plan_groups(model: nn.Module) -> Plan:
    layers_path, layers = find_layers(model)
    head_module = model.get_output_embeddings()
    head_names = {name for name, m in model.named_modules() if m is head_module and m is not None}
    owners = _param_owners(model)
    canonical, tied = _canonical_params(model)

    module_order = [name for name, _ in model.named_modules()]
    layers_at = module_order.index(layers_path)
    position = {name: i for i, name in enumerate(module_order)}

    embed, norm, head = PlannedGroup("embed", "pre"), PlannedGroup("norm", "post"), PlannedGroup("head", "post")
    per_layer = [PlannedGroup(f"layers.{i}", "layer") for i in range(len(layers))]

    def group_of(pname: str) -> PlannedGroup:
        owner = owners[pname]
        if pname.startswith(layers_path + "."):
            return per_layer[int(pname[len(layers_path) + 1:].split(".")[0])]
        if owner in head_names:
            return head
        return embed if position[owner] < layers_at else norm

    for pname, shape in canonical.items():
        group_of(pname).params[pname] = shape
    for alias, target in tied.items():
        group_of(alias).aliases[alias] = target
    for bname, (owner, shape, dtype) in _persistent_buffers(model).items():
        owners[bname] = owner
        group_of(bname).buffers[bname] = (shape, dtype)
    for mname, entry in find_experts(model).items():
        group_of(entry["tensors"][0]).experts[mname] = entry
    groups = [g for g in [embed, *per_layer, norm, head] if g.params or g.aliases]
    return Plan(groups=groups, layers_path=layers_path, tied=tied)


# the experts forward's argument that names each token's experts (gpt-oss calls it router_indices)
ROUTED_ARGS = ("top_k_index", "router_indices")
# the MoE block's router module, beside its `experts` (nn.Linear in some models: Llama 4's); stays unquantized
ROUTER_NAMES = ("gate", "router")
# experts modules that take no routed ids: their forward gets its input stacked per expert, [E * tokens,
# hidden], each expert's copy of the tokens scaled by its router score (rows of zeros for the tokens it does
# not get), and computes every expert on it (Llama 4). An expert whose rows are all zero adds exactly zero.
STACKED_EXPERTS = ("Llama4TextExperts",)


def stacks_tokens(module: nn.Module) -> bool:
    """Whether `module` is an experts module of the STACKED_EXPERTS kind."""
    return type(module).__name__ in STACKED_EXPERTS


def holds_inward(module: nn.Module) -> bool:
    """Whether an experts module holds its experts as (in, out) matrices, [E, in, out]: gpt-oss's
    (`is_transposed`) and Llama 4's; transformers' experts contract holds (out, in), as nn.Linear does."""
    return bool(getattr(module, "is_transposed", False)) or stacks_tokens(module)


def find_experts(model: nn.Module) -> dict[str, dict]:
    """Experts modules: {qualified name: {"num_experts": E, "tensors": [param names]}}.

    An experts module is one that transformers dispatches routed tokens to (its forward takes
    the router's `top_k_index`, see transformers.integrations.moe, or gpt-oss's `router_indices`;
    or it is of the STACKED_EXPERTS kind) and holds `num_experts` experts as parameters of shape
    [E, ...]; expert e of each is `param[e]`.
    """
    found = {}
    for mname, module in model.named_modules():
        count = getattr(module, "num_experts", None)
        routed = _forward_args(module) & set(ROUTED_ARGS) or stacks_tokens(module)
        if not isinstance(count, int) or count < 1 or not routed:
            continue
        names = [f"{mname}.{p}" for p, t in module.named_parameters(recurse=False)
                 if t.dim() >= 1 and t.shape[0] == count]
        if names:
            found[mname] = {"num_experts": count, "tensors": names}
    return found


def _forward_args(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _persistent_buffers(model: nn.Module) -> dict[str, tuple[str, torch.Size, torch.dtype]]:
    """Persistent buffers (in the state dict, so a checkpoint may hold them): name -> (owner, shape, dtype)."""
    found = {}
    for mname, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is not None and bname not in module._non_persistent_buffers_set:
                found[f"{mname}.{bname}" if mname else bname] = (mname, buf.shape, buf.dtype)
    return found


def _param_owners(model: nn.Module) -> dict[str, str]:
    """param name -> qualified name of the module that registers it (aliases included)."""
    owners = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[f"{mname}.{pname}" if mname else pname] = mname
    return owners


def _canonical_params(model: nn.Module) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """The stored parameters (first name of each) and the aliases of tied ones."""
    first_name, canonical, tied = {}, {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:
            tied[name] = first_name[id(p)]
        else:
            first_name[id(p)] = name
            canonical[name] = p.shape
    return canonical, tied
