"""Where a CPU decode step of a small model goes: Python (cProfile) and torch ops (torch.profiler).

SmolLM2-135M-Instruct, converted as fp16 and `--quantize int8` / `int4` folders, resident on the
CPU in the default dtype; a prompt of 16 tokens, then greedy steps of one token with the KV cache
(forward + argmax). Prints ms/token for each folder, then the profiles of `--steps` steps of the
int8 folder: the top Python functions by own time and the top torch ops.

  python benchmarks/profile_decode.py [--threads 2] [--steps 32] [--hooks]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from common import machine_lines  # noqa: E402
from models import smollm2_quantized  # noqa: E402


def decode(lm, steps: int):
    """Prompt, then `steps` greedy steps; returns the seconds of each step."""
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=lm.config)
    logits = lm(ids, past_key_values=cache, use_cache=True).logits
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = logits[:, -1:].argmax(-1)
        logits = lm(tok, past_key_values=cache, use_cache=True).logits
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    from runtime.model import LayeredModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("\n".join(machine_lines("default (CPU)", args.threads)))
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine)\n")
    paths = smollm2_quantized()
    for name, path in paths.items():
        with LayeredModel.from_pretrained(path, device="cpu", max_cpu_memory="10GB") as lm:
            decode(lm, 4)
            times = sorted(decode(lm, args.steps))
            print(f"{name}: compute {lm.loader.dtype}, {1000 * times[len(times) // 2]:.2f} ms/token median, "
                  f"{1000 * times[0]:.2f} min, load avg {os.getloadavg()[0]:.1f}")
    with LayeredModel.from_pretrained(paths["int8"], device="cpu", max_cpu_memory="10GB") as lm:
        decode(lm, 4)
        prof = cProfile.Profile()
        prof.enable()
        decode(lm, args.steps)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"\n## cProfile, int8 folder, {args.steps} steps, by own time\n")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:8000])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            decode(lm, args.steps)
        print(f"\n## torch.profiler, int8 folder, {args.steps} steps (+ prompt), by self CPU time\n")
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
