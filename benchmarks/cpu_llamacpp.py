"""CPU decode against llama.cpp on the same GGUF, batch 1: ms/token, and perplexity vs the float folder.

Setup once (llama-cpp-python built from PyPI's source in its own venv, not a project dependency):
    bash benchmarks/setup_llamacpp.sh            # LLAMACPP_VENV, default /work/venvs/llamacpp
Run:
    python benchmarks/cpu_llamacpp.py [--threads 2] [--tokens 32] [--rounds 2] [--skip-ppl]

1. A random 1.1B-class llama (TinyLlama's shape, SmolLM2's tokenizer; benchmarks/gguf_model.py)
   is written as a Q8_0 and a Q4_0 GGUF, every 2-D weight (embeddings and head too) quantized.
2. Each GGUF is converted by `reshard convert --dtype float16 --quantize-embeddings` with
   `--quantize int8` (from the Q8_0 file) and `--quantize int4 --quantize-group 32` (Q4_0).
3. Each tool runs in its own process, in turn, `--rounds` times: a prompt of `--prompt` tokens,
   then `--tokens` greedy steps (forward of one token with the KV cache, argmax), each timed;
   ms/token is the median step. Ours: LayeredModel resident on the CPU, default dtype.
4. Perplexity of SmolLM2-135M-Instruct on tests/data/english.txt: its fp16 folder in float32
   (the baseline) and in the CPU's default dtype, and int8 / int4 g32 folders through the kernels.
The machine is shared: the load average is printed before each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine_lines  # noqa: E402

LLAMACPP = os.environ.get("LLAMACPP_VENV", "/work/venvs/llamacpp")
PAIRS = [("Q8_0", "int8"), ("Q4_0", "int4")]

# Both children: PROMPT random token ids, then N timed steps; print one JSON line.
LLAMA_CHILD = """
import json, os, time, numpy as np, llama_cpp
from llama_cpp import Llama
llm = Llama(model_path={path!r}, n_threads={threads}, n_threads_batch={threads}, n_ctx=512, n_batch=512,
            verbose=False)
rng = np.random.default_rng(0)
llm.eval(rng.integers(100, 1000, {prompt}).tolist())
times = []
for _ in range({tokens}):
    t0 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([tok])
    times.append(time.perf_counter() - t0)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({{"times": times, "peak_rss": int(hwm) * 1024, "version": llama_cpp.__version__,
                  "system": llama_cpp.llama_print_system_info().decode()}}))
"""

OURS_CHILD = """
import json, time, torch
torch.set_num_threads({threads})
from transformers import DynamicCache
from runtime.model import LayeredModel
t0 = time.perf_counter()
lm = LayeredModel.from_pretrained({path!r}, device="cpu", max_cpu_memory="100GB")
load = time.perf_counter() - t0
ids = torch.randint(100, 1000, (1, {prompt}), generator=torch.Generator().manual_seed(0))
cache = DynamicCache(config=lm.config)
logits = lm(ids, past_key_values=cache, use_cache=True).logits
times = []
for _ in range({tokens}):
    t0 = time.perf_counter()
    tok = logits[:, -1:].argmax(-1)
    logits = lm(tok, past_key_values=cache, use_cache=True).logits
    times.append(time.perf_counter() - t0)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
packed = sum(type(m).__name__ == "PackedLinear" for m in lm.model.modules())
print(json.dumps({{"times": times, "peak_rss": int(hwm) * 1024, "load_seconds": load, "dtype": str(lm.loader.dtype),
                  "packed_linears": packed}}))
