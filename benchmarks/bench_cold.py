"""(b) Cold page cache, a >= 1.5 GB model on the CPU: pass time vs max(read-only time, compute-only time).

read-only: evict the files (POSIX_FADV_DONTNEED), then read them all with plain reads into one buffer.
compute-only: the same pass with every group resident in RAM (max_cpu_memory large), warm.
cold pass: evict the files (and drop this process's mapped pages), then one pass streaming them all.

Usage: python benchmarks/bench_cold.py [--tokens 1 64] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from common import cached_fraction, evict_page_cache, machine_lines  # noqa: E402
from models import big_synthetic  # noqa: E402


def read_only_seconds(folder: Path) -> float:
    files = sorted(folder.glob("*.safetensors"))
    buf = bytearray(max(f.stat().st_size for f in files))
    evict_page_cache(folder)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            view, n = memoryview(buf), 0
            while (k := fh.readinto(view[n:])) > 0:
                n += k
    return time.perf_counter() - t0


def pass_seconds(model, ids, *, cold: bool, folder: Path) -> float:
    if cold:
        for i in range(len(model.groups)):
            model.loader.release_pages(i)  # read-ahead of the previous pass included
        evict_page_cache(folder)
    with torch.inference_mode():
        model(ids, use_cache=False)
    return model.stats.per_pass[-1].seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from runtime.model import LayeredModel

    folder = big_synthetic()
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print("## (b) cold page cache\n\n```")
    print("\n".join(machine_lines("bfloat16", args.threads)))
    print(f"model: random bf16 Llama, hidden 2048, intermediate 5632, 14 layers: {total / 1e9:.2f} GB in "
          f"{len(list(folder.glob('*.safetensors')))} files; {args.runs} runs of each (median and best)")
    read = min(read_only_seconds(folder) for _ in range(args.runs))
    print(f"read-only (cold, plain reads): {read:.3f} s = {total / read / 1e9:.2f} GB/s")
    inputs = {n: torch.randint(3, 32000, (1, n), generator=torch.Generator().manual_seed(0)) for n in args.tokens}
    # Resident first, then closed: its mapped pages would keep the files in the page cache.
    resident = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory="100GB")
    compute = {n: min(pass_seconds(resident, ids, cold=False, folder=folder)
                      for _ in range(args.runs + 1)) for n, ids in inputs.items()}
    resident.close()
    del resident
    gc.collect()
    streamed = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0)
    for n, ids in inputs.items():
        pass_seconds(streamed, ids, cold=False, folder=folder)
        runs = [pass_seconds(streamed, ids, cold=True, folder=folder) for _ in range(args.runs)]
        cold = min(runs)
        p = streamed.stats.per_pass[runs.index(cold) - len(runs)]
        goal, median = max(read, compute[n]), statistics.median(runs)
        print(f"{n} token(s)/pass: compute-only {compute[n]:.3f} s; cold pass median {median:.3f} s = "
              f"{median / goal:.2f}x, best {cold:.3f} s = {cold / goal:.2f}x max(read-only, compute-only) = {goal:.3f} s; "
              f"best cold pass: {p.read_seconds:.3f} s reading on the prefetch thread, {p.wait_seconds:.3f} s "
              f"waiting for weights, {p.compute_seconds:.3f} s computing, {p.gb_per_s:.2f} GB/s")
    streamed.close()
    print(f"page cache holds {cached_fraction(folder):.0%} of the files after the last pass\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
