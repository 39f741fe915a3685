"""A converted folder of random weights for any config: for benchmarks and memory tests.

Written group by group through the format writer, so memory stays at about one group
whatever the model's size. The weights are random (std 0.02, norms at 1), not trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .format import DTYPE_TO_ST, MANIFEST, Group, Manifest, dtype_name, group_file_name, write_group_file, write_text_atomic
from .plan import build_empty_model, plan_groups


def write_random_model(config, out: str | Path, *, dtype: torch.dtype = torch.float16, seed: int = 0,
                       device: str | torch.device = "cpu") -> Manifest:
    """Write a converted folder (config.json, layer files, manifest.json) of random weights.

    `device` is where the random numbers are drawn (a GPU draws gigabytes in a blink).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_empty_model(config, dtype=dtype)
    plan = plan_groups(model)
    gen = torch.Generator(device).manual_seed(seed)
    groups = []
    for planned in plan.groups:
        tensors = {name: _random(name, shape, dtype, gen, device) for name, shape in planned.params.items()}
        file = group_file_name(planned.name) if tensors else None
        size, sha = write_group_file(out / file, tensors) if file else (0, "")
        groups.append(Group(name=planned.name, kind=planned.kind, file=file, bytes=size, sha256=sha,
                            tensors={n: {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
                            aliases=dict(planned.aliases)))
        del tensors
    config.save_pretrained(out)
    manifest = Manifest(source={"id": "random", "revision": None, "commit": None}, dtype=dtype_name(dtype),
                        architecture=type(model).__name__, layers_path=plan.layers_path, groups=groups)
    write_text_atomic(out / MANIFEST, manifest.to_json())
    return manifest


def _random(name: str, shape, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    if len(shape) == 1:  # norm weights at one, biases at zero: activations stay in range
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
    return t.cpu()
