"""`reshard convert`: rewrite a checkpoint as one safetensors file per layer group.

Work goes group by group and tensor by tensor: the source is read with plain reads (or a
mapped `torch.load` for `.bin`), so peak memory is about one layer whatever the shard size.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import hub
from .diskspace import check_disk, gb
from .errors import SourceError, UsageError
from .format import (DTYPE_NAMES, blocks_of, stored_names, DTYPE_TO_ST, MANIFEST, Group, Manifest, dtype_name, group_file_name,
                     quant_part_names, write_bytes_atomic, write_group_file, write_text_atomic)
from .fp8 import Fp8Source, Fp8Spec, layout as fp8_layout
from .mxfp4 import CtMxfp4Source, CtMxfp4Spec, Mxfp4Source, Mxfp4Spec, is_ct_mxfp4, is_mxfp4
from .bnb import Bnb4Source, Bnb4Spec, is_bnb4
from .nvfp4 import Nvfp4Source, Nvfp4Spec, layout as nvfp4_layout
from .ggml_quants import check_block_shape
from .ggml_repack import GROUP as REPACKED_GROUP, REPACKED, repack_blocks
from .keymap import KeyMap, check_shape, check_shapes, map_keys
from .multimodal import language_part
from .tiktoken_vocab import tiktoken_class, write_fast_tokenizer
from .plan import build_empty_model, plan_groups, read_config
from .published import PublishedSource, RepackSpec, check_repackable, published_format
from .quant import DEFAULT_GROUP, check_scheme, quantizable_params, quantize as quantize_weight, quantize_experts
from .resume import Progress, conversion_params, manifest_source
from .opening import open_source, ready_source
from .source import SIDE_FILES, Source


def check_dtype_name(name: str) -> None:
    if name != "auto" and name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {name!r}; use auto, float16, bfloat16 or float32")


def resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        # `dtype` (transformers >= 4.56); reading `torch_dtype` would log a deprecation warning
        dtype = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
        if isinstance(dtype, str):
            dtype = DTYPE_NAMES.get(dtype)
        return dtype if dtype in DTYPE_NAMES.values() else torch.float32
    check_dtype_name(name)
    return DTYPE_NAMES[name]


def convert(source: str, out: str | Path, *, revision: str | None = None, dtype: str = "auto",
            token: str | None = None, trust_remote_code: bool = False, progress: bool = True,
            force: bool = False, low_disk: bool = False, quantize: str | None = None,
            quantize_group: int = DEFAULT_GROUP, quantize_embeddings: bool = False) -> Manifest:
    """Convert `source` (hub repo id, checkpoint folder or .gguf file) into `out`.

    Rerunning the same conversion resumes it: files an earlier run finished are checked and
    kept, the rest written again. An `out` holding anything else is refused unless `force`.
    `quantize` ("int8" or "int4", group size `quantize_group`) stores the decoder layers'
    linear weights (and the embeddings/head if `quantize_embeddings`) quantized; see reshard/quant.py.
    """
    if quantize:
        check_scheme(quantize, quantize_group)
    check_dtype_name(dtype)
    out = Path(out)
    src = open_source(source, revision=revision, token=token, low_disk_out=out if low_disk else None, out=out,
                      progress=progress)
    try:
        config = read_config(src.folder, source, trust_remote_code=trust_remote_code)
        published = published_format(config, source)  # an unknown format is refused before any download
        part = language_part(config, trust_remote_code=trust_remote_code)  # a vision-language model's text model
        if part is not None:
            config = part.config
            if progress:
                print(f"reshard: {source} is a vision-language model ({type(part.outer).__name__}); converting its "
                      f"language model ({config.architectures[0]}), the vision tower left out", file=sys.stderr)
        target = resolve_dtype(dtype, config)
        model = build_empty_model(config, dtype=target, trust_remote_code=trust_remote_code)
        if part is not None:
            part.bind(model)
        plan = plan_groups(model)
        # a published quantized checkpoint: kept as published unless a dtype or --quantize is asked for
        # (GPTQ/AWQ/compressed-tensors int weights re-packed into int4/int8, not rounded again)
        kept = published_kept(config, model, plan, published)
        keep = kept is not None and dtype == "auto" and not quantize
        quant = QuantSpec.for_model(model, plan, quantize, quantize_group, quantize_embeddings) if quantize else None
        if keep:
            quant = kept[0]
        quantization = quant.manifest_entry() if quant else None
        params = conversion_params(src, dtype=dtype_name(target), architecture=type(model).__name__,
                                   quantization=quantization)
        check_before_fetching(src, out, plan, target, params, force=force)
        src = ready_source(src, model, progress=progress)
        if kept is not None:  # its packed weights read as the model's: as stored, or de-quantized
            src = kept[1](src, keep)
        params_map = {p: s for g in plan.groups for p, s in g.params.items()}
        buffers = {b: s for g in plan.groups for b, (s, _) in g.buffers.items()}
        mapping = map_keys(model, src.keys(), params_map, aliases=plan.tied, buffers=buffers, part=part)
        check_shapes(mapping.direct, {**params_map, **buffers}, src.shapes())
        if isinstance(quant, RepackSpec):
            check_repackable(src, mapping, quant)
        record = Progress.open(out, params, force=force)
        _copy_side_files(src.folder, out, config=config if part is not None or _renamed(src.folder, config) else None)
        if tiktoken_class(src.folder) is not None:  # Kimi-K2's tokenizer, made one that needs no code of its own
            write_fast_tokenizer(src.folder, out)
        kept = {g.name: k for g in plan.groups if (k := record.kept(g.name, g.params)) is not None}
        sharded = hasattr(src, "largest_shard_bytes")  # --low-disk
        check_disk(out, plan, kept, target, extra=getattr(src, "largest_shard_bytes", 0), hint=not sharded,
                   progress=progress)
        src.want(mapping.source_keys([*params_map, *buffers]))
        blocks = _kept_blocks(src, model, plan, mapping) if dtype == "auto" and not quant else {}
        groups = _write_groups(src, model, plan, mapping, out, target, record, kept, progress, quant, blocks)
        manifest = Manifest(
            source=manifest_source(params), dtype=dtype_name(target), architecture=type(model).__name__,
            layers_path=plan.layers_path, groups=groups, quantization=quantization)
        write_text_atomic(out / MANIFEST, manifest.to_json())
        record.finish()
        if hasattr(src, "remove_work_folder"):
            src.remove_work_folder()
        return manifest
    finally:
        if hasattr(src, "close"):
            src.close()


def published_kept(config, model, plan, published):
    """(the spec that stores a published quantized checkpoint's weights as published, `wrap(src, keep)`: the
    source that reads them, as stored with `keep`, else de-quantized), or None for a checkpoint not quantized."""
    fp8, nvfp4 = fp8_layout(config), nvfp4_layout(config)
    if fp8 is not None:
        return Fp8Spec(fp8), lambda src, keep: Fp8Source(src, fp8, keep=keep)
    if is_mxfp4(config):
        return Mxfp4Spec(), lambda src, keep: Mxfp4Source(src, keep=keep)
    if is_ct_mxfp4(config):
        return CtMxfp4Spec(), lambda src, keep: CtMxfp4Source(src, keep=keep)
    if is_bnb4(config):
        return Bnb4Spec.for_config(config), lambda src, keep: Bnb4Source(src, keep=keep)
    if nvfp4 is not None:
        return Nvfp4Spec(nvfp4), lambda src, keep: Nvfp4Source(src, nvfp4, keep=keep)
    if published is not None:
        spec = RepackSpec.for_model(model, plan, published)
        return spec, lambda src, keep: PublishedSource(src, published, repack_group=spec.group if keep else None)
    return None


def check_before_fetching(src, out: Path, plan, target: torch.dtype, params: dict, *, force: bool) -> None:
    """Refuse now what would be refused later, before a download or a de-quantization: an OUT that
    holds something else (touching nothing), or a disk too small for what is left to fetch and write."""
    earlier = Progress.check(out, params, force=force)
    if isinstance(src, hub.HubCheckpoint):
        check_disk(out, plan, earlier, target, extra=src.download_bytes(), extra_dir=src.cache_dir, progress=False)
    else:
        sharded = getattr(src, "largest_shard_bytes", None)  # --low-disk
        check_disk(out, plan, earlier, target, extra=sharded or 0, hint=sharded is None, progress=False)


def _renamed(folder: Path, config) -> bool:
    """Whether `config` is read as another model type than its file says (reshard/plan.py NATIVE)."""
    return json.loads((folder / "config.json").read_text()).get("model_type") != config.model_type


def _copy_side_files(folder: Path, out: Path, config=None) -> None:
    """The source's config, generation config and tokenizer files; `config` as config.json where given
    (the language model of a vision-language checkpoint: reshard/multimodal.py; a config read as
    another model type: reshard/plan.py NATIVE)."""
    for name in SIDE_FILES:
        if name == "config.json" and config is not None:
            data = config.to_json_string(use_diff=False).encode()
        elif (folder / name).is_file():
            data = (folder / name).read_bytes()
        else:
            continue
        if not (out / name).is_file() or (out / name).read_bytes() != data:
            write_bytes_atomic(out / name, data)


@dataclass
class QuantSpec:
    """What `--quantize` stores and how; shared with reshard.synthetic so both write the same bytes."""
    scheme: str  # "int8" or "int4"
    group: int  # int4 group size
    embeddings: bool  # embeddings and head quantized too
    params: dict[str, bool]  # param to quantize -> stored transposed (Conv1D)

    @classmethod
    def for_model(cls, model, plan, scheme: str, group: int = DEFAULT_GROUP, embeddings: bool = False) -> "QuantSpec":
        check_scheme(scheme, group)
        return cls(scheme, group, embeddings, quantizable_params(model, plan, embeddings=embeddings))

    def manifest_entry(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group if self.scheme == "int4" else None,
                "embeddings": self.embeddings}

    def store(self, name: str, t: torch.Tensor, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """Put `name`'s quantized parts into `tensors`, and what it expands to into `quantized`."""
        transposed = self.params[name]
        if t.dim() == 3:  # experts [E, ...]: each expert quantized alone, parts [E, ...] (one range each)
            parts = quantize_experts(t, self.scheme, group=self.group, dtype=target, transposed=transposed)
        else:
            parts = quantize_weight(t.t() if transposed else t, self.scheme, group=self.group, dtype=target)
        for part, stored in quant_part_names(name, self.scheme).items():
            tensors[stored] = parts[part]
        quantized[name] = {"shape": list(t.shape), "dtype": DTYPE_TO_ST[target], "transposed": transposed}


