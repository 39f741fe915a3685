"""Quantized parameters from their stored parts: packed for a low-bit kernel, or expanded.

The loader reads and copies a group's stored (compressed) tensors as they are; this turns
each quantized parameter's parts (`X.weight.qweight`, `.scales`, `.zeros`) into what the
model runs with, on the background thread (and the copy stream on CUDA):
- a weight in `packing` (the CPU, see runtime/lowbit.py) becomes the packed weight and scales
  a `PackedLinear` takes (`X.weight`, `X.qscales`, and `X.qorder` for act order): its bytes
  stay about the stored ones;
- any other is expanded to `X.weight` in the compute dtype with reshard.quant's math (compiled
  into one kernel per weight on CUDA: runtime/expansion.py), so the hooks put ordinary tensors
  in place and transformers' modules run unchanged.
"""

from __future__ import annotations

import math

import torch

from reshard.format import ST_TO_DTYPE, Group, param_names, quant_part_names, scheme_of

from .expansion import expand_weight
from .lowbit import PackSpec, pack_param, packed_names, packed_nbytes


def expand_group(tensors: dict[str, torch.Tensor], group: Group, scheme: str | None,
                 dtype: torch.dtype, packing: dict[str, PackSpec] | None = None, keep=()) -> dict[str, torch.Tensor]:
    """`tensors` (a group's stored tensors by name) with each quantized parameter's parts
    replaced by the parameter itself, in `dtype`, or by its packed form if it is in `packing`;
    the parameters in `keep` stay as their parts (experts computed as stored, runtime/packedexperts.py)."""
    packing = packing or {}
    for param in group.quantized:
        if param in keep:
            continue
        own = scheme_of(group, param, scheme)
        names = quant_part_names(param, own)
        if not all(name in tensors for name in names.values()):
            continue  # routed expert weights left out of this load (runtime/experts.py expands them)
        parts = {part: tensors.pop(name) for part, name in names.items()}
        if param in packing:
            tensors.update(zip(packed_names(param, packing[param]), pack_param(parts, packing[param])))
        else:
            tensors[param] = expand_param(parts, group.quantized[param], own, dtype)
    return tensors


def expand_param(parts: dict[str, torch.Tensor], info: dict, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """One quantized parameter from its parts; `info` is its manifest entry (shape, transposed)."""
    shape = info["shape"]
    transposed = info.get("transposed", False)
    if len(shape) == 3:  # experts [E, ...]: each expert's parts on their own
        one = {**info, "shape": shape[1:]}
        return torch.stack([expand_param({k: v[e] for k, v in parts.items()}, one, scheme, dtype)
                            for e in range(shape[0])])
    w = expand_weight(parts, scheme, columns=shape[0] if transposed else shape[1], dtype=dtype)
    return w.t() if transposed else w  # Conv1D keeps (in, out); a transposed view serves it


def held_names(names: list[str], packing: dict[str, PackSpec]) -> list[str]:
    """The tensor names a loaded group carries: `names` (its parameters) with each packed
    weight followed by its scales."""
    out = []
    for name in names:
        out.extend(packed_names(name, packing[name]) if name in packing else (name,))
    return out


def held_bytes(group: Group, scheme: str | None, dtype: torch.dtype, device: torch.device,
               packing: dict[str, PackSpec] | None = None) -> int:
    """Bytes `group`'s parameters take once in place on `device`, computing in `dtype`.

    The one place the budget learns this (runtime.budget plans with it): a quantized weight in
    `packing` (the CPU's low-bit kernels) takes its packed bytes, any other quantized weight is
    expanded to `dtype`; floating tensors are cast to `dtype`.
    """
    return sum(param_held_bytes(group, name, dtype, device, packing) for name in param_names(group, scheme))


def param_held_bytes(group: Group, name: str, dtype: torch.dtype, device: torch.device,
                     packing: dict[str, PackSpec] | None = None) -> int:
    """Bytes parameter `name` of `group` takes once in place on `device` (see `held_bytes`)."""
    if packing and name in packing:
        return packed_nbytes(packing[name])
    if name in group.quantized:
        return math.prod(group.quantized[name]["shape"]) * dtype.itemsize
    info = group.tensors[name]
    stored = ST_TO_DTYPE[info["dtype"]]
    return math.prod(info["shape"]) * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
