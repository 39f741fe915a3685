"""The on-disk format: one safetensors file per layer group plus `manifest.json`.

This module knows the file names and the manifest schema, and reshard/layerfile.py the bytes
of a layer file; `reshard` writes through them and `runtime` reads through them. See
docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import FormatError
from .fileio import write_at

FORMAT_NAME = "reshard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"  # files being written; never taken for finished ones
PROGRESS = "convert-progress.json"  # `reshard convert`'s record of finished groups, for resuming

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_group_file_name(name: str) -> bool:
    """True for names `group_file_name` gives (and their `.partial` temporaries)."""
    return re.fullmatch(r"(embed|norm|head|layers\.\d{5})\.safetensors(\.partial)?", name) is not None


def group_file_name(name: str) -> str:
    """`embed` -> `embed.safetensors`, `layers.7` -> `layers.00007.safetensors`."""
    if name.startswith("layers."):
        return f"layers.{int(name.split('.')[1]):05d}.safetensors"
    return f"{name}.safetensors"


@dataclass
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: list[int]
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass
class Group:
    name: str  # "embed", "layers.<i>", "norm", "head"
    kind: str  # "pre", "layer" or "post": where it runs relative to the decoder layers
    file: str | None  # None for a group whose only parameter is tied to another group's
    bytes: int = 0  # file size
    sha256: str = ""  # of the whole file
    tensors: dict[str, dict] = field(default_factory=dict)  # param name -> {"dtype", "shape"}
    aliases: dict[str, str] = field(default_factory=dict)  # tied param -> the param whose tensor it uses
    # quantized param -> {"shape", "dtype" (safetensors name), "transposed"}: what it expands to;
    # it is stored as the tensors `quant_part_names` gives (see reshard/quant.py)
    quantized: dict[str, dict] = field(default_factory=dict)
    # experts module -> {"num_experts": E, "tensors": [stored names]}: tensors of shape [E, ...] whose
    # expert e is the e-th of E equal, contiguous byte ranges (see `expert_range`); stored first
    experts: dict[str, dict] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)  # stored tensors that are persistent buffers, not parameters


@dataclass
class Manifest:
    source: dict  # {"id": repo id or path, "revision": ..., "commit": ...}
    dtype: str  # dtype of the floating tensors, e.g. "bfloat16"
    architecture: str  # transformers class, e.g. "LlamaForCausalLM"
    layers_path: str  # qualified name of the decoder-layer ModuleList, e.g. "model.layers"
    groups: list[Group]
    quantization: dict | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        raw = asdict(self)
        for g in raw["groups"]:  # optional entries are left out when empty, as before they existed
            for key in ("quantized", "experts", "buffers"):
                if not g[key]:
                    del g[key]
        return json.dumps(raw, indent=1, sort_keys=True) + "\n"

    @property
    def total_bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


# --- quantized parameters ------------------------------------------------------------------

QUANT_PARTS = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros")}


def quant_part_names(param: str, scheme: str) -> dict[str, str]:
    """`X.weight` -> {"qweight": "X.weight.qweight", "scales": ..., ["zeros": ...]}: its stored tensors."""
    return {part: f"{param}.{part}" for part in QUANT_PARTS[scheme]}


def param_names(group: Group, scheme: str | None = None) -> list[str]:
    """The model parameters `group`'s file provides (quantized ones by their own name; buffers not)."""
    stored = set().union(*(quant_part_names(p, scheme).values() for p in group.quantized)) if group.quantized else set()
    stored.update(group.buffers)
    return [n for n in group.tensors if n not in stored] + list(group.quantized)


# --- experts ---------------------------------------------------------------------------------

def stored_names(param: str, tensors) -> list[str]:
    """The stored tensors of parameter `param`: itself, or its quantized parts (see quant_part_names)."""
    if param in tensors:
        return [param]
    return [n for n in (f"{param}.{part}" for part in QUANT_PARTS["int4"]) if n in tensors]


