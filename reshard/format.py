"""The on-disk format: one safetensors file per layer group plus `manifest.json`.

This is the only module that knows file names, the manifest schema and the byte layout;
`reshard` writes through it and `runtime` reads through it (one home for the format, writer and
reader together, is why it is longer than the other modules). See docs/FORMAT.md.

A layer file is a plain safetensors file (readable by `safetensors.safe_open`) written
deterministically: tensors ordered by element size (largest first) then name, those of whole
multiples of 64 bytes first (see `_ordered`), so every tensor's offset is a multiple of its
element size and can be viewed in place, and the weights lie 64-byte aligned; the JSON header has
sorted keys and is padded with spaces so that the data starts at a multiple of 64 bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import CorruptFileError, FormatError
from .fileio import Digest, copy_at, write_at
from .ggml_quants import BLOCK_TYPES

FORMAT_NAME = "reshard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"  # files being written; never taken for finished ones
PROGRESS = "convert-progress.json"  # `reshard convert`'s record of finished groups, for resuming
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _LIBC = None

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
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

ACT_ORDER = "int4-act"  # int4 with its columns gathered group by group (act-order GPTQ: reshard/published.py)
# bitsandbytes' 4-bit weights (reshard/bnb.py): + the dtype their values are rounded to ("bnb4-bfloat16")
BNB4 = "bnb4-"
BNB4_DTYPES = ("float32", "float16", "bfloat16")
REORDERED = "-reordered"  # GGML blocks whose stored columns are in another order (see QUANT_PARTS)
QUANT_PARTS = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros"),
               "int4-sym": ("qweight", "scales"),  # int4 with zeros = -8 * scales (GGUF Q4_0: reshard/ggml_repack.py)
               # int4 over the columns in act order; `columns` (in,) int32: each weight column's place there
               ACT_ORDER: ("qweight", "scales", "zeros", "columns"),
               "fp8-block": ("qweight", "scale_inv"),  # reshard/fp8.py
               "mxfp4": ("blocks", "scales"),  # reshard/mxfp4.py
               # e2m1 codes (out, in / 2) uint8, F8_E4M3 scales per 16, F32 global scale per row (reshard/nvfp4.py)
               "nvfp4": ("qweight", "scales", "global_scale"), "nvfp4-modelopt": ("qweight", "scales", "global_scale"),
               # codes (out, in / 2) uint8, float32 scales per block, the codes' 16 values (reshard/bnb.py)
               **{BNB4 + d: ("qweight", "absmax", "code") for d in BNB4_DTYPES},
               # GGML blocks kept as in a GGUF file (reshard/ggml_quants.py): one uint8 part
               **{s: ("blocks",) for s in BLOCK_TYPES},
               # GGML blocks whose columns the model takes in another order (a Qwen3.5 GGUF's
               # linear-attention output projection, regrouped by value head): `columns` (in,) int32,
               # as act order's, gives each weight column's place in the stored ones
               **{s + REORDERED: ("blocks", "columns") for s in BLOCK_TYPES}}


def reordered(scheme: str) -> str:
    """The scheme of `scheme`'s GGML blocks stored with their columns in another order."""
    return scheme + REORDERED


def blocks_of(scheme: str) -> str | None:
    """The GGML block scheme a reordered-columns scheme stores its blocks in, or None for any other."""
    return scheme[:-len(REORDERED)] if scheme.endswith(REORDERED) else None


def quant_part_names(param: str, scheme: str) -> dict[str, str]:
    """`X.weight` -> {"qweight": "X.weight.qweight", "scales": ..., ["zeros": ...]}: its stored tensors."""
    return {part: f"{param}.{part}" for part in QUANT_PARTS[scheme]}


def scheme_of(group: Group, param: str, folder_scheme: str | None) -> str | None:
    """The scheme quantized `param` of `group` is stored in: its own entry's `"scheme"` where it
    has one (a GGUF mixes block types per tensor), else the folder's `quantization.scheme`."""
    return group.quantized[param].get("scheme", folder_scheme)


