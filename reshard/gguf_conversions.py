"""GGUF names and values as transformers' newer GGUF path makes them (`transformers.integrations.gguf`:
Qwen3.5, Qwen3.5-MoE, LFM2, and whatever architectures it adds).

For these architectures transformers does not use its `TensorProcessor`s: each architecture has a
list of `WeightRenaming`s (llama.cpp's `blk.N.attn_qkv` -> `model.layers.N.linear_attn.in_proj_qkv`)
and `WeightConverter`s that undo llama.cpp's transforms (norms stored as `w + 1`, `ssm_a` as
`-exp(A_log)`, tiled value heads, squeezed convolution kernels, gate and up experts in two tensors).
`from_pretrained(..., gguf_file=...)` de-quantizes a tensor's blocks first, runs its converter's
operations on the values in the file's own float type, and casts last. This module applies the same
lists, one parameter at a time, with transformers' own operations (reshard/fusion.py's `Fusion`).
"""

from __future__ import annotations

import copy
import re

import torch

from .fusion import Fusion, converter_patterns


def newer_path(architecture: str) -> bool:
    """Whether transformers loads GGUF files of `architecture` through its conversion mappings."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # a transformers from before that path
        return False
    return bool(is_gguf_arch_supported(architecture))


class ConversionMap:
    """Which GGUF tensors make each parameter of a model, and how (its transformers converter)."""

    def __init__(self, architecture: str, model, names):
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        from transformers.integrations.gguf import get_gguf_conversion_mapping

        self.model = model
        # on a copy, as transformers' own planning does: matching a name arms stateful renamings
        mapping = copy.deepcopy(get_gguf_conversion_mapping(architecture, model.config))
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = converter_patterns(converters)
        known = set(model.state_dict())
        ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        self.sources: dict[str, list[str]] = {}  # parameter -> its GGUF tensor names
        self.fusions: dict[str, Fusion] = {}  # parameter -> the converter that makes it
        for name in names:
            target, pattern = rename_source_key(name, renamings, converters)
            if target not in known and any(p.search(target) for p in ignored):
                continue  # dropped by transformers too (a Qwen3.5 file's multi-token-prediction block)
            self.sources.setdefault(target, []).append(name)
            if pattern is not None:
                self.fusions.setdefault(target, Fusion(by_pattern[pattern], target)).add(pattern, name)

    def transposed(self, key: str) -> bool:
        """Whether the GGUF's rows are the columns of parameter `key`: never, on this path."""
        return False

    def make(self, key: str, tensors: dict[str, torch.Tensor], stored: bool = False) -> torch.Tensor:
        """Parameter `key` from its GGUF tensors {GGUF name: values in the file's own float type}."""
        fusion = self.fusions.get(key)
        if fusion is None:
            (tensor,) = tensors.values()
            return tensor
        return fusion.run(dict(tensors), self.model, dtype=None)[key]
