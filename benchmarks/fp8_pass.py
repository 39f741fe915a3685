"""An FP8 folder (scheme fp8-block) against the same model de-quantized to bf16: bytes and time per pass.

A synthetic Llama-shaped checkpoint in the layout FP8 models publish (bf16 embeddings and norms,
each decoder linear weight float8_e4m3fn with a float32 128x128 `weight_scale_inv` grid) is
converted twice in the same run: with default options (kept fp8) and with `--dtype bfloat16`
(de-quantized at convert: the baseline). Every group streams from its file (max_cpu_memory=0).

  python benchmarks/fp8_pass.py                 # CPU; raw output -> benchmarks/results/fp8_pass.txt
  python benchmarks/fp8_pass.py --device cuda --placement pinned --hidden 8192 --intermediate 28672 \
      --heads 64 --kv-heads 8 --layers 4       # GPU: Llama-2-70B layer shapes from pinned RAM

Figures: bytes per pass (what `reshard info` reports), decode s/token with the page cache warm
(greedy, `--new-tokens` after a short prompt, median of `--repeat`), and s/pass of one token with
the folder's pages dropped from the page cache first (cold; `--placement disk` only). With
`--placement pinned` every group waits in pinned host RAM and is copied to the device each pass
(max_gpu_memory=0). The ratio columns are fp8 / bf16.
Output is a Markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from reshard.cli import describe  # noqa: E402
from reshard.convert import convert  # noqa: E402
from reshard.fp8 import quantize_fp8  # noqa: E402
from runtime.model import LayeredModel  # noqa: E402
from common import cached_fraction, evict_page_cache, machine_lines  # noqa: E402

PLACEMENTS = {"disk": dict(max_cpu_memory=0, max_gpu_memory=0), "pinned": dict(max_cpu_memory="1TB", max_gpu_memory=0)}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build_fp8(folder: Path, args) -> Path:
    """A random Llama of the benchmark's shape, saved as an fp8 block-scale checkpoint (tensors
    made one at a time from the shapes of a model on the meta device: no full model in RAM)."""
    import transformers as tf
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return folder
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, p in model.state_dict().items():
        t = torch.ones(p.shape) if key.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
        if ".layers." in key and key.endswith("proj.weight"):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(t, (128, 128))
        else:
            tensors[key] = t.to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def decode_seconds(folders: dict[str, Path], args) -> dict[str, list[float]]:
    """{label: a greedy decode's seconds per new token, page cache warm, `--repeat` rounds}; the
    folders take turns in every round, so a change in the machine's load hits both alike."""
    models, times = {}, {label: [] for label in folders}
    ids = torch.randint(100, 8000, (1, 8), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    for label, folder in folders.items():
        models[label] = LayeredModel.from_pretrained(folder, device=args.device, dtype=args.dtype, prefetch=1,
                                                     **PLACEMENTS[args.placement])
        models[label].generate(ids.to(models[label].device), **greedy)  # warm-up: page cache, compiled expansion
    for _ in range(args.repeat):
        for label, lm in models.items():
            sync(lm.device)
            t0 = time.perf_counter()
            lm.generate(ids.to(lm.device), **greedy)
            sync(lm.device)
            times[label].append((time.perf_counter() - t0) / args.new_tokens)
    for lm in models.values():
        lm.close()
    return times


def cold_pass_seconds(folders: dict[str, Path], args) -> tuple[dict[str, list[float]], float]:
    """({label: s/pass of one token with the folder's pages dropped first, `--repeat` rounds, the
    folders taking turns}, the most of a folder still cached right before a pass)."""
    times, cached = {label: [] for label in folders}, 0.0
    for _ in range(args.repeat):
        for label, folder in folders.items():
            lm = LayeredModel.from_pretrained(folder, device=args.device, dtype=args.dtype, prefetch=1,
                                              **PLACEMENTS["disk"])
            ids = torch.tensor([[101]], device=lm.device)
            evict_page_cache(folder)  # (the expansion was compiled by the warm rounds, in this process)
            cached = max(cached, cached_fraction(folder))
            sync(lm.device)
            t0 = time.perf_counter()
            lm(ids)
            sync(lm.device)
            times[label].append(time.perf_counter() - t0)
            lm.close()
    return times, cached


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--placement", choices=list(PLACEMENTS), default="disk",
                   help="disk: every group read from its file each pass; pinned: from pinned host RAM (GPU)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--work", default="/tmp/reshard-fp8-bench", help="where the checkpoint and folders go")
    args = p.parse_args()
    work = Path(args.work)
    source = build_fp8(work / "fp8-hf", args)
    folders = {"bf16 (--dtype bfloat16)": work / "bf16", "fp8-block (default)": work / "fp8"}
    for (label, out), dtype in zip(folders.items(), ("bfloat16", "auto")):
        if not (out / "manifest.json").is_file():
            log(f"converting {label}")
            convert(str(source), out, dtype=dtype, progress=False)
    print("```")
    print("\n".join(machine_lines(args.dtype)))
    print(f"model: synthetic Llama, hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads} "
          f"(kv {args.kv_heads}), {args.layers} layers, vocab 8192; fp8 source with 128x128 float32 scales; "
          f"device: {args.device}; placement: every group streamed ({args.placement}: {PLACEMENTS[args.placement]}); "
          f"decode: {args.new_tokens} new tokens after 8; medians of {args.repeat} rounds, the folders taking turns; "
          f"baseline: the bf16 folder, same run")
    print("```\n")
    log("measuring decode, page cache warm")
    warm = decode_seconds(folders, args)
    cold, cached = cold_pass_seconds(folders, args) if args.placement == "disk" else ({}, 0.0)
    print("| folder | bytes/pass MB | vs bf16 | layer MB | s/token warm | vs bf16 | s/pass cold | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for label, out in folders.items():
        info = describe(out)
        w = statistics.median(warm[label])
        c = statistics.median(cold[label]) if cold else float("nan")
        base = base or (info["pass_bytes"], w, c)
        print(f"| {label} | {info['pass_bytes'] / 1e6:.1f} | {info['pass_bytes'] / base[0]:.3f} "
              f"| {info['layer_bytes'] / 1e6:.1f} | {w:.4f} | {w / base[1]:.3f} | {c:.4f} | {c / base[2]:.3f} |")
    print(f"\nmost of a folder in the page cache right before a cold pass: {cached:.0%}")
    for label in folders:
        print(f"raw s/token warm, {label}: {', '.join(f'{t:.4f}' for t in warm[label])}")
        if cold:
            print(f"raw s/pass cold, {label}: {', '.join(f'{t:.4f}' for t in cold[label])}")

if __name__ == "__main__":
    main()
