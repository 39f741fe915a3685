"""FP8 e4m3 checkpoints with block scales (`quant_method: "fp8"`: DeepSeek-V3/R1, Qwen3-*-FP8, ...),
compressed-tensors float8 (`quant_method: "compressed-tensors"`, float weights of 8 bits), NVIDIA
ModelOpt's FP8 (`quant_method: "modelopt"`, `quant_algo: "FP8"`: NVIDIA's `*-FP8` uploads) and Meta's
row-wise FP8 (`quant_method: "fbgemm_fp8"`: Llama-3.1-405B-Instruct-FP8 and its siblings).

Such a checkpoint stores each quantized linear weight `X.weight` as float8_e4m3fn beside a scale
grid: fp8's float32 `X.weight_scale_inv` has one scale per block (`weight_block_size`, e.g.
128x128); compressed-tensors' `X.weight_scale` one per output row ([out, 1], strategy "channel"),
one in all ([1], "tensor") or one per block ("block"); ModelOpt's `X.weight_scale` one in all ([]);
fbgemm's `X.weight_scale` one per output row ([out, 1]). In every case `w = q * scale`, block by
block, a block being (rows / grid rows, columns / grid columns). A folder converted with default
options keeps both as they are (scheme "fp8-block", parts `X.weight.qweight` and
`X.weight.scale_inv`); an explicit `--dtype` or `--quantize` de-quantizes them while reading.
Activation scales (`activation_scale`, `input_scale`, fbgemm's bound `input_scale_ub`) and ModelOpt's
FP8 KV-cache scales (`k_scale`, `v_scale`) are left out: the runtime, as transformers once it has
de-quantized fp8 weights on a CPU, runs the activations and the KV cache unquantized.

The de-quantization is transformers' own (`integrations/finegrained_fp8.py`, `Fp8Dequantize`,
what it runs when it loads such a checkpoint on a CPU): the block shape comes from the scale grid
(rows // grid rows, columns // grid columns), the product is taken in float32 and rounded once
to the output dtype (ModelOpt's `FP8QTensor.dequantize` takes the product in the output dtype: the
same in float32; in half precision it rounds the scale first, which this one does not). Per-expert checkpoints (DeepSeek's `experts.N.gate_proj.weight`) are fused
by transformers' conversion as the converter fuses any checkpoint, run once on the fp8 bytes and
once on the scales, so each expert's parts stay one range of the [E, ...] tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import SourceError
from .format import DTYPE_TO_ST, quant_part_names
from .source import CompanionSource

SCHEME = "fp8-block"
SCALE = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`, as stored here
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Layout:
    """How a published fp8 checkpoint names a weight's companions."""
    method: str  # its quant_method
    scale: str  # `X.weight` + this is its scale grid
    others: tuple[str, ...]  # `X.` + these: activation scales, no part of the de-quantized model
    block: list[int] | None  # the weight_block_size it declares (recorded in the manifest)