def _kept_blocks(src: Source, model, plan, mapping: KeyMap) -> dict[str, tuple[str, bool]]:
    """{param: (scheme, transposed)} for the decoder layers' linear weights (and experts, (in, out) ones
    too where the source's blocks are their (out, in) rows), and the output head's where it is a
    linear layer of its own (not tied to the input embeddings), that the source holds as quantized
    blocks reshard stores as they are (a GGUF's Q4_K, Q8_0, ...: reshard/ggml_quants.py). The
    head is read whole on every pass (a Q6_K head is a quarter of float32's bytes); the input
    embeddings are looked up, never multiplied, so they are de-quantized at convert."""
    linear = quantizable_params(model, plan)
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head is not model.get_input_embeddings():
        name = next(n for n, m in model.named_modules() if m is head) + ".weight"
        if any(name in g.params for g in plan.groups):  # stored: not an alias of the input embeddings
            linear[name] = False
    return {p: (scheme, transposed) for p, transposed in linear.items()
            if p in mapping.direct and (scheme := src.block_scheme(mapping.direct[p], transposed))}


def _write_groups(src: Source, model, plan, mapping: KeyMap, out: Path, target: torch.dtype, record: Progress,
                  kept: dict[str, Group], progress: bool, quant: QuantSpec | None = None,
                  blocks: dict[str, tuple[str, bool]] | None = None) -> list[Group]:
    """Write every group not `kept`, in order; the next one is read (and cast) on a thread
    while this one is written, so reading, casting, writing and hashing overlap."""
    size = {g.name: sum(math.prod(s) for s in g.params.values()) * target.itemsize for g in plan.groups}
    # kept groups start the bar, so its rate is that of the writing (not of checking kept files)
    bar = tqdm(total=sum(size.values()), initial=sum(size[name] for name in kept), unit="B", unit_scale=True,
               desc="reshard", file=sys.stderr, disable=not progress)
    todo = [g for g in plan.groups if g.name not in kept]
    prepared = _prepared_groups(todo, lambda g: _prepare_group(src, model, g, mapping, target, quant, blocks or {}),
                                ahead=src.read_ahead)
    groups, start, written = [], time.perf_counter(), 0
    with bar, contextlib.closing(prepared):
        for planned in plan.groups:
            group = kept.get(planned.name)
            if group is None:
                record.forget(planned.name)  # its file is about to be replaced
                done, tensors, quantized, buffers = next(prepared)
                assert done is planned  # groups come in plan order
                group = _write_group(planned, out, tensors, quantized, buffers)
                record.add(group)
                bar.update(size[planned.name])
                written += group.bytes
            groups.append(group)
            src.finished(mapping.source_keys([*planned.params, *planned.buffers]))
    if progress and written:
        seconds = time.perf_counter() - start
        print(f"reshard: wrote {gb(written)} in {seconds:.2f} s ({written / seconds / 1e9:.2f} GB/s)", file=sys.stderr)
    return groups


