"""(d) `reshard convert` throughput vs a plain copy (+ fsync) of the same bytes, and its peak RSS.

Source: an HF checkpoint (safetensors shards + index) of a random bf16 Llama of 1.7 GB. Every
variant runs as a child process on a warm page cache, alternating, best of `--runs`. Times are
measured inside the child: for the copies, the copy loop; for `reshard convert`, both the whole
command ("total", with Python, torch and transformers start-up, the model built on meta and the
checks) and its writing phase alone (`_write_groups`: read, cast, write, hash, fsync of every group:
"start-up excluded"). `--before REF` also runs the converter of git commit REF (exported with
`git archive`), so before and after are measured in the same run on the same machine.

Usage: python benchmarks/bench_convert.py [--runs 3] [--before COMMIT] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import commit, load_average, machine_lines  # noqa: E402
from models import CACHE, big_synthetic, hf_checkpoint_of  # noqa: E402

# Each child prints one JSON line last on stderr: {"seconds": whole work, "phase": timed part, "peak": VmHWM}.
REPORT = """
def report(seconds, phase):
    import json, sys
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "phase": phase, "peak": peak}), file=sys.stderr)
"""
COPY = REPORT + """
import os, shutil, sys, pathlib, time
src, out, sync = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "fsync"
t0 = time.perf_counter()
out.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, out / f.name)
    if sync:
        fd = os.open(out / f.name, os.O_RDONLY); os.fsync(fd); os.close(fd)
seconds = time.perf_counter() - t0
report(seconds, seconds)
"""
CONVERT = REPORT + """
import sys, time
t0 = time.perf_counter()
import reshard.convert as convert
real, phase = convert._write_groups, []
def timed(*args, **kwargs):
    t = time.perf_counter()
    try:
        return real(*args, **kwargs)
    finally:
        phase.append(time.perf_counter() - t)
convert._write_groups = timed
from reshard.cli import main
sys.argv[0] = "reshard"
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
report(time.perf_counter() - t0, phase[0])
"""


def child(cmd: list[str], tree: Path) -> dict:
    run = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd="/")
    if run.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {run.stderr[-2000:]}")
    return json.loads(run.stderr.strip().splitlines()[-1])


def export_tree(ref: str) -> tuple[Path, str]:
    """The project at git commit `ref`, as files in the cache (its reshard is what `before` runs)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = CACHE / f"tree-{sha}"
    if not (tree / "reshard").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, sha


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", help="git commit whose converter is measured too (e.g. the one before a change)")
    ap.add_argument("--dtype", default="bfloat16", help="--dtype of the conversions (the source is bfloat16)")
    args = ap.parse_args(argv)
    src = hf_checkpoint_of(big_synthetic(), CACHE / "synthetic-14l-bf16-hf")
    total = sum(f.stat().st_size for f in src.iterdir())
    out = CACHE / "convert-out"
    convert = [sys.executable, "-c", CONVERT, "convert", str(src), str(out), "--dtype", args.dtype, "--quiet"]
    variants = {"plain copy (shutil.copyfile per file)": ([sys.executable, "-c", COPY, str(src), str(out), "-"], ROOT),
                "plain copy + fsync per file": ([sys.executable, "-c", COPY, str(src), str(out), "fsync"], ROOT)}
    if args.before:
        tree, sha = export_tree(args.before)
        variants[f"before: reshard convert at {sha}"] = (convert, tree)
    variants[f"after: reshard convert at {commit()}"] = (convert, ROOT)

    print(f"## (d) reshard convert --dtype {args.dtype} vs plain copy\n\n```")
    print("\n".join(machine_lines(args.dtype)))
    print(f"source: HF checkpoint, {total / 1e9:.2f} GB in {len(list(src.iterdir()))} files (warm page cache); "
          f"best of {args.runs} (the load average above is at the start)")
    best: dict[str, dict] = {}
    rounds: list[dict[str, float]] = []         # writing-phase seconds of each variant, per round
    for _ in range(args.runs):
        rounds.append({})
        for name, (cmd, tree) in variants.items():
            shutil.rmtree(out, ignore_errors=True)
            r = child(cmd, tree)
            rounds[-1][name] = r["phase"]
            if name not in best or r["phase"] < best[name]["phase"]:
                best[name] = r
    shutil.rmtree(out, ignore_errors=True)
    fsync_rate = total / best["plain copy + fsync per file"]["phase"]
    for name, r in best.items():
        rate = total / r["phase"]
        print(f"{name}: total {r['seconds']:.2f} s; start-up excluded {r['phase']:.2f} s = {rate / 1e9:.2f} GB/s "
              f"= {rate / fsync_rate:.2f}x copy+fsync speed; peak RSS {r['peak'] / 1e6:.0f} MB")
    print("speed against copy+fsync within each round (writing phase), and the median of the rounds:")
    for name in variants:
        ratios = [run["plain copy + fsync per file"] / run[name] for run in rounds]
        print(f"  {name}: rounds {', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x")
    print(f"load average at the end: {load_average()}")
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
