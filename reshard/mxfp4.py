"""MXFP4 checkpoints (`quant_method: "mxfp4"`: gpt-oss-20b and gpt-oss-120b).

gpt-oss stores each experts weight `X` ([E, in, out] as the model holds it, e.g.
`mlp.experts.gate_up_proj`) as `X_blocks`, uint8 [E, out, in / 32, 16] (two fp4 e2m1 values a
byte, the even column in the low nibble, blocks of 32), and `X_scales`, uint8 [E, out, in / 32]
(e8m0: the block's power of two, biased by 127). A folder converted with default options keeps
those bytes, re-packed exactly into GGML's MXFP4 blocks (scheme "mxfp4_blocks", reshard/ggml_iquants.py:
per block of 32 the e8m0 byte, then 16 bytes holding value j in the low nibble and j + 16 in the
high one), 17 bytes a block as published, each expert one range: what the native CPU kernels multiply
as stored. (Folders written before keep the published layout, scheme "mxfp4", parts `X.blocks` and
`X.scales`, and still load.) An explicit `--dtype` or `--quantize` de-quantizes them while reading.

The de-quantization is transformers' (`integrations/mxfp4.py`, `convert_moe_packed_tensors`, what
it runs when it loads gpt-oss on a CPU without Triton kernels): each nibble looked up in the fp4
table in the output dtype, then `ldexp` by the block's exponent; the result is the transpose
of the [out, in] matrix the blocks hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import SourceError
from .format import DTYPE_TO_ST, quant_part_names
from .source import CompanionSource

SCHEME = "mxfp4"  # the published layout (folders written before re-packing)
GGML_SCHEME = "mxfp4_blocks"  # what a conversion stores them as
SUFFIXES = {"blocks": "_blocks", "scales": "_scales"}  # part -> `X` + suffix in the checkpoint
# fp4 e2m1: sign, two exponent bits, one mantissa bit
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    return qc.get("quant_method") == "mxfp4"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) matrix in `dtype` from blocks (out, in / 32, 16) and scales (out, in / 32)."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    rows, groups, width = blocks.shape
    values = torch.stack([lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]], dim=-1)  # (out, G, 16, 2)
    exp = scales.to(torch.int32) - 127
    return torch.ldexp(values.view(rows, groups, 2 * width), exp[..., None]).to(dtype).view(rows, -1)


def dequantize_experts(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """The [E, in, out] experts parameter from its [E, ...] blocks and scales."""
    return torch.stack([dequantize_mxfp4(b, s, dtype=dtype).t() for b, s in zip(blocks, scales)])


def to_ggml_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss's blocks [..., G, 16] (value 2b in byte b's low nibble, 2b + 1 in its high one) and
    scales [..., G] as GGML MXFP4 blocks [..., G * 17] (scale byte, then value j low, j + 16 high).
    The same codes (fp4 e2m1, sign bit 8) and exponents: the values are equal (GGML's code 8 is +0
    where transformers' table has -0)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2)  # [..., G, 32] in order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([scales.unsqueeze(-1), packed], dim=-1).flatten(-2)


def param_shape(blocks_shape) -> list[int]:
    """[E, in, out] of the parameter that blocks [E, out, in / 32, 16] hold."""
    experts, out, groups, width = blocks_shape
    return [experts, groups * 2 * width, out]


class Mxfp4Source:
    """A checkpoint's tensors with each `X_blocks` and `X_scales` pair shown as the parameter `X`
    they make: reading `X` reads both. With `keep`, they come back under their own names (see
    `Mxfp4Spec.take`); else `X` comes back de-quantized (float32, exactly)."""

    def __init__(self, src, *, keep: bool):
        self.src, self.keep = src, keep
        keys = set(src.keys())
        self.packed = {k.removesuffix("_blocks") for k in keys
                       if k.endswith("_blocks") and k.removesuffix("_blocks") + "_scales" in keys}

    def __getattr__(self, name):  # folder, info, read_ahead, close, what --low-disk sources add
        return getattr(self.src, name)

    def _parts(self, key: str) -> list[str]:
        return [key + s for s in SUFFIXES.values()] if key in self.packed else [key]

    def keys(self) -> list[str]:
        hidden = {p for k in self.packed for p in self._parts(k)}
        return [k for k in self.src.keys() if k not in hidden] + sorted(self.packed)

    def shapes(self):
        shapes = self.src.shapes()
        out = {k: s for k, s in shapes.items() if not any(k.endswith(s) for s in SUFFIXES.values())}
        out.update({k: param_shape(shapes[k + "_blocks"]) for k in self.packed if k + "_blocks" in shapes})
        return out

    def locate(self, key):
        return None if key in self.packed else self.src.locate(key)

    def want(self, keys) -> None:
        self.src.want([p for k in keys for p in self._parts(k)])

    def finished(self, keys) -> None:
        self.src.finished([p for k in keys for p in self._parts(k)])

    def read(self, keys) -> dict[str, torch.Tensor]:
        out = self.src.read([p for k in keys for p in self._parts(k)])
        if not self.keep:
            for key in (k for k in keys if k in self.packed):
                out[key] = dequantize_experts(out.pop(key + "_blocks"), out.pop(key + "_scales"), dtype=torch.float32)
        return out


@dataclass
class Mxfp4Spec:
    """What a conversion that keeps a gpt-oss checkpoint's MXFP4 experts stores (the converter's
    counterpart of convert.QuantSpec: the same `manifest_entry`/`params`/`store` verbs)."""
    scheme: str = SCHEME
    params: dict = field(default_factory=dict)  # nothing is quantized by the conversion itself

    def manifest_entry(self) -> dict:
        return {"scheme": self.scheme, "source_method": "mxfp4", "embeddings": False}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, dict[str, torch.Tensor]]:
        """{param: {"blocks", "scales"}} for `planned`'s params the source stores as MXFP4, popped from `raw`."""
        out = {}
        for p in planned.params:
            key = mapping.direct.get(p)
            if key is not None and key + "_blocks" in raw:
                out[p] = {part: raw.pop(key + suffix) for part, suffix in SUFFIXES.items()}
        return out

    def store(self, name: str, parts: dict, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s blocks and scales into `tensors` as GGML MXFP4 blocks (`to_ggml_blocks`), and
        what they expand to into `quantized`."""
        (stored,) = quant_part_names(name, GGML_SCHEME).values()
        tensors[stored] = to_ggml_blocks(parts["blocks"], parts["scales"]).contiguous()
        # the blocks hold each expert's (out, in) matrix: the parameter is its transpose
        quantized[name] = {"shape": param_shape(parts["blocks"].shape), "dtype": DTYPE_TO_ST[target],
                           "transposed": True, "scheme": GGML_SCHEME}


# --- compressed-tensors' MXFP4 (`format: "mxfp4-pack-quantized"`) ------------------------------
# `X.weight_packed` uint8 (out, in / 2): fp4 codes as gpt-oss's blocks hold them (the even column in the low
# nibble); `X.weight_scale` uint8 (out, in / 32): the e8m0 exponents. Its decompression (compressed-tensors'
# `MXFP4PackedCompressor`) is `e2m1(q) * 2^(e - 127)`: the same values as GGML's MXFP4 blocks of those codes and
# exponents, so they are kept as those blocks (`to_ggml_blocks`), which the native CPU kernels multiply.
CT_FORMAT = "mxfp4-pack-quantized"
CT_BLOCKS = ".mxfp4_blocks"  # `X.weight` + this: its GGML blocks while read (see `CtMxfp4Spec.take`)
CT_PARTS = ("weight_packed", "weight_scale")
CT_DROPPED = ("input_global_scale", "input_scale")  # activation scales: no part of the de-quantized model


def is_ct_mxfp4(config) -> bool:
    """Whether `config` is a compressed-tensors checkpoint whose weights are all MXFP4."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    return qc.get("quant_method") == "compressed-tensors" and bool(groups) \
        and {g.get("format") or qc.get("format") for g in groups} == {CT_FORMAT} \
        and all(w.get("type") == "float" and w.get("num_bits") == 4 and w.get("group_size") == 32 for w in weights)


class CtMxfp4Source(CompanionSource):
    """A compressed-tensors MXFP4 checkpoint's tensors, each weight's codes and exponents shown as the weight
    `X.weight`: read, they come back as GGML MXFP4 blocks under `X.weight` + CT_BLOCKS with `keep`, else as
    the weight de-quantized (float32, exactly)."""

    def __init__(self, src, *, keep: bool):
        self.keep = keep
        keys = set(src.keys())
        prefixes = [k[:-len(CT_PARTS[0])] for k in keys if k.endswith("." + CT_PARTS[0])]
        self.packed = {p + "weight": p for p in prefixes if all(p + s in keys for s in CT_PARTS)}
        super().__init__(src, {w: [p + s for s in (*CT_PARTS, *CT_DROPPED) if p + s in keys]
                               for w, p in self.packed.items()}, virtual=set(self.packed),
                         nibbles={w: p + CT_PARTS[0] for w, p in self.packed.items()})

    def read(self, keys) -> dict[str, torch.Tensor]:
        from .ggml_quants import dequantize_blocks

        out = self.src.read(self.inner(keys))
        for key in (k for k in keys if k in self.packed):
            prefix = self.packed[key]
            q, exponents = (out.pop(prefix + s) for s in CT_PARTS)
            for name in CT_DROPPED:
                out.pop(prefix + name, None)
            if q.dim() != 2 or q.shape[1] % 16 or tuple(exponents.shape) != (q.shape[0], q.shape[1] // 16):
                raise SourceError(f"{key} is an MXFP4 weight whose codes {list(q.shape)} and scales "
                                  f"{list(exponents.shape)} do not make one (out, in) weight in blocks of 32; "
                                  f"is the config the one of these weights?")
            blocks = to_ggml_blocks(q.view(torch.uint8).reshape(q.shape[0], -1, 16), exponents.view(torch.uint8))
            if self.keep:
                out[key + CT_BLOCKS] = blocks.contiguous()
            else:
                out[key] = dequantize_blocks(blocks, GGML_SCHEME, dtype=torch.float32)
        return out


@dataclass
class CtMxfp4Spec:
    """What a conversion that keeps a compressed-tensors MXFP4 checkpoint's precision stores (the
    converter's counterpart of convert.QuantSpec: the same `manifest_entry`/`params`/`store` verbs)."""
    scheme: str = GGML_SCHEME
    params: dict = field(default_factory=dict)  # nothing is quantized by the conversion itself

    def manifest_entry(self) -> dict:
        return {"scheme": self.scheme, "source_method": "compressed-tensors", "embeddings": False}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, dict[str, torch.Tensor]]:
        """{param: {"blocks"}} for `planned`'s params the source stores in MXFP4, popped from `raw`; a MoE's
        per-expert weights fused by transformers' conversion (whole rows of blocks: stacked, joined)."""
        out = {}
        for p in planned.params:
            key = mapping.direct.get(p)
            if key is not None and key + CT_BLOCKS in raw:
                out[p] = {"blocks": raw.pop(key + CT_BLOCKS)}
        for first in dict.fromkeys(mapping.made_by[p] for p in planned.params if p in mapping.made_by):
            fusion = mapping.fused[first]
            if fusion.kept_as(raw, CT_BLOCKS, "MXFP4"):
                out.update(fusion.run_parts(raw, model, {"blocks": CT_BLOCKS}, "MXFP4"))
        return out

    def store(self, name: str, parts: dict, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        (stored,) = quant_part_names(name, GGML_SCHEME).values()
        blocks = parts["blocks"]
        tensors[stored] = blocks.contiguous()
        quantized[name] = {"shape": [*blocks.shape[:-1], blocks.shape[-1] // 17 * 32], "dtype": DTYPE_TO_ST[target],
                           "transposed": False, "scheme": GGML_SCHEME}
