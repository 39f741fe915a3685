"""Reading the fields of GGML blocks (rows of uint8) in torch, for reshard/ggml_quants.py and
reshard/ggml_iquants.py: float16 scales, nibbles, little-endian words and bit fields."""

from __future__ import annotations

import torch


def half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row (little-endian float16) -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(n, k, width) bytes -> (n, k, 2, width): low nibbles, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def words(b: torch.Tensor, width: int) -> torch.Tensor:
    """(n, k * width) bytes -> (n, k) little-endian unsigned integers of `width` bytes, as int64."""
    b = b.reshape(len(b), -1, width).long()
    return sum(b[..., i] << (8 * i) for i in range(width))


def bits(b: torch.Tensor, count: int, step: int, mask: int) -> torch.Tensor:
    """(n, k) integers -> (n, k, count): fields of `step` bits masked by `mask`, lowest first."""
    shifts = torch.arange(0, count * step, step, dtype=b.dtype, device=b.device)
    return (b.unsqueeze(-1) >> shifts) & mask
