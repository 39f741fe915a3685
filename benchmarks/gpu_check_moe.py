"""GPU check, MoE section: expert-sparse streaming vs whole layers at real MoE layer shapes.

Random bf16 models with Mixtral-8x7B's layer shapes (hidden 4096, 8 experts of 14336, 2 per token)
and Qwen3-30B-A3B's (hidden 2048, 128 experts of 768, 8 per token), a few layers each (about
11 GB of files, under the 16 GB cap), decoded at batch 1 with every group streamed from disk and
the page cache dropped before every pass (benchmarks/moe.py does the work). Goal: s/token of
expert-sparse streaming at least 3x (Mixtral shape) and 8x (Qwen3 shape) faster than whole layers.
`dry` runs tiny shapes on the CPU (the check that this code runs; its figures mean nothing).
"""

from __future__ import annotations

import shutil

import torch

from moe import describe, folder_of, run_once, summarize

GOALS = {"mixtral": 3.0, "qwen3": 8.0}
LAYERS = {"mixtral": 4, "qwen3": 8}  # Mixtral: ~2.9 GB a layer, Qwen3-30B-A3B: ~1.3 GB (bf16)


def moe_streaming(out, device: torch.device, work, dry: bool, cache_fraction: float = 0.25) -> bool:
    """Print the table; True if every shape ran (the goals are reported, not enforced)."""
    dtype = torch.float32 if dry else torch.bfloat16
    tokens, modes = (2 if dry else 4), ["whole", "sparse", "sparse+cache", "sparse+cache+predict"]
    ok = True
    out("MoE: batch-1 decode, every group streamed from disk, page cache dropped before each pass")
    for shape, goal in GOALS.items():
        folder = folder_of(shape, 2 if dry else LAYERS[shape], dtype, device.type, 2 if dry else 0, root=work)
        out(describe(shape, folder))
        rows = {}
        for mode in modes:
            rows[mode] = summarize([run_once(folder, mode, tokens, True, str(device), cache_fraction)], [])
        base = rows["whole"]["s_per_token"]
        for mode, r in rows.items():
            speedup = base / r["s_per_token"] if r["s_per_token"] else float("nan")
            out(f"  {mode:<13} {r['s_per_token']:.3f} s/token ({speedup:.2f}x whole; goal for sparse >= {goal:g}x)  "
                f"{r['bytes_per_pass'] / 1e9:.3f} GB/pass (experts {r['expert_bytes_per_pass'] / 1e9:.3f} GB, "
                f"{r['experts_read_per_pass']:g} read), cache hits {r['cache_hit_rate']}, guess hits {r['guess_hit_rate']}")
        ok = ok and all(r["passes"] for r in rows.values())
        shutil.rmtree(folder, ignore_errors=True)
    return ok
