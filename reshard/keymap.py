"""Match a checkpoint's tensor names to the instantiated model's parameter names.

transformers renames some checkpoints' tensors when it loads them (legacy `gamma`/`beta`,
per-model renamings, a missing or extra base-model prefix). We apply the same renamings,
taken from transformers itself where it exposes them, so the converted files already carry
the names the runtime's model uses. Checks, like nanoGPT's, come before a byte is written:
every parameter has a source tensor of the right shape, and no source tensor is left over.
"""

from __future__ import annotations

import re

import torch

from .errors import SourceError


def _transformers_renamer(model):
    """A function source key -> renamed key using transformers' own rules, or None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except (TypeError, AttributeError):
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        new, pattern = rename_source_key(key, renamings, converters)
        return new, pattern is not None

    try:  # these are transformers internals: use them only if they behave as expected here
        new, _ = rename("model.embed_tokens.weight")
        if not isinstance(new, str):
            return None
    except (TypeError, ValueError, AttributeError):
        return None
    return rename


def _legacy_rename(key: str) -> tuple[str, bool]:
    key = re.sub(r"\.gamma$", ".weight", key)
    key = re.sub(r"\.beta$", ".bias", key)
    return key, False


def map_keys(model, source_keys: list[str], params: dict[str, torch.Size], aliases=()) -> dict[str, str]:
    """{param name: source key} for every parameter in `params`; errors name what is wrong.

    Source tensors for tied aliases (`aliases`, e.g. a saved copy of a tied head) are skipped.
    """
    rename = _transformers_renamer(model) or _legacy_rename
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    mapping, unexpected, fused = {}, [], []
    for key in source_keys:
        target, needs_converter = rename(key)
        target = _fix_prefix(target, prefix, params)
        if target in params:
            mapping[target] = key
        elif target in aliases:
            continue
        elif needs_converter:
            fused.append(key)
        elif not any(p.search(key) for p in ignored):
            unexpected.append(key)
    if fused:
        raise SourceError(
            f"tensors such as {fused[0]!r} must be fused or split by transformers when loading; "
            f"this kind of checkpoint conversion is not supported yet")
    missing = [p for p in params if p not in mapping]
    if missing:
        raise SourceError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}; "
                          f"is the config the one of these weights?")
    if unexpected:
        raise SourceError(f"the checkpoint has {len(unexpected)} tensor(s) the model does not use, e.g. "
                          f"{unexpected[0]!r}; is the config the one of these weights?")
    return mapping


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
        shape = source_shapes.get(key)
        if shape is not None and tuple(shape) != tuple(params[pname]):
            raise SourceError(f"tensor {key} has shape {list(shape)} but the config needs {list(params[pname])}; "
                              f"is the config the one of these weights?")
