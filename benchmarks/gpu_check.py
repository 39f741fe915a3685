"""GPU check: host->device streaming at Llama-2-70B layer shapes, then fp16 greedy parity on SmolLM2.

Run by `benchmarks/gpu_check.sh`; prints Markdown for benchmarks/RESULTS.md on stdout (the
commit it ran on first) and exits 1 if a section crashed or a check failed: where exactness
holds (streamed vs resident weights, same device and dtype) any logit difference fails. `--dry` runs everything on the CPU with tiny
shapes (what CI does, so this script cannot rot); the CUDA-only parts say they were skipped.

1. writes a random fp16 model with Llama-2-70B's layer shapes (hidden 8192, intermediate
   28672, 64 heads, 8 KV heads, vocab 32000) but `--layers` layers, with the format writer;
2. measures a plain pinned host->device copy (the bandwidth to approach);
3. runs passes with the weights resident on the GPU (compute only), streamed from pinned
   RAM, from the page cache and from a cold page cache; decode (1 token) and prefill
   (`--prefill` tokens); reports GB/s, copy/compute overlap and s/pass extrapolated to 80 layers;
4. quantized streaming: the same model written as int8 and as int4 (group 32), quantized on the
   device; decode s/pass streamed from pinned RAM, the page cache and a cold cache next to the
   fp16 figures of 3; streamed logits must equal the same folder's resident ones exactly;
5. mixtures of experts (benchmarks/gpu_check_moe.py): expert-sparse streaming vs whole layers at
   Mixtral-8x7B and Qwen3-30B-A3B layer shapes, from disk, s/token and bytes per pass;
6. greedy parity of LayeredModel (resident and streamed) against transformers in memory, fp16,
   on the SmolLM2 that `benchmarks/prepare_gpu_check.py` put in `.gpu/` (trimmed to a few
   layers): greedy tokens must match transformers', streamed prompt logits must equal the
   resident ones exactly (the difference to transformers' logits is reported);
7. tree speculation (benchmarks/speculate.py gpu; run right after 3): one forward verifying a tree of 16, 64, 256 and
   1024 tokens over a 1-token forward, 4 int4 layers of the same shapes streamed from pinned RAM,
   then the tokens/s a whole 70B int4 model would reach over PCIe4 and PCIe5;
8. a small GPU (benchmarks/small_gpu.py): a blocker leaves `--small-free-gb` free; default-budget
   generation, 32 prompts at once, scoring 128 items at batch 16, int8 and int4 folders, each
   within the free memory; accelerate's device_map="auto" and AirLLM side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from common import count_places, evict_page_cache, machine_lines, opened, out  # noqa: E402
from gpu_parity import parity  # noqa: E402
from models import LLAMA2_70B  # noqa: E402
from small_gpu import small_gpu  # noqa: E402

GiB = 2**30
FULL = LLAMA2_70B
DRY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)


SECTIONS = ["streaming", "speculation", "quantized", "moe", "parity", "small"]


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if bad := [n for n in names if n not in SECTIONS]:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    return names


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing useful")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (default 4; dry 3)")
    ap.add_argument("--prefill", type=int, default=None, help="tokens of the prefill pass (default 8192; dry 16)")
    ap.add_argument("--cap-gb", type=float, default=16, help="GPU memory cap for this process, GB (default 16)")
    ap.add_argument("--assets", type=Path, default=ROOT / ".gpu", help="what prepare_gpu_check.py wrote")
    ap.add_argument("--small-free-gb", type=float, default=6, help="small-GPU section: GB left free (default 6)")
    ap.add_argument("--small-tokens", type=int, default=None, help="small-GPU section: new tokens (default 16; dry 3)")
    ap.add_argument("--only", type=_sections, default=None,
                    help=f"run only these sections, comma-separated: {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--tokens-per-pass", type=float, default=4.0,
                    help="speculation section's 70B arithmetic: tokens a tree pass yields "
                         "(benchmarks/results/speculate_cpu.txt)")
    ap.add_argument("--work", type=Path, default=None, help="where to write the synthetic model (default: a temp dir)")
    args = ap.parse_args(argv)
    args.layers = args.layers or (3 if args.dry else 4)
    args.prefill = args.prefill or (16 if args.dry else 8192)
    args.small_tokens = args.small_tokens or (3 if args.dry else 16)
    return args


# --- the device ----------------------------------------------------------------------------

def pick_device(args) -> torch.device:
    if args.dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("Error: no CUDA device; run with --dry to check the script on the CPU")
    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total), dev)
    out(f"GPU memory capped at {args.cap_gb:g} GB of {total / 1e9:.0f} GB (set_per_process_memory_fraction)")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_copy_gbps(nbytes: int, device: torch.device) -> float:
    """A plain pinned host->device copy of `nbytes` (host memcpy on the CPU): best of 3, GB/s."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(4):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return nbytes / min(times[1:]) / 1e9


