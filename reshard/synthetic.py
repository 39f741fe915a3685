"""A converted folder of random weights for any config: for benchmarks and memory tests.

Written group by group through the format writer, so memory stays at about one group
whatever the model's size. The weights are random (std 0.02, norms at 1), not trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .convert import QuantSpec
from .fp8 import SCALE, Fp8Spec, Layout, quantize_fp8, regrid
from .format import (DTYPE_TO_ST, MANIFEST, Group, Manifest, dtype_name, group_file_name, stored_names,
                     write_group_file, write_text_atomic)
from .plan import build_empty_model, plan_groups
from .quant import DEFAULT_GROUP, quantizable_params

FP8_BLOCK = [128, 128]  # the block scales DeepSeek-V3 and Qwen3-*-FP8 publish


def write_random_model(config, out: str | Path, *, dtype: torch.dtype = torch.float16, seed: int = 0,
                       device: str | torch.device = "cpu", quantize: str | None = None,
                       quantize_group: int = DEFAULT_GROUP) -> Manifest:
    """Write a converted folder (config.json, layer files, manifest.json) of random weights.

    `device` is where the random numbers are drawn (a GPU draws gigabytes in a blink).
    `quantize` ("int8" or "int4", group size `quantize_group`) stores the decoder layers' linear
    weights as `reshard convert --quantize` does, quantized on `device`; the same seed draws
    the same weights, so a quantized folder is the fp16 one's weights, quantized. "fp8" stores
    them as a default conversion keeps a published fp8 checkpoint (scheme fp8-block, float8_e4m3fn
    with 128x128 block scales), experts one range each.
    """
    out = Path(out)
    model = build_empty_model(config, dtype=dtype)
    plan = plan_groups(model)
    if quantize == "fp8":
        quant = _Fp8Random(Layout("fp8", SCALE, (), FP8_BLOCK),
                           params={p: t for p, t in quantizable_params(model, plan).items() if not t})
    else:
        quant = QuantSpec.for_model(model, plan, quantize, quantize_group) if quantize else None
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    groups = [_write_group(planned, out, dtype, gen, device, quant) for planned in plan.groups]
    config.save_pretrained(out)
    manifest = Manifest(source={"id": "random", "revision": None, "commit": None}, dtype=dtype_name(dtype),
                        architecture=type(model).__name__, layers_path=plan.layers_path, groups=groups,
                        quantization=quant.manifest_entry() if quant else None)
    write_text_atomic(out / MANIFEST, manifest.to_json())
    return manifest


def _write_group(planned, out: Path, dtype: torch.dtype, gen: torch.Generator, device,
                 quant: QuantSpec | None) -> Group:
    tensors, quantized = {}, {}
    for name, shape in planned.params.items():
        t = _random(name, shape, dtype, gen, device)
        stored = {}
        if quant and name in quant.params:
            quant.store(name, t, dtype, stored, quantized)
        else:
            stored[name] = t
        tensors.update((n, s.cpu()) for n, s in stored.items())  # one tensor on the device at a time
        del t, stored
    experts = {m: dict(e) for m, e in planned.experts.items()}
    first = {n for e in experts.values() for p in e["tensors"] for n in stored_names(p, tensors)}
    file = group_file_name(planned.name) if tensors else None
    size, sha = write_group_file(out / file, tensors, first) if file else (0, "")
    return Group(name=planned.name, kind=planned.kind, file=file, bytes=size, sha256=sha,
                 tensors={n: {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
                 aliases=dict(planned.aliases), quantized=quantized, experts=experts)


class _Fp8Random(Fp8Spec):
    """Fp8Spec's store, fed a float weight: quantized to fp8 with block scales first (each expert
    of an [E, out, in] tensor alone), the scale grid made to divide the weight as the converter's does."""

    def store(self, name: str, t: torch.Tensor, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        pairs = [quantize_fp8(w, tuple(self.form.block)) for w in (t if t.dim() == 3 else [t])]
        q = torch.stack([p[0] for p in pairs]) if t.dim() == 3 else pairs[0][0]
        scales = [regrid(s, w.shape, self.form.block) for (_, s), w in zip(pairs, t if t.dim() == 3 else [t])]
        super().store(name, {"qweight": q, "scale_inv": torch.stack(scales) if t.dim() == 3 else scales[0]},
                      target, tensors, quantized)


def _random(name: str, shape, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    """Drawn on `device` and left there (the caller moves it to the CPU)."""
    if len(shape) == 1:  # norm weights at one, biases at zero: activations stay in range
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
