"""Expanding GGML blocks that no native kernel multiplies: plain torch vs the compiled expansion.

On a CPU, the GGUF types without a kernel in runtime/kernels (IQ1-IQ3, TQ1_0/TQ2_0, MXFP4, Q5_0,
Q5_1, IQ4_NL) are expanded at every load of a streamed layer; on a GPU every type is. This times
one (rows x cols) weight of random blocks per type, expanded to bfloat16 by reshard/ggml_quants.py's
formulas in plain torch and by runtime/expansion.py's compiled graph (the blocks alone, their
number dynamic), after a warm-up call that compiles. `--rounds` rounds time each way once per type;
the ratio compiled / plain ("vs plain") pairs the figures of one round, and the median of the rounds' ratios is
quoted. Both give the same bits (tests/test_expansion.py). GB/s counts the blocks' bytes.

  python benchmarks/expansion.py > benchmarks/results/expansion_cpu.txt
  python benchmarks/expansion.py --device cuda --rows 8192 --cols 28672  # a 70B down_proj, on a GPU
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
from reshard.quant import dequantize  # noqa: E402
from runtime import expansion  # noqa: E402

TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "tq1_0", "tq2_0", "mxfp4_blocks",
         "q5_0", "q5_1", "iq4_nl", "q4_k", "q6_k")


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the CPU's compiled expansion, as the runtime uses it for these types
        expansion.DEVICES = (*expansion.DEVICES, "cpu")
    for line in machine_lines("bfloat16"):
        out(line)
    out(f"weight: {args.rows} x {args.cols}, expanded to bfloat16 on {device}; {args.rounds} rounds")
    out()
    out(f"{'type':<13} {'bits/w':>6} {'plain ms':>9} {'compiled ms':>11} {'compiled GB/s':>13} {'vs plain':>9}")
    for scheme in args.types.split(","):
        _, size, nbytes = BLOCK_TYPES[scheme]
        parts = {"blocks": torch.from_numpy(random_blocks(scheme, args.rows, args.cols // size, scale=0.02)).to(device)}

        def plain():
            return dequantize(parts, scheme, columns=args.cols, dtype=torch.bfloat16)

        def compiled():
            return expansion.expand_weight(parts, scheme, columns=args.cols, dtype=torch.bfloat16)

        assert torch.equal(compiled(), plain()), scheme  # warm-up (compiles), and the same bits
        rounds = [(timed(plain, device), timed(compiled, device)) for _ in range(args.rounds)]
        p = statistics.median(r[0] for r in rounds)
        c = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[1] / r[0] for r in rounds)
        stored = parts["blocks"].numel()
        out(f"{scheme:<13} {8 * nbytes / size:>6.2f} {p * 1e3:>9.1f} {c * 1e3:>11.1f} {stored / c / 1e9:>13.2f} "
            f"{ratio:>8.3f}x")
    out()
    out(f"fallbacks to plain torch: {expansion.fallbacks()}")


if __name__ == "__main__":
    main()
