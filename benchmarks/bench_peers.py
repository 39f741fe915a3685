"""(c) Side by side on SmolLM2-135M-Instruct, same prompt, greedy, float32, CPU: LayeredModel
streamed from disk, accelerate's disk offload (every decoder layer on "disk" in a device_map),
and AirLLM (`device="cpu"`, from a separate venv: AIRLLM_PYTHON, default /tmp/airllm-venv/bin/python).

Each tool runs in its own process: s/token ((best t(N) - best t(1)) / (N - 1) over
runs of generate), peak RSS (VmHWM of that process), and whether its text matches transformers in memory.

Usage: python benchmarks/bench_peers.py [--tokens 16] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine_lines  # noqa: E402
from models import converted, smollm2_checkpoint  # noqa: E402

PROMPT = "Write a short poem about the sea."

# One child per tool: {SETUP} builds `model` (anything with .generate) from SRC / FOLDER.
CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from transformers import AutoTokenizer
SRC, FOLDER, N, RUNS = {src!r}, {folder!r}, {tokens}, {runs}
tok = AutoTokenizer.from_pretrained(SRC)
text = tok.apply_chat_template([{{"role": "user", "content": {prompt!r}}}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
{setup}
def gen(n):
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=tok.eos_token_id)
    out = out.sequences if hasattr(out, "sequences") else out
    return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()
gen(2)
ones, manys = [], []
for _ in range(RUNS):
    ones.append(gen(1)[0])
    many, tokens = gen(N)
    manys.append(many)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({{"s_per_token": (min(manys) - min(ones)) / (N - 1), "peak_rss": int(hwm) * 1024, "tokens": tokens, "text": tok.decode(tokens)}}))
"""

SETUPS = {
    "transformers in memory (reference)": (None, """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()
"""),
    "reshard LayeredModel, streamed from disk (max_cpu_memory=0)": (None, """
from runtime.model import LayeredModel
model = LayeredModel.from_pretrained(FOLDER, device="cpu", max_cpu_memory=0)
"""),
    'accelerate disk offload (decoder layers on "disk")': (None, """
import tempfile
from transformers import AutoConfig, AutoModelForCausalLM
n = AutoConfig.from_pretrained(SRC).num_hidden_layers
device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "disk" for i in range(n)}}
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32, device_map=device_map,
                                             offload_folder=tempfile.mkdtemp(prefix="offload-")).eval()
"""),
    'AirLLM (device="cpu")': ("AIRLLM", """
import tempfile
from airllm import AutoModel
model = AutoModel.from_pretrained(SRC, device="cpu", dtype=torch.float32,
                                  layer_shards_saving_path=tempfile.mkdtemp(prefix="airllm-"))
"""),
}


def run_child(python: str, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if run.returncode != 0:
        tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": " | ".join(tail)}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    src = smollm2_checkpoint()
    folder = converted(src, "smollm2-float32", "float32")
    airllm = os.environ.get("AIRLLM_PYTHON", "/tmp/airllm-venv/bin/python")
    print("## (c) side by side: reshard, accelerate disk offload, AirLLM\n\n```")
    print("\n".join(machine_lines("float32", args.threads)))
    print(f"model: SmolLM2-135M-Instruct, float32, CPU; prompt {PROMPT!r} (chat template); {args.tokens} new tokens, "
          f"greedy; best of {args.runs}")
    results = {}
    for name, (python, setup) in SETUPS.items():
        if python == "AIRLLM" and not Path(airllm).is_file():
            print(f"{name}: not run: no AirLLM environment at {airllm} (set AIRLLM_PYTHON; see RESULTS.md)")
            continue
        code = CHILD.format(threads=args.threads, src=str(src), folder=str(folder), tokens=args.tokens,
                            runs=args.runs, prompt=PROMPT, setup=setup)
        results[name] = r = run_child(airllm if python == "AIRLLM" else sys.executable, code)
        if "error" in r:
            print(f"{name}: FAILED: {r['error']}")
            continue
        ref = next(iter(results.values()))
        same = "reference" if r is ref else ("text MATCHES" if r["tokens"] == ref.get("tokens") else "text DIFFERS")
        print(f"{name}: {r['s_per_token'] * 1000:.1f} ms/token, peak RSS {r['peak_rss'] / 1e6:.0f} MB, {same}: {r['text']!r}")
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
