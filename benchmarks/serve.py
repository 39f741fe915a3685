"""`runtime serve` throughput against concurrency (issue 14): every pass serves every running request.

  python benchmarks/serve.py                       # SmolLM2 float32 on the CPU, all streamed
  python benchmarks/serve.py --device cuda --concurrency 1 4 16 64   # streamed from disk through the GPU
  python benchmarks/serve.py --device cuda --synthetic 4 --tokenizer .gpu/smollm2-trim/tokenizer \
      --max-cpu-memory 1TB      # the GPU check: 4 random layers of Llama-2-70B's shapes, streamed from pinned RAM

For each concurrency C, C clients (the real `openai` client, one thread each) send one chat
request of --max-tokens greedy tokens at once to a server on a loopback port, and the wall time
from the first request to the last answer gives tokens/s (best of --repeat). The baseline,
measured in the same run on the same model object: `transformers.generate` for one prompt, as
`runtime generate` runs it. The figures go to stdout (Markdown), with machine, date, commit and load average; progress
to stderr. The machine may be shared: the load average before and after each row says how much.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import commit, machine_lines  # noqa: E402
from models import LLAMA2_70B, converted, smollm2_checkpoint  # noqa: E402

TOPICS = ["the sea", "mountains", "a city at night", "autumn leaves", "a cup of coffee", "the moon", "trains",
          "a library", "rain", "the desert", "a lighthouse", "snow", "a garden", "bicycles", "the stars", "bread"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[k % len(TOPICS)]} (version {k // len(TOPICS) + 1})." for k in range(n)]


def baseline(lm, ids, max_tokens: int) -> tuple[float, int]:
    """Seconds and tokens of transformers' generate for one chat prompt (what `runtime generate` runs)."""
    t0 = time.perf_counter()
    out = lm.generate(input_ids=ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
    return time.perf_counter() - t0, out.shape[1] - ids.shape[1]


def synthetic_70b(layers: int, tokenizer: Path, folder: Path, device: str) -> Path:
    """A random fp16 model of `layers` layers with Llama-2-70B's layer shapes and `tokenizer`'s
    vocabulary and chat template (the prompts are real text; the answers are random tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from reshard.synthetic import write_random_model

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(**{**LLAMA2_70B, "vocab_size": len(tok)}, num_hidden_layers=layers,
                         tie_word_embeddings=False)
    write_random_model(config, folder, dtype=torch.float16, device=device)
    tok.save_pretrained(folder)
    return folder


def run_clients(url: str, texts: list[str], max_tokens: int) -> tuple[float, int]:
    """Wall seconds for all `texts` sent at once, and the completion tokens they got."""
    import openai

    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600) for _ in texts]

    def ask(c, text: str) -> int:  # the clients exist before the clock starts: the requests leave at once
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], temperature=0,
                                      max_tokens=max_tokens)
        return r.usage.completion_tokens

    with ThreadPoolExecutor(len(texts)) as pool:
        t0 = time.perf_counter()
        tokens = sum(pool.map(ask, clients, texts))
    return time.perf_counter() - t0, tokens


def measure(lm, url: str, concurrency: list[int], max_tokens: int, repeat: int) -> tuple[dict, list[dict]]:
    """Best (seconds, tokens, passes, load) per row, and every round's, the rows taken in turn `repeat`
    times (the baseline, then each concurrency), so that every row samples the same stretch of a shared
    machine's load."""
    import torch

    from runtime.batch import prompt_ids

    ids = torch.tensor([prompt_ids(lm.tokenizer, prompts(1)[0], chat=True)], device=lm.device)
    baseline(lm, ids, max_tokens)  # untimed: first reads of the files, kernel warm-up
    best: dict = {}
    rounds: list[dict] = []
    for r in range(repeat):
        rounds.append({})
        for c in ["baseline", *concurrency]:
            passes0, load0 = lm.stats.passes, os.getloadavg()[0]
            if c == "baseline":
                secs, tokens = baseline(lm, ids, max_tokens)
            else:
                secs, tokens = run_clients(url, prompts(c), max_tokens)
            run = (secs, tokens, lm.stats.passes - passes0, f"{load0:.1f}/{os.getloadavg()[0]:.1f}")
            print(f"round {r + 1}, {c}: {secs:.1f} s, {tokens} tokens, {run[2]} passes, load {run[3]}", flush=True)
            best[c] = min(best.get(c, run), run)
            rounds[r][c] = run
    return best, rounds


def same_round_ratios(rounds: list[dict], c: int) -> list[float]:
    """tokens/s at concurrency `c` over the baseline's tokens/s, within each round."""
    return [(run[c][1] / run[c][0]) / (run["baseline"][1] / run["baseline"][0]) for run in rounds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path,
                    help="a converted folder (default: SmolLM2 float32, converted once into $RESHARD_BENCH_CACHE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-cpu-memory", default="0", help="weights kept in RAM (default 0: all streamed)")
    ap.add_argument("--max-gpu-memory", default="0", help="weights kept on a GPU (default 0: all streamed)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per row; the best is reported")
    ap.add_argument("--synthetic", type=int, metavar="LAYERS",
                    help="instead of --model: random fp16 weights of Llama-2-70B's layer shapes, LAYERS layers, "
                         "written to a temporary folder (needs --tokenizer)")
    ap.add_argument("--tokenizer", type=Path, help="the tokenizer folder for --synthetic")
    args = ap.parse_args()
    if args.synthetic and not args.tokenizer:
        ap.error("--synthetic needs --tokenizer")
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        if args.synthetic:
            args.model = synthetic_70b(args.synthetic, args.tokenizer, Path(tmp) / "synthetic-70b-shapes", args.device)
        run(args)


def run(args) -> None:

    from runtime import LayeredModel
    from runtime.engine import Engine
    from runtime.server import BackgroundServer, create_app

    folder = args.model or converted(smollm2_checkpoint(), "smollm2-f32", "float32")
    lm = LayeredModel.from_pretrained(folder, device=args.device, max_cpu_memory=args.max_cpu_memory,
                                      max_gpu_memory=args.max_gpu_memory)
    engine = Engine(lm, max_batch=max(args.concurrency), max_queue=0)
    server = BackgroundServer(create_app(engine, model_name="m"))
    for line in machine_lines(str(lm.dtype).removeprefix("torch.")):
        print(line)
    print(f"commit: {commit()}; model: {folder.name}; device: {lm.device}; max_cpu_memory {args.max_cpu_memory}, "
          f"max_gpu_memory {args.max_gpu_memory} ({lm.stats.resident_bytes}); {args.max_tokens} new tokens per "
          f"request, greedy, chat template")
    print("shared machine: other jobs may run at the same time; the load average (1 min) is printed per row\n")
    try:
        best, rounds = measure(lm, server.url, args.concurrency, args.max_tokens, args.repeat)
        secs, tokens, passes, load = best["baseline"]
        print(f"\nbest of {args.repeat} rounds per row (each round: the baseline, then every concurrency); "
              "x baseline: the median over rounds of tokens/s against the same round's baseline\n")
        print("| run | tokens | passes | tokens/pass | s | tokens/s | x baseline | load before/after |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| baseline: transformers generate, one prompt | {tokens} | {passes} | {tokens / passes:.2f} "
              f"| {secs:.1f} | {tokens / secs:.2f} | 1.00x | {load} |")
        for c in args.concurrency:
            secs, tokens, passes, load = best[c]
            ratio = statistics.median(same_round_ratios(rounds, c))
            print(f"| serve, concurrency {c} | {tokens} | {passes} | {tokens / passes:.2f} | {secs:.1f} "
                  f"| {tokens / secs:.2f} | {ratio:.2f}x | {load} |")
        print("\nx baseline within each round: " + "; ".join(
            f"concurrency {c}: " + ", ".join(f"{x:.2f}x" for x in same_round_ratios(rounds, c))
            for c in args.concurrency))
    finally:
        server.stop()
        engine.close()
        lm.close()


if __name__ == "__main__":
    main()