def _prepared_groups(todo: list, prepare, *, ahead: bool):
    """prepare(g) for each g of `todo`, in order; with `ahead`, g+1's is computed on a thread
    while the caller writes g (so about two groups are in memory, never more)."""
    if not ahead:
        yield from map(prepare, todo)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="reshard-read") as pool:
        pending = pool.submit(prepare, todo[0]) if todo else None
        try:
            for nxt in todo[1:] + [None]:
                done = pending.result()
                pending = pool.submit(prepare, nxt) if nxt is not None else None
                yield done
        finally:
            if pending is not None:
                pending.cancel()


def _prepare_group(src: Source, model, planned, mapping: KeyMap, target: torch.dtype,
                   quant: QuantSpec | None, blocks: dict[str, tuple[str, bool]]) -> tuple:
    """(planned, tensors, quantized, buffers) to write for `planned`. Parameters stored in the
    source as they are to be written stay there (`FileSlice`s, copied by the kernel when the
    file is written); the rest are read, fused as transformers fuses them, and cast."""
    as_stored = {p: loc for p in planned.params
                 if p in mapping.direct and not (quant and p in quant.params) and p not in blocks
                 and (loc := src.locate(mapping.direct[p])) is not None
                 and (loc.dtype == target or not loc.dtype.is_floating_point)}
    buffers = [b for b in planned.buffers if b in mapping.direct]  # persistent buffers the checkpoint holds
    read = [p for p in planned.params if p not in as_stored and p not in blocks]
    raw = src.read(mapping.source_keys([*read, *buffers]))
    kept = quant.take(planned, mapping, raw, model) if hasattr(quant, "take") else {}  # stored as published
    made = _run_fusions(planned, mapping, raw, model, target, skip=kept)
    tensors, quantized = {}, {}
    for pname, shape in planned.params.items():
        if pname in kept:
            quant.store(pname, kept[pname], target, tensors, quantized)
            check_shape(pname, torch.empty(quantized[pname]["shape"], device="meta"), shape)
            continue
        if pname in blocks:  # the source's blocks, kept or re-packed: expanded at load
            key = mapping.direct[pname]
            scheme, transposed = blocks[pname]
            columns = src.block_columns(key) if blocks_of(scheme) else None
            _store_blocks(pname, src.read_blocks(key), scheme, shape, target, tensors, quantized, columns, transposed)
            continue
        if pname in as_stored:
            t = as_stored[pname]
        else:
            t = made.pop(pname) if pname in made else raw.pop(mapping.direct[pname])
        check_shape(pname, t, shape)
        if quant and pname in quant.params:
            quant.store(pname, t, target, tensors, quantized)
        elif isinstance(t, torch.Tensor) and t.is_floating_point():
            wider = src.wider_dtype(mapping.direct[pname]) if pname in mapping.direct else None
            tensors[pname] = t.to(wider if wider is not None and wider.itemsize > target.itemsize else target)
        else:
            tensors[pname] = t
    for bname in buffers:  # in the buffer's own dtype, as transformers loads it
        shape, dtype = planned.buffers[bname]
        t = raw.pop(mapping.direct[bname])
        check_shape(bname, t, shape)
        tensors[bname] = t.to(dtype)
    return planned, tensors, quantized, buffers


