"""A `.gguf` checkpoint (single or split `-0000i-of-0000N.gguf`), read one tensor at a time.

The `gguf` package's `GGUFReader` maps each file and lists its tensors (name, type, shape,
offset); a tensor's bytes are read with `pread` when it is needed, de-quantized with gguf's own
`dequantize` (every type it supports), and renamed and permuted exactly as transformers' GGUF
loader does: for most architectures its name map from the model and its per-architecture
`TensorProcessor` (`transformers.modeling_gguf_pytorch_utils`), for those of its newer path its
conversion mappings (reshard/gguf_conversions.py). So memory is one group's tensors, whatever the
file's size, and the tensors equal what `from_pretrained(..., gguf_file=...)` loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import SourceError
from .format import reordered
from .ggml_iquants import require_gguf
from .ggml_quants import scheme_for
from .gguf_conversions import ConversionMap, newer_path
from .gguf_tables import TableMap, config_from_metadata, mapped_here, metadata_fields, split_pre_tokens
from .source import GGUF_SPLIT_NAME, Source

CHUNK_ELEMENTS = 1 << 22  # de-quantize in row blocks of about this many values (bounds gguf's temporaries)
HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}
TIED_ANYWAY = ("falcon", "bloom")  # transformers' exceptions to "no output.weight means tied"


def split_files(path: Path) -> list[Path]:
    """All files of a split GGUF given any of them (in order), or `[path]` for a single file."""
    m = GGUF_SPLIT_NAME.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{path} is part {int(m['index'])} of a {count}-file GGUF, but "
                          f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    return files


class GGUFSource(Source):
    """Tensors of a GGUF checkpoint under transformers' names; call `load(model)` before `keys()`."""

    def __init__(self, path: Path):
        GGUFReader = require_gguf().GGUFReader  # noqa: N806 - the class
        self.path, self.files = path, split_files(path)
        self.info = {"id": str(self.files[0].resolve()), "revision": None, "commit": None}
        try:
            readers = [GGUFReader(f) for f in self.files]
        except (ValueError, OSError) as e:
            raise SourceError(f"{path} is not a readable GGUF file ({e}); download it again") from None
        self.architecture = _architecture(readers[0])
        self._newer = newer_path(self.architecture)
        # an architecture transformers does not read (or misreads), mapped here (reshard/gguf_tables.py);
        # once transformers' newer path takes it, its rules are the reference again
        own = mapped_here(self.architecture) and not self._newer
        self._fields = metadata_fields(readers[0]) if own else None
        self._splits = tuple(_text_field(readers[0], f"tokenizer.ggml.{k}") for k in ("model", "pre"))
        # Only the tensor tables are needed from here on: the metadata (a vocabulary is
        # hundreds of thousands of small arrays) is what transformers reads, from the file.
        self._tensors = [list(r.tensors) for r in readers]
        del readers
        self._tmp = tempfile.mkdtemp(prefix="reshard-gguf-")
        self.folder = Path(self._tmp)
        self._metadata = self._save_config_and_tokenizer()
        self._processor = self._mapping = self._conversions = None
        self._sources: dict[str, list] = {}  # transformers name -> [(reader index, ReaderTensor)]
        self._row_maps: dict[str, np.ndarray | None] = {}  # transformers name -> _row_map's answer
        self._column_maps: dict[str, torch.Tensor | None] = {}  # transformers name -> block_columns' answer

    def _save_config_and_tokenizer(self) -> dict:
        """config.json and the tokenizer files (transformers reads them from the first file)."""
        from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        first = self.files[0]
        if self._fields is not None:
            located = {t.name: (i, t) for i, tensors in enumerate(self._tensors) for t in tensors}
            config = config_from_metadata(self.architecture, self._fields, list(located), first,
                                          read=lambda name: self._dequantize(*located[name]))
        try:  # the newer path's architectures have no legacy metadata (nor need it)
            if self._fields is not None:  # the tokenizer alone, whatever the architecture
                metadata, tokenizer = None, PreTrainedTokenizerFast.from_pretrained(first.parent, gguf_file=first.name)
            else:
                metadata = None if self._newer else load_gguf_checkpoint(str(first), return_tensors=False)
                config = AutoConfig.from_pretrained(first.parent, gguf_file=first.name)
                tokenizer = AutoTokenizer.from_pretrained(first.parent, gguf_file=first.name)
            if self._splits[0] == "gpt2":  # byte-level BPE: split text as llama.cpp does for the file's `pre`
                split_pre_tokens(tokenizer, self._splits[1])
        except Exception as e:  # transformers raises many kinds here; say which file and why
            raise SourceError(f"{first}: transformers cannot read this GGUF file ({str(e).splitlines()[0]})") from None
        if getattr(config, "dtype", None) is None and (half := self._half_type()) is not None:
            config.dtype = half  # a file of float16 (or bfloat16) tensors alone converts in that type, not float32
        if len(self.files) > 1:  # transformers saw the first file's tensors only: apply its rule to all
            tied = self.architecture in TIED_ANYWAY or not any(
                t.name == "output.weight" for tensors in self._tensors for t in tensors)
            config.tie_word_embeddings = tied
            if metadata is not None:
                metadata["config"]["tie_word_embeddings"] = tied
        config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        return metadata

    def wider_dtype(self, key: str) -> torch.dtype | None:
        """float32 for a parameter made from float32 tensors alone (a norm, a convolution kernel, in a
        file of float16 or bfloat16 weights: kept exact, as a float32 load of the file has them)."""
        found = self._sources.get(key, [])
        return torch.float32 if found and all(t.tensor_type.name == "F32" for _, t in found) else None

    def _half_type(self) -> str | None:
        """"float16" or "bfloat16" where every tensor of the file is that type or float32 (no blocks:
        transformers loads such a file in that type too); else None."""
        types = {t.tensor_type.name for tensors in self._tensors for t in tensors}
        halves = types & set(HALF_TYPES)
        if types - {"F32", *HALF_TYPES} or len(halves) != 1:
            return None
        return {"F16": "float16", "BF16": "bfloat16"}[halves.pop()]

    def load(self, meta_model) -> None:
        """Map GGUF tensor names to `meta_model`'s names, as transformers' loader does."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self._sources, self._row_maps, self._column_maps = {}, {}, {}
        if self._newer or self._fields is not None:
            located = {t.name: (i, t) for i, tensors in enumerate(self._tensors) for t in tensors}
            self._conversions = (TableMap(self.architecture, meta_model, list(located)) if self._fields is not None
                                 else ConversionMap(self.architecture, meta_model, list(located)))
            self._sources = {k: [located[n] for n in names] for k, names in self._conversions.sources.items()}
            return
        cls = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)
        self._processor = cls(config=self._metadata["config"])
        self._mapping = get_gguf_hf_weights_map(meta_model, self._processor)
        for i, tensors in enumerate(self._tensors):
            for t in tensors:
                # merged tensors (MoE experts) are mapped without their ".weight" suffix
                target = self._mapping.get(t.name) or self._mapping.get(t.name.rsplit(".", 1)[0])
                if target is not None:  # transformers skips the tensors it has no name for
                    self._sources.setdefault(target, []).append((i, t))

    def keys(self):
        return list(self._sources)

    def read(self, keys):
        """De-quantize the GGUF tensors behind `keys`, in file order, through transformers'
        processor (which may permute, transpose or merge them) or its conversion mapping."""
        if self._conversions is not None:
            return {k: self._conversions.make(k, {t.name: self._values(i, t) for i, t in self._ordered(k)})
                    for k in keys}
        wanted = sorted({(i, t.data_offset): (i, t) for k in keys for i, t in self._sources[k]}.items())
        parsed = {"tensors": {}}  # where processors put the tensors they merge or rename themselves
        for _, (i, t) in wanted:
            weights = self._dequantize(i, t)
            result = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._mapping,
                                             parsed_parameters=parsed)
            if result.name in self._mapping:
                parsed["tensors"][self._mapping[result.name]] = torch.from_numpy(np.ascontiguousarray(result.weights))
        missing = [k for k in keys if k not in parsed["tensors"]]
        if missing:
            raise SourceError(f"{self.path}: transformers' GGUF processing gave no tensor for {missing[0]}")
        return {k: parsed["tensors"][k] for k in keys}

    def block_scheme(self, key: str, transposed: bool = False) -> str | None:
        """The reshard/ggml_quants.py scheme `key` is kept in: its GGUF tensors (one, or several that
        transformers' processor merges, as a MoE layer's gate and up experts) are weights of one
        block type reshard stores, and the processor only moves their rows (see `_row_map`); or
        the same scheme `reordered` where a single matrix's processing only moves its columns
        (`block_columns`: their order is stored beside the blocks). A `transposed` parameter (gpt-oss's
        (in, out) experts) keeps blocks where its mapping makes it from the file's (out, in) rows."""
        found = self._sources.get(key, [])
        stored_transposed = self._conversions is not None and self._conversions.transposed(key)
        if not found or any(len(t.shape) not in (2, 3) for _, t in found) or transposed != stored_transposed:
            return None
        schemes = {scheme_for(t.tensor_type.name) for _, t in found}
        columns = {int(t.shape[0]) for _, t in found}  # GGUF shapes are (columns, rows[, experts])
        if len(schemes) != 1 or None in schemes or len(columns) != 1:
            return None
        if self._row_map(key) is not None:
            return schemes.pop()
        return reordered(schemes.pop()) if self.block_columns(key) is not None else None

    def block_columns(self, key: str) -> torch.Tensor | None:
        """Where each column of the weight transformers makes from `key`'s one GGUF matrix lies in
        the stored one ((in,) int32: its processing gathers whole columns, as Qwen3.5's output
        projection's regrouping by value head), or None. Found as `_row_map`'s rows are: a probe
        of distinct values, two rows of the matrix's width, processed."""
        if key in self._column_maps:
            return self._column_maps[key]
        found, order = self._ordered(key), None
        # the newer path's converters only: a legacy processor's reshapes assume the tensor's own rows
        if self._conversions is not None and len(found) == 1 and len(found[0][1].shape) == 2:
            name, width = found[0][1].name, int(found[0][1].shape[0])
            probe = np.arange(2 * width, dtype=np.float64).reshape(2, width)
            made = self._converted_probe(key, {name: probe})
            if made is not None and made.shape == (2, width):
                index = made[0].astype(np.int64)
                if (np.array_equal(np.sort(index), np.arange(width))
                        and np.array_equal(made, probe[:, index])):
                    order = torch.from_numpy(index.astype(np.int32))
        self._column_maps[key] = order
        return order

    def read_blocks(self, key: str) -> torch.Tensor:
        """`key`'s blocks as in the file, (rows, bytes per row) uint8 ([E, rows, bytes] for experts),
        rows where transformers puts them (the sources' rows gathered by `_row_map`; columns are
        `block_columns`' to put)."""
        raws = []
        for i, t in self._ordered(key):
            raw = np.empty(t.data.shape, dtype=np.uint8)
            with open(self.files[i], "rb") as f:
                _pread_into(f.fileno(), raw, t.data_offset, self.files[i], t.name)
            raws.append(raw.reshape(-1, raw.shape[-1]))
        rows = raws[0] if len(raws) == 1 else np.concatenate(raws)
        order = self._row_map(key)
        if order is None:  # a reordered scheme's matrix: its rows as they are (`block_columns`)
            return torch.from_numpy(rows)
        flat = order.reshape(-1)
        if not np.array_equal(flat, np.arange(len(flat))):
            rows = rows[flat]
        return torch.from_numpy(rows.reshape(*order.shape, rows.shape[-1]))

    def _ordered(self, key: str) -> list:
        """`key`'s GGUF tensors in the order `read` hands them to the processor (file order)."""
        return [it for _, it in sorted({(i, t.data_offset): (i, t) for i, t in self._sources[key]}.items())]

    def _row_map(self, key: str) -> np.ndarray | None:
        """Where each row of the weight transformers makes from `key`'s GGUF tensors comes from, as
        an index into those tensors' rows stacked in file order (an array of the weight's shape but
        its last dimension), or None where the processor does more than move whole rows. Found by
        processing a small probe, (..., rows, 2) float64 per tensor, whose every value is distinct."""
        cache = self._row_maps
        if key in cache:
            return cache[key]
        probes, offset = {}, 0
        for _, t in self._ordered(key):
            lead = tuple(int(n) for n in reversed(t.shape.tolist()[1:]))  # ([experts,] rows)
            count = int(np.prod(lead))
            probes[t.name] = ((offset + np.arange(count, dtype=np.float64)).reshape(*lead, 1) * 2 + np.arange(2.0))
            offset += count
        made = self._converted_probe(key, probes) if self._conversions is not None else self._processed_probe(key, probes)
        order = None
        if made is not None and made.ndim >= 2 and made.shape[-1] == 2:
            index = made[..., 0] // 2
            flat = index.reshape(-1)
            if (np.all((flat >= 0) & (flat < offset)) and len(np.unique(flat)) == offset == len(flat)
                    and np.array_equal(made, index[..., None] * 2 + np.arange(2.0))):
                order = index.astype(np.int64)
        cache[key] = order
        return order

    def _converted_probe(self, key: str, probes: dict) -> np.ndarray | None:
        """The probes made into `key` by its conversion mapping, or None where its operations fail
        on them (a column permutation, which no row map can express)."""
        try:
            made = self._conversions.make(key, {n: torch.from_numpy(p) for n, p in probes.items()}, stored=True)
        except (SourceError, IndexError, RuntimeError, ValueError):
            return None
        return made.numpy()

    def _processed_probe(self, key: str, probes: dict) -> np.ndarray | None:
        """The probes made into `key` by transformers' TensorProcessor, or None where it does more
        than return one array for it."""
        parsed, made = {"tensors": {}}, None
        for _, t in self._ordered(key):
            probe = probes[t.name]
            result = self._processor.process(weights=probe, name=t.name, tensor_key_mapping=self._mapping,
                                              parsed_parameters=parsed)
            if result.name is not None:  # not merged by the processor itself
                if self._mapping.get(result.name) != key or made is not None:
                    made = False
                    break
                made = np.asarray(result.weights)
        merged = parsed["tensors"]
        if made is None and set(merged) == {key}:
            return np.asarray(merged[key])
        return None if made is False or made is None or merged else made

    def _values(self, i: int, t) -> torch.Tensor:
        """Tensor `t` of file `i` as transformers' newer path hands it to its conversions: blocks
        de-quantized to float32, float tensors in the file's own type (a norm stored as `w + 1` in
        float16 is un-offset in float16 there; their float32 values convert back exactly)."""
        values = torch.from_numpy(self._dequantize(i, t))
        dtype = HALF_TYPES.get(t.tensor_type.name)
        return values.to(dtype) if dtype is not None else values

    def _dequantize(self, i: int, t) -> np.ndarray:
        """Tensor `t` of file `i` as float32, read and de-quantized a block of rows at a time."""
        from gguf import dequantize

        raw_shape, raw_dtype = t.data.shape, t.data.dtype  # a view of the mapping: nothing is read here
        out = np.empty(tuple(reversed(t.shape.tolist())), dtype=np.float32)
        rows = raw_shape[0] if len(raw_shape) > 1 else 1
        row_items = int(np.prod(raw_shape)) // rows
        row_bytes = row_items * raw_dtype.itemsize
        step = max(1, CHUNK_ELEMENTS * out.dtype.itemsize // max(out.nbytes // rows, 1))
        flat_out = out.reshape(rows, -1)
        with open(self.files[i], "rb") as f:
            for start in range(0, rows, step):
                n = min(step, rows - start)
                raw = np.empty((n, *raw_shape[1:]) if len(raw_shape) > 1 else raw_shape, dtype=raw_dtype)
                _pread_into(f.fileno(), raw, t.data_offset + start * row_bytes, self.files[i], t.name)
                flat_out[start:start + n] = dequantize(raw, t.tensor_type).reshape(n, -1)
        return out

    def close(self):
        self._tensors = []
        shutil.rmtree(self._tmp, ignore_errors=True)


def _text_field(reader, key: str) -> str | None:
    from transformers.modeling_gguf_pytorch_utils import read_field

    values = read_field(reader, key)
    return values[0] if values else None


def _architecture(reader) -> str:
    from transformers.modeling_gguf_pytorch_utils import read_field

    return read_field(reader, "general.architecture")[0]


def _pread_into(fd: int, array: np.ndarray, offset: int, path: Path, name: str) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SourceError(f"{path} is truncated in tensor {name}; download it again")
        done += n