# --- the synthetic model -------------------------------------------------------------------

def write_synthetic(args, folder: Path, device: torch.device, *, quantize: str | None = None, group: int = 32,
                    vocab: int | None = None):
    from transformers import LlamaConfig

    from reshard.synthetic import write_random_model

    shapes = {**(DRY if args.dry else FULL), **({"vocab_size": vocab} if vocab else {})}
    config = LlamaConfig(**shapes, num_hidden_layers=args.layers, max_position_embeddings=max(4096, args.prefill),
                         tie_word_embeddings=False)
    t0 = time.perf_counter()
    manifest = write_random_model(config, folder, dtype=torch.float16, device=device, quantize=quantize,
                                  quantize_group=group)
    seconds = time.perf_counter() - t0
    layer = next(g.bytes for g in manifest.groups if g.kind == "layer")
    out(f"synthetic model: {args.layers} layers x {layer / 1e9:.3f} GB + {(manifest.total_bytes - args.layers * layer) / 1e9:.3f} GB "
        f"embed/norm/head = {manifest.total_bytes / 1e9:.2f} GB {weights_label(quantize, group)}, written in {seconds:.1f} s")
    return manifest, layer


MODES = [  # name, max_gpu_memory, max_cpu_memory, evict the page cache before each measured pass
    ("resident on device (compute only)", "1TB", "1TB", False),
    ("streamed from pinned RAM", "0", "1TB", False),
    ("streamed from page cache", "0", "0", False),
    ("streamed from disk, cold cache", "0", "0", True),
]


def weights_label(quantize: str | None, group: int) -> str:
    return {None: "fp16", "int8": "int8"}.get(quantize, f"{quantize} g{group}")


def skipped(device: torch.device, mode) -> dict | None:
    if device.type == "cpu" and mode[0] == "streamed from pinned RAM":
        return {"skipped": "CPU: host RAM is the device; no pinned tier"}
    return None


def run_mode(folder: Path, device: torch.device, mode, prefill: int, dtype: torch.dtype) -> dict:
    _, gpu, cpu, cold = mode
    if skip := skipped(device, mode):
        return skip
    t0 = time.perf_counter()
    with opened(folder, device, gpu, cpu, dtype) as model:
        open_s = time.perf_counter() - t0
        return _passes(model, folder, device, prefill, cold) | {"open_s": open_s, "places": count_places(model.places)}


def _decode(model, folder, device, cold: bool):
    """A warm-up pass, then one-token passes (3; 1 from a cold cache): (their stats, the last logits)."""
    one = torch.tensor([[11]], device=device)
    model(one, use_cache=False)  # warm-up: kernels, allocator
    decode = []
    for _ in range(1 if cold else 3):  # a cold pass reads every byte from the disk: once is enough
        if cold:
            evict_page_cache(folder)
        logits = model(one, use_cache=False).logits
        decode.append(model.stats.per_pass[-1])
    return decode, logits


def _passes(model, folder, device, prefill: int, cold: bool) -> dict:
    vocab = model.config.vocab_size
    long = torch.randint(3, vocab, (1, prefill), generator=torch.Generator().manual_seed(0)).to(device)
    decode, _ = _decode(model, folder, device, cold)
    if cold:
        evict_page_cache(folder)
    logits = model(long, use_cache=False).logits
    pre = model.stats.per_pass[-1]
    finite = bool(torch.isfinite(logits[0, -1]).all())
    best = min(decode, key=lambda p: p.seconds)
    return {"decode_s": statistics.median(p.seconds for p in decode), "decode": best, "prefill": pre, "finite": finite}


def at_80_layers(args, manifest, layer: int) -> float:
    """The factor from a pass over `args.layers` layers to one over 80, byte-proportional: passes move bytes."""
    total = manifest.total_bytes
    return (80 * layer + total - args.layers * layer) / total


