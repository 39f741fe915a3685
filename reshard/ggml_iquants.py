"""GGML's lowest-bit blocks kept as they are in a `.gguf` file: the grid types (IQ1_S, IQ1_M,
IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), the ternary ones (TQ1_0, TQ2_0) and MXFP4 (gpt-oss's
experts), with their de-quantization in torch.

These are the files people run the largest models from on the smallest machines: IQ2_XXS stores
256 weights in 66 bytes where bfloat16 takes 512. De-quantized at convert they would take their
bfloat16 size on disk and on every pass; kept, a pass moves their 1.56-4.25 bits a weight (reshard/ggml_quants.py
registers them beside the K-quants: the same `X.weight.blocks` part, the same expansion path).

Each function is a port of the gguf package's `dequantize_blocks` for the type, operation for
operation, so it equals `gguf.quants.dequantize` bit for bit in float32. Every product is exact in
float32 (a float16 scale, a scale of at most 5 bits, a grid value of at most 6), so compiled code
gives the same numbers too. The grid types look up 4 or 8 values at a time in ggml's grids
(256 to 2048 rows); those tables, and IQ2's sign patterns, are the gguf package's own, read from it
once per device (`gguf` is needed to expand these types, as to convert a GGUF).
"""

from __future__ import annotations

import torch

from .errors import UsageError
from .ggml_bytes import bits, half, nibbles, words

QK_K = 256
# scheme -> (GGML type name, values per block, bytes per block)
BLOCK_TYPES = {"iq2_xxs": ("IQ2_XXS", QK_K, 66), "iq2_xs": ("IQ2_XS", QK_K, 74), "iq2_s": ("IQ2_S", QK_K, 82),
               "iq3_xxs": ("IQ3_XXS", QK_K, 98), "iq3_s": ("IQ3_S", QK_K, 110), "iq1_s": ("IQ1_S", QK_K, 50),
               "iq1_m": ("IQ1_M", QK_K, 56), "tq1_0": ("TQ1_0", QK_K, 54), "tq2_0": ("TQ2_0", QK_K, 66),
               "mxfp4_blocks": ("MXFP4", 32, 17)}  # ("mxfp4" is transformers' layout: reshard/mxfp4.py)
GRIDS = {"iq2_xxs": "IQ2_XXS", "iq2_xs": "IQ2_XS", "iq2_s": "IQ2_S", "iq3_xxs": "IQ3_XXS", "iq3_s": "IQ3_S",
         "iq1_s": "IQ1_S", "iq1_m": "IQ1_S"}  # scheme -> the gguf class whose grid it looks up (IQ1_M: IQ1_S's)
