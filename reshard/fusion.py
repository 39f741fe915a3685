"""Tensors that transformers fuses or splits when it loads a checkpoint, fused the same way.

Many checkpoints store what the instantiated model holds as one parameter in several tensors
(Mixtral's `experts.N.w1.weight` / `w3.weight` per expert become one `experts.gate_up_proj` of
shape [E, 2I, H]), or the other way round. transformers describes each such case with a
`WeightConverter` (source patterns, target patterns, operations such as `MergeModulelist` and
`Concatenate`; see transformers.conversion_mapping). A `Fusion` is one application of such a
converter: the source tensors of one target, in the order transformers collects them, and the
converter itself, so the conversion runs transformers' own operations, one group at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .errors import SourceError


def natural_key(name: str) -> list:
    """Sort key transformers uses for checkpoint names: numbers numerically (`experts.2` before `experts.10`)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


@dataclass
class Fusion:
    converter: object  # the transformers WeightConverter (a template: each run works on a copy)
    target: str  # the first target parameter, by which transformers names the conversion
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> source keys, in order

    @property
    def keys(self) -> list[str]:
        return [k for keys in self.sources.values() for k in keys]

    def targets(self) -> list[str]:
        """Every parameter this conversion produces (several when it splits a tensor)."""
        patterns = self.converter.target_patterns
        return [self.target.replace(patterns[0], p) for p in patterns] if len(patterns) > 1 else [self.target]

    def add(self, pattern: str, key: str) -> None:
        self.sources.setdefault(pattern, []).append(key)

    def sort(self) -> None:
        for keys in self.sources.values():
            keys.sort(key=natural_key)

    def run(self, raw: dict[str, torch.Tensor], model, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Apply the converter to the source tensors in `raw` (popped from it, cast to `dtype`
        first, as transformers does for a checkpoint's tensors; None: left as they are, as it
        does for a GGUF's); return {parameter name: tensor}."""
        conv = copy.deepcopy(self.converter)
        for pattern, keys in self.sources.items():
            for key in keys:
                t = raw.pop(key)
                t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                conv.add_tensor(self.target, key, pattern, lambda t=t: t)
        try:
            out = conv.convert(self.target, model=model, config=model.config)
        except Exception as e:  # transformers' own operations failed on these tensors
            raise SourceError(f"transformers' conversion of {self.keys[0]!r} and {len(self.keys) - 1} more tensor(s) "
                              f"into {self.target!r} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"is the config the one of these weights?") from None
        return {name: (t[0] if isinstance(t, list) else t).contiguous() for name, t in out.items()}


    def kept_as(self, raw: dict, suffix: str, label: str) -> bool:
        """Whether this conversion's source tensors come as a published format `label` kept as stored (each
        key's part `key + suffix` in `raw`): all of them, or none (False); a mix cannot be kept."""
        kept = [k + suffix in raw for k in self.keys]
        if all(kept) or not any(kept):
            return all(kept)
        text = (f"{self.target!r} is made from {label} tensors and unquantized ones such as "
                f"{self.keys[kept.index(False)]!r}, so it cannot be kept in {label}; de-quantize the checkpoint ")
        raise SourceError(text + 'with dtype="bfloat16"', cli=text + "with --dtype bfloat16")

    def run_parts(self, raw: dict[str, torch.Tensor], model, suffixes: dict[str, str], label: str,
                  turns: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """The conversion run on each part of quantized source tensors of format `label` alone ({part:
        suffix}: `key + suffix` in `raw`, popped), each in its own dtype, 8-bit floats as their bytes
        (stacking and concatenation move bytes, no cast); {parameter name: {part: tensor}}. For
        conversions that keep rows whole (stacking experts, joining gate and up: each part's rows follow
        its weight's), and, where the parts are a value and its scale grid (`turns`: FP8), that transpose
        them (Llama 4's per-expert uploads); packed codes cannot be transposed."""
        if not turns and not keeps_rows(self.converter.operations):
            text = (f"{self.target!r} is made from {label} tensors that transformers transposes at load, which "
                    f"their packing does not allow; de-quantize the checkpoint ")
            raise SourceError(text + 'with dtype="bfloat16"', cli=text + "with --dtype bfloat16")
        made = {}
        for part, suffix in suffixes.items():
            values = {k: raw.pop(k + suffix) for k in self.keys}
            dtype = values[self.keys[0]].dtype
            if dtype.is_floating_point and dtype.itemsize == 1:
                values = {k: v.view(torch.uint8) for k, v in values.items()}
            run = self.run(values, model, values[self.keys[0]].dtype)
            made[part] = {name: t.view(dtype) for name, t in run.items()}
        first = next(iter(suffixes))
        return {name: {part: made[part][name] for part in made} for name in made[first]}


def converter_patterns(converters) -> dict[str, object]:
    """source pattern -> the converter it belongs to."""
    return {p: c for c in converters for p in c.source_patterns}


def keeps_rows(operations) -> bool:
    """Whether transformers' operations only stack per-expert (out, in) weights (`MergeModulelist`
    on dim 0) and concatenate them along a dimension before the last: then they may run on each
    re-packed part alone, whose last dimension holds the packed input columns."""
    rank = 2
    for op in operations:
        name, dim = type(op).__name__, getattr(op, "dim", None)
        if name == "MergeModulelist" and dim == 0:
            rank += 1
        elif not (name == "Concatenate" and isinstance(dim, int) and 0 <= dim < rank - 1):
            return False
    return True
