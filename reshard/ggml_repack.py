"""GGUF Q8_0, Q4_0 and Q4_1 blocks re-packed, exactly, into the project's int8/int4 (group 32).

Each of these GGML types is 32 values with float16 scale(s) per block, which is what the
project's own schemes store per group of 32 input columns (reshard/quant.py):
- Q8_0, w = d * q (q int8): int8 with group scales, `qweight` = the q's, `scales` (out, in/32) = the d's.
  34 bytes per 32 values, as the source.
- Q4_1, w = d * q + m (q in 0..15): int4, `scales` = d, `zeros` = m. 20 bytes per 32 values, as the source.
- Q4_0, w = d * (q - 8): "int4-sym", int4 whose zeros are -8 * scales, left out of the file (stored
  they would make 20 bytes of the source's 18: over the 1.1x a kept format may take). Where -8 * d
  does not fit the scales' float16 (|d| > 8188) the weight is plain int4 with float32 zeros.

The values are those of `gguf.quants.dequantize`, bit for bit in float32 up to the sign of a zero:
q * d (at most 8 by 11 significant bits) is exact in float32, so zeros + q * scales rounds once,
as ggml's (d * q) + m does; for Q4_0 the sum -8d + q*d is the exact d * (q - 8), but a zero
comes out +0 where ggml's 0 * d gives -0 for a negative d (equal values, which torch.equal takes as equal).
A block's 16 Q4_0/Q4_1 bytes hold values j (low nibble) and j + 16 (high nibble); the project
packs columns 2i and 2i + 1 in a byte, so the nibbles are re-paired here.
"""

from __future__ import annotations

import torch

from .ggml_quants import BLOCK_TYPES

GROUP = 32  # values per block of each type here: the stored group size
SYMMETRIC_ZERO = 8  # Q4_0's, and "int4-sym"'s: zeros = -8 * scales
REPACKED = {"q8_0": "int8", "q4_0": "int4-sym", "q4_1": "int4"}  # GGML scheme -> the project's


def repack_blocks(raw: torch.Tensor, scheme: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(stored scheme, parts) for `raw` (rows, in / 32 * bytes per block) uint8 blocks of GGML
    `scheme` (one of REPACKED), rows as they are (a row permutation was applied already)."""
    _, size, nbytes = BLOCK_TYPES[scheme]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, nbytes)  # (rows, G, bytes per block)
    d = _f16(blocks[..., :2])  # (rows, G) float16
    if scheme == "q8_0":
        return "int8", {"qweight": blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), "scales": d}
    first = 4 if scheme == "q4_1" else 2
    qs = blocks[..., first:]  # (rows, G, 16): value j in the low nibble of byte j, j + 16 in the high
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, -1)  # (rows, in) in column order
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    if scheme == "q4_1":
        return "int4", {"qweight": packed, "scales": d, "zeros": _f16(blocks[..., 2:4])}
    zeros = -SYMMETRIC_ZERO * d.float()
    if torch.isfinite(zeros.to(d.dtype)).all():
        return "int4-sym", {"qweight": packed, "scales": d}
    return "int4", {"qweight": packed, "scales": d, "zeros": zeros}


def symmetric_zeros(scales: torch.Tensor) -> torch.Tensor:
    """The zeros of an "int4-sym" weight, -8 * scales, in float32 (exact)."""
    return -SYMMETRIC_ZERO * scales.float()


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) little-endian bytes -> (...) float16."""
    return b.contiguous().view(torch.float16).squeeze(-1)