def expert_tensors(group: Group) -> dict[str, int]:
    """{stored tensor name: number of experts} for every expert tensor of `group` (quantized
    expert weights: each of their parts, all [E, ...])."""
    return {name: e["num_experts"] for e in group.experts.values() for param in e["tensors"]
            for name in stored_names(param, group.tensors)}


def expert_range(info: TensorInfo, num_experts: int, expert: int) -> tuple[int, int]:
    """Byte range of `expert` inside the data section: dim 0 of the tensor is the expert."""
    size = info.nbytes // num_experts
    begin = info.offsets[0] + expert * size
    return begin, begin + size


def dense_range(infos: dict[str, TensorInfo], group: Group) -> tuple[int, int]:
    """Bytes [begin, end) of the data section that hold every tensor of the group that is not an
    expert tensor (the writer puts expert tensors before the others of their element size, so in
    a folder of one dtype this range holds no expert byte)."""
    experts = expert_tensors(group)
    ranges = [i.offsets for n, i in infos.items() if n not in experts and i.nbytes]
    return (min(b for b, _ in ranges), max(e for _, e in ranges)) if ranges else (0, 0)


def expert_bytes(group: Group, entry: dict | None = None) -> int:
    """Bytes of the group's expert tensors (those of one experts module `entry`, or all)."""
    names = ([n for p in entry["tensors"] for n in stored_names(p, group.tensors)] if entry is not None
             else expert_tensors(group))
    return sum(numel(group.tensors[n]["shape"]) * ST_TO_DTYPE[group.tensors[n]["dtype"]].itemsize for n in names)


def unquantized_bytes(group: Group, scheme: str | None) -> int:
    """The group's file size had its quantized parameters been stored in their own dtype."""
    size = group.bytes
    for param, info in group.quantized.items():
        for name in quant_part_names(param, scheme).values():
            t = group.tensors[name]
            size -= numel(t["shape"]) * ST_TO_DTYPE[t["dtype"]].itemsize
        size += numel(info["shape"]) * ST_TO_DTYPE[info["dtype"]].itemsize
    return size


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_experts(m: Manifest, path) -> None:
    for g in m.groups:
        for name, count in expert_tensors(g).items():
            shape = g.tensors.get(name, {}).get("shape") or [0]
            if count < 1 or shape[0] != count:
                raise FormatError(f"{path}: expert tensor {name} of group {g.name} is not [{count}, ...]; "
                                  f"run `reshard convert` again")


def _check_quantized(m: Manifest, path) -> None:
    scheme = (m.quantization or {}).get("scheme")
    for g in m.groups:
        if g.quantized and scheme not in QUANT_PARTS:
            raise FormatError(f"{path}: group {g.name} has quantized tensors but the quantization scheme is {scheme!r}")
        for param in g.quantized:
            missing = [n for n in quant_part_names(param, scheme).values() if n not in g.tensors]
            if missing:
                raise FormatError(f"{path}: quantized {param} lacks {missing[0]}; run `reshard convert` again")


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file() and (Path(folder) / PROGRESS).is_file():
        raise FormatError(f"the conversion into {folder} did not finish; run the same `reshard convert` "
                          f"command again to resume it")
    if not path.is_file():
        raise FormatError(f"{folder} holds no {MANIFEST}; create it with `reshard convert SOURCE {folder}`")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT_NAME:
            raise FormatError(f"{path} is not a {FORMAT_NAME} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"{path} has format version {raw.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}; convert the model again with this version's `reshard convert`")
        raw["groups"] = [Group(**g) for g in raw["groups"]]
        manifest = Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(f"{path} is damaged ({e}); run `reshard convert` again") from e
    _check_quantized(manifest, path)
    _check_experts(manifest, path)
    return manifest


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name, so `path` is whole or absent."""
    with writing(path) as f:
        write_at(f.fileno(), data, 0)


@contextlib.contextmanager
def writing(path: Path):
    """A file opened at `path`'s temporary name, fsynced and renamed to `path` on success;
    on failure (a full disk, say) removed, so no partial file stays or takes up space."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # so the error names the file
        raise
    os.replace(tmp, path)
