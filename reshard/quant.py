"""Weight-only quantization of linear weights: the math, in plain torch (CPU or CUDA).

Two schemes, both for a 2-D weight `w` of shape (out, in) as `nn.Linear` stores it:
- int8: symmetric, one scale per output row; `w ~ q * scale`, q in [-127, 127].
- int4: asymmetric, group-wise along the input dim (`group` columns per group), one scale and
  one zero (the group's minimum) per group; `w ~ q * scale + zero`, q in [0, 15], two values
  per byte (low nibble = even column). A ragged last group is padded with copies of the
  row's last value, which leaves its range unchanged; the padding is dropped on expansion.

Scales and zeros are stored in the checkpoint's dtype. The rounding is chosen so the error
bound holds with the *stored* values: |w - expanded| <= scale / 2 for every element (up to
the rounding of the final multiply-add). Everything is deterministic: same input, same bytes.
"""

from __future__ import annotations

import torch

from .bnb import dequantize_bnb4
from .errors import UsageError
from .format import ACT_ORDER, BNB4, blocks_of
from .fp8 import SCHEME as FP8_SCHEME, dequantize_fp8
from .mxfp4 import SCHEME as MXFP4_SCHEME, dequantize_mxfp4
from .nvfp4 import MODELOPT as NVFP4_MODELOPT, SCHEME as NVFP4_SCHEME, dequantize_nvfp4
from .ggml_quants import BLOCK_TYPES, dequantize_blocks
from .ggml_repack import symmetric_zeros

SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 32


def check_scheme(scheme: str, group: int) -> None:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization {scheme!r}; use int8 or int4")
    if scheme == "int4" and (group < 2 or group % 2):
        text = f"must be an even number of 2 or more, not {group}"
        raise UsageError(f"quantize_group {text}", cli=f"--quantize-group {text}")


