"""NVFP4 checkpoints: 4-bit float (e2m1) weights in groups of 16 with an fp8 scale each and a float32
scale per tensor, in the two layouts the hub has: compressed-tensors' `nvfp4-pack-quantized` (`quant_method:
"compressed-tensors"`, llm-compressor's `*-NVFP4` uploads) and NVIDIA ModelOpt's (`quant_method: "modelopt"`,
`quant_algo: "NVFP4"`, NVIDIA's `*-FP4` uploads).

Both store each quantized linear weight (out, in) as uint8 (out, in / 2) codes, two a byte, the even
column in the low nibble (bit 3 the sign), and float8_e4m3fn scales (out, in / 16):
- compressed-tensors: `X.weight_packed`, `X.weight_scale`, and `X.weight_global_scale` F32 [1], which
  divides the scales. Its decompression (`NVFP4PackedCompressor.decompress`, what transformers runs for
  `CompressedTensorsConfig(dequantize=True)`): `bfloat16(e2m1 * (float32(scale) / global))`, bfloat16
  being its unpacking's dtype, then the model's dtype. Scheme "nvfp4".
- ModelOpt: `X.weight` (the codes under the weight's own name), `X.weight_scale`, and `X.weight_scale_2`
  F32 [], which multiplies them. Its `NVFP4QTensor.dequantize`: `dtype(e2m1 * (float32(scale) * scale_2))`,
  rounded once. Scheme "nvfp4-modelopt". transformers cannot load these pre-quantized, so the tests
  check this published formula.
A folder converted with default options keeps codes and scales as published (parts `X.weight.qweight`,
`.scales`, and `.global_scale` F32 (out, 1): the per-tensor scale repeated per row, so that transformers'
fusion of a MoE layer's experts and of gate with up, run on each part, keeps each row's). Activation and
KV-cache scales (`input_global_scale`, `input_scale`, `k_scale`, `v_scale`) are left out: the runtime runs
activations and the KV cache unquantized. An explicit `--dtype` or `--quantize` de-quantizes while reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import SourceError
from .format import DTYPE_TO_ST, quant_part_names
from .source import CompanionSource

SCHEME, MODELOPT = "nvfp4", "nvfp4-modelopt"  # the stored schemes: compressed-tensors', ModelOpt's math
FORMAT = "nvfp4-pack-quantized"
GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes; bit 3 is the sign
SCALES, GLOBAL = ".nvfp4_scales", ".nvfp4_global"  # `X.weight` + these: its other parts while read (see `take`)


@dataclass(frozen=True)
class Layout:
    """How a checkpoint names an NVFP4 weight's tensors: `X.` + these."""
    scheme: str
    codes: str  # "weight_packed" (compressed-tensors) or "weight" (ModelOpt)
    second: str  # the per-tensor scale
    dropped: tuple[str, ...]  # activation and KV-cache scales: no part of the de-quantized model
    method: str  # the quant_method (recorded)


COMPRESSED_TENSORS = Layout(SCHEME, "weight_packed", "weight_global_scale", ("input_global_scale",), "compressed-tensors")
MODELOPT_LAYOUT = Layout(MODELOPT, "weight", "weight_scale_2", ("input_scale", "k_scale", "v_scale"), "modelopt")


def layout(config) -> Layout | None:
    """The NVFP4 layout of `config`'s checkpoint (every weight group NVFP4), or None."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    if qc.get("quant_method") == "modelopt" and str(qc.get("quant_algo", "")).upper() == "NVFP4" \
            and int(qc.get("group_size") or GROUP) == GROUP:
        return MODELOPT_LAYOUT
    groups = list((qc.get("config_groups") or {}).values())
    if qc.get("quant_method") != "compressed-tensors" or not groups:
        return None
    formats = {g.get("format") or qc.get("format") for g in groups}
    weights = [g.get("weights") or {} for g in groups]
    nvfp4 = formats == {FORMAT} and all(w.get("type") == "float" and w.get("num_bits") == 4
                                        and w.get("group_size") == GROUP for w in weights)
    return COMPRESSED_TENSORS if nvfp4 else None


def dequantize_nvfp4(qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, *,
                     dtype: torch.dtype, modelopt: bool = False) -> torch.Tensor:
    """The (out, in) weight in `dtype` from codes (out, in / 2), group scales (out, in / 16) and per-tensor
    scales (out, 1): compressed-tensors' decompression (it divides, and rounds to bfloat16 first), or with
    `modelopt` ModelOpt's (it multiplies, and rounds once), bit for bit."""
    rows = qweight.shape[0]
    codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(rows, -1)  # the even column low
    magnitude = torch.tensor(E2M1, dtype=torch.float32, device=qweight.device)[(codes & 0x07).long()]
    values = torch.where((codes & 0x08).bool(), -magnitude, magnitude)
    second = global_scale.float().reshape(rows, 1)
    scale = scales.float() * second if modelopt else scales.float() / second  # (out, in / 16)
    w = (values.view(rows, scale.shape[1], -1) * scale[..., None]).view(rows, -1)
    return w.to(dtype) if modelopt else w.to(torch.bfloat16).to(dtype)


