"""Checkpoints published already quantized (config.json's `quantization_config`).

`published_format` reads the config: a method this toolkit reads comes back as a `Published`
(how to unpack its linear weights, reshard/gptq.py has the math); any other is refused at once,
before a weight file is downloaded. `PublishedSource` wraps the checkpoint so that each packed
linear weight reads as the model's own `X.weight`: a `Repacked` (the project's int4/int8 parts,
which represent the same values exactly) or, when the conversion de-quantizes, the float32 weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bnb import is_bnb4
from .errors import SourceError
from .format import ACT_ORDER, DTYPE_TO_ST, quant_part_names
from .fusion import keeps_rows
from .fp8 import layout as fp8_layout
from .ggml_repack import SYMMETRIC_ZERO
from .gptq import Affine, unpack_awq, unpack_gptq, unpack_int_quantized, unpack_pack_quantized
from .mxfp4 import is_ct_mxfp4, is_mxfp4
from .nvfp4 import layout as nvfp4_layout
from .quant import plan_shape, quantizable_params
from .source import Source

SUPPORTED = ("gptq", "awq", "compressed-tensors")  # quant_method values re-packed here
INT_MARKER = "weight_scale"  # compressed-tensors int-quantized: `X.weight` is int8 itself, known by its scale
# fp8 (and compressed-tensors float8), mxfp4, NVFP4 and bitsandbytes 4-bit are kept as stored by reshard/fp8.py,
# reshard/mxfp4.py, reshard/nvfp4.py and reshard/bnb.py
ADVICE = ("convert the original unquantized checkpoint, or an FP8, MXFP4, NVFP4, GPTQ, AWQ, compressed-tensors "
          "or bitsandbytes 4-bit version of it")


@dataclass
class Published:
    method: str  # "gptq", "awq", "compressed-tensors"
    label: str  # how `reshard info` names it: "GPTQ", "AWQ", "compressed-tensors"
    bits: int  # 4 or 8
    group: int  # input columns per scale; 0 for one per output row
    marker: str  # the stored part whose presence makes `X.weight` a packed weight
    parts: tuple[str, ...]  # the stored parts of a packed weight (optional ones may be absent)
    v1: bool = False  # GPTQ's v1 checkpoint format stores zero points minus one

    def unpack(self, parts: dict[str, torch.Tensor]) -> Affine:
        if self.method == "gptq":
            return unpack_gptq(parts, group=self.group, v1=self.v1)
        if self.method == "awq":
            return unpack_awq(parts, group=self.group)
        if self.marker == INT_MARKER:  # int-quantized: the int8 weight as it is
            return unpack_int_quantized(parts)
        return unpack_pack_quantized(parts, bits=self.bits, group=self.group)

    def weight_shape(self, shapes: dict[str, list[int]]) -> list[int] | None:
        """(out, in) of a packed weight from its parts' shapes, where they say it."""
        if self.method == "gptq" and "qweight" in shapes:
            rows, out = shapes["qweight"]
            return [out, rows * 8]
        if self.method == "awq" and "qweight" in shapes:
            rows, words = shapes["qweight"]
            return [words * 8, rows]
        return None  # compressed-tensors: its `weight_shape` tensor says it

    @property
    def scheme(self) -> str:
        """The project's stored scheme these weights re-pack into (reshard/quant.py)."""
        return "int4" if self.bits == 4 else "int8"


