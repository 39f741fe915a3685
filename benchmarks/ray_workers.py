"""Scoring over Ray Data workers (issue 15): items/s against the number of workers.

  python benchmarks/ray_workers.py                      # SmolLM2 float32, streamed, 1 and 2 workers
  python benchmarks/ray_workers.py --items 256 --workers 1 2 4 --model FOLDER

Baseline, in the same run: the same items scored by one process (`LayeredModel.score`, all
CPUs). Each worker gets `cores / workers` torch threads and one block (one weight pass);
every group streams (max_cpu_memory=0), so each worker really reads the weights. The Ray
cluster is started once before the timings; worker start-up (actors importing torch and
opening the model) is timed apart from the scoring itself. Writes a Markdown table on
stdout and the same lines to benchmarks/results/ray_workers.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_lines  # noqa: E402
from benchmarks.models import converted, smollm2_checkpoint  # noqa: E402

STREAMED = {"device": "cpu", "max_cpu_memory": 0}


def questions(n: int) -> list[dict]:
    subjects = ["the sun", "a cat", "the river", "my neighbour", "the old car", "this book", "the market", "rain"]
    verbs = ["is", "was", "looks", "seems"]
    return [{"prompt": f"Question {k}: {subjects[k % 8]} {verbs[k % 4]}",
             "choices": [" bright.", " very quiet today.", " far away from here.", " red."]} for k in range(n)]


def one_process(folder: Path, items: list[dict], batch: int) -> float:
    from runtime.model import LayeredModel

    with LayeredModel.from_pretrained(folder, **STREAMED) as lm:
        t0 = time.perf_counter()
        lm.score(items, batch_size=batch)
        return time.perf_counter() - t0


def with_workers(folder: Path, items: list[dict], workers: int, batch: int) -> tuple[float, float]:
    """(seconds of the whole call, seconds of the slowest block inside its worker)."""
    from runtime.distributed import score_items

    threads = max(1, (os.cpu_count() or 1) // workers)
    t0 = time.perf_counter()
    _, blocks = score_items(items, folder, workers=workers, model_options=STREAMED, threads=threads,
                            batch_size=batch)
    return time.perf_counter() - t0, max(b.seconds for b in blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a converted folder (default: SmolLM2-135M-Instruct float32)")
    p.add_argument("--items", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    import ray

    folder = Path(args.model) if args.model else converted(smollm2_checkpoint(), "smollm2-f32")
    items = questions(args.items)
    lines = [*machine_lines("float32"),
             f"model: {folder.name}, streamed (max_cpu_memory=0); {args.items} items x 4 choices, "
             f"micro-batch {args.batch_size}", ""]
    base = one_process(folder, items, args.batch_size)
    lines += ["| run | wall s | slowest block s | items/s (wall) | items/s (blocks) |", "|---|---|---|---|---|",
              f"| one process, {os.cpu_count()} threads (baseline) | {base:.1f} | {base:.1f} | "
              f"{args.items / base:.2f} | {args.items / base:.2f} |"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for w in args.workers:
        wall, block = with_workers(folder, items, w, args.batch_size)
        lines.append(f"| Ray, {w} worker(s) | {wall:.1f} | {block:.1f} | {args.items / wall:.2f} | "
                     f"{args.items / block:.2f} |")
    ray.shutdown()
    lines += ["", "wall: the whole call (actors start, import torch and open the model, then score); "
                  "blocks: the scoring alone, slowest worker."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = ROOT / "benchmarks" / "results" / "ray_workers.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
