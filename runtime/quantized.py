"""Expanding quantized parameters to the compute dtype, on whatever device their bytes are.

The loader reads and copies a group's stored (compressed) tensors as they are; this turns
each quantized parameter's parts (`X.weight.qweight`, `.scales`, `.zeros`) back into
`X.weight` with reshard.quant's math, on the background thread (and the copy stream on
CUDA), so the hooks put ordinary tensors in place and transformers' modules run unchanged.
"""

from __future__ import annotations

import torch

from reshard.format import Group, quant_part_names
from reshard.quant import dequantize


def expand_group(tensors: dict[str, torch.Tensor], group: Group, scheme: str | None,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`tensors` (a group's stored tensors by name) with each quantized parameter's parts
    replaced by the parameter itself, in `dtype`."""
    for param in group.quantized:
        names = quant_part_names(param, scheme)
        if not all(name in tensors for name in names.values()):
            continue  # routed expert weights left out of this load (runtime/experts.py expands them)
        parts = {part: tensors.pop(name) for part, name in names.items()}
        tensors[param] = expand_param(parts, group.quantized[param], scheme, dtype)
    return tensors


def expand_param(parts: dict[str, torch.Tensor], info: dict, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """One quantized parameter from its parts; `info` is its manifest entry (shape, transposed)."""
    shape = info["shape"]
    transposed = info.get("transposed", False)
    if len(shape) == 3:  # experts [E, ...]: each expert's parts on their own
        one = {**info, "shape": shape[1:]}
        return torch.stack([expand_param({k: v[e] for k, v in parts.items()}, one, scheme, dtype)
                            for e in range(shape[0])])
    w = dequantize(parts, scheme, columns=shape[0] if transposed else shape[1], dtype=dtype)
    return w.t() if transposed else w  # Conv1D keeps (in, out); a transposed view serves it
