"""Expanding quantized weights on CUDA at the speed of their bytes: one fused kernel per weight.

reshard.quant's plain torch expansion of an int4 weight runs five kernels (two nibble
extractions, a stack, a cast, a multiply-add) and moves about 10 bytes per weight through
device memory for the 2.5 a fused kernel needs; on a GPU that, not the host->device copy of
the compressed bytes, bounded streaming time. Here the same function is compiled with
`torch.compile` (Inductor fuses it into one kernel), on CUDA, and on the CPU for fp8 folders
(whose plain expansion is bound by torch's element-at-a-time float8 cast there).

The math is the same function, so the numbers are the same: in half precision both compute
`zero + q * scale` in float32 (the product is exact: q has 4 or 8 bits) and round once to the
dtype. Float32 expansion stays plain torch (there a fused multiply-add could round differently).

GGML blocks kept from a GGUF file (Q4_K, Q6_K, ...: reshard/ggml_quants.py) compile too: their
products are exact in float32, so a fused multiply-add rounds as the plain two steps do. Their
graph takes the blocks alone, (n, block bytes) with n dynamic and the block's width fixed, so its
index math divides by constants; compiled over the weight's (rows, bytes) shape the same function
ran slower than plain torch on the CPU's Inductor.

It is compiled with dynamic shapes: one graph serves every weight shape of a (scheme, dtype),
bar a few size cases (a ragged last int4 group, a single group). Compiled for each shape, a
model's handful of weight shapes reached torch's recompile limit (8) and every later shape ran
eager. The limit is raised to RECOMPILE_LIMIT for this function's calls only; a weight that
would need more graphs expands with plain torch, as does every weight once compiling is not
possible (no Triton, an old GPU, no C++ compiler for the CPU, `RUNTIME_COMPILE_EXPANSION=0`
aside) or fails. Either is said once on stderr and counted: `fallbacks()`, `expansion_fallbacks`
in `--stats`. A failure turns off the one compiled function that failed (GGML blocks', or the
others'), not both.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from reshard.ggml_quants import BLOCK_TYPES, expand_blocks, prepare
from reshard.format import blocks_of
from reshard.quant import dequantize

# Compiled output equals plain torch's bit for bit in these (checked on the CPU's Inductor too);
# in float32 a fused multiply-add may round differently, so float32 keeps the plain path.
EXACT_DTYPES = (torch.float16, torch.bfloat16)
DEVICES = ("cuda",)  # where the compiled expansion runs (the CPU's Inductor works too: tests add it)
# Compiled on the CPU too: torch's float8 -> float32 cast runs about an element per 5 ns there, and
# fused into one vectorized pass the fp8 expansion is about 10x faster (a multiply, no add: exact).
# GGML blocks where no native kernel multiplies them (a CPU with neither AVX2 nor AVX512, no compiler)
# expand in 0.09-0.67x plain torch's time compiled (most types under 0.28x), on a 2-core EPYC
# (benchmarks/results/expansion_cpu.txt).
CPU_COMPILED = ("fp8-block", *BLOCK_TYPES)
# Only these compile. ("int4-act", act-order GPTQ, expands with plain torch: compiling its column
# gather costs a test run about 25 s of a cold compile on 2 cores, more than its share of the suite.)
COMPILED = ("int8", "int4", "int4-sym", "fp8-block", "mxfp4", *BLOCK_TYPES)
_FUNCTIONS = {"weights": dequantize, "blocks": expand_blocks}  # what compiles: a weight's parts; GGML blocks
RECOMPILE_LIMIT = 64  # graphs of the expansion: about 4 per (scheme, dtype) with dynamic shapes
_lock = threading.Lock()  # compiling is not safe from two threads at once
_state: dict = {"compiled": {}, "failed": set(), "limit_said": False, "fallbacks": 0}


def expand_weight(parts: dict[str, torch.Tensor], scheme: str, *, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """reshard.quant.dequantize(parts, ...): compiled on CUDA (and fp8 on the CPU), plain torch elsewhere."""
    if blocks_of(scheme):  # GGML blocks with their columns in another order: expanded, then each column put back
        w = expand_weight({"blocks": parts["blocks"]}, blocks_of(scheme), columns=columns, dtype=dtype)
        return w.index_select(1, parts["columns"].long())
    device = next(iter(parts.values())).device.type
    wanted = scheme in COMPILED and dtype in EXACT_DTYPES and (
        device in DEVICES or (device == "cpu" and scheme in CPU_COMPILED))
    kind = "blocks" if scheme in BLOCK_TYPES else "weights"
    fn = _compiled(kind) if wanted else None
    if fn is not None:
        try:
            with _lock, torch._dynamo.config.patch(_limits()):
                if kind == "weights":
                    return fn(parts, scheme, columns=columns, dtype=dtype)
                raw = parts["blocks"]
                prepare(scheme, raw.device)  # its lookup tables, made before the graph is traced
                blocks = raw.reshape(-1, BLOCK_TYPES[scheme][2])
                torch._dynamo.maybe_mark_dynamic(blocks, 0)  # any number of blocks: one graph
                torch._dynamo.mark_static(blocks, 1)  # the block's width: constant divisors
                return fn(blocks, scheme, dtype=dtype).reshape(raw.shape[0], -1)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the plain path is always right
            _fall_back(e, kind)
    elif wanted and kind in _state["failed"]:
        _state["fallbacks"] += 1
    return dequantize(parts, scheme, columns=columns, dtype=dtype)


def compiled_dequantize():
    """The compiled expansion of a weight's parts (also usable on the CPU, for tests), or None where
    it is off."""
    return _compiled("weights")


def fallbacks() -> int:
    """Weights this process expanded with plain torch where the compiled expansion was meant to
    run (it failed, or a weight's shape needed a graph past RECOMPILE_LIMIT)."""
    return _state["fallbacks"]


def _compiled(kind: str):
    if kind in _state["failed"] or os.environ.get("RUNTIME_COMPILE_EXPANSION", "1") == "0":
        return None
    if kind not in _state["compiled"]:  # blocks: dynamic where marked (the number of blocks) only
        _state["compiled"][kind] = torch.compile(_FUNCTIONS[kind], dynamic=True if kind == "weights" else None,
                                                 fullgraph=True)
    return _state["compiled"][kind]


def _limits() -> dict:
    """torch's recompile limit raised to RECOMPILE_LIMIT, and a call past it an error, not a
    silent eager run (fullgraph makes it one only in newer torch; the option's older name too)."""
    config = torch._dynamo.config
    fail = next((k for k in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit") if hasattr(config, k)), None)
    return {"recompile_limit": RECOMPILE_LIMIT, **({fail: True} if fail else {})}


def _fall_back(e: Exception, kind: str) -> None:
    """Plain torch for this weight; for every later one of its kind too unless it was the
    recompile limit."""
    _state["fallbacks"] += 1
    if _recompile_limit_hit(e):
        if not _state["limit_said"]:
            print(f"runtime: the compiled expansion of quantized weights reached its limit of {RECOMPILE_LIMIT} "
                  f"graphs; weights of new shapes expand with plain torch (same numbers, slower)", file=sys.stderr)
        _state["limit_said"] = True
        return
    if kind not in _state["failed"]:
        first = str(e).splitlines()[0] if str(e) else ""
        what = "GGUF blocks" if kind == "blocks" else "quantized weights"
        print(f"runtime: compiled expansion of {what} failed ({type(e).__name__}: {first}); "
              f"expanding with plain torch", file=sys.stderr)
    _state["failed"].add(kind)


def _recompile_limit_hit(e: Exception) -> bool:
    """torch's error for a fullgraph function past its recompile limit (named so since torch 2.6)."""
    return type(e).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