def published_format(config, name: str) -> Published | None:
    """The published quantization of `config` that is re-packed here (None if it has none, or if it
    is an fp8/mxfp4/NVFP4/bitsandbytes 4-bit one, which reshard/fp8.py, mxfp4.py, nvfp4.py and bnb.py
    keep); a format this toolkit cannot read exactly is refused here, before any weight file is fetched."""
    qc = getattr(config, "quantization_config", None)
    if qc is None or fp8_layout(config) is not None or is_mxfp4(config) or is_ct_mxfp4(config) or is_bnb4(config) \
            or nvfp4_layout(config):
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "?")).lower()
    if method == "bitsandbytes":  # its 4-bit weights are kept by reshard/bnb.py
        raise SourceError(f"{name} is 8-bit bitsandbytes (LLM.int8), which reshard cannot read; {ADVICE}")
    if method == "modelopt":  # its FP8 and NVFP4 are kept by reshard/fp8.py and reshard/nvfp4.py
        raise SourceError(f"{name} is ModelOpt {qc.get('quant_algo')}, which reshard cannot read; {ADVICE}")
    if method not in SUPPORTED:
        raise SourceError(f"{name} is quantized with {method!r}, which reshard cannot read; {ADVICE}")
    if method in ("gptq", "awq"):
        return _gptq_like(qc, method, name)
    return _compressed_tensors(qc, name)


def _gptq_like(qc: dict, method: str, name: str) -> Published:
    label = method.upper()
    bits, group = qc.get("bits", 4), qc.get("group_size", 128)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or qc.get("version") or
              ("gptq" if method == "gptq" else "gemm")).lower()
    problem = None
    if bits != 4:
        problem = f"{bits}-bit {label}"
    elif method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        problem = f"GPTQ in the {fmt!r} checkpoint format"
    elif method == "awq" and (fmt != "gemm" or qc.get("zero_point") is False):
        problem = f"AWQ version {fmt!r}" if fmt != "gemm" else "AWQ without zero points"
    if problem:
        raise SourceError(f"{name} is {problem}, which reshard cannot read; {ADVICE}")
    parts = ("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales")
    return Published(method, label, 4, max(int(group), 0), "qweight", parts, v1=(method == "gptq" and fmt == "gptq"))