IQ1_DELTA = 0.125
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled (ggml's kvalues_mxfp4)
_TABLES: dict = {}  # (table, device) -> tensor


def prepare(scheme: str, device: torch.device) -> None:
    """Make `scheme`'s tables on `device` before a compiled expansion traces it (a no-op for types
    without tables)."""
    if scheme in GRIDS:
        _grid(GRIDS[scheme], device)
    if scheme in ("iq2_xxs", "iq2_xs", "iq3_xxs"):
        _ksigns(device)


def require_gguf():
    """The `gguf` package (reading a .gguf file, or expanding the grid types, needs it), or one clear
    line where it is not installed."""
    try:
        import gguf
        import gguf.quants  # noqa: F401 - the grids and de-quantization
    except ImportError as e:
        raise UsageError(f"GGUF files and the GGML blocks they hold need the gguf package ({e.name} is not "
                         f"installed): pip install 'reshard[gguf]'") from None
    return gguf


def kernel_tables(scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What runtime/kernels/iquant_cpu.c reads for `scheme`'s blocks: its grid as int8 rows (the
    values are small integers: exact) and its sign patterns as rows of eight int8, +1 or -1."""
    cpu = torch.device("cpu")
    grid = _grid(GRIDS[scheme], cpu).to(torch.int8).contiguous()  # -1..62
    # IQ2_XXS, IQ3_XXS, IQ2_XS: a 7-bit index into IQ2_XXS's patterns; IQ2_S, IQ3_S: the sign byte itself
    patterns = _ksigns(cpu).long() if scheme in ("iq2_xxs", "iq3_xxs", "iq2_xs") else torch.arange(256)
    signs = (1 - 2 * bits(patterns, 8, 1, 1)).to(torch.int8).contiguous()
    return grid, signs


def _grid(name: str, device: torch.device) -> torch.Tensor:
    """ggml's grid for the gguf class `name`, (rows, 4 or 8) float32, as gguf de-quantizes with it."""
    key = (name, str(device))
    if key not in _TABLES:
        cls = getattr(require_gguf().quants, name)
        cls.init_grid()
        _TABLES[key] = torch.from_numpy(cls.grid.reshape(cls.grid_shape).copy()).to(device)
    return _TABLES[key]


def _ksigns(device: torch.device) -> torch.Tensor:
    """IQ2_XXS's 128 sign patterns (eight signs from seven bits and their parity), uint8."""
    key = ("ksigns", str(device))
    if key not in _TABLES:
        ksigns = require_gguf().quants.IQ2_XXS.ksigns
        _TABLES[key] = torch.frombuffer(bytearray(ksigns), dtype=torch.uint8).to(device)
    return _TABLES[key]


def _signs(bits: torch.Tensor) -> torch.Tensor:
    """Sign bits -> +1 (bit 0) or -1 (bit 1), float32."""
    return torch.where(bits == 0, 1.0, -1.0)


def _iq2_xxs(blocks):
    """float16 d, then eight groups of 8 bytes: four grid indices, then a uint32 of four 7-bit sign
    indices and a 4-bit scale: w = d * (0.5 + s) * 0.25 * grid * sign."""
    n = len(blocks)
    d = half(blocks[:, :2])
    groups = blocks[:, 2:].reshape(n, 8, 8)
    aux = words(groups[:, :, 4:].reshape(n, -1), 4)  # (n, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    signs = _ksigns(blocks.device)[bits(aux, 4, 7, 0x7F)]  # (n, 8, 4)
    signs = _signs(bits(signs.long(), 8, 1, 1))  # (n, 8, 4, 8)
    grid = _grid("IQ2_XXS", blocks.device)[groups[:, :, :4].long()]  # (n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_xs(blocks):
    """float16 d, 32 uint16 (a 9-bit grid index, a 7-bit sign index), 8 bytes of two 4-bit scales."""
    n = len(blocks)
    d = half(blocks[:, :2])
    qs = words(blocks[:, 2:66], 2)  # (n, 32)
    scales = bits(blocks[:, 66:74].long(), 2, 4, 0x0F).reshape(n, 16)
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(bits(_ksigns(blocks.device)[qs >> 9].long(), 8, 1, 1)).reshape(n, 16, 2, 8)
    grid = _grid("IQ2_XS", blocks.device)[qs & 511].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(blocks):
    """float16 d, 32 bytes of grid indices' low 8 bits, 32 bytes of signs, 8 bytes of their 2 high
    bits, 8 bytes of two 4-bit scales."""
    n = len(blocks)
    d = half(blocks[:, :2])
    qs, signs, qh, scales = blocks[:, 2:34], blocks[:, 34:66], blocks[:, 66:74], blocks[:, 74:82]
    scales = bits(scales.long(), 2, 4, 0x0F).reshape(n, 16)
    db = (d * (0.5 + scales.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(bits(signs.long(), 8, 1, 1)).reshape(n, 16, 2, 8)
    index = qs.long() | (bits(qh.long(), 4, 2, 0x03).reshape(n, 32) << 8)
    grid = _grid("IQ2_S", blocks.device)[index].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_xxs(blocks):
    """float16 d, 64 grid indices (4 values each), eight uint32 of four 7-bit sign indices and a
    4-bit scale: w = d * (0.5 + s) * 0.5 * grid * sign."""
    n = len(blocks)
    d = half(blocks[:, :2])
    aux = words(blocks[:, 66:98], 4)  # (n, 8)
    db = (d * (0.5 + (aux >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    signs = _signs(bits(_ksigns(blocks.device)[bits(aux, 4, 7, 0x7F)].long(), 8, 1, 1))  # (n, 8, 4, 8)
    grid = _grid("IQ3_XXS", blocks.device)[blocks[:, 2:66].long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(blocks):
    """float16 d, 64 bytes of grid indices' low 8 bits, 8 bytes of their 9th bits, 32 bytes of
    signs, 4 bytes of two 4-bit scales: w = d * (1 + 2 s) * grid * sign."""
    n = len(blocks)
    d = half(blocks[:, :2])
    qs, qh, signs, scales = blocks[:, 2:66], blocks[:, 66:74], blocks[:, 74:106], blocks[:, 106:110]
    scales = bits(scales.long(), 2, 4, 0x0F).reshape(n, 8)
    db = (d * (1 + 2 * scales).float()).reshape(n, 8, 1, 1)
    signs = _signs(bits(signs.long(), 8, 1, 1)).reshape(n, 8, 4, 8)
    index = qs.long() | (bits(qh.long(), 8, 1, 0x01).reshape(n, 64) << 8)
    grid = _grid("IQ3_S", blocks.device)[index].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq1_s(blocks):
    """float16 d, 32 bytes of grid indices' low 8 bits, eight uint16: four 3-bit high parts, a 3-bit
    scale and the sign of a shift: w = d * (2 s + 1) * (grid +- 0.125)."""
    n = len(blocks)
    d = half(blocks[:, :2])
    qh = words(blocks[:, 34:50], 2)  # (n, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 1, 1)
    index = blocks[:, 2:34].long() | (bits(qh, 4, 3, 0x07).reshape(n, 32) << 8)
    grid = _grid("IQ1_S", blocks.device)[index].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(blocks):
    """32 bytes of grid indices' low 8 bits, 16 bytes of two (3 high bits, shift sign) nibbles, four
    uint16 of 3-bit scales whose top nibbles together are the float16 d."""
    n = len(blocks)
    qs, qh = blocks[:, :32], blocks[:, 32:48]
    scales = words(blocks[:, 48:56], 2)  # (n, 4)
    top = ((scales & 0xF000) >> torch.tensor([12, 8, 4, 0], device=blocks.device)).sum(-1)  # disjoint: an OR
    d = half(torch.stack([top & 0xFF, top >> 8], dim=-1).to(torch.uint8))
    dl = (d * (2 * bits(scales, 4, 3, 0x07).reshape(n, 16) + 1).float()).reshape(n, 8, 2, 1, 1)
    high = bits(qh.long(), 2, 4, 0x0F).reshape(n, 32)
    index = qs.long() | ((high & 0x07) << 8)
    delta = torch.where((high & 0x08) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _grid("IQ1_S", blocks.device)[index].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _trits(b: torch.Tensor, powers: tuple[int, ...]) -> torch.Tensor:
    """TQ1_0's bytes of five (or four) base-3 digits -> (n, len(powers) * width) digits 0..2: the
    byte times 3^j modulo 256, its top two bits times 3."""
    pw = torch.tensor(powers, dtype=torch.long, device=b.device).reshape(1, -1, 1)
    q = (b.long().unsqueeze(1) * pw) & 0xFF
    return ((q * 3) >> 8).reshape(len(b), -1)


def _tq1_0(blocks):
    """48 bytes of five trits each (32 then 16), 4 bytes of four, float16 d: w = d * (t - 1)."""
    q = torch.cat([_trits(blocks[:, :32], (1, 3, 9, 27, 81)), _trits(blocks[:, 32:48], (1, 3, 9, 27, 81)),
                   _trits(blocks[:, 48:52], (1, 3, 9, 27))], dim=-1)
    return half(blocks[:, 52:54]) * (q - 1).float()


def _tq2_0(blocks):
    """64 bytes of four 2-bit values each (value j of byte i: bits 2j), float16 d: w = d * (q - 1)."""
    n = len(blocks)
    q = (blocks[:, :64].reshape(n, 2, 1, 32).long() >> torch.tensor([0, 2, 4, 6], device=blocks.device
                                                                     ).reshape(1, 1, 4, 1)) & 3
    return half(blocks[:, 64:66]) * (q.reshape(n, QK_K) - 1).float()


def _mxfp4_blocks(blocks):
    """A byte of e8m0 exponent, 16 bytes of e2m1 nibbles (low: values 0-15, high: 16-31):
    w = 2^(e - 128) * 2 v (ggml's e8m0_to_fp32_half; v doubled in MXFP4_VALUES)."""
    n = len(blocks)
    e = blocks[:, :1].long()
    exponent = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = exponent.to(torch.int32).view(torch.float32)
    q = nibbles(blocks[:, 1:].reshape(n, 1, 16), 16).reshape(n, 32)
    values = torch.tensor(MXFP4_VALUES, dtype=torch.int8, device=blocks.device)[q.long()]
    return d * values.float()


DEQUANTIZE = {"iq2_xxs": _iq2_xxs, "iq2_xs": _iq2_xs, "iq2_s": _iq2_s, "iq3_xxs": _iq3_xxs, "iq3_s": _iq3_s,
              "iq1_s": _iq1_s, "iq1_m": _iq1_m, "tq1_0": _tq1_0, "tq2_0": _tq2_0, "mxfp4_blocks": _mxfp4_blocks}
