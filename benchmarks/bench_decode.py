"""(a) Decode s/token: LayeredModel vs transformers in memory, same checkpoint, dtype and threads, warm cache.

s/token is (t(N) - t(1)) / (N - 1) over runs of generate, so prefill and setup cancel out:
the median over runs (what a goal is judged on) and the best (best t(N) - best t(1)); the modes
take turns run by run, so load from other jobs hits them alike. Modes: transformers in memory;
LayeredModel with every group streamed (max_cpu_memory=0); LayeredModel with every group
resident (max_cpu_memory=64GiB, far above the model's size).

Usage: python benchmarks/bench_decode.py [--tokens 32] [--runs 3] [--dtype float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from common import machine_lines  # noqa: E402
from models import converted, smollm2_checkpoint  # noqa: E402

PROMPT = "Write a short poem about the sea."


def timed_generate(model, ids, n: int, pad: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()


def seconds_per_token(model, ids, n: int, pad: int) -> tuple[float, float, list[int]]:
    one, _ = timed_generate(model, ids, 1, pad)
    many, tokens = timed_generate(model, ids, n, pad)
    return one, many, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.model import LayeredModel

    dtype = getattr(torch, args.dtype)
    src = smollm2_checkpoint()
    folder = converted(src, f"smollm2-{args.dtype}", args.dtype)
    tok = AutoTokenizer.from_pretrained(src)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    print("## (a) decode s/token, warm page cache\n\n```")
    print("\n".join(machine_lines(args.dtype, args.threads)))
    print(f"model: SmolLM2-135M-Instruct ({sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 1e6:.0f} MB "
          f"in {args.dtype}); prompt {ids.shape[1]} tokens; {args.tokens} new tokens; {args.runs} runs per mode")
    models = {"transformers in memory": AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval(),
              "LayeredModel, all streamed (max_cpu_memory=0)": LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0),
              "LayeredModel, all resident (max_cpu_memory=64GiB)": LayeredModel.from_pretrained(
                  folder, device="cpu", max_cpu_memory="64GiB")}
    slopes, texts = {name: [] for name in models}, {}
    for name, model in models.items():
        timed_generate(model, ids, 2, tok.eos_token_id)  # warm-up: page cache, kernels
    for _ in range(args.runs):  # round robin, so that load from other jobs hits every mode alike
        for name, model in models.items():
            one, many, texts[name] = seconds_per_token(model, ids, args.tokens, tok.eos_token_id)
            slopes[name].append((one, many))
    best = {name: (min(m for _, m in v) - min(o for o, _ in v)) / (args.tokens - 1) for name, v in slopes.items()}
    median = {name: statistics.median((m - o) / (args.tokens - 1) for o, m in v) for name, v in slopes.items()}
    base = best["transformers in memory"]
    # each mode against transformers in the same round (the modes ran one after the other), then the median
    same_round = {name: statistics.median((m - o) / (bm - bo) for (o, m), (bo, bm)
                                          in zip(v, slopes["transformers in memory"])) for name, v in slopes.items()}
    want = texts["transformers in memory"]
    for name, model in models.items():
        line = (f"{name}: median {median[name] * 1000:.1f} ms/token, {same_round[name]:.2f}x (median of "
                f"same-round ratios); best {best[name] * 1000:.1f} ms/token = {best[name] / base:.2f}x")
        if hasattr(model, "stats"):
            last = model.stats.per_pass[-1]
            places = {p: model.places.count(p) for p in set(model.places)}
            line += (f" {places}; text {'matches' if texts[name] == want else 'DIFFERS'}; last pass: "
                     f"{json.dumps({k: round(v, 4) for k, v in vars(last).items()})}")
            model.close()
        print(line)
    print(f"text: {tok.decode(want)!r}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