def _store_blocks(pname: str, raw: torch.Tensor, scheme: str, shape, target: torch.dtype, tensors: dict,
                  quantized: dict, columns: torch.Tensor | None = None, transposed: bool = False) -> None:
    """`pname`'s GGML blocks as stored: re-packed into int8/int4 group 32 where those hold them
    exactly (Q8_0, Q4_0, Q4_1: reshard/ggml_repack.py), else as the blocks (reshard/ggml_quants.py),
    with their `columns` order for a reordered scheme; a `transposed` parameter's blocks are the
    rows of its (out, in) matrices (its shape's last two dimensions swapped)."""
    rows = [*shape[:-2], shape[-1], shape[-2]] if transposed else shape
    check_block_shape(pname, raw, blocks_of(scheme) or scheme, rows)
    entry = {"shape": list(shape), "dtype": DTYPE_TO_ST[target], "transposed": transposed}
    if scheme in REPACKED:  # experts [E, out, ...] re-packed as one matrix of E * out rows: each expert's rows stay together
        scheme, parts = repack_blocks(raw.reshape(-1, raw.shape[-1]), scheme)
        parts = {part: p.reshape(*raw.shape[:-1], *p.shape[1:]) for part, p in parts.items()}
        entry["group_size"] = REPACKED_GROUP
    else:
        parts = {"blocks": raw} if columns is None else {"blocks": raw, "columns": columns}
    for part, name in quant_part_names(pname, scheme).items():
        tensors[name] = parts[part]
    quantized[pname] = {**entry, "scheme": scheme}


