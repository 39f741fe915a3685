"""GPU check, frontier MoE section (issue 23): DeepSeek-V3- and Qwen3-235B-A22B-shaped layers
decoding on a GPU with 6 GB free, every group waiting in pinned host RAM.

Random weights at the real models' layer shapes (transformers' configs; `--layers` layers, every
one a MoE layer), stored int4 (group 32) and, for DeepSeek-V3, fp8 with 128x128 block scales as
it is published (reshard.synthetic). A blocker tensor leaves `--free` GB of device memory, so the
default budget plans as on a 16 GB card with a desktop beside it. Batch-1 sampled decode of
`--tokens` tokens after an 8-token prompt, in three modes:
- sparse: routed experts only, no expert cache (expert_cache=0);
- cache: the same plus the expert cache the budget leaves room for (the default);
- cache+predict: plus the next layer's experts guessed and sent ahead (predict_experts=True).
Per mode: median decode s/token, GB moved per token (weights copied to the device, guesses that
missed included), the floor those bytes set at the pinned copy rate measured in the same run
(goal: s/token <= 1.3x the floor), cache and guess hit rates, and the peak device memory the
model took beside the blocker. `--dry` runs tiny shapes on the CPU (the code runs; no figures).

    PYTHONPATH=. python benchmarks/moe_gpu.py | tee benchmarks/results/moe_gpu_h200.txt
    python benchmarks/moe_gpu.py --dry
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from common import machine_lines, out, release  # noqa: E402
from gpu_check import pinned_copy_gbps  # noqa: E402
from hybrid import DSV3, DSV3_TINY  # noqa: E402
from small_gpu import block  # noqa: E402

# Qwen3-235B-A22B: 94 layers, every one MoE
QWEN3_235B = dict(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
                  num_experts_per_tok=8, num_attention_heads=64, num_key_value_heads=4, head_dim=128)
QWEN3_TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=16,
                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
RUNS = ("deepseek-v3:int4", "qwen3-235b:int4", "deepseek-v3:fp8")  # the largest last
MODES = {"sparse": dict(expert_cache=0), "cache": dict(), "cache+predict": dict(predict_experts=True)}
GOAL = 1.3


def config_of(shape: str, layers: int, dry: bool):
    import transformers as tf

    common = dict(num_hidden_layers=layers, vocab_size=8000, tie_word_embeddings=False, max_position_embeddings=4096)
    if shape == "deepseek-v3":
        return tf.DeepseekV3Config(first_k_dense_replace=0, **common, **(DSV3_TINY if dry else DSV3))
    return tf.Qwen3MoeConfig(**common, **(QWEN3_TINY if dry else QWEN3_235B))


def run_mode(folder: Path, device: str, mode: str, tokens: int) -> dict:
    from runtime import LayeredModel

    dtype = "bfloat16" if device == "cuda" else "float32"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = LayeredModel.from_pretrained(folder, device=device, dtype=dtype, max_cpu_memory="200GB" if device == "cuda" else 0,
                                         **MODES[mode])
    try:
        torch.manual_seed(0)
        ids = torch.randint(3, 8000, (1, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=0, pad_token_id=0)
        decode = model.stats.per_pass[1:]
        read, cached = sum(p.experts_read for p in decode), sum(p.experts_cached for p in decode)
        guessed, used = sum(p.experts_predicted for p in decode), sum(p.predicted_used for p in decode)
        return {"s": statistics.median(p.seconds for p in decode),
                "bytes": statistics.median(p.bytes + p.predicted_wasted_bytes for p in decode),
                "routed": statistics.median(p.experts_read + p.experts_cached for p in decode),
                "cache_hits": cached / (read + cached) if read + cached else None,
                "guess_hits": used / guessed if guessed else None,
                "places": ", ".join(f"{model.places.count(p)} {p}" for p in ("device", "host", "disk") if p in model.places),
                "cache_gb": model.experts.cache.capacity / 1e9,
                "peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9 if device == "cuda" else None}
    finally:
        release(model)


def hits(rate) -> str:
    return "-" if rate is None else f"{rate:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU: checks the code runs")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="decode tokens per run (the prompt pass is not counted)")
    parser.add_argument("--free", type=float, default=6.0, help="GB of device memory the blocker leaves free")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="shape:scheme pairs, comma-separated")
    args = parser.parse_args()
    device = "cpu" if args.dry or not torch.cuda.is_available() else "cuda"
    from reshard.format import expert_bytes
    from reshard.synthetic import write_random_model

    for line in machine_lines("bfloat16" if device == "cuda" else "float32"):
        out(line)
    gbps = pinned_copy_gbps(1 << 30, torch.device(device))
    out(f"pinned host->device copy: {gbps:.1f} GB/s (1 GiB, best of 3, this run)")
    work = Path(tempfile.mkdtemp(prefix="moe-gpu-"))
    blocker = None
    try:
        for run in args.runs.split(","):
            shape, scheme = run.split(":")
            folder = work / f"{shape}-{scheme}"
            start = time.perf_counter()
            manifest = write_random_model(config_of(shape, args.layers, args.dry), folder, dtype=torch.bfloat16,
                                          device=device, quantize=scheme)
            layers = [g for g in manifest.groups if g.experts]
            experts = expert_bytes(layers[0])
            entry = next(iter(layers[0].experts.values()))
            k = config_of(shape, 1, args.dry).num_experts_per_tok
            out(f"\n{shape} {scheme}: {len(layers)} MoE layers of {layers[0].bytes / 1e9:.2f} GB ({experts / 1e9:.2f} GB "
                f"routed experts, {entry['num_experts']} of {experts / entry['num_experts'] / 1e6:.1f} MB, {k} a token), "
                f"{sum(g.bytes for g in manifest.groups) / 1e9:.1f} GB in all, written in {time.perf_counter() - start:.0f} s")
            blocker, _ = block(torch.device(device, 0) if device == "cuda" else torch.device(device), args.free)  # after the writing
            for mode in MODES:
                r = run_mode(folder, device, mode, args.tokens)
                floor = r["bytes"] / (gbps * 1e9)
                peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
                out(f"  {mode:<14} {r['s']:.4f} s/token  {r['bytes'] / 1e9:.3f} GB/token -> floor {floor:.4f} s "
                    f"({r['s'] / floor if floor else float('nan'):.2f}x the floor; goal <= {GOAL})  "
                    f"experts routed/token {r['routed']:g}, cache hits {hits(r['cache_hits'])}, guess hits "
                    f"{hits(r['guess_hits'])}; expert cache {r['cache_gb']:.2f} GB; places {r['places']}; peak device {peak} GB")
            blocker = None
            if device == "cuda":
                torch.cuda.empty_cache()  # the next model is drawn on the device
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        del blocker
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