def layout(config) -> Layout | None:
    """The fp8 layout of a checkpoint whose config says it is one, else None."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    if qc.get("quant_method") == "fp8":
        return Layout("fp8", SCALE, ("activation_scale",), list(qc.get("weight_block_size") or []) or None)
    if qc.get("quant_method") == "fbgemm_fp8":  # Meta's: one float32 scale per output row ([out, 1])
        return Layout("fbgemm_fp8", "_scale", ("input_scale_ub",), None)
    if qc.get("quant_method") == "modelopt" and str(qc.get("quant_algo", "")).upper() == "FP8":
        # NVIDIA ModelOpt: one float32 scale per tensor (`X.weight_scale`, []), activation and KV-cache scales
        return Layout("modelopt", "_scale", ("input_scale", "k_scale", "v_scale"), None)
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if qc.get("quant_method") == "compressed-tensors" and weights and all(
            w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
        blocks = {tuple(w.get("block_structure") or ()) for w in weights}
        block = list(blocks.pop()) if len(blocks) == 1 else []
        return Layout("compressed-tensors", "_scale", ("input_scale",), block or None)
    return None


def grid(scale_inv: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of the scale grid; a per-tensor scale is a 1x1 grid."""
    return tuple(scale_inv.shape[-2:]) if scale_inv.dim() >= 2 else (1, 1)


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, cols) weight in `dtype`: each block of `q` times its scale, in float32, rounded once."""
    rows, cols = q.shape
    grows, gcols = grid(scale_inv)
    w = q.float().reshape(grows, rows // grows, gcols, cols // gcols) * scale_inv.float().reshape(grows, 1, gcols, 1)
    return w.to(dtype).reshape(rows, cols)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale_inv float32 (ceil(rows / bm), ceil(cols / bn))): the layout
    fp8 checkpoints publish, for tests and benchmarks that write one."""
    rows, cols = w.shape
    bm, bn = block
    grows, gcols = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(grows * bm, gcols * bn, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(grows, bm, gcols, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(grows * bm, gcols * bn)[:rows, :cols].contiguous(), scale


def regrid(scale: torch.Tensor, shape, block: list[int] | None) -> torch.Tensor:
    """`scale` on a grid that divides `shape`. Where a dimension ends in a partial block of the
    declared `block` size (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows in blocks of 128, a grid of
    5), each block's scale is repeated over sub-blocks of gcd(dim, block): the same value for the
    same weights, on a grid whose blocks are all of one size. Other grids come back unchanged."""
    if scale.dim() < 2 or not block:
        return scale
    for axis, (dim, size) in enumerate(zip(shape, block)):
        ax = scale.dim() - 2 + axis
        if dim % size and scale.shape[ax] == -(-dim // size):
            sub = math.gcd(dim, size)
            scale = scale.repeat_interleave(size // sub, dim=ax).narrow(ax, 0, dim // sub)
    return scale.contiguous()


def check_grid(key: str, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
    grows, gcols = grid(scale_inv)
    if q.dim() != 2 or q.shape[0] % grows or q.shape[1] % gcols:
        raise SourceError(f"fp8 weight {key} has shape {list(q.shape)}, which its scale grid {[grows, gcols]} "
                          f"does not divide; is the config the one of these weights?")


class Fp8Source(CompanionSource):
    """A checkpoint's tensors with each fp8 weight's scale grid (and activation scales) hidden
    behind the weight: reading a weight reads its scale too. With `keep`, the scale comes back as
    `KEY_scale_inv` beside the fp8 weight (see `Fp8Spec.take`); else the weight comes back
    de-quantized (float32, exactly; the conversion casts it once to its dtype)."""

    def __init__(self, src, form: Layout, *, keep: bool):
        self.form, self.keep = form, keep
        keys = set(src.keys())
        super().__init__(src, {k: [c for c in (k + form.scale, *(k.removesuffix("weight") + o for o in form.others))
                                   if c in keys] for k in keys if k + form.scale in keys})

    def read(self, keys) -> dict[str, torch.Tensor]:
        out = self.src.read(self.inner(keys))
        for key in (k for k in keys if k in self.companions):
            scale = out.pop(key + self.form.scale)
            for other in self.companions[key][1:]:
                out.pop(other)
            scale = regrid(scale, out[key].shape, self.form.block)
            check_grid(key, out[key], scale)
            if self.keep:
                out[key + SCALE] = scale
            else:
                out[key] = dequantize_fp8(out[key], scale, dtype=torch.float32)
        return out


@dataclass
class Fp8Spec:
    """What a conversion that keeps an fp8 checkpoint's precision stores (the converter's
    counterpart of convert.QuantSpec: the same `manifest_entry`/`params`/`store` verbs)."""
    form: Layout  # the source's (recorded; the math reads the grid)
    scheme: str = SCHEME
    params: dict = field(default_factory=dict)  # nothing is quantized by the conversion itself

    def manifest_entry(self) -> dict:
        return {"scheme": self.scheme, "source_method": self.form.method, "block_size": self.form.block,
                "embeddings": False}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, dict[str, torch.Tensor]]:
        """{param: {"qweight", "scale_inv"}} for `planned`'s params the source stores in fp8,
        popped from `raw`; per-expert tensors fused by transformers' conversion, bytes and scales each."""
        out = {}
        for p in planned.params:
            key = mapping.direct.get(p)
            if key is not None and key + SCALE in raw:
                out[p] = {"qweight": raw.pop(key), "scale_inv": raw.pop(key + SCALE)}
        for first in dict.fromkeys(mapping.made_by[p] for p in planned.params if p in mapping.made_by):
            fusion = mapping.fused[first]
            if fusion.kept_as(raw, SCALE, "fp8"):
                out.update(fusion.run_parts(raw, model, {"qweight": "", "scale_inv": SCALE}, "fp8", turns=True))
        return out

    def store(self, name: str, parts: dict, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s parts into `tensors` as they are, and what it expands to into `quantized`."""
        for part, stored in quant_part_names(name, self.scheme).items():
            tensors[stored] = parts[part].contiguous()
        quantized[name] = {"shape": list(parts["qweight"].shape), "dtype": DTYPE_TO_ST[target], "transposed": False}
