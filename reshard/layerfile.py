"""The bytes of a layer file: a plain safetensors file (readable by `safetensors.safe_open`),
written deterministically and read through a memory map.

Tensors are ordered by element size (largest first) then name, so every tensor's offset is a
multiple of its element size and can be viewed in place; the JSON header has sorted keys and
is padded with spaces to a multiple of 8 bytes (of EXPERT_ALIGN where experts are stored, so
that each expert's range can be read alone and is as aligned as a fresh allocation).
The manifest and the file names are reshard/format.py's. See docs/FORMAT.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorruptFileError, FormatError
from .fileio import Digest, copy_at, write_at
from .format import DTYPE_TO_ST, ST_TO_DTYPE, Group, TensorInfo, numel, writing

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _LIBC = None


EXPERT_ALIGN = 64  # data section start in files with expert tensors (see build_header)


def _ordered(tensors: dict[str, torch.Tensor], first=frozenset()) -> list[str]:
    return sorted(tensors, key=lambda k: (-tensors[k].element_size(), k not in first, k))


def build_header(tensors: dict[str, torch.Tensor], first=frozenset()) -> bytes:
    """The safetensors header (length prefix included) for `tensors`, in our canonical order.

    Tensors in `first` (expert tensors) come before the others of their element size, and the
    header is then padded so that the data section starts at a multiple of EXPERT_ALIGN: the
    experts are then as aligned in a memory map as in a fresh allocation, which CPU matmul
    kernels need to give bit-identical results."""
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
    text += b" " * (-(len(text) + 8) % EXPERT_ALIGN if first else -len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class FileSlice:
    """A tensor whose bytes already lie, as stored, in another file: written by copying them there."""

    path: Path
    offset: int  # of its first byte in `path`
    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        return numel(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


def write_group_file(path: Path, tensors: dict[str, torch.Tensor | FileSlice], first=frozenset()) -> tuple[int, str]:
    """Write `tensors` to `path` atomically (temp name, fsync, rename); return (bytes, sha256).
    Tensors in `first` are expert tensors (see `build_header`).

    No tensor byte is copied in Python: tensors are written from their own memory, `FileSlice`s
    copied from their file by the kernel, and the sha256 is computed on another thread meanwhile.
    """
    header = build_header(tensors, first)
    with writing(path) as f, Digest() as digest:
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
