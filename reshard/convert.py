"""`reshard convert`: rewrite a checkpoint as one safetensors file per layer group.

Work goes group by group and tensor by tensor: the source is read with plain reads (or a
mapped `torch.load` for `.bin`), so peak memory is about one layer whatever the shard size.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import hub
from .errors import SourceError, UsageError
from .format import DTYPE_NAMES, DTYPE_TO_ST, Group, Manifest, dtype_name, group_file_name, quant_part_names, write_group_file, write_text_atomic, MANIFEST
from .keymap import check_shape, map_keys
from .plan import build_empty_model, plan_groups
from .quant import DEFAULT_GROUP, check_scheme, quantizable_params, quantize as quantize_weight
from .source import SIDE_FILES, GGUFSource, Source, open_local


def open_source(source: str, *, revision: str | None = None, token: str | None = None) -> Source:
    path = Path(source).expanduser()
    if path.exists() or not hub.looks_like_repo_id(source):
        return open_local(path)
    folder, info = hub.fetch(source, revision=revision, token=token)
    return open_local(folder, info)


def resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = DTYPE_NAMES.get(dtype)
        return dtype if dtype in DTYPE_NAMES.values() else torch.float32
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {name!r}; use auto, float16, bfloat16 or float32")
    return DTYPE_NAMES[name]


def convert(source: str, out: str | Path, *, revision: str | None = None, dtype: str = "auto",
            token: str | None = None, trust_remote_code: bool = False, progress: bool = True,
            quantize: str | None = None, quantize_group: int = DEFAULT_GROUP,
            quantize_embeddings: bool = False) -> Manifest:
    """Convert `source` (hub repo id, checkpoint folder or .gguf file) into `out`.

    `quantize` ("int8" or "int4", group size `quantize_group`) stores the decoder layers'
    linear weights (and the embeddings/head if `quantize_embeddings`) quantized; see reshard/quant.py.
    """
    from transformers import AutoConfig

    if quantize:
        check_scheme(quantize, quantize_group)
    out = Path(out)
    src = open_source(source, revision=revision, token=token)
    try:
        try:
            config = AutoConfig.from_pretrained(src.folder, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise SourceError(f"transformers cannot read the config of {source}: {str(e).splitlines()[0]}") from None
        target = resolve_dtype(dtype, config)
        model = build_empty_model(config, dtype=target, trust_remote_code=trust_remote_code)
        plan = plan_groups(model)
        if isinstance(src, GGUFSource):
            src.load(model)
        params = {p: s for g in plan.groups for p, s in g.params.items()}
        mapping = map_keys(model, src.keys(), params, aliases=plan.tied)
        out.mkdir(parents=True, exist_ok=True)
        _copy_side_files(src.folder, out)
        quant = _QuantSpec(quantize, quantize_group, quantizable_params(model, plan, embeddings=quantize_embeddings)) \
            if quantize else None
        groups = _write_groups(src, plan, mapping, out, target, progress, quant)
        manifest = Manifest(
            source=src.info, dtype=dtype_name(target), architecture=type(model).__name__,
            layers_path=plan.layers_path, groups=groups, quantization=quant and quant.manifest_entry(quantize_embeddings))
        write_text_atomic(out / MANIFEST, manifest.to_json())
        return manifest
    finally:
        src.close()


def _copy_side_files(folder: Path, out: Path) -> None:
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)


@dataclass
class _QuantSpec:
    scheme: str  # "int8" or "int4"
    group: int  # int4 group size
    params: dict[str, bool]  # param to quantize -> stored transposed (Conv1D)

    def manifest_entry(self, embeddings: bool) -> dict:
        return {"scheme": self.scheme, "group_size": self.group if self.scheme == "int4" else None,
                "embeddings": embeddings}

    def store(self, name: str, t: torch.Tensor, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s quantized parts into `tensors`, and what it expands to into `quantized`."""
        transposed = self.params[name]
        w = t.t() if transposed else t
        parts = quantize_weight(w, self.scheme, group=self.group, dtype=target)
        for part, stored in quant_part_names(name, self.scheme).items():
            tensors[stored] = parts[part]
        quantized[name] = {"shape": list(t.shape), "dtype": DTYPE_TO_ST[target], "transposed": transposed}


def _write_groups(src: Source, plan, mapping, out: Path, target: torch.dtype, progress: bool,
                  quant: _QuantSpec | None = None) -> list[Group]:
    total = sum(s.numel() for g in plan.groups for s in g.params.values()) * target.itemsize
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="reshard", file=sys.stderr, disable=not progress)
    groups = []
    with bar:
        for planned in plan.groups:
            raw = src.read([mapping[p] for p in planned.params])
            tensors, quantized = {}, {}
            for pname, shape in planned.params.items():
                t = raw.pop(mapping[pname])
                check_shape(pname, t, shape)
                if quant and pname in quant.params:
                    quant.store(pname, t, target, tensors, quantized)
                else:
                    tensors[pname] = t.to(target) if t.is_floating_point() else t
            file = group_file_name(planned.name) if tensors else None
            size, sha = write_group_file(out / file, tensors) if file else (0, "")
            groups.append(Group(
                name=planned.name, kind=planned.kind, file=file, bytes=size, sha256=sha,
                tensors={n: {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
                aliases=dict(planned.aliases), quantized=quantized))
            bar.update(sum(s.numel() for s in planned.params.values()) * target.itemsize)
            del tensors, raw
    return groups
