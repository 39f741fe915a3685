"""Match a checkpoint's tensor names to the instantiated model's parameter names.

transformers renames some checkpoints' tensors when it loads them (legacy `gamma`/`beta`,
per-model renamings, a missing or extra base-model prefix), and fuses or splits others (per-expert
tensors into one [E, ...] parameter; see reshard/fusion.py). We apply the same rules, taken from
transformers itself where it exposes them, so the converted files already carry the names the
runtime's model uses. Checks, like nanoGPT's, come before a byte is written:
every parameter has a source tensor of the right shape, and no source tensor is left over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import SourceError
from .fusion import Fusion, converter_patterns, natural_key


def per_expert_conversions(model) -> list:
    """Conversions of per-expert checkpoints that transformers loads by swapping the experts module
    instead (its quantizers' `SequentialLlama4TextExperts`: Llama 4's FP8 and 4-bit uploads keep one
    `experts.N.{gate,up,down}_proj` Linear per expert): stacked into the model's own experts, as
    transformers' converters stack Mixtral's, and turned to the (in, out) matrices Llama 4 holds."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, WeightConverter

    if not any(type(m).__name__ == "Llama4TextExperts" for m in model.modules()):
        return []
    return [WeightConverter(source_patterns=[".experts.*.gate_proj.weight", ".experts.*.up_proj.weight"],
                            target_patterns=".experts.gate_up_proj",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1), Transpose(1, 2)]),
            WeightConverter(source_patterns=[".experts.*.down_proj.weight"], target_patterns=".experts.down_proj",
                            operations=[MergeModulelist(dim=0), Transpose(1, 2)])]


def _transformers_rules(model):
    """(rename, converters): rename(source key) -> (renamed key, matched converter pattern or None)
    with transformers' own rules (and `per_expert_conversions`), and {converter source pattern:
    WeightConverter}; None if unusable."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    try:
        transforms = [*get_model_conversion_mapping(model), *per_expert_conversions(model)]
    except (TypeError, AttributeError, ImportError):
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> tuple[str, str | None]:
        return rename_source_key(key, renamings, converters)

    try:  # these are transformers internals: use them only if they behave as expected here
        new, _ = rename("model.embed_tokens.weight")
        if not isinstance(new, str):
            return None
    except (TypeError, ValueError, AttributeError):
        return None
    return rename, converter_patterns(converters)


def _legacy_rename(key: str) -> tuple[str, None]:
    key = re.sub(r"\.gamma$", ".weight", key)
    key = re.sub(r"\.beta$", ".bias", key)
    return key, None


@dataclass
class KeyMap:
    """Where each parameter's tensor comes from: one source tensor, or a `Fusion` of several."""
    direct: dict[str, str] = field(default_factory=dict)  # param (or buffer) name -> source key
    fused: dict[str, Fusion] = field(default_factory=dict)  # first target param -> its fusion
    made_by: dict[str, str] = field(default_factory=dict)  # every fused target param -> its fusion's first target

    def source_keys(self, names) -> list[str]:
        """The source tensors that parameters `names` need (a fusion's, once)."""
        keys, seen = [], set()
        for name in names:
            if name in self.direct:
                keys.append(self.direct[name])
            elif name in self.made_by and self.made_by[name] not in seen:
                seen.add(self.made_by[name])
                keys += self.fused[self.made_by[name]].keys
        return keys

    def covers(self, name: str) -> bool:
        return name in self.direct or name in self.made_by


def map_keys(model, source_keys: list[str], params: dict[str, torch.Size], aliases=(), buffers=(),
             part=None) -> KeyMap:
    """Where every parameter in `params` comes from; errors name what is wrong.

    Source tensors for tied aliases (`aliases`, e.g. a saved copy of a tied head) are skipped;
    persistent `buffers` are taken when the checkpoint has them. Tensors that transformers fuses
    or splits at load (its WeightConverters) become `Fusion`s, run later by the conversion.
    `part` (a reshard.multimodal.LanguagePart): `model` is the language model of a vision-language
    checkpoint, whose names are the vision-language model's (by transformers' rules for that one),
    then `part.place`d in `model`; the rest of the checkpoint (its vision tower) is left out.
    """
    outer = part.outer if part is not None else model
    rules = _transformers_rules(outer)
    rename, converters = rules if rules else (_legacy_rename, {})
    prefix = getattr(outer, "base_model_prefix", "") or ""
    ignored = [re.compile(p) for p in (getattr(outer, "_keys_to_ignore_on_load_unexpected", None) or [])]
    known = {**params, **{b: None for b in buffers}}
    outer_known = part.names if part is not None else known
    keymap, unexpected = KeyMap(), []
    for key in sorted(source_keys, key=natural_key):
        target, pattern = rename(key)
        target = _fix_prefix(target, prefix, outer_known)
        if part is not None:
            target = part.place(target)
            if target is None:  # not the language model's
                continue
        if target not in known and key in known:  # as transformers: a key that needed no renaming
            target, pattern = key, None
        if pattern is not None and target in params:
            keymap.fused.setdefault(target, Fusion(converters[pattern], target)).add(pattern, key)
        elif target in known and pattern is None:
            keymap.direct[target] = key
        elif target in aliases:
            continue
        elif not any(p.search(key) for p in ignored):
            unexpected.append(key)
    for fusion in keymap.fused.values():
        fusion.sort()
        keymap.made_by.update({t: fusion.target for t in fusion.targets() if t in params})
    missing = [p for p in params if not keymap.covers(p)]
    if missing:
        raise SourceError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}; "
                          f"is the config the one of these weights?")
    if unexpected:
        raise SourceError(f"the checkpoint has {len(unexpected)} tensor(s) the model does not use, e.g. "
                          f"{unexpected[0]!r}; is the config the one of these weights?")
    return keymap


def _fix_prefix(key: str, prefix: str, params) -> str:
    if not prefix or key in params:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in params:
        return key[len(prefix) + 1:]
    if f"{prefix}.{key}" in params:
        return f"{prefix}.{key}"
    return key


def check_shape(name: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise SourceError(f"tensor {name} has shape {list(tensor.shape)} but the config needs {list(shape)}; "
                          f"is the config the one of these weights?")


def check_shapes(mapping: dict[str, str], params: dict[str, torch.Size], source_shapes: dict[str, list[int]]) -> None:
    """Before anything is written: every source tensor whose shape is known fits its parameter."""
    for pname, key in mapping.items():
        if pname not in params:
            continue
        shape = source_shapes.get(key)
        if shape is not None and tuple(shape) != tuple(params[pname]):
            raise SourceError(f"tensor {key} has shape {list(shape)} but the config needs {list(params[pname])}; "
                              f"is the config the one of these weights?")
