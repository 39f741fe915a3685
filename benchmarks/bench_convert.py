"""(d) `reshard convert` throughput vs a plain copy of the same bytes, and its peak RSS.

Source: an HF checkpoint (safetensors shards + index) of a random bf16 Llama of 1.7 GB.
Both run as child processes on a warm page cache; peak RSS is the child's ru_maxrss.

Usage: python benchmarks/bench_convert.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine_lines  # noqa: E402
from models import CACHE, big_synthetic, hf_checkpoint_of  # noqa: E402

COPY = """
import os, shutil, sys, pathlib
src, out, sync = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "fsync"
out.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, out / f.name)
    if sync:
        fd = os.open(out / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
# Peak RSS read from inside the child (VmHWM starts afresh at exec; ru_maxrss would count the fork).
PEAK = "\nimport sys; print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr)"
CONVERT = "import sys; from reshard.cli import main; sys.argv[0] = 'reshard'; rc = main(sys.argv[1:])" + PEAK


def child(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a child process."""
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {run.stderr[-2000:]}")
    return seconds, int(run.stderr.split()[-1]) * 1024


def sha256_gbps(src: Path) -> float:
    import hashlib

    t0, n = time.perf_counter(), 0
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        hashlib.sha256(data).hexdigest()
        n += len(data)
    return n / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    src = hf_checkpoint_of(big_synthetic(), CACHE / "synthetic-14l-bf16-hf")
    total = sum(f.stat().st_size for f in src.iterdir())
    out = CACHE / "convert-out"
    print("## (d) reshard convert vs plain copy\n\n```")
    print("\n".join(machine_lines("bfloat16")))
    print(f"source: HF checkpoint, {total / 1e9:.2f} GB in {len(list(src.iterdir()))} files (warm page cache); "
          f"best of {args.runs}")
    results = {"plain copy (shutil.copyfile per file)": [sys.executable, "-c", COPY + PEAK, str(src), str(out), "-"],
               "plain copy + fsync per file": [sys.executable, "-c", COPY + PEAK, str(src), str(out), "fsync"],
               "reshard convert --dtype bfloat16": [sys.executable, "-c", CONVERT, "convert", str(src), str(out),
                                                    "--dtype", "bfloat16", "--quiet"],
               "python importing torch + transformers (startup)": [sys.executable, "-c", "import torch, transformers" + PEAK]}
    best = {}
    for _ in range(args.runs):
        for name, cmd in results.items():
            shutil.rmtree(out, ignore_errors=True)
            s, rss = child(cmd)
            best[name] = min(best.get(name, (s, rss)), (s, rss))
    shutil.rmtree(out, ignore_errors=True)
    base = best["plain copy (shutil.copyfile per file)"][0]
    for name, (s, rss) in best.items():
        rate = f"{total / s / 1e9:.2f} GB/s = {s / base:.2f}x the copy's time, " if "startup" not in name else ""
        print(f"{name}: {s:.2f} s, {rate}peak RSS {rss / 1e6:.0f} MB")
    print(f"sha256 of the same bytes (convert hashes every file it writes): {sha256_gbps(src):.2f} GB/s on one core")
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