def param_names(group: Group, scheme: str | None = None) -> list[str]:
    """The model parameters `group`'s file provides (quantized ones by their own name; buffers not)."""
    stored = set().union(*(quant_part_names(p, scheme_of(group, p, scheme)).values()
                           for p in group.quantized)) if group.quantized else set()
    stored.update(group.buffers)
    return [n for n in group.tensors if n not in stored] + list(group.quantized)


# --- experts ---------------------------------------------------------------------------------

def stored_names(param: str, tensors) -> list[str]:
    """The stored tensors of parameter `param`: itself, or its quantized parts (see quant_part_names)."""
    if param in tensors:
        return [param]
    parts = dict.fromkeys(part for names in QUANT_PARTS.values() for part in names)  # every scheme's
    return [n for n in (f"{param}.{part}" for part in parts) if n in tensors]


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
    return sum(_numel(group.tensors[n]["shape"]) * ST_TO_DTYPE[group.tensors[n]["dtype"]].itemsize for n in names)


def row_gathered(manifest: Manifest) -> tuple[int, str, int] | None:
    """(group index, tensor name, bytes of one row) of the input embeddings where a streamed pass
    reads only the rows it looks up (runtime/embedrows.py): the first group ("pre") holds one
    unquantized 2-D tensor, with no alias, that no other group borrows (a tied head would)."""
    for i, group in enumerate(manifest.groups):
        if group.kind != "pre":
            continue
        if len(group.tensors) != 1 or group.quantized or group.aliases or not group.file:
            return None
        name, info = next(iter(group.tensors.items()))
        borrowed = any(target == name for g in manifest.groups for target in g.aliases.values())
        if len(info["shape"]) != 2 or borrowed:
            return None
        return i, name, info["shape"][1] * ST_TO_DTYPE[info["dtype"]].itemsize
    return None


def unquantized_bytes(group: Group, scheme: str | None) -> int:
    """The group's file size had its quantized parameters been stored in their own dtype."""
    size = group.bytes
    for param, info in group.quantized.items():
        for name in quant_part_names(param, scheme_of(group, param, scheme)).values():
            t = group.tensors[name]
            size -= _numel(t["shape"]) * ST_TO_DTYPE[t["dtype"]].itemsize
        size += _numel(info["shape"]) * ST_TO_DTYPE[info["dtype"]].itemsize
    return size


def _numel(shape) -> int:
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
    folder_scheme = (m.quantization or {}).get("scheme")
    for g in m.groups:
        for param in g.quantized:
            scheme = scheme_of(g, param, folder_scheme)
            if scheme is None:
                raise FormatError(f"{path}: group {g.name} has quantized tensors but the quantization scheme is {scheme!r}")
            if scheme not in QUANT_PARTS:  # a folder written by a newer reshard (a format added since)
                raise FormatError(f"{path}: {param} is stored as {scheme!r}, which this version of reshard does not "
                                  f"read; update reshard, or convert the model again with this version")
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
    with _writing(path) as f:
        write_at(f.fileno(), data, 0)


@contextlib.contextmanager
def _writing(path: Path):
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


# --- layer files ---------------------------------------------------------------------------

ALIGN = 64  # the data section's start in a file, and of each tensor it can align (see _ordered)


def _ordered(tensors: dict[str, torch.Tensor], first=frozenset()) -> list[str]:
    """By element size (largest first), then name, with two refinements:
    - tensors whose bytes are a whole multiple of ALIGN come before the others (of the file, or
      of the experts and of the rest): each then starts ALIGN-aligned in a memory map, as in a
      fresh allocation, and CPU matmul kernels round an operand by its alignment (so only then
      do generation's one-row products give transformers' bits on fresh weights);
    - expert tensors (`first`) before all the others when their bytes add up to a multiple of 8
      (the others keep their alignment after them; of ALIGN, their ALIGN too), else before the
      others of their element size. Either way, in a folder of one dtype, one byte range holds
      every non-expert tensor; with experts of several element sizes (quantized parts) only the
      first keeps expert bytes out of that range (`dense_range`)."""
    size = {k: tensors[k].element_size() for k in tensors}
    nbytes = {k: tensors[k].numel() * size[k] for k in tensors}
    experts = sum(nbytes[k] for k in tensors if k in first)
    apart, aligned = experts % 8 == 0, experts % ALIGN == 0
    return sorted(tensors, key=lambda k: (apart and k not in first, aligned and nbytes[k] % ALIGN != 0, -size[k],
                                          k not in first, k))


