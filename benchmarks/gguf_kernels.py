"""The CPU kernels for GGUF blocks at batch 1: one weight's product per type, against bf16.

For each GGML type the native kernels take as stored (runtime/kernels/kquant_cpu.c, iquant_cpu.c), one
(rows x cols) weight of random blocks (tests/gguf_files.py) is multiplied by one activation row,
`--repeat` times a round; in the same round torch multiplies the bf16 weight of the same shape (what the
blocks expand to). `--rounds` rounds; each row's time and GB/s (of the weight's stored bytes) are the
medians over the rounds, and "vs bf16" the median of the rounds' ratios. A weight of 4096 x 11008 is a
7B model's down_proj: 90 MB in bf16, past the CPU's caches, as decode reads it.

  python benchmarks/gguf_kernels.py > benchmarks/results/gguf_kernels.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine_lines, out  # noqa: E402
from gguf_files import random_blocks  # noqa: E402

from reshard.ggml_quants import BLOCK_TYPES  # noqa: E402
from runtime import native  # noqa: E402

TYPES = ("q4_k", "q6_k", "q2_k", "iq4_xs", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s",
         "tq1_0", "tq2_0", "iq4_nl", "mxfp4_blocks", "q5_0", "q5_1")


def timed(fn, repeat: int) -> float:
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for line in machine_lines("bfloat16"):
        out(line)
    if native.lowbit() is None:
        out("no native kernels on this machine (no compiler or no AVX512-VNNI): nothing to time")
        return
    out(f"weight: {args.rows} x {args.cols}, activations: 1 row of bfloat16; {args.repeat} products a round, "
        f"{args.rounds} rounds")
    out()
    x = torch.randn(1, args.cols, generator=torch.Generator().manual_seed(0)).bfloat16()
    dense = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    out(f"{'type':<13} {'bits/w':>6} {'MB':>7} {'ms':>8} {'GB/s':>7} {'vs bf16':>8}")
    for scheme in TYPES:
        _, size, nbytes = BLOCK_TYPES[scheme]
        blocks = torch.from_numpy(random_blocks(scheme, args.rows, args.cols // size, scale=0.02))
        rounds = []
        for _ in range(args.rounds):
            ours = timed(lambda: native.kquant_gemm(x, blocks, scheme), args.repeat)
            bf16 = timed(lambda: x @ dense.T, args.repeat)
            rounds.append((ours, bf16))
        ms = statistics.median(r[0] for r in rounds)
        ratio = statistics.median(r[0] / r[1] for r in rounds)
        out(f"{scheme:<13} {8 * nbytes / size:>6.2f} {blocks.nbytes / 1e6:>7.1f} {ms * 1e3:>8.3f} "
            f"{blocks.nbytes / ms / 1e9:>7.2f} {ratio:>7.3f}x")
    bf16 = statistics.median(timed(lambda: x @ dense.T, args.repeat) for _ in range(args.rounds))
    out(f"{'bf16':<13} {16:>6.2f} {dense.nbytes / 1e6:>7.1f} {bf16 * 1e3:>8.3f} {dense.nbytes / bf16 / 1e9:>7.2f} "
        f"{1:>7.3f}x")


if __name__ == "__main__":
    main()
