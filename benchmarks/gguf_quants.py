"""GGUF Q4_K kept as blocks vs the same file de-quantized to bfloat16: bytes per pass, s/token.

A random llama GGUF (SmolLM2's tokenizer; decoder-layer weights all Q4_K, embeddings Q8_0)
is converted twice in the same run: with default options (Q4_K blocks kept, expanded at load,
reshard/ggml_quants.py) and with `--dtype bfloat16` (de-quantized at convert, as before).
Each folder streams every group from its file (max_cpu_memory=0) and decodes `--tokens`
greedy tokens after a warm-up; bytes per pass is what the loader streamed per forward pass.

"layer MB" is the decoder layers' stored bytes, read once per pass: the Q4_K share. MB/pass also
counts the embeddings and head, which a default GGUF conversion stores in float32 (the GGUF's
config names no dtype) against bfloat16 in the other folder: at this model's 49k x 1024 vocabulary
they outweigh the layers, so read both columns. On the CPU the blocks are expanded at load with
plain torch (several kernels per weight), which is what s/token pays for the smaller reads.

  python benchmarks/gguf_quants.py > benchmarks/results/gguf_quants.txt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from common import machine_lines  # noqa: E402
from conftest import smollm2_gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_files import llama_tensors, write_random_llama  # noqa: E402

from reshard.convert import convert  # noqa: E402
from runtime.model import LayeredModel  # noqa: E402

SHAPE = dict(layers=8, hidden=1024, inter=2816, heads=16, kv_heads=4)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def decode(folder: Path, tokens: int) -> tuple[float, float]:
    """(s/token, bytes streamed per forward pass) of greedy decoding, streamed from disk."""
    lm = LayeredModel.from_pretrained(folder, device="cpu", dtype="bfloat16", max_cpu_memory=0)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    lm.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: page cache, allocator
    before, passes = lm.stats.bytes_streamed, tokens
    t0 = time.perf_counter()
    lm.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    seconds = time.perf_counter() - t0
    per_pass = (lm.stats.bytes_streamed - before) / passes
    lm.close()
    return seconds / tokens, per_pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    print("\n".join(machine_lines("bfloat16", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = tmp / "q4k.gguf"
        types = {n: Q.Q4_K for n, _, _ in llama_tensors(SHAPE["layers"], SHAPE["hidden"], SHAPE["inter"],
                                                          SHAPE["heads"], SHAPE["kv_heads"], 1)
                 if n.startswith("blk.") and not n.endswith("norm.weight")}
        size = write_random_llama(gguf, smollm2_gguf(), types=types, **SHAPE)
        print(f"source: random llama GGUF {SHAPE}, decoder weights Q4_K, {size / 1e6:.0f} MB")
        rows = []
        for label, dtype in (("q4_k blocks", "auto"), ("bf16 (--dtype bfloat16)", "bfloat16")):
            log(f"converting: {label}")
            manifest = convert(str(gguf), tmp / dtype, dtype=dtype, progress=False)
            layers = sum(g.bytes for g in manifest.groups if g.kind == "layer")
            log(f"decoding: {label}")
            s_token, per_pass = decode(tmp / dtype, args.tokens)
            rows.append((label, layers, per_pass, s_token))
    base = rows[1]
    print(f"\n{'folder':<26}{'layer MB':>10}{'MB/pass':>10}{'s/token':>10}{'bytes ratio':>13}{'time ratio':>12}")
    for label, layers, per_pass, s_token in rows:
        print(f"{label:<26}{layers / 1e6:>10.1f}{per_pass / 1e6:>10.1f}{s_token:>10.3f}"
              f"{per_pass / base[2]:>13.2f}{s_token / base[3]:>12.2f}")


if __name__ == "__main__":
    main()
