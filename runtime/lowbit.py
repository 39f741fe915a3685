"""Quantized linear weights kept packed on the CPU and run through low-bit CPU kernels.

A `--quantize int8|int4` folder stores each quantized weight as parts (reshard/quant.py). On
the CPU, instead of expanding them to the compute dtype, the loader keeps them packed and the
model's `nn.Linear` (or `Conv1D`) holding that weight is swapped at build time for a
`PackedLinear`, whose forward is one kernel call; every other module stays transformers' own.

Two kernels, chosen once per weight when the model is built (`PackSpec.backend`):
- "native", where runtime/native.py could build the project's C kernels (x86 CPUs with
  AVX512-VNNI): the weight as stored (int8 (N, K); int4 (N, K/2), two values a byte) and a small
  scale table; the activations are quantized per block of 32 values, as llama.cpp's Q8_0 does,
  and the products are integer dot products, at the memory's speed. K % 64 == 0, and for int4
  group % 32 == 0 and K % group == 0.
- "torch" otherwise: torch's weight-only kernels, below.

- int8 (one scale per output row): `aten._weight_int8pack_mm(x, qweight (N, K) int8, scales (N,))`
  computes `x @ (qweight * scales[:, None]).T`; `qweight` is used as stored (a view of the
  mapped file on a resident CPU load: no copy).
- int4 (groups of g input columns): `aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)` with
  `packed = aten._convert_weight_to_int4pack_for_cpu(q (N, K) int32, 1)`, a layout that
  depends on the CPU torch runs on (so it is made at load, never stored), and
  `sz (K / g, N, 2) = [scale, zero + 8 * scale]`: the kernel computes `(q - 8) * scale + sz[..., 1]`,
  which is our `q * scale + zero`.
Both kernels take bfloat16 activations (their float32 paths are reference loops, ~100x slower),
so a PackedLinear computes in bfloat16 whatever the model's dtype and casts back.

A GGUF's Q2_K to Q6_K, IQ4_XS, IQ4_NL, Q5_0 and Q5_1 blocks (reshard/ggml_quants.py), and IQ1_S,
IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, TQ1_0, TQ2_0 and MXFP4 ones (reshard/ggml_iquants.py), run natively as stored, one uint8 tensor (runtime/kernels/kquant_cpu.c and
iquant_cpu.c: the blocks' own scales, grids and signs decoded in the loop, each weight ggml's value);
with no native kernel they expand. An "int4-sym" weight (a GGUF's Q4_0 re-packed, reshard/ggml_repack.py) runs as int4 with its zeros
-8 * scales made at load; an "int4-act" one (act-order GPTQ, its columns stored group by group) runs
as int4 on the input gathered into that order (`X.qorder`, a third tensor); int8 with a scale per
block of 32 (a GGUF's Q8_0 re-packed) runs natively with its (N, K/32) scales as float32 (torch's
int8 kernel scales per row only: without the native one it expands).
What the kernels refuse (or, for int8, crash on) is left to the expansion in runtime/quantized.py:
int8 needs K % 16 == 0; int4 needs g in {32, 64, 128, 256}, K % g == 0 and N % 16 == 0.
Both read their operands with aligned vector loads and crash on a tensor that does not start
on a 64-byte boundary (measured on torch 2.13, AVX512): weights are copied at load where the
file's layout leaves them unaligned, activations in the forward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from reshard.format import ACT_ORDER, blocks_of, reordered
from reshard.ggml_quants import BLOCK_TYPES
from reshard.ggml_repack import symmetric_zeros
from reshard.quant import float_zeros

from . import native

KERNEL_DTYPE = torch.bfloat16  # what both kernels are fast with
INT4_GROUPS = (32, 64, 128, 256)
# stored scheme -> the kernel's; "int4-sym" is int4 with zeros -8 * scales (reshard/ggml_repack.py);
# "int4-act" int4 over the input columns in act order (act-order GPTQ), and GGML blocks whose columns
# are reordered (reshard.format.reordered): the input is gathered to match
KERNEL_SCHEMES = {"int8": "int8", "int4": "int4", "int4-sym": "int4", ACT_ORDER: "int4",
                  **{s: s for s in native.BLOCK_SCHEMES}, **{reordered(s): s for s in native.BLOCK_SCHEMES}}
# GGML K-quant and grid blocks: multiplied as stored, by the native kernels only (a weight, no scale table)
KQUANTS = native.BLOCK_SCHEMES
SCALES = "qscales"
ORDER = "qorder"  # a PackedLinear's last tensor, for a permuted weight: the input columns' order
ALIGN = 64  # bytes; torch's CPU allocator aligns every allocation to this  # a PackedLinear's second tensor: int8 scales, or int4 scales-and-zeros


@dataclass(frozen=True)
class PackSpec:
    """How one quantized weight runs packed."""

    scheme: str  # "int8", "int4", or GGML blocks (native.BLOCK_SCHEMES: "q2_k" to "q6_k", "iq4_xs", ...; native only)
    group: int  # int4 group size; int8: 0 (a scale per row) or 32 (per block of 32 columns, native only)
    out_features: int  # N
    in_features: int  # K
    backend: str = "torch"  # "native" (runtime/native.py) or "torch"
    scale_dtype: torch.dtype = torch.bfloat16  # the stored scales' (and zeros') dtype: what the native int4 table keeps
    permuted: bool = False  # stored over the input columns in another order ("int4-act"): the input follows it


def kernels_available() -> bool:
    """Both CPU kernels exist in this torch (2.5 and later; older ones expand instead)."""
    ops = torch.ops.aten
    return all(hasattr(ops, n) for n in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu",
                                         "_convert_weight_to_int4pack_for_cpu"))


def cpu_bf16_fast() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (oneDNN's own check: AVX512-BF16/AMX, ARM BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_compute_dtype(folder_dtype: torch.dtype) -> torch.dtype:
    """The CPU's default compute dtype for a folder: bfloat16 for a half-precision folder where
    the CPU is fast at it, float32 otherwise (float32 folders stay float32, exactly)."""
    if folder_dtype in (torch.float16, torch.bfloat16):
        return torch.bfloat16 if cpu_bf16_fast() else torch.float32
    return folder_dtype


def supported(spec: PackSpec) -> bool:
    """Whether `spec.backend`'s kernel takes a weight of this shape (outside it torch's fail, or for int8 crash)."""
    n, k = spec.out_features, spec.in_features
    if spec.scheme in KQUANTS:  # whole blocks (256 values, or 32 for IQ4_NL, MXFP4, Q5_0, Q5_1)
        return spec.backend == "native" and k % BLOCK_TYPES[spec.scheme][1] == 0
    if spec.backend == "native":  # int8: a scale per row, or per block of 32 (a GGUF's Q8_0)
        if not native.int_kernels():  # AVX2 alone: the block kernels only
            return False
        if spec.scheme == "int8":
            return k % 64 == 0 and spec.group in (0, 32)
        return k % 64 == 0 and spec.group % 32 == 0 and k % spec.group == 0
    if spec.scheme == "int8":
        return k % 16 == 0 and not spec.group
    return spec.group in INT4_GROUPS and k % spec.group == 0 and n % 16 == 0


def plan_packing(model: nn.Module, manifest, device: torch.device) -> dict[str, PackSpec]:
    """{param name: PackSpec} for the quantized weights of `manifest` (reshard.format.Manifest)
    that run packed: on the CPU, with the kernels present, held by a plain `nn.Linear` or
    `Conv1D` (a subclass may change the math: it expands), of a shape the kernels take."""
    quant = manifest.quantization or {}
    if device.type != "cpu":
        return {}
    backends = [b for b, ok in (("native", native.lowbit() is not None), ("torch", kernels_available())) if ok]
    if not backends:
        return {}
    from transformers.pytorch_utils import Conv1D

    specs = {}
    for g, name, info in ((g, n, i) for g in manifest.groups for n, i in g.quantized.items()):
        owner = model.get_submodule(name.rpartition(".")[0])
        if type(owner) not in (nn.Linear, Conv1D) or not name.endswith(".weight"):
            continue
        spec = weight_spec(g, name, quant, backends)
        if spec is not None:
            specs[name] = spec
    return specs


def weight_spec(group, name: str, quant: dict, backends) -> PackSpec | None:
    """How quantized weight `name` of `group` runs packed through the first of `backends`
    ("native", "torch") whose kernel takes it, or None where none does; an [E, out, in] expert
    weight (runtime/packedexperts.py) by each expert's matrix."""
    from reshard.format import scheme_of

    info = group.quantized[name]
    scheme = scheme_of(group, name, quant.get("scheme"))
    # a parameter with a scheme of its own may name its group size too (GGUF blocks re-packed)
    size = info.get("group_size", quant.get("group_size")) or 0
    if scheme not in KERNEL_SCHEMES:
        return None
    out, inp = reversed(info["shape"][-2:]) if info.get("transposed") else info["shape"][-2:]
    scale_dtype = stored_scale_dtype(group, name, scheme)
    permuted = scheme == ACT_ORDER or blocks_of(scheme) is not None  # the input gathered into the stored order
    for backend in backends:  # the project's kernel where it takes the shape, else torch's
        spec = PackSpec(KERNEL_SCHEMES[scheme], size, out, inp, backend, scale_dtype, permuted)
        if supported(spec):
            return spec
    return None