def quantize(w: torch.Tensor, scheme: str, *, group: int = DEFAULT_GROUP, dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
    """{"qweight", "scales"[, "zeros"]} for `w`; scales/zeros in `dtype` (default: w's dtype)."""
    dtype = dtype or w.dtype
    if scheme == "int8":
        q, scales = quantize_int8(w, dtype=dtype)
        return {"qweight": q, "scales": scales}
    q, scales, zeros = quantize_int4(w, group=group, dtype=dtype)
    return {"qweight": q, "scales": scales, "zeros": zeros}


def dequantize(parts: dict[str, torch.Tensor], scheme: str, *, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, columns) weight in `dtype` from the parts `quantize` returned (or a published
    format kept as it was stored: "fp8-block", reshard/fp8.py; "mxfp4", reshard/mxfp4.py; "nvfp4",
    reshard/nvfp4.py; "bnb4-*", reshard/bnb.py)."""
    if scheme == FP8_SCHEME:
        return dequantize_fp8(parts["qweight"], parts["scale_inv"], dtype=dtype)
    if scheme == MXFP4_SCHEME:
        return dequantize_mxfp4(parts["blocks"], parts["scales"], dtype=dtype)
    if scheme in (NVFP4_SCHEME, NVFP4_MODELOPT):  # compressed-tensors' or ModelOpt's math
        return dequantize_nvfp4(parts["qweight"], parts["scales"], parts["global_scale"], dtype=dtype,
                                modelopt=scheme == NVFP4_MODELOPT)
    if scheme == "int8":
        return dequantize_int8(parts["qweight"], parts["scales"], dtype=dtype)
    if scheme.startswith(BNB4):  # bitsandbytes' NF4/FP4, rounded to its own dtype first (reshard/bnb.py)
        return dequantize_bnb4(parts["qweight"], parts["absmax"], parts["code"],
                               rounded=getattr(torch, scheme[len(BNB4):]), dtype=dtype)
    if scheme in BLOCK_TYPES:  # GGML blocks kept from a GGUF file (reshard/ggml_quants.py)
        return dequantize_blocks(parts["blocks"], scheme, dtype=dtype)
    if blocks_of(scheme):  # the same with their columns in another order: each column back in its place
        return dequantize_blocks(parts["blocks"], blocks_of(scheme), dtype=dtype).index_select(1, parts["columns"].long())
    if scheme == ACT_ORDER:  # int4 over the columns in act order (act-order GPTQ): each column back in its place
        w = dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"], columns=columns, dtype=dtype)
        return w.index_select(1, parts["columns"].long())
    if scheme == "int4-sym":  # int4 whose zeros are -8 * scales (a GGUF's Q4_0: reshard/ggml_repack.py)
        return dequantize_int4(parts["qweight"], parts["scales"], symmetric_zeros(parts["scales"]), columns=columns,
                               dtype=dtype)
    return dequantize_int4(parts["qweight"], parts["scales"], parts["zeros"], columns=columns, dtype=dtype)


# --- int8, symmetric per output row ---------------------------------------------------------

def quantize_int8(w: torch.Tensor, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales (out,) in `dtype`)."""
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scales = _stored_scale(absmax / 127, 127, dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """q * scales, with scales (out,) one per row, or (out, G) one per group of in / G columns
    (a GGUF's Q8_0 re-packed: reshard/ggml_repack.py)."""
    work = _work_dtype(dtype, scales)
    if scales.dim() == 2:
        rows, groups = scales.shape
        return (q.view(rows, groups, -1).to(work) * scales.to(work)[..., None]).view(rows, -1).to(dtype)
    return (q.to(work) * scales.to(work)[:, None]).to(dtype)


# --- int4, asymmetric group-wise ------------------------------------------------------------

def quantize_int4(w: torch.Tensor, *, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(q uint8 (out, padded_in / 2), scales (out, groups), zeros (out, groups)); scales/zeros in `dtype`."""
    rows, cols = w.shape
    groups = -(-cols // group)
    w = w.float()
    if groups * group != cols:  # pad with the row's last value: the last group's range is unchanged
        w = torch.cat([w, w[:, -1:].expand(rows, groups * group - cols)], dim=1)
    w = w.view(rows, groups, group)
    zeros = _round_down(w.amin(dim=2), dtype)  # zero <= every value, so q >= 0
    scales = _stored_scale((w.amax(dim=2) - zeros.float()) / 15, 15, dtype)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.view(rows, groups * group)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, columns: int,
                    dtype: torch.dtype) -> torch.Tensor:
    rows, groups = scales.shape
    zeros = float_zeros(zeros, scales)
    work = _work_dtype(dtype, scales, zeros)
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(rows, groups, -1).to(work)  # (out, groups, group)
    # addcmul rounds once (opmath), so half-precision results match float32 math cast down.
    w = torch.addcmul(zeros.to(work)[..., None], q, scales.to(work)[..., None])
    return w.view(rows, -1)[:, :columns].to(dtype)


def float_zeros(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An int4 weight's zeros as `q * scales + zeros` adds them: as stored where they are floats;
    U8 integer zero points z (a re-packed asymmetric GPTQ/AWQ weight, w = (q - z) * scales) become
    -z * scales in float32, exact (z has 4 bits, a scale at most 24)."""
    if zeros.dtype == torch.uint8:
        return -zeros.float() * scales.float()
    return zeros


def _work_dtype(dtype: torch.dtype, *parts: torch.Tensor) -> torch.dtype:
    """`dtype`, or float32 where a stored part is not exact in `dtype` (a re-packed GPTQ/AWQ
    folder's float32 zeros, float16 scales in a bfloat16 folder): then one rounding at the end."""
    return dtype if all(p.dtype == dtype for p in parts) else torch.float32


# --- rounding of the stored scale and zero ---------------------------------------------------

def _stored_scale(scale: torch.Tensor, top: int, dtype: torch.dtype) -> torch.Tensor:
    """`scale` (float32, = range / top) in `dtype`, nearest, but one step up where the nearest
    would put range / stored scale at or past top + 0.5 (so q would leave [.., top]) or is 0.

    Nearest (not always up) keeps scales that are already exact in `dtype` exact, which makes
    weights that were quantized on the same grid before (a GGUF's) come back unchanged.
    """
    y = scale.to(dtype)
    above = torch.nextafter(y, torch.full_like(y, float("inf")))
    return torch.where(y.float() * (top + 0.5) <= scale * top, above, y)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float32) in `dtype`, rounded towards -inf so the stored value is <= x."""
    y = x.to(dtype)
    below = torch.nextafter(y, torch.full_like(y, float("-inf")))
    return torch.where(y.float() > x, below, y)


# --- which parameters -------------------------------------------------------------------------

def quantizable_params(model: torch.nn.Module, plan, *, embeddings: bool = False) -> dict[str, bool]:
    """{param name: transposed} for the weights to quantize: 2-D weights of the decoder layers'
    linear modules (`nn.Linear`, or transformers' `Conv1D`, which stores its weight (in, out):
    transposed) but MoE routers (kept as llama.cpp keeps them: a rounded router picks other experts),
    the input/output embeddings if `embeddings`, and the experts' [E, ...] weights, each expert
    alone. Tied aliases are left out."""
    from transformers.pytorch_utils import Conv1D

    from .plan import ROUTER_NAMES, find_experts, holds_inward

    stored = {p for g in plan.groups for p in g.params}
    experts = find_experts(model)
    routers = {f"{path.rpartition('.')[0]}.{name}" for path in experts for name in ROUTER_NAMES}
    chosen = {}
    for mname, module in model.named_modules():
        if mname in routers:
            continue
        inside = mname.startswith(plan.layers_path + ".")
        linear = isinstance(module, (torch.nn.Linear, Conv1D)) and inside
        is_embedding = embeddings and module in (model.get_input_embeddings(), model.get_output_embeddings())
        weight = module._parameters.get("weight") if (linear or is_embedding) else None
        name = f"{mname}.weight"
        if weight is not None and weight.dim() == 2 and name in stored:
            chosen[name] = isinstance(module, Conv1D)
    for mname, entry in experts.items():  # [E, out, in] expert weights: each expert alone
        transposed = holds_inward(model.get_submodule(mname))
        chosen.update({n: transposed for n in entry["tensors"] if n in stored and len(plan_shape(plan, n)) == 3})
    return chosen


def plan_shape(plan, name: str):
    return next(g.params[name] for g in plan.groups if name in g.params)


def quantize_experts(w: torch.Tensor, scheme: str, *, group: int, dtype: torch.dtype, transposed: bool
                     ) -> dict[str, torch.Tensor]:
    """`quantize` of each expert w[e] (its (out, in) matrix: w[e].t() if `transposed`), parts stacked on dim 0."""
    per_expert = [quantize(x.t() if transposed else x, scheme, group=group, dtype=dtype) for x in w]
    return {part: torch.stack([p[part] for p in per_expert]) for part in per_expert[0]}
