"""Models built on `meta` without ever allocating their large weights.

accelerate's `init_empty_weights` moves each parameter to `meta` once its module registers it, after
`torch.empty` made it in host memory: a DeepSeek-V3 layer's stacked experts are one 30 GB tensor in
float32 (Kimi-K2's 45 GB), more than many hosts can reserve even for a moment, so the model could not
be built there at all. Inside `large_tensors_on_meta`, a tensor factory call of `LARGE` bytes or more
that names no device makes its tensor on `meta` from the start. Buffers (rotary tables, masks) are
far smaller and stay real, as `build_empty_model` needs them.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

LARGE = 1 << 30  # bytes: above any buffer a model computes, below a large model's biggest weights
FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.randn, torch.rand})


class large_tensors_on_meta(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and _nbytes(func, args, kwargs) >= LARGE:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def _nbytes(func, args: tuple, kwargs: dict) -> int:
    """The bytes a factory call asks for (0 where its size cannot be read)."""
    size = args if args and func is not torch.full and all(isinstance(a, int) for a in args) else \
        (args[0] if args else kwargs.get("size"))
    size = (size,) if isinstance(size, int) else size
    try:
        count = math.prod(int(s) for s in size)
    except TypeError:
        return 0
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return count * dtype.itemsize