class Nvfp4Source(CompanionSource):
    """A checkpoint's tensors with each NVFP4 weight's parts shown as the weight `X.weight` they make.
    With `keep`, reading it gives the codes under `X.weight` and the scales beside it (`X.weight` +
    SCALES, + GLOBAL: see `Nvfp4Spec.take`); else the weight de-quantized (float32, exactly)."""

    def __init__(self, src, form: Layout, *, keep: bool):
        self.form, self.keep = form, keep
        keys = set(src.keys())
        self.suffixes = {"qweight": form.codes, "scales": "weight_scale", "global_scale": form.second}
        prefixes = [k[:-len(form.second)] for k in keys if k.endswith("." + form.second)]
        self.packed = {p + "weight": p for p in prefixes if all(p + s in keys for s in self.suffixes.values())}
        parts = {w: [p + s for s in (*self.suffixes.values(), *form.dropped) if p + s in keys and p + s != w]
                 for w, p in self.packed.items()}
        super().__init__(src, parts, virtual={w for w in self.packed if w not in keys},  # compressed-tensors'
                         nibbles={w: p + self.suffixes["qweight"] for w, p in self.packed.items()})

    def read(self, keys) -> dict[str, torch.Tensor]:
        out = self.src.read(self.inner(keys))
        for key in (k for k in keys if k in self.packed):
            prefix = self.packed[key]
            q, scales, glob = (out.pop(prefix + self.suffixes[p]) for p in ("qweight", "scales", "global_scale"))
            for name in self.form.dropped:
                out.pop(prefix + name, None)
            if q.dim() != 2 or scales.shape != (q.shape[0], q.shape[1] * 2 // GROUP) or glob.numel() != 1:
                raise SourceError(f"{key} is an NVFP4 weight whose parts have shapes {list(q.shape)}, "
                                  f"{list(scales.shape)} and {list(glob.shape)}, which do not make one (out, in) "
                                  f"weight in groups of {GROUP}; is the config the one of these weights?")
            glob = glob.float().reshape(1, 1).expand(q.shape[0], 1).contiguous()  # one per row
            if self.keep:
                out[key], out[key + SCALES], out[key + GLOBAL] = q, scales, glob
            else:
                out[key] = dequantize_nvfp4(q, scales, glob, dtype=torch.float32, modelopt=self.form is MODELOPT_LAYOUT)
        return out


@dataclass
class Nvfp4Spec:
    """What a conversion that keeps an NVFP4 checkpoint's precision stores (the converter's counterpart
    of convert.QuantSpec: the same `manifest_entry`/`params`/`store` verbs)."""
    form: Layout
    params: dict = field(default_factory=dict)  # nothing is quantized by the conversion itself

    @property
    def scheme(self) -> str:
        return self.form.scheme

    def manifest_entry(self) -> dict:
        return {"scheme": self.scheme, "source_method": self.form.method, "group_size": GROUP, "embeddings": False}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, dict[str, torch.Tensor]]:
        """{param: {"qweight", "scales", "global_scale"}} for `planned`'s params the source stores in NVFP4,
        popped from `raw`; per-expert weights fused by transformers' conversion, one part at a time."""
        out = {}
        for p in planned.params:
            key = mapping.direct.get(p)
            if key is not None and key + SCALES in raw:
                out[p] = {"qweight": raw.pop(key), "scales": raw.pop(key + SCALES), "global_scale": raw.pop(key + GLOBAL)}
        for first in dict.fromkeys(mapping.made_by[p] for p in planned.params if p in mapping.made_by):
            fusion = mapping.fused[first]
            if fusion.kept_as(raw, SCALES, "NVFP4"):
                parts = {"qweight": "", "scales": SCALES, "global_scale": GLOBAL}
                out.update(fusion.run_parts(raw, model, parts, "NVFP4"))
        return out

    def store(self, name: str, parts: dict, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s parts into `tensors` as they are, and what it expands to into `quantized`."""
        for part, stored in quant_part_names(name, self.scheme).items():
            tensors[stored] = parts[part].contiguous()
        shape = [*parts["qweight"].shape[:-1], parts["qweight"].shape[-1] * 2]
        quantized[name] = {"shape": shape, "dtype": DTYPE_TO_ST[target], "transposed": False}