def _compressed_tensors(qc: dict, name: str) -> Published:
    schemes = list((qc.get("config_groups") or {}).values())
    problem = _ct_problem(qc, schemes)
    if problem:
        raise SourceError(f"{name} is {problem}, which reshard cannot read; {ADVICE}")
    w = schemes[0]["weights"]
    group = int(w.get("group_size") or 0) if w.get("strategy") == "group" else 0
    if _ct_format(qc, schemes) == {"int-quantized"}:  # W8A8: int8 weights as they are; activations run unquantized
        return Published("compressed-tensors", "compressed-tensors", 8, 0, INT_MARKER,
                         ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point"))
    return Published("compressed-tensors", "compressed-tensors", w["num_bits"], group, "weight_packed",
                     ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"))


def _ct_format(qc: dict, schemes: list[dict]) -> set:
    return {s.get("format") or qc.get("format") for s in schemes} or {qc.get("format")}


def _ct_problem(qc: dict, schemes: list[dict]) -> str | None:
    """What in a compressed-tensors config this branch cannot read exactly (None: all of it)."""
    fmts = _ct_format(qc, schemes)
    if fmts not in ({"pack-quantized"}, {"int-quantized"}):
        return f"compressed-tensors in the {', '.join(sorted(map(str, fmts)))} format"
    weights = [s.get("weights") or {} for s in schemes]
    if len(weights) != 1:
        return "compressed-tensors with several weight schemes"
    w = weights[0]
    bits, strategy, symmetric = w.get("num_bits"), w.get("strategy"), w.get("symmetric", True)
    if w.get("type", "int") != "int" or bits not in (4, 8) or not symmetric:
        return f"compressed-tensors {w.get('type')} {bits}-bit{'' if symmetric else ' asymmetric'}"
    if strategy not in ("group", "channel") or ((bits == 8 or fmts == {"int-quantized"}) and strategy != "channel"):
        return f"compressed-tensors {bits}-bit with the {strategy!r} strategy"
    if fmts == {"int-quantized"} and bits != 8:
        return f"compressed-tensors int-quantized {bits}-bit"
    return None


# --- the project's parts for an Affine -----------------------------------------------------

@dataclass
class Repacked:
    """A packed weight re-packed into the project's scheme: `parts` as reshard.quant names them."""
    shape: torch.Size  # (out, in), what it expands to
    parts: dict[str, torch.Tensor]

    def dim(self) -> int:
        return len(self.shape)


def repack(a: Affine, scheme: str, group: int, *, name: str) -> dict[str, torch.Tensor]:
    """The project's `scheme` parts holding exactly `a`'s values, with `group` columns per group
    (int4; a multiple or divisor of a's). int4 expands as zeros + q * scales: zeros = -z * s in
    float32 is exact, so that is (q - z) * s with one rounding, as the published formula. Zeros all
    8 (symmetric formats) are left out ("int4-sym"); others are stored in the scales' dtype where
    -z * s is exact there, else as the integer z, one byte (reshard.quant.float_zeros makes -z * s). Act-order groups (`a.g_idx`) are stored with
    their columns gathered group by group, and a `columns` part, each weight column's place
    among them ("int4-act", see `stored_scheme`): expansion puts them back."""
    rows, cols = a.q.shape
    if scheme == "int8":  # one scale per row, z = 128 on the stored unsigned values
        return {"qweight": (a.q - a.z).to(torch.int8), "scales": a.s.reshape(rows)}
    q, columns = a.q, None
    if a.g_idx is not None:
        order = torch.argsort(a.g_idx.long(), stable=True)  # the columns, group by group
        if not torch.equal(a.g_idx.long()[order], torch.arange(cols) // a.group):
            raise SourceError(f"{name}.g_idx does not give each group {a.group} columns; this cannot be re-packed "
                              f"exactly: convert with --dtype float16 (or bfloat16) to de-quantize it")
        q, columns = q[:, order], torch.empty(cols, dtype=torch.int32)
        columns[order] = torch.arange(cols, dtype=torch.int32)
    groups = -(-cols // group)
    index = (torch.arange(groups) * group) // a.group  # each new group's source group
    s, z = a.s[:, index], a.z[:, index]
    q = torch.nn.functional.pad(q, (0, groups * group - cols)).to(torch.uint8)
    parts = {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": s.contiguous()}
    if columns is None and bool((z == SYMMETRIC_ZERO).all()):
        return parts  # symmetric (GPTQ sym, compressed-tensors): "int4-sym", its zeros -8 * s implied
    zeros = -z.float() * s.float()
    narrow = zeros.to(s.dtype)  # exact in the scales' dtype (the CPU kernels' table too)?
    zeros = narrow if torch.equal(narrow.float(), zeros) else z.to(torch.uint8)  # else the integer zero points
    parts["zeros"] = zeros.contiguous()
    return parts if columns is None else {**parts, "columns": columns}


def integer_zeros(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Re-packed zeros as U8 integer zero points: as they are, or z = -zeros / scales of float ones
    (exact: a float zero here is -z * s, exact in the scales' dtype)."""
    return zeros if zeros.dtype == torch.uint8 else (-zeros.float() / scales.float()).round().to(torch.uint8)


def one_order(columns: torch.Tensor, key: str) -> torch.Tensor:
    """[E, in] from the [E, R, in] `columns` of R weights concatenated along their rows (a fused gate and
    up projection): one input order serves them all only if they share it, as GPTQ's act-order gives
    weights that read the same input."""
    if not torch.equal(columns, columns[:, :1].expand_as(columns)):
        raise SourceError(f"{key} and the weights transformers concatenates with it have different act-orders; "
                          f"convert with --dtype float16 (or bfloat16) to de-quantize them")
    return columns[:, 0].contiguous()


def stored_scheme(parts: dict[str, torch.Tensor], scheme: str) -> str:
    """The scheme re-packed `parts` are stored in: `scheme`, "int4-act" for act-order int4, or
    "int4-sym" for int4 whose zero points are all 8."""
    if "columns" in parts:
        return ACT_ORDER
    return "int4-sym" if scheme == "int4" and "zeros" not in parts else scheme


def stored_group(fmt: Published, in_features: list[int]) -> int:
    """The folder-wide int4 group: the source's, or for one group per row (group -1) the largest
    size dividing every weight's input width (each row's scale repeated; even, as packed input
    widths are multiples of 8)."""
    return fmt.group or math.gcd(*in_features)


class PublishedSource(Source):
    """`inner` with each packed linear weight read as `X.weight`: `Repacked` if `repack`, else float32."""

    def __init__(self, inner: Source, fmt: Published, *, repack_group: int | None):
        self.inner, self.fmt, self.group = inner, fmt, repack_group
        self.folder, self.info, self.read_ahead = inner.folder, inner.info, inner.read_ahead
        keys = inner.keys()
        self._have = set(keys)
        self.packed = {k[: -len(fmt.marker)] + "weight": k[: -len(fmt.marker)] for k in keys
                       if k.endswith("." + fmt.marker)}  # "X.weight" -> "X."
        hidden = {p + part for p in self.packed.values() for part in fmt.parts}
        self._keys = [k for k in keys if k not in hidden] + list(self.packed)

    def __getattr__(self, name: str):
        """What else the wrapped source offers (--low-disk's `largest_shard_bytes`, `remove_work_folder`)."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _parts(self, key: str) -> dict[str, str]:
        prefix = self.packed[key]
        return {part: prefix + part for part in self.fmt.parts if prefix + part in self._have}

    def keys(self):
        return list(self._keys)

    def shapes(self):
        inner = self.inner.shapes()
        out = {k: v for k, v in inner.items() if k in self._keys}
        for key, prefix in self.packed.items():
            shape = self.fmt.weight_shape({p: inner[prefix + p] for p in self.fmt.parts if prefix + p in inner})
            if shape is not None:
                out[key] = shape
        return out

    def locate(self, key):
        return None if key in self.packed else self.inner.locate(key)

    def _inner_keys(self, keys) -> list[str]:
        return [k for key in keys for k in (self._parts(key).values() if key in self.packed else [key])]

    def want(self, keys):
        self.inner.want(self._inner_keys(keys))

    def finished(self, keys):
        self.inner.finished(self._inner_keys(keys))

    def read(self, keys):
        plain = self.inner.read([k for k in keys if k not in self.packed])
        for key in (k for k in keys if k in self.packed):
            names = self._parts(key)
            raw = self.inner.read(list(names.values()))
            affine = self.fmt.unpack({part: raw[n] for part, n in names.items()})
            if self.group is None:
                plain[key] = affine.dequantize()
            else:
                parts = repack(affine, self.fmt.scheme, self.group, name=key[: -len(".weight")])
                plain[key] = Repacked(torch.Size(affine.q.shape), parts)
        return plain

    def close(self):
        self.inner.close()


def check_repackable(src: PublishedSource, mapping, spec: "RepackSpec") -> None:
    """Every packed weight must be a linear weight of its own, or one of the per-expert weights
    transformers stacks (and concatenates) into an [E, out, in] parameter, all of them packed;
    `spec.params` is narrowed to those parameters, so the others are copied as stored."""
    direct = {key: param for param, key in mapping.direct.items()}
    fused = {key: f for f in mapping.fused.values() for key in f.keys}
    params = {}
    for key in src.packed:
        fusion = fused.get(key)
        if direct.get(key) in spec.params:
            params[direct[key]] = False
        elif fusion is not None and fusion.target in spec.params and all(k in src.packed for k in fusion.keys) \
                and keeps_rows(fusion.converter.operations):
            params.update({t: False for t in fusion.targets()})
        else:
            raise SourceError(f"{key} is a packed {spec.fmt.label} weight that transformers combines with others "
                              f"at load; convert with --dtype float16 (or bfloat16) to de-quantize it")
    spec.params = params


@dataclass
class RepackSpec:
    """convert.QuantSpec's counterpart for a published checkpoint kept quantized: its packed
    weights are stored re-packed (no rounding), its other weights as they are."""
    fmt: Published
    group: int  # the stored int4 group
    params: dict[str, bool]  # params that may come packed -> transposed (always False: nn.Linear)

    @classmethod
    def for_model(cls, model, plan, fmt: Published) -> "RepackSpec":
        params = quantizable_params(model, plan, embeddings=True)
        group = stored_group(fmt, [plan_shape(plan, n)[-1] for n in params]) if fmt.scheme == "int4" else 0
        return cls(fmt, group, {n: False for n in params})

    def manifest_entry(self) -> dict:
        return {"scheme": self.fmt.scheme, "group_size": self.group or None, "embeddings": False,
                "source_format": self.fmt.label}

    def take(self, planned, mapping, raw: dict, model) -> dict[str, Repacked]:
        """{param: Repacked [E, out, in]} for `planned`'s expert parameters made from packed
        per-expert weights (popped from `raw`): transformers' own stacking and concatenation run on
        each part alone (check_repackable made sure they keep rows whole), so every part is
        [E, ...] and each expert's bytes of it one range, as `--quantize` stores experts."""
        out = {}
        for first in dict.fromkeys(mapping.made_by[p] for p in planned.params if p in mapping.made_by):
            fusion = mapping.fused[first]
            if not isinstance(raw.get(fusion.keys[0]), Repacked):
                continue
            packed = [raw.pop(k) for k in fusion.keys]  # of one input width, or the stacking below fails
            if {stored_scheme(p.parts, self.fmt.scheme) for p in packed} == {"int4", "int4-sym"}:
                for p in (p for p in packed if "zeros" not in p.parts):  # stacked with others: zero points 8
                    p.parts["zeros"] = torch.full(p.parts["scales"].shape, SYMMETRIC_ZERO, dtype=torch.uint8)
            if len({stored_scheme(p.parts, self.fmt.scheme) for p in packed}) > 1:
                raise SourceError(f"{fusion.keys[0]} and the weights transformers stacks with it are not all in "
                                  f"act-order (or all not); convert with --dtype float16 (or bfloat16) to de-quantize")
            parts = {}
            for part in packed[0].parts:
                dtypes = {p.parts[part].dtype for p in packed}  # zeros: the scales' dtype where exact, else U8
                if dtypes == {torch.uint8, next(iter(packed)).parts["scales"].dtype} and part == "zeros":
                    dtypes = {torch.uint8}  # integer zero points for all: those exact in float are integers too
                    for p in packed:
                        p.parts[part] = integer_zeros(p.parts[part], p.parts["scales"])
                dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
                if part == "columns":  # one order of input columns per weight: as a row, concatenations stack it
                    made = fusion.run({k: p.parts[part][None] for k, p in zip(fusion.keys, packed)}, model, dtype)
                    parts[part] = {name: one_order(t, fusion.keys[0]) for name, t in made.items()}
                    continue
                parts[part] = fusion.run({k: p.parts[part] for k, p in zip(fusion.keys, packed)}, model, dtype)
            for name in parts["qweight"]:
                one = {part: made[name] for part, made in parts.items()}
                out[name] = Repacked(torch.Size([*one["qweight"].shape[:2], packed[0].shape[1]]), one)
        return out

    def store(self, name: str, t, target: torch.dtype, tensors: dict, quantized: dict) -> None:
        """`name`'s parts into `tensors` and its entry into `quantized` if it came packed, else `t` cast."""
        if not isinstance(t, Repacked):
            tensors[name] = t.to(target) if t.is_floating_point() else t
            return
        scheme = stored_scheme(t.parts, self.fmt.scheme)
        for part, stored in quant_part_names(name, scheme).items():
            tensors[stored] = t.parts[part]
        quantized[name] = {"shape": list(t.shape), "dtype": DTYPE_TO_ST[target], "transposed": False}
        if scheme != self.fmt.scheme:  # a parameter's own scheme (act-order), as a GGUF's block types
            quantized[name]["scheme"] = scheme