"""


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run_child(python: str, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if run.returncode != 0:
        tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {run.returncode}: " + " | ".join(tail)}
    return json.loads(run.stdout.strip().splitlines()[-1])


def prepare(work: Path) -> dict[str, Path]:
    """The two GGUF files and our two folders converted from them (cached in `work`)."""
    from gguf_model import write_llama_gguf

    from reshard.convert import convert

    paths = {}
    work.mkdir(parents=True, exist_ok=True)
    for qtype, scheme in PAIRS:
        gguf = work / f"llama-1.1b-{qtype}.gguf"
        if not gguf.is_file():
            log(f"writing {gguf}")
            write_llama_gguf(gguf.with_suffix(".partial"), qtype).rename(gguf)
        folder = work / f"llama-1.1b-{scheme}"
        if not (folder / "manifest.json").is_file():
            log(f"converting {gguf.name} -> {folder.name}")
            convert(str(gguf), folder, dtype="float16", quantize=scheme, quantize_group=32,
                    quantize_embeddings=True, progress=False)
        paths[qtype], paths[scheme] = gguf, folder
    return paths


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timings(paths: dict[str, Path], args) -> None:
    python = str(Path(LLAMACPP) / "bin" / "python")
    by_round: list[dict[str, float]] = []      # ms/token of each tool, per round
    for r in range(args.rounds):
        by_round.append({})
        for qtype, scheme in PAIRS:
            for name, code in [(f"llama.cpp {qtype}", LLAMA_CHILD.format(path=str(paths[qtype]), **vars(args))),
                               (f"ours {scheme}", OURS_CHILD.format(path=str(paths[scheme]), **vars(args)))]:
                load = os.getloadavg()[0]
                res = run_child(python if name.startswith("llama") else sys.executable, code)
                if "error" in res:
                    print(f"round {r + 1} {name}: FAILED {res['error']}", flush=True)
                    continue
                ms = 1000 * median(res["times"])
                by_round[r][name] = ms
                extra = {k: v for k, v in res.items() if k not in ("times", "system")}
                print(f"round {r + 1} {name}: {ms:.1f} ms/token median (min {1000 * min(res['times']):.1f}, "
                      f"max {1000 * max(res['times']):.1f}) load avg before {load:.1f}; {json.dumps(extra)}", flush=True)
                if "system" in res and r == 0:
                    print(f"  llama.cpp system info: {res['system'].strip()}")
    print_ratios(by_round)


def print_ratios(by_round: list[dict[str, float]]) -> None:
    """ours / llama.cpp within each round (the tools ran one after the other), and the median over rounds:
    never one tool's best round against the other's."""
    print("\nours / llama.cpp within each round, and the median of the rounds' ratios:")
    for qtype, scheme in PAIRS:
        ratios = [ms[f"ours {scheme}"] / ms[f"llama.cpp {qtype}"] for ms in by_round
                  if f"ours {scheme}" in ms and f"llama.cpp {qtype}" in ms]
        if ratios:
            rounds = ", ".join(f"{x:.2f}x" for x in ratios)
            print(f"  {qtype} vs {scheme}: rounds {rounds}; median {statistics.median(ratios):.2f}x")


def perplexities() -> None:
    import torch

    from models import smollm2_quantized
    from runtime.model import LayeredModel

    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    folders = smollm2_quantized()
    runs = [("fp16 folder, float32 compute (baseline)", "fp16", "float32"), ("fp16 folder, default dtype", "fp16", None),
            ("int8 folder, packed kernels, default dtype", "int8", None),
            ("int4 g32 folder, packed kernels, default dtype", "int4-g32", None),
            ("int8 folder, packed kernels, float32 elsewhere", "int8", "float32"),
            ("int4 g32 folder, packed kernels, float32 elsewhere", "int4-g32", "float32")]
    print("\nperplexity, SmolLM2-135M-Instruct on tests/data/english.txt (one forward pass):")
    base = None
    for label, name, dtype in runs:
        with LayeredModel.from_pretrained(folders[name], device="cpu", dtype=dtype, max_cpu_memory=0) as lm:
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            logits = lm(ids).logits[0, :-1].float()
            ppl = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())
            compute = lm.loader.dtype
        base = base or ppl
        print(f"  {label}: {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%; compute {compute}, {ids.shape[1]} tokens)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens before the timed steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/cpu-llamacpp", help="where the GGUF files and folders go")
    ap.add_argument("--skip-ppl", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print("\n".join(machine_lines("ours: CPU default (see each run); llama.cpp: its own", args.threads)))
    print(f"commit: {commit}; load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(a shared machine: other jobs run at the same time)")
    print(f"protocol: prompt {args.prompt} tokens, then {args.tokens} greedy steps of 1 token, batch 1, "
          f"{args.threads} threads; ms/token = median step; {args.rounds} rounds, tools in turn\n")
    paths = prepare(work)
    for key in ("Q8_0", "int8", "Q4_0", "int4"):
        p = paths[key]
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))
        print(f"{key}: {p.name}, {size / 1e9:.3f} GB")
    print()
    timings(paths, args)
    if not args.skip_ppl:
        perplexities()
    print(f"\nload average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