def build_header(tensors: dict[str, torch.Tensor], first=frozenset()) -> bytes:
    """The safetensors header (length prefix included) for `tensors`, in our canonical order.

    Tensors in `first` are expert tensors (see `_ordered`). The header is padded so that the data
    section starts at a multiple of ALIGN: the tensors `_ordered` aligns are then as aligned in a
    memory map as in a fresh allocation."""
    entries, offset = {}, 0
    for name in _ordered(tensors, first):
        t = tensors[name]
        if t.dtype not in DTYPE_TO_ST:
            raise FormatError(f"tensor {name} has dtype {t.dtype}, which the format cannot store")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % ALIGN)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class FileSlice:
    """A tensor whose bytes already lie, as stored, in another file: written by copying them there."""

    path: Path
    offset: int  # of its first byte in `path`
    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        return _numel(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


def write_group_file(path: Path, tensors: dict[str, torch.Tensor | FileSlice], first=frozenset()) -> tuple[int, str]:
    """Write `tensors` to `path` atomically (temp name, fsync, rename); return (bytes, sha256).
    Tensors in `first` are expert tensors (see `build_header`).

    No tensor byte is copied in Python: tensors are written from their own memory, `FileSlice`s
    copied from their file by the kernel, and the sha256 is computed on another thread meanwhile.
    """
    header = build_header(tensors, first)
    with _writing(path) as f, Digest() as digest:
        fd, offset = f.fileno(), 0
        for piece in [header, *(tensors[name] for name in _ordered(tensors, first))]:
            if isinstance(piece, FileSlice):
                nbytes = piece.numel() * piece.element_size()
                digest.update_from_file(piece.path, piece.offset, nbytes)
                copy_at(piece.path, piece.offset, nbytes, fd, offset)
            else:
                data = piece if isinstance(piece, bytes) else _tensor_bytes(piece)
                digest.update(data)
                write_at(fd, data, offset)
                nbytes = len(data)
            offset += nbytes
        sha = digest.hexdigest()
    return offset, sha


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_header(path: str | os.PathLike, file_size: int | None = None) -> tuple[dict[str, TensorInfo], int]:
    """Parse a safetensors header; return ({name: TensorInfo}, start of the data section)."""
    size = os.path.getsize(path) if file_size is None else file_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(path, "file is truncated (no header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, 100 << 20):
            raise CorruptFileError(path, "header length is out of range")
        try:
            raw = json.loads(f.read(n))
        except ValueError:
            raise CorruptFileError(path, "header is not valid JSON") from None
    raw.pop("__metadata__", None)
    infos = {}
    for name, e in raw.items():
        try:
            infos[name] = TensorInfo(e["dtype"], list(e["shape"]), tuple(e["data_offsets"]))
        except (KeyError, TypeError):
            raise CorruptFileError(path, f"header entry {name!r} is malformed") from None
    data_start = 8 + n
    end = max((i.offsets[1] for i in infos.values()), default=0)
    if data_start + end != size:
        raise CorruptFileError(path, f"size is {size} bytes, header describes {data_start + end}")
    return infos, data_start


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_group_file(path: Path, group: Group, *, checksum: bool = False) -> tuple[dict[str, TensorInfo], int]:
    """Check one layer file against its manifest entry: present, size, header, tensor names,
    dtypes and shapes, and (if `checksum`) its sha256. Return `read_header`'s result;
    raise `CorruptFileError` naming the file."""
    if not path.is_file():
        raise CorruptFileError(path, "file is missing")
    size = path.stat().st_size
    if size != group.bytes:
        raise CorruptFileError(path, f"size is {size} bytes, manifest says {group.bytes}")
    infos, data_start = read_header(path, size)
    if set(infos) != set(group.tensors):
        missing = sorted(set(group.tensors) - set(infos))
        extra = sorted(set(infos) - set(group.tensors))
        raise CorruptFileError(path, f"tensors differ from the manifest (missing {missing}, extra {extra})")
    for name, want in group.tensors.items():
        got = infos[name]
        if got.dtype != want["dtype"] or got.shape != list(want["shape"]):
            raise CorruptFileError(path, f"tensor {name} is {got.dtype}{got.shape}, manifest says "
                                         f"{want['dtype']}{want['shape']}")
    if checksum and file_sha256(path) != group.sha256:
        raise CorruptFileError(path, "checksum differs from the manifest (the file is damaged)")
    return infos, data_start


class GroupFile:
    """A layer file mapped into memory; tensors are views of the mapping (no copy).

    The mapping is private (copy-on-write), so a tensor modified in place never
    writes back to the file.
    """

    def __init__(self, path: str | os.PathLike, group: Group):
        self.path = Path(path)
        self.infos, self.data_start = check_group_file(self.path, group)
        with open(self.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.nbytes = group.bytes
        self._views: dict[str, torch.Tensor] = {}
        anchor = ctypes.c_char.from_buffer(self.mm)  # only to learn the mapping's address
        self._address = ctypes.addressof(anchor)
        del anchor

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` as a view of the mapping, made once: it stays valid after `evict()`
        (the pages come back from the page cache on the next touch)."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self._view(name)
        return view

    def _view(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = ST_TO_DTYPE[info.dtype]
        count = info.nbytes // dtype.itemsize
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        t = torch.frombuffer(self.mm, dtype=dtype, count=count, offset=self.data_start + info.offsets[0])
        return t.view(info.shape)

    def view_of(self, flat: torch.Tensor, name: str, base: int = 0) -> torch.Tensor:
        """Tensor `name` as a view of `flat`, a copy of the data section (uint8) from byte `base` on, anywhere."""
        info = self.infos[name]
        begin, end = info.offsets
        return flat[begin - base:end - base].view(ST_TO_DTYPE[info.dtype]).view(info.shape)

    def data(self, span: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole data section, or bytes `span` of it, as uint8 (for one bulk copy)."""
        n = len(self.mm) - self.data_start
        begin, end = span or (0, n)
        if end <= begin:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)

    def touch(self, span: tuple[int, int] | None = None) -> None:
        """Fault the file's pages into memory (page cache) ahead of use: all of them, or those
        of `span`, a byte range of the data section."""
        begin, end = (0, len(self.mm)) if span is None else (self.data_start + span[0], self.data_start + span[1])
        begin -= begin % mmap.PAGESIZE
        if end <= begin:
            return
        # One call maps every page (Linux >= 5.14). Through ctypes, which lets go of the GIL:
        # mmap.madvise holds it, and the compute thread would wait for the disk with it.
        if _LIBC is not None and _LIBC.madvise(ctypes.c_void_p(self._address + begin), ctypes.c_size_t(end - begin),
                                               MADV_POPULATE_READ) == 0:
            return
        self.mm.madvise(mmap.MADV_WILLNEED, begin, end - begin)
        # Reading one word per page faults every page in (torch lets go of the GIL too).
        n = (end - begin) // 8
        if n:
            torch.frombuffer(self.mm, dtype=torch.int64, count=n, offset=begin)[:: mmap.PAGESIZE // 8].sum()

    def forget_views(self) -> None:
        self._views.clear()

    def evict(self) -> None:
        """Drop this process's mapping of the pages (the page cache keeps them)."""
        self.mm.madvise(mmap.MADV_DONTNEED)
