"""MoE decode: bytes and s/token per pass, expert-sparse streaming vs whole layers, expert cache and
guess (--predict-experts) hit rates.

Random mixtures of experts shaped like Mixtral (8 experts, 2 per token) and Qwen3-30B-A3B
(many small experts, 8 per token), scaled down to fit the machine, are written as converted
folders (reshard.synthetic) and decoded at batch 1, every group streamed (max_cpu_memory=0):
- whole: MoE layers stream whole (sparse_experts=False), the baseline;
- sparse: only the routed experts are read (runtime/experts.py), no expert cache;
- sparse+cache: the same with an expert cache of `--cache-fraction` of the expert bytes;
- sparse+predict, sparse+cache+predict: the same with the next MoE layer's experts guessed and read
  ahead while a layer computes (runtime/prediction.py);
- sparse-reads: sparse, but a pass that routes most experts (a prefill) reads its routed experts
  too instead of loading its layers whole (runtime/experts.py's WHOLE_AT; on the CPU the sparse
  modes load them whole).
With `--cold` (default) the folder's pages are dropped from the page cache before every pass, so
each pass reads from the disk what it brings; `--warm` leaves them cached. The modes take turns
run by run (a round: each mode once). Figures are medians over the decode passes (the prompt pass is
left out) of all runs; "vs whole" is the median over rounds of whole's median s/token divided by
the mode's, both from the same round. The prompt pass (`--prompt` tokens, a prefill that routes
most experts) is timed apart: sparse reads of the union of its experts against whole layers.

Usage: python benchmarks/moe.py [--tokens 12] [--runs 2] [--threads 2] [--layers 6] [--warm]
       [--device cpu|cuda] [--dtype float32] [--shapes mixtral,qwen3] [--prompt 8] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from common import evict_page_cache, machine_lines  # noqa: E402
from models import CACHE  # noqa: E402


# scale 0: the real models' layer widths; 1: scaled down for a CPU; 2: tiny (dry runs)
MIXTRAL = {0: (4096, 14336, 32, 8), 1: (512, 1792, 8, 2), 2: (64, 96, 4, 2)}  # hidden, intermediate, heads, kv
QWEN3 = {0: (2048, 768, 128, 32, 4, 128), 1: (512, 192, 64, 8, 2, 64), 2: (64, 32, 16, 4, 2, 16)}  # ... experts, head_dim


def shape_config(name: str, layers: int, scale: int = 1):
    """The config of a Mixtral-8x7B / Qwen3-30B-A3B shape (see the scales above), `layers` layers."""
    import transformers as tf

    common = dict(num_hidden_layers=layers, vocab_size=8000, tie_word_embeddings=False)
    if name == "mixtral":
        h, i, heads, kv = MIXTRAL[scale]
        return tf.MixtralConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv,
                                num_local_experts=8, num_experts_per_tok=2, **common)
    if name == "qwen3":
        h, i, e, heads, kv, hd = QWEN3[scale]
        return tf.Qwen3MoeConfig(hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=i, num_experts=e,
                                 num_experts_per_tok=8, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                                 **common)
    raise ValueError(name)


def folder_of(name: str, layers: int, dtype: torch.dtype, device: str = "cpu", scale: int = 1,
              root: Path = CACHE) -> Path:
    from reshard.synthetic import write_random_model

    folder = root / f"moe-{name}-{layers}l-{str(dtype).removeprefix('torch.')}-s{scale}"
    if not (folder / "manifest.json").is_file():
        write_random_model(shape_config(name, layers, scale), folder, dtype=dtype, device=device)
    return folder


MODES = ["whole", "sparse", "sparse+predict", "sparse+cache", "sparse+cache+predict"]


def run_once(folder: Path, mode: str, tokens: int, cold: bool, device: str, cache_fraction: float,
             prompt: int = 8) -> tuple:
    """(the prompt pass, the decode passes) of one greedy generation in `mode`."""
    from reshard.format import expert_bytes, read_manifest
    from runtime import LayeredModel

    experts = sum(expert_bytes(g) for g in read_manifest(folder).groups)
    kwargs = dict(sparse_experts=False) if mode == "whole" else dict(
        expert_cache=int(experts * cache_fraction) if "cache" in mode else 0, predict_experts="predict" in mode)
    model = LayeredModel.from_pretrained(folder, device=device, max_cpu_memory=0, max_gpu_memory=0, **kwargs)
    if mode == "sparse-reads":
        model.experts.whole_at = None
    if cold:  # before the pass's clock starts (prepend): every pass reads its bytes from the disk
        model.model.register_forward_pre_hook(lambda *_: evict_page_cache(folder), prepend=True)
    ids = torch.randint(3, 8000, (1, prompt), generator=torch.Generator().manual_seed(0)).to(model.device)
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    first, passes = model.stats.per_pass[0], model.stats.per_pass[1:]  # the prompt's pass, the decode passes
    model.close()
    return first, passes


def summarize(runs: list[tuple], ratios: list[float]) -> dict:
    """Figures of one mode over its runs ((prompt pass, decode passes) each); `ratios`: whole's
    median s/token over this mode's, one per round."""
    passes = [p for _, run in runs for p in run]
    read = sum(p.experts_read for p in passes)
    cached = sum(p.experts_cached for p in passes)
    guessed, used = sum(p.experts_predicted for p in passes), sum(p.predicted_used for p in passes)
    return {"s_per_token": statistics.median(p.seconds for p in passes),
            "vs_whole": round(statistics.median(ratios), 3) if ratios else None,
            "bytes_per_pass": int(statistics.median(p.bytes + p.predicted_wasted_bytes for p in passes)),
            "expert_bytes_per_pass": int(statistics.median(p.expert_bytes for p in passes)),
            "wasted_bytes_per_pass": int(statistics.median(p.predicted_wasted_bytes for p in passes)),
            "experts_read_per_pass": statistics.median(p.experts_read for p in passes),
            "cache_hit_rate": round(cached / (read + cached), 3) if read + cached else None,
            "guess_hit_rate": round(used / guessed, 3) if guessed else None,
            "guessed_share": round(used / (read + cached), 3) if guessed and read + cached else None,
            "prompt_s": statistics.median(first.seconds for first, _ in runs),
            "prompt_bytes": int(statistics.median(first.bytes for first, _ in runs)),
            "prompt_reads": statistics.median(first.expert_reads for first, _ in runs),
            "passes": len(passes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--warm", action="store_true", help="leave the files in the page cache")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--full-width", action="store_true", help="the real models' layer shapes (GPU machines)")
    ap.add_argument("--cache-fraction", type=float, default=0.5)
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens (the prefill pass)")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    for line in machine_lines(args.dtype, args.threads):
        print(line)
    print(f"decode at batch 1, {args.tokens} new tokens x {args.runs} runs, every group streamed, "
          f"{'warm page cache' if args.warm else 'page cache dropped before every pass (cold)'}, device {args.device}")
    modes = args.modes.split(",")
    results = {}
    for shape in args.shapes.split(","):
        folder = folder_of(shape, args.layers, dtype, "cuda" if args.device.startswith("cuda") else "cpu",
                           0 if args.full_width else 1)
        print(describe(shape, folder))
        runs, ratios = {m: [] for m in modes}, {m: [] for m in modes}
        for _ in range(args.runs):
            medians = {}
            for mode in modes:  # taking turns: load from other jobs hits every mode alike
                runs[mode].append(run_once(folder, mode, args.tokens, not args.warm, args.device,
                                           args.cache_fraction, args.prompt))
                medians[mode] = statistics.median(p.seconds for p in runs[mode][-1][1])
            for mode in modes:
                if "whole" in medians:
                    ratios[mode].append(medians["whole"] / medians[mode])
        results[shape] = {m: summarize(runs[m], ratios[m]) for m in modes}
        for mode, r in results[shape].items():
            print(f"  {mode:<20} {r['s_per_token']:.4f} s/token ({r['vs_whole']}x whole)  "
                  f"{r['bytes_per_pass'] / 1e6:7.1f} MB/pass (experts {r['expert_bytes_per_pass'] / 1e6:.1f} MB, "
                  f"{r['experts_read_per_pass']:g} read, {r['wasted_bytes_per_pass'] / 1e6:.1f} MB guessed unused)  "
                  f"cache hits {r['cache_hit_rate']}  guess hits {r['guess_hit_rate']} "
                  f"(share of routed {r['guessed_share']})  prompt pass {r['prompt_s']:.3f} s, "
                  f"{r['prompt_bytes'] / 1e6:.1f} MB, {r['prompt_reads']:g} expert reads")
    print(json.dumps(results))


def describe(shape: str, folder: Path) -> str:
    from reshard.format import expert_bytes, read_manifest

    m = read_manifest(folder)
    cfg = json.loads((folder / "config.json").read_text())
    experts = sum(expert_bytes(g) for g in m.groups)
    return (f"{shape}: {folder.name}, {m.total_bytes / 1e6:.0f} MB in files, experts {experts / 1e6:.0f} MB "
            f"({cfg.get('num_local_experts') or cfg.get('num_experts')} per layer, {cfg['num_experts_per_tok']} "
            f"per token), hidden {cfg['hidden_size']}")


if __name__ == "__main__":
    main()
