"""Expanding quantized weights on CUDA at the speed of their bytes: one fused kernel per weight.

reshard.quant's plain torch expansion of an int4 weight runs five kernels (two nibble
extractions, a stack, a cast, a multiply-add) and moves about 10 bytes per weight through
device memory for the 2.5 a fused kernel needs; on a GPU that, not the host->device copy of
the compressed bytes, bounded streaming time. Here the same function is compiled with
`torch.compile` (Inductor fuses it into one kernel per weight shape), on CUDA only.

The math is the same function, so the numbers are the same: in half precision both compute
`zero + q * scale` in float32 (the product is exact: q has 4 or 8 bits) and round once to the
dtype. Float32 expansion stays plain torch (there a fused multiply-add could round differently).
Where compiling is not possible (no Triton, an old GPU, `RUNTIME_COMPILE_EXPANSION=0`) or
fails, plain torch runs, and that is said once on stderr.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from reshard.quant import dequantize

# Compiled output equals plain torch's bit for bit in these (checked on the CPU's Inductor too);
# in float32 a fused multiply-add may round differently, so float32 keeps the plain path.
EXACT_DTYPES = (torch.float16, torch.bfloat16)
COMPILED = ("int8", "int4")
_lock = threading.Lock()  # compiling is not safe from two threads at once
_state: dict = {"compiled": None, "failed": False}


def expand_weight(parts: dict[str, torch.Tensor], scheme: str, *, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """reshard.quant.dequantize(parts, ...): compiled on CUDA, plain torch elsewhere."""
    # only int8/int4 compile: a fused multiply-add would round GGML blocks' two-step math differently
    fn = _compiled() if scheme in COMPILED and parts["qweight"].is_cuda and dtype in EXACT_DTYPES else None
    if fn is not None:
        try:
            with _lock:
                return fn(parts, scheme, columns=columns, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the plain path is always right
            _give_up(e)
    return dequantize(parts, scheme, columns=columns, dtype=dtype)


def compiled_dequantize():
    """The compiled expansion (also usable on the CPU, for tests), or None where it is off."""
    return _compiled()


def _compiled():
    if _state["failed"] or os.environ.get("RUNTIME_COMPILE_EXPANSION", "1") == "0":
        return None
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(dequantize, dynamic=False, fullgraph=True)
    return _state["compiled"]


def _give_up(e: Exception) -> None:
    if not _state["failed"]:
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"runtime: compiled expansion of quantized weights failed ({type(e).__name__}: {first}); "
              f"expanding with plain torch", file=sys.stderr)
    _state["failed"] = True