def stored_scale_dtype(group, name: str, scheme: str) -> torch.dtype:
    """The dtype that holds a weight's stored scales and zeros exactly: theirs, or float32 where they
    differ (a re-packed GPTQ's float16 scales and integer zero points, whose -z * s float16 cannot
    hold); what the native int4 table keeps."""
    from reshard.format import ST_TO_DTYPE, quant_part_names

    names = quant_part_names(name, scheme)
    dtypes = {ST_TO_DTYPE[group.tensors[names[p]]["dtype"]] for p in names if p in ("scales", "zeros")}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def install_packed(model: nn.Module, specs: dict[str, PackSpec]) -> None:
    """Swap each module whose weight runs packed for a PackedLinear (its weight on meta)."""
    for name, spec in specs.items():
        path = name.rpartition(".")[0]
        model.set_submodule(path, PackedLinear(model.get_submodule(path), spec))


def packed_names(param: str, spec: PackSpec) -> tuple[str, ...]:
    """The tensors a packed `X.weight` is held as: `X.weight` (packed) and `X.qscales`, and for a
    permuted one `X.qorder`; K-quant blocks as `X.weight` alone (and `X.qorder`)."""
    owner = param.rpartition(".")[0]
    order = (f"{owner}.{ORDER}",) if spec.permuted else ()
    return (param, *order) if spec.scheme in KQUANTS else (param, f"{owner}.{SCALES}", *order)


