"""Checkpoints to convert: a local folder (safetensors or pytorch `.bin`) or a hub repo id
(fetched by `reshard.hub`); `.gguf` files are `reshard.gguf_source`. Tensors are read one at a time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import CorruptFileError, SourceError
from .format import ST_TO_DTYPE, FileSlice, read_header

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "tiktoken.model",  # Kimi-K2's vocabulary (reshard/tiktoken_vocab.py)
)
# hf_quant_config.json: NVIDIA ModelOpt's quantization, which older exports keep out of config.json
SIDE_FILES = ("config.json", "generation_config.json", "hf_quant_config.json", *TOKENIZER_FILES)
# a part of a split GGUF (llama.cpp's gguf-split names): "Model-Q4_K_M-00002-of-00005.gguf"
GGUF_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class CompanionSource:
    """A source seen through a published quantized format: a weight's companions (scales, states, the
    parts of packed codes) hidden behind the key the model asks for, `companions[key]`, and read, wanted
    and finished with it. `virtual`: keys the wrapped source lacks, made from their companions alone (a
    compressed-tensors weight is its `weight_packed` and scales); `nibbles`: keys whose shape is their packed
    codes' with twice the columns. Subclasses give `read` (and may narrow `shapes`); anything else (folder, info, read_ahead, close, what --low-disk sources add) is the wrapped
    source's."""

    def __init__(self, src, companions: dict[str, list[str]], virtual=frozenset(), nibbles: dict[str, str] | None = None):
        self.src, self.companions, self.virtual = src, companions, frozenset(virtual)
        self.nibbles = nibbles or {}  # key -> the tensor of its 4-bit codes, two a byte: (out, in / 2) for (out, in)
        self.hidden = {c for cs in companions.values() for c in cs}

    def __getattr__(self, name):
        if name == "src":  # not set yet (unpickling, a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.src, name)

    def keys(self) -> list[str]:
        return [k for k in self.src.keys() if k not in self.hidden and k not in self.virtual] + sorted(self.virtual)

    def shapes(self):
        shapes = self.src.shapes()
        out = {k: s for k, s in shapes.items() if k not in self.hidden}
        for key, codes in self.nibbles.items():
            if codes in shapes and len(shapes[codes]) == 2:
                out[key] = [shapes[codes][0], shapes[codes][1] * 2]
        return out

    def locate(self, key):
        return None if key in self.companions else self.src.locate(key)

    def inner(self, keys) -> list[str]:
        """The wrapped source's keys that reading `keys` reads."""
        return [*(k for k in keys if k not in self.virtual), *(c for k in keys for c in self.companions.get(k, ()))]

    def want(self, keys) -> None:
        self.src.want(self.inner(keys))

    def finished(self, keys) -> None:
        self.src.finished(self.inner(keys))


