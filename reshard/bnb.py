"""bitsandbytes 4-bit checkpoints (`quant_method: "bitsandbytes"`, `load_in_4bit`): NF4 and FP4, the
hub's `*-bnb-4bit` uploads among them.

bitsandbytes stores each quantized linear weight `X.weight` ((out, in) in the model) as uint8
[out * in / 2, 1]: two 4-bit codes a byte over the weight flattened row by row, the first of each
pair in the high nibble. Beside it: `X.weight.quant_map`, the 16 float32 values the codes stand for
(NF4's or FP4's); `X.weight.absmax`, one scale per block of `blocksize` values (float32, or with
double quantization uint8 codes of a second blockwise quantization: `X.weight.nested_absmax`,
`X.weight.nested_quant_map` and the JSON state's `nested_offset`); and the JSON state itself,
`X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): quant type, block size, dtype, shape.

A conversion with default options keeps the codes and the table and stores the scales as the
float32 values bitsandbytes computes from the double quantization (its `dequantize_blockwise`,
then the offset added: float32 products and one sum, done once here): scheme `bnb4-<dtype>`,
parts `X.weight.qweight` (out, in / 2), `.absmax` (blocks,) and `.code` (16,). That is 36 bytes per
64 weights against the source's 33. `<dtype>` is the state's: bitsandbytes rounds each value to it
(`code[q] * absmax` in float32, then the dtype) before the model's compute dtype sees it, and so
does the expansion here (`dequantize_bnb4`). An explicit `--dtype` or `--quantize` de-quantizes
while reading. 8-bit bitsandbytes (LLM.int8) is refused (reshard/published.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .errors import SourceError
from .format import BNB4 as PREFIX, BNB4_DTYPES, DTYPE_TO_ST, quant_part_names
from .source import CompanionSource

DTYPES = {name: getattr(torch, name) for name in BNB4_DTYPES}  # the dtypes a state may name
STATE = ".quant_state.bitsandbytes__"  # `X.weight` + this + quant type: the JSON state
AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def is_bnb4(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else {})
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))


def dequantize_bnb4(qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *, rounded: torch.dtype,
                    dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` from codes (out, in / 2), float32 block scales and the code
    table: bitsandbytes' `dequantize_4bit` (`code[q] * absmax` in float32, rounded to `rounded`)."""
    rows = qweight.shape[0]
    codes = torch.stack([qweight >> 4, qweight & 0x0F], dim=-1).reshape(-1)  # the first value in the high nibble
    values = code.float()[codes.long()].view(absmax.numel(), -1) * absmax.float()[:, None]
    return values.to(rounded).view(rows, -1).to(dtype)