def report_streaming(args, results: dict, manifest, layer: int, copy_gbps: float) -> None:
    total = manifest.total_bytes
    scale = at_80_layers(args, manifest, layer)
    out()
    out(f"| mode | placement | decode s/pass | GB/s | wait s | copy s | prefill {args.prefill} tok s/pass | "
        f"decode s/pass at 80 layers |")
    out("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "skipped" in r or "error" in r:
            out(f"| {name} | {r.get('skipped') or 'FAILED: ' + r['error']} |||||||")
            continue
        d, p = r["decode"], r["prefill"]
        out(f"| {name} | {r['places']} | {r['decode_s']:.4f} | {d.gb_per_s:.2f} | {d.wait_seconds:.4f} | "
            f"{d.copy_seconds:.4f} | {p.seconds:.4f} | {r['decode_s'] * scale:.2f} |")
    out()
    out(f"plain pinned host->device copy: {copy_gbps:.2f} GB/s (one {layer / 1e9:.2f} GB buffer, best of 3)")
    _report_overlap(results, total, copy_gbps, args.prefill)


def _report_overlap(results: dict, total: int, copy_gbps: float, prefill: int) -> None:
    res, pinned = results.get(MODES[0][0], {}), results.get(MODES[1][0], {})
    if "prefill" not in res or "prefill" not in pinned:
        out("copy/compute overlap: not measured (needs the resident and pinned-RAM modes)")
        return
    copy = total / copy_gbps / 1e9
    for label, key in (("decode", "decode"), (f"prefill {prefill} tok", "prefill")):
        compute, streamed = res[key].seconds, pinned[key].seconds
        hidden = max(0.0, min(1.0, (copy + compute - streamed) / min(copy, compute))) if min(copy, compute) else 0.0
        out(f"{label}: copy-only {copy:.4f} s (bytes / pinned GB/s), compute-only {compute:.4f} s, streamed from "
            f"pinned RAM {streamed:.4f} s = {streamed / max(copy, compute):.2f}x max(copy, compute); "
            f"overlap {hidden:.0%} of the shorter one hidden; achieved {total / streamed / 1e9:.2f} GB/s "
            f"= {total / streamed / 1e9 / copy_gbps:.0%} of the plain pinned copy")


# --- quantized streaming ------------------------------------------------------------------

STREAMED = MODES[1:]  # pinned RAM, page cache, cold cache
QUANTIZED = [("int8", 32), ("int4", 32)]  # scheme, int4 group size


def quantized_streaming(args, device: torch.device, work: Path, fp16: dict) -> None:
    """The synthetic model as int8 and int4 g32: decode s/pass per streamed tier next to fp16's
    (`fp16`, from the streaming section), and streamed logits against the folder resident."""
    rows, bad = {"fp16": fp16}, []
    for scheme, group in QUANTIZED:
        folder = work / f"synthetic-{scheme}"
        try:  # one folder on the disk at a time
            rows[weights_label(scheme, group)], ok = measure_quantized(args, device, folder, scheme, group)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        bad += [] if ok else [scheme]
    out("```")
    report_quantized(rows, args, device)
    out("```")
    if bad:
        raise RuntimeError(f"quantized streaming failed, gave non-finite logits or differs from resident: {bad}")


def measure_quantized(args, device: torch.device, folder: Path, scheme: str, group: int) -> tuple[dict, bool]:
    """({manifest, layer, results by streamed mode}, whether every mode ran and matched resident)."""
    manifest, layer = write_synthetic(args, folder, device, quantize=scheme, group=group)
    results = {mode[0]: guarded(f"{scheme} {mode[0]}", decode_mode, folder, device, mode) for mode in STREAMED}
    with opened(folder, device, "1TB", "1TB") as model:
        resident = model(torch.tensor([[11]], device=device), use_cache=False).logits.float().cpu()
    streamed = {name: r["logits"] for name, r in results.items() if "logits" in r}
    diff = max(((got - resident).abs().max().item() for got in streamed.values()), default=float("nan"))
    ok = diff == 0 and all("error" not in r and r.get("finite") is not False for r in results.values())
    tiers = "; ".join(name.removeprefix("streamed from ") for name in streamed)
    out(f"{weights_label(scheme, group)} logits streamed ({tiers}) vs resident on the device: "
        f"max |diff| {diff:.3g}: {'MATCH' if diff == 0 else 'DIFFER'}")
    return {"manifest": manifest, "layer": layer, "results": results}, ok


def decode_mode(folder: Path, device: torch.device, mode) -> dict:
    _, gpu, cpu, cold = mode
    if skip := skipped(device, mode):
        return skip
    with opened(folder, device, gpu, cpu) as model:
        decode, logits = _decode(model, folder, device, cold)
    logits = logits.float().cpu()
    return {"decode_s": statistics.median(p.seconds for p in decode), "logits": logits,
            "finite": bool(torch.isfinite(logits).all())}


def report_quantized(rows: dict, args, device: torch.device) -> None:
    ref = STREAMED[0][0] if device.type == "cuda" else STREAMED[1][0]  # no pinned tier on the CPU
    short = ref.removeprefix("streamed from ")
    out()
    tiers = " | ".join(m[0].removeprefix("streamed from ") for m in STREAMED)
    out(f"| weights | bytes/pass | decode s/pass: {tiers} | "
        f"{short} s/pass at 80 layers | bytes vs fp16 | {short} s/pass vs fp16 |")
    out("|---|---|---|---|---|---|---|---|")
    base = rows["fp16"]
    for label, row in rows.items():
        if "results" not in row:
            out(f"| {label} | not measured (its section failed) |||||||")
            continue
        total, seconds = row["manifest"].total_bytes, row["results"].get(ref, {}).get("decode_s")
        base_s = base.get("results", {}).get(ref, {}).get("decode_s")
        cells = [_cell(row["results"].get(m[0], {})) for m in STREAMED]
        at80 = f"{seconds * at_80_layers(args, row['manifest'], row['layer']):.2f}" if seconds else "-"
        by = f"{total / base['manifest'].total_bytes:.2f}x" if "manifest" in base else "-"
        sx = f"{seconds / base_s:.2f}x" if seconds and base_s else "-"
        out(f"| {label} | {total / 1e9:.3f} GB | {' | '.join(cells)} | {at80} | {by} | {sx} |")
    out()


def _cell(r: dict) -> str:
    if "decode_s" in r:
        return f"{r['decode_s']:.4f}"
    return "skipped" if "skipped" in r else "FAILED"


# --- main ----------------------------------------------------------------------------------

def use_gguf_copy(assets: Path) -> None:
    """Where `gguf` is not installed, import the copy prepare_gpu_check.py made; before transformers
    is imported, as it may decide once whether GGUF files can be read."""
    if importlib.util.find_spec("gguf") is None:
        sys.path.append(str(assets / "site"))
        importlib.invalidate_caches()


def main(argv=None) -> int:
    args = parse_args(argv)
    use_gguf_copy(args.assets)
    torch.manual_seed(0)
    out(f"## GPU check{' (DRY RUN: CPU, tiny shapes; measures nothing)' if args.dry else ''}")
    out()
    out("```")
    for line in machine_lines("float16"):
        out(line)
    device = pick_device(args)
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work) as tmp:
        work = Path(tmp)
        fp16 = {}  # the streaming section's figures: the quantized section's baseline
        sections = {  # name -> run it; False, a list of failures or an exception is a failure
            "streaming": lambda: streaming(args, device, work / "synthetic", fp16),
            "speculation": lambda: speculation_section(args, work),
            "quantized streaming": lambda: quantized_streaming(args, device, work, fp16),
            "moe streaming": lambda: moe_section(args, device, work),
            "parity": lambda: parity(args, device, work),
            "small GPU": lambda: small_gpu(args, device, work, write_synthetic),
        }
        for name, run in sections.items():
            if args.only and name.split()[0] not in args.only:
                continue
            try:
                result = run()
                failures += result if isinstance(result, list) else [name] if result is False else []
            except Exception:
                failures.append(name)
                out(f"{name} section FAILED:\n" + traceback.format_exc())
    out(f"gpu_check: {'FAILED: ' + ', '.join(failures) if failures else 'OK'}")
    out("```")
    return 1 if failures else 0