class Source:
    """Tensors of a checkpoint, by the checkpoint's own names."""

    folder: Path  # holds config.json and the tokenizer files
    info: dict  # {"id", "revision", "commit"} for the manifest
    read_ahead = True  # convert may read the next group on a thread while it writes this one

    def keys(self) -> list[str]:
        raise NotImplementedError

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read `keys` (one group's worth); memory is only what is returned."""
        raise NotImplementedError

    def locate(self, key: str) -> FileSlice | None:
        """Where `key`'s bytes lie as stored, if this source can say: then they are copied, not read."""
        return None

    def shapes(self) -> dict[str, list[int]]:
        """Shapes known without reading any data (for checks before writing); may be partial."""
        return {}

    def block_scheme(self, key: str, transposed: bool = False) -> str | None:
        """The scheme `key` can be kept in as the source's own quantized blocks (a GGUF's), or None;
        for a `transposed` parameter (held (in, out)), blocks that are its (out, in) rows."""
        return None

    def read_blocks(self, key: str) -> torch.Tensor:
        """`key`'s blocks as stored (only where `block_scheme(key)` names a scheme)."""
        raise NotImplementedError

    def wider_dtype(self, key: str) -> torch.dtype | None:
        """A float type `key` is kept in where the folder's is narrower (a GGUF's float32 norms in a
        float16 file), or None: the folder's."""
        return None

    def block_columns(self, key: str) -> torch.Tensor | None:
        """Where each weight column lies in `key`'s stored blocks, for a `reordered` block scheme."""
        return None

    def want(self, keys) -> None:
        """The conversion will read `keys` (and no others); a source may plan with that."""

    def finished(self, keys) -> None:
        """Tensors `keys` are written (or kept from an earlier run); a source may free them."""

    def close(self) -> None:
        pass


class SafetensorsSource(Source):
    """Single or sharded safetensors; read with plain `pread`s, so nothing stays mapped."""

    def __init__(self, folder: Path, files: list[Path], info: dict):
        self.folder, self.files, self.info = folder, files, info
        self._where = {}  # key -> (path, TensorInfo, data_start)
        for path in files:
            try:
                infos, start = read_header(path)
            except CorruptFileError as e:
                raise SourceError(f"{path} is not a readable safetensors file ({e.problem}); download it again") from None
            for key, ti in infos.items():
                self._where[key] = (path, ti, start)

    def keys(self) -> list[str]:
        return list(self._where)

    def shapes(self):
        return {key: list(ti.shape) for key, (_, ti, _) in self._where.items()}

    def locate(self, key):
        path, ti, start = self._where[key]
        return FileSlice(path, start + ti.offsets[0], ST_TO_DTYPE[ti.dtype], tuple(ti.shape))

    def read(self, keys):
        out = {}
        for key in keys:
            path, ti, start = self._where[key]
            buf = torch.empty(ti.nbytes, dtype=torch.uint8)
            with open(path, "rb") as f:
                f.seek(start + ti.offsets[0])
                if f.readinto(memoryview(buf.numpy())) != ti.nbytes:
                    raise SourceError(f"{path} is truncated at tensor {key}; download it again")
            out[key] = buf.view(ST_TO_DTYPE[ti.dtype]).view(ti.shape)
        return out


class BinSource(Source):
    """PyTorch `.bin` shards, through `torch.load(weights_only=True, mmap=True)` per read."""

    def __init__(self, folder: Path, files: list[Path], info: dict):
        self.folder, self.files, self.info = folder, files, info
        self._where, self._shapes = {}, {}
        for path in files:
            for key, t in self._load(path).items():
                self._where[key] = path
                if isinstance(t, torch.Tensor):
                    self._shapes[key] = list(t.shape)

    @staticmethod
    def _load(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # an unpicklable or corrupt file: say which and why
            raise SourceError(f"{path} cannot be read safely as weights ({str(e).splitlines()[0]})") from None

    def keys(self):
        return list(self._where)

    def shapes(self):
        return dict(self._shapes)

    def read(self, keys):
        out, by_file = {}, {}
        for key in keys:
            by_file.setdefault(self._where[key], []).append(key)
        for path, names in by_file.items():
            state = self._load(path)  # mapped: only the tensors touched below are read
            for key in names:
                out[key] = state[key].clone()
            del state
        return out


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files) of a checkpoint folder; safetensors preferred."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            return kind, _indexed_files(folder, folder / index)
        if (folder / single).is_file():
            return kind, [folder / single]
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return "safetensors", loose
    raise SourceError(
        f"{folder} holds no weights (model.safetensors, pytorch_model.bin or their .index.json); "
        f"point SOURCE at a checkpoint folder, a .gguf file or a hub repo id")


def _indexed_files(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise SourceError(f"{index} is not a valid shard index ({e})") from None
    root = folder.resolve()
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = (folder / name).resolve()
        if root not in path.parents:
            raise SourceError(f"{index} points outside {folder} ({name!r}); refusing to read it")
        if not path.is_file():
            raise SourceError(f"{index} names {name}, which is missing from {folder}")
        files.append(path)
    return files


def open_local(path: Path, info: dict | None = None) -> Source:
    if not path.exists():
        raise SourceError(f"{path} does not exist; give a checkpoint folder, a .gguf file or a hub repo id")
    if path.is_file():
        raise SourceError(f"{path} is a file; give its folder, or a .gguf file")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"{path} is not readable")
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} has no config.json; it is not a Hugging Face checkpoint folder")
    info = info or {"id": str(path.resolve()), "revision": None, "commit": None}
    kind, files = weight_files(path)
    return (SafetensorsSource if kind == "safetensors" else BinSource)(path, files, info)
