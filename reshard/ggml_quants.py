"""GGML block types kept as they are in a `.gguf` file, and their de-quantization in torch.

A GGUF weight of shape (out, in) is stored as `out` rows of `in / block` blocks of bytes; a
row of the weight is a row of blocks, so a row permutation (transformers' q/k un-permuting)
moves whole rows of bytes. reshard keeps these bytes as one uint8 part, `X.weight.blocks`
(out, in / block * block_bytes), under a scheme named after the type ("q8_0", "q4_k", ...).

The expansion is a port of the gguf package's `dequantize_blocks` (ggml's reference formulas),
operation for operation, so it equals `gguf.quants.dequantize` bit for bit in float32: every
product and sum rounds as numpy's does. Then it is cast to the compute dtype, as the
de-quantize-at-convert path casts gguf's float32 result.

Every product here is exact in float32: a float16 scale (11 significant bits) times integers of
at most 13 bits together (a 6-bit sub-block scale and a 4-bit value, say) fits float32's 24. So
each value rounds at most once before the cast, at its one add or subtract, and a fused
multiply-add gives the same float32: compiled code (runtime/expansion.py) equals this bit for bit.
"""

from __future__ import annotations

import torch

from . import ggml_iquants
from .ggml_bytes import half, nibbles, words
from .errors import SourceError

QK_K = 256
# scheme -> (GGML type name, values per block, bytes per block)
BLOCK_TYPES = {"q8_0": ("Q8_0", 32, 34), "q4_0": ("Q4_0", 32, 18), "q4_1": ("Q4_1", 32, 20),
               "q5_0": ("Q5_0", 32, 22), "q5_1": ("Q5_1", 32, 24),
               "q2_k": ("Q2_K", QK_K, 84), "q3_k": ("Q3_K", QK_K, 110), "q4_k": ("Q4_K", QK_K, 144),
               "q5_k": ("Q5_K", QK_K, 176), "q6_k": ("Q6_K", QK_K, 210), "iq4_nl": ("IQ4_NL", 32, 18),
               "iq4_xs": ("IQ4_XS", QK_K, 136)}
BLOCK_TYPES.update(ggml_iquants.BLOCK_TYPES)  # IQ1-IQ3, TQ and MXFP4 blocks: reshard/ggml_iquants.py
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl


def scheme_for(ggml_type_name: str) -> str | None:
    """The stored scheme that keeps GGML type `ggml_type_name` (e.g. "Q4_K") as blocks, or None."""
    return next((s for s, (name, _, _) in BLOCK_TYPES.items() if name == ggml_type_name), None)