def moe_section(args, device: torch.device, work: Path) -> bool:
    from gpu_check_moe import moe_streaming

    out("```")
    try:
        return moe_streaming(out, device, work / "moe", args.dry)
    finally:
        out("```")


def speculation_section(args, work: Path) -> None:
    """Tree speculation's verify cost (benchmarks/speculate.py gpu): trees of 16-1024 tokens vs a
    1-token pass on 4 int4 layers of Llama-2-70B's shapes streamed from pinned RAM (issue 24)."""
    from speculate import gpu_section

    out()
    out("tree speculation: verify cost of a tree vs a 1-token pass, int4, streamed from pinned RAM")
    out("```")
    try:
        gpu_section(args.dry, args.tokens_per_pass, work, header=False)
    finally:
        shutil.rmtree(work / ("speculate-tiny" if args.dry else "speculate-70b-4l-int4"), ignore_errors=True)
        out("```")


def guarded(name: str, fn, *args) -> dict:
    """fn(*args), or {"error": ...} with the traceback printed: one mode's crash leaves the others."""
    try:
        return fn(*args)
    except Exception as e:
        out(f"{name} FAILED:\n" + traceback.format_exc())
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def streaming(args, device: torch.device, folder: Path, fp16: dict) -> None:
    """Fills `fp16` with (manifest, layer, results) for the quantized section's baseline row."""
    manifest, layer = write_synthetic(args, folder, device)
    copy_gbps = pinned_copy_gbps(layer, device)
    results = {}
    fp16.update(manifest=manifest, layer=layer, results=results)
    for mode in MODES:
        results[mode[0]] = guarded(mode[0], run_mode, folder, device, mode, args.prefill, torch.float16)
    out("```")
    report_streaming(args, results, manifest, layer, copy_gbps)
    out("```")
    bad = [name for name, r in results.items() if "error" in r or r.get("finite") is False]
    if bad:
        raise RuntimeError(f"modes failed or gave non-finite logits: {bad}")


if __name__ == "__main__":
    sys.exit(main())
