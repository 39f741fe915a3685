"""GPTQ, AWQ and compressed-tensors pack-quantized weights: their layouts and published math.

Each format stores a linear weight (out, in) as small integers packed into int32 words, with a
scale and an integer zero point per group of `group` input columns; all three de-quantize as

    w[o, i] = (q[o, i] - z[o, i // group]) * s[o, i // group]

so each unpacks here into one `Affine` (q, z, s). Layouts (bits 4; 8 for compressed-tensors):
- GPTQ: `qweight` (in/8, out), input row 8r+j in bits 4j of word r; `qzeros` (groups, out/8),
  output column 8c+j in bits 4j; `scales` (groups, out); `g_idx` (in,) each row's group: i // group,
  or with act-order (`desc_act`) the group of the row's place in the order GPTQ quantized the
  rows in, so that a group's rows lie anywhere (then i // group above reads g_idx[i]). The v1
  checkpoint format ("gptq", AutoGPTQ's) stores z - 1: the published kernels add 1 back.
- AWQ "gemm": `qweight` (in, out/8) and `qzeros` (groups, out/8), output columns packed in the
  order [0, 2, 4, 6, 1, 3, 5, 7] (column 8c + ORDER[j] in bits 4j); `scales` (groups, out); no +1.
- compressed-tensors "pack-quantized", symmetric: `weight_packed` (out, in/k), input column
  k*c+j in bits `bits`*j of word c, each value stored as q + 2^(bits-1); `weight_scale`
  (out, groups), `weight_shape` [out, in]; z = 0 on the signed values (2^(bits-1) on the stored).
  With `actorder: "group"` a `weight_g_idx` (in,) gives each column's group, as GPTQ's g_idx
  (-1 everywhere, or absent, as with `actorder: "weight"`: i // group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + AWQ_ORDER[j]


@dataclass
class Affine:
    """w = (q - z[:, g(i)]) * s[:, g(i)], all (out, ...) in nn.Linear's orientation, with column i in
    group g(i) = i // group, or `g_idx[i]` where the checkpoint orders its groups otherwise (act-order)."""
    q: torch.Tensor  # (out, in) int16, the stored unsigned values
    z: torch.Tensor  # (out, groups) int16
    s: torch.Tensor  # (out, groups), the checkpoint's scale dtype
    group: int  # input columns per group
    g_idx: torch.Tensor | None = None  # (in,) each column's group, where it is not i // group

    def groups_of_columns(self) -> torch.Tensor:
        """(in,) long: each input column's group."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.q.shape[1]) // self.group

    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight in float32, exactly: (q - z) is a small integer and the scale has
        at most 11 significant bits, so each product is exact in float32."""
        g = self.groups_of_columns()
        return (self.q - self.z[:, g]).float() * self.s.float()[:, g]


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 `words` -> int16 values, 32/bits per word, the lowest bits first, spread along `dim`."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).unsqueeze(-1)  # (..., per) on the last dim
    vals = torch.bitwise_right_shift(w, shifts) & ((1 << bits) - 1)
    vals = vals.movedim(-1, dim + 1) if dim != words.dim() - 1 else vals
    shape = list(words.shape)
    shape[dim] *= per
    return vals.reshape(shape).to(torch.int16)


def unpack_gptq(parts: dict[str, torch.Tensor], *, group: int, v1: bool) -> Affine:
    """A GPTQ linear from its `qweight`, `qzeros`, `scales` and `g_idx` (kept where it is not i // group)."""
    q = unpack_words(parts["qweight"], 4, 0).t()  # (in, out) -> (out, in)
    cols = q.shape[1]
    g = group if group > 0 else cols
    z = unpack_words(parts["qzeros"], 4, 1) + (1 if v1 else 0)  # (groups, out)
    return Affine(q.contiguous(), z.t().contiguous(), parts["scales"].t().contiguous(), g,
                  _group_order(parts.get("g_idx"), cols, g))


def _group_order(g_idx: torch.Tensor | None, cols: int, group: int) -> torch.Tensor | None:
    """A stored g_idx where it is not plain i // group (absent, or -1 everywhere: plain), else None."""
    if g_idx is None or bool((g_idx < 0).all()) or torch.equal(g_idx.long(), torch.arange(cols) // group):
        return None
    return g_idx


def unpack_awq(parts: dict[str, torch.Tensor], *, group: int) -> Affine:
    """An AWQ "gemm" linear from its `qweight`, `qzeros`, `scales`."""
    q = _awq_columns(unpack_words(parts["qweight"], 4, 1))  # (in, out)
    z = _awq_columns(unpack_words(parts["qzeros"], 4, 1))  # (groups, out)
    g = group if group > 0 else q.shape[0]
    return Affine(q.t().contiguous(), z.t().contiguous(), parts["scales"].t().contiguous(), g)


def _awq_columns(vals: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's column interleave: nibble j of word c is column 8c + AWQ_ORDER[j]."""
    rows, cols = vals.shape
    inverse = [AWQ_ORDER.index(k) for k in range(8)]
    return vals.view(rows, cols // 8, 8)[:, :, inverse].reshape(rows, cols)


def unpack_int_quantized(parts: dict[str, torch.Tensor]) -> Affine:
    """A compressed-tensors int-quantized (symmetric int8, one scale per row: W8A8 checkpoints' weights)
    linear from `weight` int8 as it is and `weight_scale` (out, 1): w = q * s."""
    q = parts["weight"].to(torch.int16) + 128
    s = parts["weight_scale"].reshape(q.shape[0], -1)
    return Affine(q.contiguous(), torch.full(s.shape, 128, dtype=torch.int16), s.contiguous(), q.shape[1] // s.shape[1])


def unpack_pack_quantized(parts: dict[str, torch.Tensor], *, bits: int, group: int) -> Affine:
    """A compressed-tensors pack-quantized (symmetric) linear from `weight_packed`, `weight_scale`, `weight_shape`."""
    out, cols = (int(x) for x in parts["weight_shape"].tolist())
    q = unpack_words(parts["weight_packed"], bits, 1)[:, :cols]
    s = parts["weight_scale"].reshape(out, -1)
    g = group if group > 0 else cols
    z = torch.full(s.shape, 1 << (bits - 1), dtype=torch.int16)
    return Affine(q.contiguous(), z, s.contiguous(), g, _group_order(parts.get("weight_g_idx"), cols, g))