def check_block_shape(name: str, raw: torch.Tensor, scheme: str, shape) -> None:
    """`raw` must be the blocks of an (out, in) = `shape` weight in `scheme` (or of [E, out, in]
    experts: [E, out, in / block * block_bytes])."""
    _, size, nbytes = BLOCK_TYPES[scheme]
    if len(shape) not in (2, 3) or shape[-1] % size or list(raw.shape) != [*shape[:-1], shape[-1] // size * nbytes]:
        raise SourceError(f"{name}: the source's {scheme} blocks {list(raw.shape)} do not make a weight of "
                          f"shape {list(shape)}; the checkpoint does not match its config")


def dequantize_blocks(raw: torch.Tensor, scheme: str, *, dtype: torch.dtype) -> torch.Tensor:
    """(rows, in) weight in `dtype` from `raw` (rows, in / block * block_bytes) uint8 blocks."""
    return expand_blocks(raw.reshape(-1, BLOCK_TYPES[scheme][2]), scheme, dtype=dtype).reshape(raw.shape[0], -1)


def prepare(scheme: str, device) -> None:
    """Make the tables `scheme`'s expansion looks up (grids: reshard/ggml_iquants.py) on `device`,
    before compiled code traces it."""
    ggml_iquants.prepare(scheme, device)


def expand_blocks(blocks: torch.Tensor, scheme: str, *, dtype: torch.dtype) -> torch.Tensor:
    """(n, block_bytes) uint8 blocks -> (n, values per block) in `dtype`: the blocks alone, whatever
    the weight's shape (what runtime/expansion.py compiles, one graph per scheme and dtype)."""
    return _DEQUANTIZE[scheme](blocks).to(dtype)


def _q8_0(blocks):
    d = half(blocks[:, :2])
    x = blocks[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _q4_0(blocks):
    d = half(blocks[:, :2])
    qs = nibbles(blocks[:, 2:].reshape(len(blocks), 1, 16), 16).reshape(len(blocks), -1)
    return d * (qs.to(torch.int8) - 8).float()


def _q4_1(blocks):
    d, m = half(blocks[:, :2]), half(blocks[:, 2:4])
    qs = nibbles(blocks[:, 4:].reshape(len(blocks), 1, 16), 16).reshape(len(blocks), -1).float()
    return (d * qs) + m


def _q5(blocks, at: int) -> torch.Tensor:
    """Q5_0/Q5_1's 5-bit values (0..31) from their 4 bytes of fifth bits (a little-endian uint32 at
    `at`: bit i above value i) and the 16 bytes of nibbles after them, as float32 (n, 32)."""
    n = len(blocks)
    qh = words(blocks[:, at:at + 4], 4)  # (n, 1)
    high = ((qh >> torch.arange(32, device=blocks.device)) & 1).to(torch.uint8)
    low = nibbles(blocks[:, at + 4:].reshape(n, 1, 16), 16).reshape(n, -1)
    return low | (high << 4)


def _q5_0(blocks):
    """float16 d, then the 5-bit values: w = d * (q - 16)."""
    return half(blocks[:, :2]) * (_q5(blocks, 2).to(torch.int8) - 16).float()


def _q5_1(blocks):
    """float16 d and m, then the 5-bit values: w = d * q + m."""
    return (half(blocks[:, :2]) * _q5(blocks, 4).float()) + half(blocks[:, 2:4])


def _shifts(*bits: int, device) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.uint8, device=device).reshape(1, 1, len(bits), 1)


def _q2_k(blocks):
    """16 bytes of 4-bit scales and mins (one each per 16 values), 64 bytes of 2-bit values, d, dmin."""
    n = len(blocks)
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = half(blocks[:, 80:82]), half(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device)) & 3).reshape(n, QK_K // 16, 16)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q3_k(blocks):
    """32 bytes of high-bit masks, 64 bytes of 2-bit values, twelve bytes of sixteen 6-bit scales, d."""
    n = len(blocks)
    hmask, qs, scales, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], half(blocks[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=blocks.device
                                                          ).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device
                                                           ).reshape(1, 4, 1)).reshape(n, 16)
    sc = (((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device)).reshape(n, 16, QK_K // 16) & 3
    bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 1, 8, 1)  # (not _shifts: torch.compile
    # mis-traces torch.tensor of eight values there)
    qh = (hmask.reshape(n, -1, 1, 32) >> bits).reshape(n, 16, QK_K // 16) & 1
    qh = qh ^ 1  # the offset is zero where the mask bit is set
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _iq4(q: torch.Tensor) -> torch.Tensor:
    """4-bit indices -> ggml's non-linear IQ4 values, as float32."""
    return torch.tensor(IQ4_VALUES, dtype=torch.int8, device=q.device)[q.long()].float()


def _iq4_nl(blocks):
    """float16 d, then 16 bytes: low nibbles values 0-15, high nibbles 16-31, each an index into IQ4_VALUES."""
    n = len(blocks)
    q = nibbles(blocks[:, 2:].reshape(n, 1, 16), 16).reshape(n, -1)
    return half(blocks[:, :2]) * _iq4(q)


def _iq4_xs(blocks):
    """float16 d, 2 + 4 bytes of eight 6-bit scales (high bits, low nibbles), then eight blocks of 32
    values laid out as IQ4_NL's, each an index into IQ4_VALUES."""
    n = len(blocks)
    d = half(blocks[:, :2])
    high = blocks[:, 2].int() | (blocks[:, 3].int() << 8)
    high = (high.reshape(n, 1) >> torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device)) & 0x03
    low = (blocks[:, 4:8].reshape(n, -1, 1) >> torch.tensor([0, 4], dtype=torch.uint8, device=blocks.device
                                                            ).reshape(1, 1, 2)).reshape(n, -1) & 0x0F
    scales = (low.int() | (high << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, -1, 1)
    q = nibbles(blocks[:, 8:].reshape(n, -1, 16), 16).reshape(n, -1, 32)
    return (dl * _iq4(q)).reshape(n, QK_K)


def _q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in a Q4_K block's 12 bytes (see gguf's Q4_K.get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(blocks):
    n = len(blocks)
    d, dmin = half(blocks[:, :2]), half(blocks[:, 2:4])
    sc, m = _q4_k_scale_min(blocks[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    qs = nibbles(blocks[:, 16:].reshape(n, -1, 32), 32).reshape(n, -1, 32).float()
    return (d * qs - dm).reshape(n, QK_K)


def _q5_k(blocks):
    """Q4_K's scales and mins, then 32 bytes of fifth bits (bit b of byte i: value i of block b) and
    the 128 bytes of low nibbles laid out as Q4_K's."""
    n = len(blocks)
    d, dmin = half(blocks[:, :2]), half(blocks[:, 2:4])
    sc, m = _q4_k_scale_min(blocks[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    qh = blocks[:, 16:48].reshape(n, 1, 32)
    bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    high = (qh >> bits) & 0x01  # (n, 8, 32): block b's fifth bits
    ql = nibbles(blocks[:, 48:].reshape(n, -1, 32), 32).reshape(n, -1, 32)
    q = (ql | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(blocks):
    n = len(blocks)
    ql, qh = blocks[:, :QK_K // 2], blocks[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = blocks[:, QK_K // 2 + QK_K // 4:-2].contiguous().view(torch.int8).float()
    d = (half(blocks[:, -2:]) * scales).reshape(n, QK_K // 16, 1)
    ql = nibbles(ql.reshape(n, -1, 64), 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    qh = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


_DEQUANTIZE = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k,
               "q5_k": _q5_k, "q6_k": _q6_k, "iq4_nl": _iq4_nl, "iq4_xs": _iq4_xs, **ggml_iquants.DEQUANTIZE}