def _write_group(planned, out: Path, tensors: dict, quantized: dict, buffers: list) -> Group:
    experts = {m: dict(e) for m, e in planned.experts.items()}
    first = {n for e in experts.values() for p in e["tensors"] for n in stored_names(p, tensors)}
    file = group_file_name(planned.name) if tensors else None
    size, sha = write_group_file(out / file, tensors, first) if file else (0, "")
    return Group(
        name=planned.name, kind=planned.kind, file=file, bytes=size, sha256=sha,
        tensors={n: {"dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
        aliases=dict(planned.aliases), quantized=quantized, experts=experts, buffers=buffers)


def _run_fusions(planned, mapping: KeyMap, raw: dict, model, target: torch.dtype, skip=()) -> dict[str, torch.Tensor]:
    """The group's parameters that transformers' converters make from several source tensors
    (but those in `skip`, made already)."""
    made = {}
    for first in dict.fromkeys(mapping.made_by[p] for p in planned.params if p in mapping.made_by and p not in skip):
        for name, t in mapping.fused[first].run(raw, model, target).items():
            if name not in planned.params:
                raise SourceError(f"transformers' conversion into {first!r} also makes {name!r}, which is not a "
                                  f"parameter of group {planned.name}; this checkpoint cannot be converted")
            made[name] = t
    return made
