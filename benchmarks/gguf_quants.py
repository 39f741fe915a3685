"""GGUF Q4_K kept as blocks vs the same file de-quantized to bfloat16: bytes per pass, s/token.

A random llama GGUF (SmolLM2's tokenizer; decoder-layer weights Q4_K, the output head Q6_K as in
a Q4_K_M file, embeddings Q8_0) is converted twice in the same run: with default options (the
blocks kept, head included) and with `--dtype bfloat16` (de-quantized at convert). Three ways to
run them on the CPU, each streamed from its files (max_cpu_memory=0) and resident (the default
budget keeps every group in RAM):
- "q4_k native": the default; the blocks multiplied as stored by runtime/kernels/kquant_cpu.c;
- "q4_k expanded": `packed=False`, the blocks expanded at load to bfloat16 with ggml's formulas in
  plain torch (what every Q4_K weight paid before the native kernel);
- "bf16": the de-quantized folder, transformers' bfloat16 matmuls.
Each decodes `--tokens` greedy tokens after a warm-up. `--rounds` rounds run every configuration
once; a ratio pairs figures of the same round and placement, and the median of the rounds' ratios is
quoted. MB/pass is what the loader streamed per forward pass (0 for resident groups); RAM MB what the
groups kept in RAM take (the budget's count: expanded weights at their expanded size).

  python benchmarks/gguf_quants.py > benchmarks/results/gguf_quants.txt
  python benchmarks/gguf_quants.py --model qwen3moe > benchmarks/results/gguf_quants_moe.txt
  python benchmarks/gguf_quants.py --weights q8_0 > benchmarks/results/gguf_q8_0.txt  # a Q8_0 file
  python benchmarks/gguf_quants.py --weights iq2_xxs > benchmarks/results/gguf_iq2_xxs.txt  # an IQ2_XXS file
  python benchmarks/gguf_quants.py --device cuda --model llama70b --tokens 4 --rounds 3  # GPU check (issue 22)

With `--device cuda` every group waits in pinned host RAM and is copied to the GPU each pass
(max_gpu_memory=0), the Q4_K blocks expanded there after the copy (reshard/ggml_quants.py's
formulas, one compiled kernel per weight: runtime/expansion.py); "q4_k" and "bf16" are the rows, "placement" is "pinned". `--model llama70b`
is Llama-2-70B's layer shapes (4 layers, hidden 8192, 64 heads, 8 KV heads, intermediate 28672)
with a 1024-token vocabulary, so the layers are what a pass moves.

With `--model qwen3moe` the source is a random Qwen3-MoE GGUF (tests/gguf_files.py): streamed, each
layer reads its routed experts alone, and "q4_k native" computes them as read
(runtime/packedexperts.py) where "q4_k expanded" expands each one first. `--model gpt-oss` is a
random gpt-oss written as llama.cpp writes its GGUF (tests/gguf_table_files.py): MXFP4 experts (the
bytes a hub gpt-oss converts to as well: reshard/mxfp4.py), biases on every expert, attention,
embeddings and head Q8_0; "mxfp4 native" multiplies the experts as stored, biases added after each product.

  python benchmarks/gguf_quants.py --model gpt-oss > benchmarks/results/gguf_gpt_oss.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from common import machine_lines  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_files import (QWEN3MOE_INTER, TOKENIZER_VOCAB, llama_tensors, tokenizer_gguf, write_random_llama,  # noqa: E402
                        write_random_qwen3moe)
from gguf_table_files import random_model, write_mapped  # noqa: E402

from reshard.convert import convert  # noqa: E402
from runtime import native  # noqa: E402
from runtime.model import LayeredModel  # noqa: E402

SHAPE = dict(layers=8, hidden=1024, inter=2816, heads=16, kv_heads=4)
TINY = dict(layers=2, hidden=256, inter=512, heads=4, kv_heads=2)  # gpu_check.sh --dry: the code runs
LLAMA70B = dict(layers=4, hidden=8192, inter=28672, heads=64, kv_heads=8)
PLACEMENTS = {"streamed": dict(max_cpu_memory=0), "resident": {},  # the CPU's; the GPU's: pinned host RAM
              "pinned": dict(max_cpu_memory="1TB", max_gpu_memory=0)}
MOE_SHAPE = dict(layers=4, hidden=1024, experts=32, used=4, heads=8, kv_heads=4, vocab=32768)
GPT_OSS_SHAPE = dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=1024, num_local_experts=32,
                     num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def decode(folder: Path, tokens: int, *, placement: str, packed: bool, device: str = "cpu") -> tuple[float, float, int]:
    """(s/token, bytes streamed per forward pass, bytes of the groups kept in RAM) of greedy decoding."""
    lm = LayeredModel.from_pretrained(folder, device=device, dtype="bfloat16", packed=packed, **PLACEMENTS[placement])
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]]) % TOKENIZER_VOCAB
    ids = ids.to(lm.device)
    lm.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: page cache, allocator, resident loads
    before, passes = lm.stats.bytes_streamed, tokens
    t0 = time.perf_counter()
    lm.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    seconds = time.perf_counter() - t0
    per_pass = (lm.stats.bytes_streamed - before) / passes
    kept = lm.stats.resident_bytes.get("device" if device == "cpu" else "host", 0)
    lm.close()
    return seconds / tokens, per_pass, kept


def runs_of(weights: str) -> tuple:
    """(label, folder dtype, packed) of each configuration on the CPU."""
    return ((f"{weights} native", "auto", True), (f"{weights} expanded", "auto", False), ("bf16", "bfloat16", True))


WHERE = {"streamed": "every group read from its file each pass", "resident": "every group kept in RAM",
         "pinned": "every group in pinned host RAM, copied to the GPU each pass"}
GPU_RUNS = (("q4_k", "auto", True), ("bf16", "bfloat16", True))  # no native kernel there: blocks expand on the device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", choices=["llama", "qwen3moe", "gpt-oss", "llama70b", "tiny"], default="llama",
                    help="qwen3moe: a mixture of experts, streamed layers read their routed experts alone; "
                         "llama70b: Llama-2-70B's layer shapes (for --device cuda)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every group in pinned host RAM, copied to the GPU each pass")
    ap.add_argument("--weights", choices=["q4_k", "q8_0", "iq2_xxs", "iq3_xxs"], default="q4_k",
                    help="the decoder weights' type; q8_0: the head too (re-packed int8 with a scale per block of "
                         "32); iq2_xxs, iq3_xxs: grid blocks (runtime/kernels/iquant_cpu.c), the head Q6_K")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    weights = "mxfp4" if args.model == "gpt-oss" else args.weights
    runs, placements = (GPU_RUNS, ("pinned",)) if gpu else (runs_of(weights), ("streamed", "resident"))
    print("\n".join(machine_lines("bfloat16", torch.get_num_threads())))
    if not gpu:
        print(f"native kernels: {'yes' if native.lowbit() is not None else 'no (Q4_K expands: both q4_k rows are the same path)'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = tmp / "q4k.gguf"
        if args.model in ("llama", "llama70b", "tiny"):
            shape = {"llama": SHAPE, "llama70b": LLAMA70B, "tiny": TINY}[args.model]
            names = [n for n, _, _ in llama_tensors(shape["layers"], shape["hidden"], shape["inter"], shape["heads"],
                                                    shape["kv_heads"], 1)]
            block = getattr(Q, args.weights.upper())
            types = {n: block for n in names if n.startswith("blk.") and not n.endswith("norm.weight")}
            types["output.weight"] = Q.Q8_0 if args.weights == "q8_0" else Q.Q6_K
            vocab = None if args.model == "llama" else TOKENIZER_VOCAB
            size = write_random_llama(gguf, tokenizer_gguf(), types=types, vocab=vocab, **shape)
            head = "Q8_0" if args.weights == "q8_0" else "Q6_K"
            print(f"source: random llama GGUF {shape}{f', vocabulary {vocab}' if vocab else ''}, decoder weights "
                  f"{args.weights.upper()}, head {head}, {size / 1e6:.0f} MB; {args.tokens} tokens per run, "
                  f"{args.rounds} rounds")
        elif args.model == "gpt-oss":
            import transformers

            config = transformers.GptOssConfig(**GPT_OSS_SHAPE, vocab_size=TOKENIZER_VOCAB)
            experts = ("experts.gate_up_proj", "experts.down_proj")
            types = lambda n: Q.MXFP4 if n.endswith(experts) else Q.Q8_0 if n.endswith("proj.weight") or n in (  # noqa: E731
                "lm_head.weight", "model.embed_tokens.weight") else None
            log("building the random gpt-oss")
            size = write_mapped(gguf, tokenizer_gguf(), random_model(config, types=types), types=types)
            print(f"source: random gpt-oss GGUF {GPT_OSS_SHAPE}, vocabulary {TOKENIZER_VOCAB}, experts MXFP4 with biases, "
                  f"attention and head Q8_0 (router F32), {size / 1e6:.0f} MB; {args.tokens} tokens per run, "
                  f"{args.rounds} rounds")
        else:  # tests/gguf_files.py's types: attention Q4_K (v Q6_K), experts Q4_K (down Q6_K), head Q6_K
            size = write_random_qwen3moe(gguf, tokenizer_gguf(), **MOE_SHAPE)
            print(f"source: random Qwen3-MoE GGUF {MOE_SHAPE}, expert width {QWEN3MOE_INTER}, experts Q4_K (down "
                  f"Q6_K), attention Q4_K/Q6_K, head Q6_K, {size / 1e6:.0f} MB; {args.tokens} tokens per run, "
                  f"{args.rounds} rounds")
        stored = {}
        for dtype in ("auto", "bfloat16"):
            log(f"converting: {dtype}")
            manifest = convert(str(gguf), tmp / dtype, dtype=dtype, progress=False)
            stored[dtype] = (sum(g.bytes for g in manifest.groups if g.kind == "layer"),
                             sum(g.bytes for g in manifest.groups))
        results = {}  # (placement, label) -> [(s/token, bytes/pass) per round]
        for r in range(args.rounds):
            for placement in placements:
                for label, dtype, packed in runs:
                    log(f"round {r + 1}: {placement} {label}")
                    results.setdefault((placement, label), []).append(
                        decode(tmp / dtype, args.tokens, placement=placement, packed=packed, device=args.device))
    for placement in placements:
        print(f"\n{placement}: {WHERE[placement]}")
        print(f"{'folder':<16}{'layers MB':>10}{'all MB':>9}{'RAM MB':>9}{'MB/pass':>9}  {'s/token per round':<24}"
              f"{'median':>8}  time / bf16's per round, median")
        base = results[(placement, "bf16")]
        for label, dtype, _ in runs:
            got = results[(placement, label)]
            ratios = [s / b for (s, _, _), (b, _, _) in zip(got, base)]
            print(f"{label:<16}{stored[dtype][0] / 1e6:>10.1f}{stored[dtype][1] / 1e6:>9.1f}"
                  f"{got[-1][2] / 1e6:>9.1f}{statistics.median(b for _, b, _ in got) / 1e6:>9.1f}  "
                  f"{' '.join(f'{s:.4f}' for s, _, _ in got):<24}{statistics.median(s for s, _, _ in got):>8.4f}  "
                  f"{' '.join(f'{r:.3f}' for r in ratios)}, {statistics.median(ratios):.2f}x")

if __name__ == "__main__":
    main()