def pack_param(parts: dict[str, torch.Tensor], spec: PackSpec) -> tuple[torch.Tensor, ...]:
    """(packed weight, scales[, input order]) for the kernel from a weight's stored parts (on the CPU);
    (blocks,) for K-quant blocks, as stored (a view of the mapped file where resident)."""
    if spec.permuted:  # stored column j holds weight column order[j] (`columns` says where each one went)
        order = torch.argsort(parts["columns"].long())
        return (*pack_param({k: v for k, v in parts.items() if k != "columns"}, replace(spec, permuted=False)),
                order)
    if spec.scheme in KQUANTS:
        return (parts["blocks"].contiguous(),)
    scales = parts["scales"]
    zeros = float_zeros(parts["zeros"], scales) if "zeros" in parts else symmetric_zeros(scales)  # int4-sym: not stored
    if spec.backend == "native":  # the weight as stored (a view of the mapped file where resident)
        if spec.scheme == "int8":
            return parts["qweight"].contiguous(), scales.float()
        table = native.int4_scales(scales.to(spec.scale_dtype), zeros, spec.group)
        return parts["qweight"].contiguous(), table
    if spec.scheme == "int8":
        return aligned(parts["qweight"]), aligned(scales.to(KERNEL_DTYPE))
    packed = parts["qweight"]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(spec.out_features, -1).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    shifted = zeros.float() + 8 * scales.float()  # the kernel's zero point is q = 8
    sz = torch.stack([scales.float(), shifted], dim=-1).transpose(0, 1)  # (K / g, N, 2)
    return weight, aligned(sz.to(KERNEL_DTYPE))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and starting on an ALIGN-byte boundary (a copy only where it is not)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def packed_shape(spec: PackSpec) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype]:
    """(weight shape, weight dtype, scales shape, scales dtype) of a packed weight (K-quant blocks:
    no scales, shape (0,))."""
    n, k = spec.out_features, spec.in_features
    if spec.scheme in KQUANTS:
        _, size, nbytes = BLOCK_TYPES[spec.scheme]
        return (n, k // size * nbytes), torch.uint8, (0,), torch.uint8
    if spec.backend == "native":
        if spec.scheme == "int8":  # a scale per row, or per block of `group` columns
            return (n, k), torch.int8, ((n, k // spec.group) if spec.group else (n,)), torch.float32
        return (n, k // 2), torch.uint8, (n, k // 32 + k // spec.group), spec.scale_dtype
    if spec.scheme == "int8":
        return (n, k), torch.int8, (n,), KERNEL_DTYPE
    return (n, k // 2), torch.uint8, (k // spec.group, n, 2), KERNEL_DTYPE


def packed_nbytes(spec: PackSpec) -> int:
    """Bytes a packed weight takes in memory (weight and scales, and a permuted one's input order):
    what runtime.budget should count for it on the CPU, about its stored bytes (int8: N * K + 2 or
    4 N; int4: N * K / 2 + 2 or 4 N * K / g; the order 8 K)."""
    wshape, wdtype, sshape, sdtype = packed_shape(spec)
    order = 8 * spec.in_features if spec.permuted else 0
    return math.prod(wshape) * wdtype.itemsize + math.prod(sshape) * sdtype.itemsize + order


def native_kernel(spec: PackSpec):
    """The project's kernel for a weight of `spec` (backend "native"): f(x (M, K) float32 or bfloat16,
    contiguous, *the operands `pack_param` gives) -> (M, N) in x's dtype."""
    if spec.scheme in KQUANTS:
        return functools.partial(native.kquant_gemm, scheme=spec.scheme)
    return native.int8_gemm if spec.scheme == "int8" else functools.partial(native.int4_gemm, group=spec.group)


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W packed (int8 per row, or int4 grouped), through a low-bit CPU kernel.

    Stands in for an `nn.Linear` (or a `Conv1D`, whose (in, out) weight was quantized as its
    transpose: the same product). `weight` and `qscales` are put in place by the runtime.
    """

    def __init__(self, module: nn.Module, spec: PackSpec):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        wshape, wdtype, sshape, sdtype = packed_shape(spec)
        self.weight = nn.Parameter(torch.empty(wshape, dtype=wdtype, device="meta"), requires_grad=False)
        if spec.scheme not in KQUANTS:  # K-quant blocks carry their scales
            self.qscales = nn.Parameter(torch.empty(sshape, dtype=sdtype, device="meta"), requires_grad=False)
        self.bias = module.bias
        if spec.permuted:  # the input's columns in the order the weight's are stored
            self.qorder = nn.Parameter(torch.empty(spec.in_features, dtype=torch.long, device="meta"),
                                       requires_grad=False)
        self.native = native_kernel(spec) if spec.backend == "native" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.permuted:
            x = x.index_select(-1, self.qorder)
        if self.native:  # float32 and bfloat16 in and out as they are, others through float32
            rows = x.reshape(-1, self.in_features)
            if rows.dtype not in native.IO_KINDS:
                rows = rows.float()
            tables = () if self.spec.scheme in KQUANTS else (self.qscales,)
            y = self.native(rows if rows.is_contiguous() else rows.contiguous(), self.weight, *tables)
            y = y.view(*x.shape[:-1], self.out_features)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return y if self.bias is None else y + self.bias
        rows = aligned(x.reshape(-1, self.in_features).to(KERNEL_DTYPE))  # (M, K)
        if self.spec.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.qscales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.spec.group, self.qscales)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.spec
        return f"in_features={s.in_features}, out_features={s.out_features}, {s.scheme} ({s.backend})" + (
            f" group {s.group}" if s.group else "") + (", act order" if s.permuted else "") + \
            f", bias={self.bias is not None}"