def scales(parts: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    """A weight's float32 block scales: `absmax` as stored, or with double quantization bitsandbytes'
    `nested_quant_map[absmax] * nested_absmax` by blocks of `nested_blocksize`, plus `nested_offset`."""
    absmax = parts["absmax"]
    if "nested_absmax" not in parts:
        return absmax.float().reshape(-1)
    values = parts["nested_quant_map"].float()[absmax.reshape(-1).long()]
    size, n = int(state["nested_blocksize"]), values.numel()
    nested = parts["nested_absmax"].float().reshape(-1)
    padded = torch.nn.functional.pad(values, (0, -n % size)).view(-1, size) * nested[:, None]
    return padded.reshape(-1)[:n] + torch.tensor(float(state["nested_offset"]), dtype=torch.float32)


@dataclass
class Bnb4Weight:
    """One weight read as stored: the parts a conversion keeps, the scheme, and its (out, in) shape."""
    shape: list[int]
    scheme: str
    parts: dict[str, torch.Tensor]

    def dim(self) -> int:
        return len(self.shape)


class Bnb4Source(CompanionSource):
    """A checkpoint's tensors with each 4-bit weight's companions (scales, tables, state) hidden behind
    the weight: reading `X.weight` reads them too and gives a `Bnb4Weight` with `keep`, else the weight
    de-quantized (float32, holding the values of the state's dtype exactly)."""

    def __init__(self, src, *, keep: bool):
        self.keep = keep
        keys = set(src.keys())
        self.states = {k.partition(STATE)[0]: k for k in keys if STATE in k}  # `X.weight` -> its state's key
        super().__init__(src, {k: [state, *(k + a for a in AUX if k + a in keys)] for k, state in self.states.items()})

    def shapes(self):  # a packed weight's shape is in its state, known only once read: checked as it is stored
        return {k: s for k, s in super().shapes().items() if k not in self.states}

    def read(self, keys) -> dict:
        out = self.src.read(self.inner(keys))
        for key in (k for k in keys if k in self.states):
            raw = {c[len(key) + 1:]: out.pop(c) for c in self.companions[key]}
            state = json.loads(bytes(raw.pop(self.states[key][len(key) + 1:]).tolist()))
            weight = self._weight(key, out.pop(key), raw, state)
            out[key] = weight if self.keep else dequantize_bnb4(
                **weight.parts, rounded=DTYPES[weight.scheme[len(PREFIX):]], dtype=torch.float32).view(weight.shape)
        return out

    @staticmethod
    def _weight(key: str, packed: torch.Tensor, raw: dict, state: dict) -> Bnb4Weight:
        shape, dtype = [int(n) for n in state.get("shape", ())], str(state.get("dtype", "")).removeprefix("torch.")
        absmax = scales(raw, state)
        if len(shape) != 2 or packed.numel() * 2 != shape[0] * shape[1] or shape[1] % 2 or dtype not in DTYPES \
                or (shape[0] * shape[1]) % absmax.numel() or raw["quant_map"].numel() != 16:
            raise SourceError(f"{key} is a 4-bit bitsandbytes weight of shape {shape} (dtype {dtype!r}, "
                              f"{absmax.numel()} blocks) that reshard cannot keep; convert with --dtype float16 "
                              f"(or bfloat16) to de-quantize it")
        qweight = packed.view(torch.uint8).reshape(shape[0], shape[1] // 2)
        return Bnb4Weight(shape, PREFIX + dtype, {"qweight": qweight, "absmax": absmax,
                                                  "code": raw["quant_map"].float().reshape(16)})


@dataclass
class Bnb4Spec:
    """What a conversion that keeps a bitsandbytes checkpoint's 4-bit weights stores (the converter's
    counterpart of convert.QuantSpec: the same `manifest_entry`/`params`/`store` verbs)."""
    quant_type: str  # "nf4" or "fp4" (recorded)
    params: dict = field(default_factory=dict)  # nothing is quantized by the conversion itself

    @classmethod
    def for_config(cls, config) -> "Bnb4Spec":
        qc = config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        return cls(str(qc.get("bnb_4bit_quant_type", "fp4")))

    def manifest_entry(self) -> dict:
        # each weight names its own scheme (`bnb4-<its state's dtype>`); the folder's names the format
        return {"scheme": self.quant_type, "source_format": "bitsandbytes", "embeddings": False}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, Bnb4Weight]:
        """{param: Bnb4Weight} for `planned`'s params the source stores in 4 bits, popped from `raw`."""
        out = {}
        for p in planned.params:
            key = mapping.direct.get(p)
            if key is not None and isinstance(raw.get(key), Bnb4Weight):
                out[p] = raw.pop(key)
        for key, value in raw.items():
            if isinstance(value, Bnb4Weight):
                raise SourceError(f"{key} is a 4-bit bitsandbytes weight that transformers combines with others "
                                  f"at load; convert with --dtype float16 (or bfloat16) to de-quantize it")
        return out

    def store(self, name: str, weight: Bnb4Weight, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s codes, scales and table into `tensors`, and what they expand to into `quantized`."""
        for part, stored in quant_part_names(name, weight.scheme).items():
            tensors[stored] = weight.parts[part].contiguous()
        quantized[name] = {"shape": list(weight.shape), "dtype": DTYPE_TO_ST[target], "transposed": False,
                           "scheme": weight.scheme}
