"""GPU check, small-GPU section: the 70B-shaped layers on a GPU with only `--small-free-gb` free.

A blocker tensor takes the rest of the device memory, so `torch.cuda.mem_get_info` reports
what a small card would (as a real small card does). Then, with the DEFAULT budget:
- fp16: greedy generation, batched generation of 32 prompts, scoring 128 items at batch 16;
- int8 and int4 folders of the same weights: greedy generation;
each must complete, and the device memory this process took (peak reserved by torch's
allocator above what it held before) must stay under what was free.
Peers in the same free memory, same weights, same prompt, greedy: transformers with
accelerate's `device_map="auto"` (what most users try first), and AirLLM where its package is
importable (it splits the Hugging Face checkpoint this script writes into its own layer files).
Imported by gpu_check.py; `--dry` runs it on the CPU with tiny shapes (no blocker, no AirLLM).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import traceback
from pathlib import Path

import torch

from common import out

VOCAB = 49152  # SmolLM2's tokenizer (the prompts are real text), as in the issue's measurement
PROMPT = "The three laws of robotics are"
SCHEMES = [None, "int8", "int4"]


def small_gpu(args, device: torch.device, work: Path, write_synthetic) -> bool:
    """Runs the section, prints its table; True if every row completed within the free memory."""
    out(f"small GPU: {args.small_free_gb:g} GB free, default budget; peers in the same free memory")
    tokenizer = args.assets / "smollm2-trim" / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {tokenizer}; run `python benchmarks/prepare_gpu_check.py` first")
    folders = {}
    for scheme in SCHEMES:
        folder = work / f"small-{scheme or 'fp16'}"
        write_synthetic(args, folder, device, quantize=scheme, vocab=VOCAB)
        _copy_tokenizer(tokenizer, folder)
        folders[scheme or "fp16"] = folder
    blocker, free = block(device, args.small_free_gb)
    rows = []
    try:
        rows += [run_row("fp16", "generate", folders["fp16"], device, free, args)]
        rows += [run_row("fp16", "generate 32 prompts", folders["fp16"], device, free, args)]
        rows += [run_row("fp16", "score 128 items, batch 16", folders["fp16"], device, free, args)]
        rows += [run_row(s, "generate", folders[s], device, free, args) for s in ("int8", "int4")]
        hf = write_hf_checkpoint(folders["fp16"], work / "small-hf")
        rows += [peer_row("accelerate device_map=auto", accelerate_generate, hf, device, free, args)]
        rows += [peer_row("AirLLM", airllm_generate, hf, device, free, args)]
    finally:
        del blocker
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for folder in [*folders.values(), work / "small-hf"]:
            shutil.rmtree(folder, ignore_errors=True)
    return report(rows, free, device)


def block(device: torch.device, free_gb: float):
    """(a blocker tensor, bytes left free): on CUDA all but `free_gb` GB taken; nothing on the CPU."""
    if device.type != "cuda":
        return None, None
    torch.cuda.set_per_process_memory_fraction(1.0, device)  # lift gpu_check's cap: the blocker is the limit here
    torch.cuda.empty_cache()
    have = torch.cuda.mem_get_info(device)[0]
    blocker = torch.empty(max(0, have - int(free_gb * 1e9)), dtype=torch.uint8, device=device)
    free = torch.cuda.mem_get_info(device)[0]
    out(f"small GPU: a blocker takes {blocker.numel() / 1e9:.1f} GB; torch.cuda.mem_get_info reports "
        f"{free / 1e9:.2f} GB free")
    return blocker, free


# --- ours -----------------------------------------------------------------------------------------

def run_row(label: str, task: str, folder: Path, device: torch.device, free, args) -> dict:
    from runtime.model import LayeredModel

    row = {"weights": label, "task": task, "system": "ours (default budget)"}
    if device.type == "cuda":  # what the budget starts from: earlier rows must have given theirs back
        row["free_before"] = torch.cuda.mem_get_info(device)[0]
        held(device, f"before {label} {task}")
    try:
        with _peak(device) as peak:
            with LayeredModel.from_pretrained(folder, device=str(device), dtype=torch.float16) as model:
                row["places"] = ", ".join(f"{model.places.count(p)} {p}" for p in ("device", "host", "disk")
                                          if model.places.count(p))
                row.update(TASKS[task](model, args))
        row["peak"] = peak["bytes"]
    except Exception as e:  # noqa: BLE001 - one row's failure is a row, the others still run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out(f"small GPU {label} {task} FAILED:\n" + traceback.format_exc())
    return row


def task_generate(model, args) -> dict:
    ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids.to(model.device)
    t0 = time.perf_counter()
    got = model.generate(ids, max_new_tokens=args.small_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - t0
    decode = [p.seconds for p in model.stats.per_pass[1:]]  # the prompt's pass is the first
    return {"s_per_token": statistics.median(decode) if decode else seconds, "seconds": seconds,
            "tokens": got[0, ids.shape[1]:].tolist()}


def task_batch(model, args) -> dict:
    prompts = [f"{PROMPT} number {k}:" for k in range(32)]
    t0 = time.perf_counter()
    done = model.generate_batch(prompts, max_new_tokens=args.small_tokens, do_sample=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "s_per_token": seconds / args.small_tokens, "items": len(done)}


def task_score(model, args) -> dict:
    items = [{"prompt": f"Question {k}: is {k} even? Answer:", "choices": [" yes", " no", " maybe"]} for k in range(128)]
    t0 = time.perf_counter()
    done = model.score(items, batch_size=16)
    return {"seconds": time.perf_counter() - t0, "items": len(done)}


TASKS = {"generate": task_generate, "generate 32 prompts": task_batch, "score 128 items, batch 16": task_score}


# --- peers ------------------------------------------------------------------------------------------

def peer_row(system: str, fn, hf: Path, device: torch.device, free, args) -> dict:
    row = {"weights": "fp16", "task": "generate", "system": system}
    try:
        with _peak(device) as peak:
            row.update(fn(hf, device, args))
        row["peak"] = peak["bytes"]
    except ImportError as e:
        row["skipped"] = f"not importable ({e})"
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out(f"small GPU {system} FAILED:\n" + traceback.format_exc())
    return row


def accelerate_generate(hf: Path, device: torch.device, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    kwargs = {"device_map": "auto"} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16, **kwargs).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    try:
        return _timed_generate(model, ids, args.small_tokens)
    finally:
        del model


def airllm_generate(hf: Path, device: torch.device, args) -> dict:
    if device.type != "cuda":
        raise ImportError("AirLLM runs on CUDA only")
    AutoModel = _airllm(args.assets).AutoModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModel.from_pretrained(str(hf))
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    return _timed_generate(model, ids, args.small_tokens)


def _airllm(assets: Path):
    """The airllm module: installed, or carried along in `assets`/site by prepare_gpu_check.py."""
    import importlib.util
    import sys

    if importlib.util.find_spec("airllm") is None and (assets / "site" / "airllm").is_dir():
        sys.path.append(str(assets / "site"))
        importlib.invalidate_caches()
    return importlib.import_module("airllm")


def _timed_generate(model, ids, new: int) -> dict:
    with torch.inference_mode():
        t0 = time.perf_counter()
        one = model.generate(ids, max_new_tokens=1, do_sample=False, use_cache=True)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True)
        seconds = time.perf_counter() - t0
    got = got.sequences if hasattr(got, "sequences") else got
    del one
    return {"seconds": seconds, "s_per_token": max(seconds - first, 0.0) / max(new - 1, 1),
            "tokens": got[0, ids.shape[1]:].tolist()}


def write_hf_checkpoint(folder: Path, hf: Path) -> Path:
    """The converted folder as a plain Hugging Face checkpoint (one safetensors shard per group)."""
    from safetensors.torch import save_file

    from reshard.format import GroupFile, read_manifest

    manifest, index = read_manifest(folder), {}
    hf.mkdir(parents=True, exist_ok=True)
    files = [g for g in manifest.groups if g.file]
    for k, g in enumerate(files):
        name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        gf = GroupFile(folder / g.file, g)
        save_file({n: gf.tensor(n).clone() for n in gf.infos}, str(hf / name), metadata={"format": "pt"})
        index.update({n: name for n in gf.infos})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for f in folder.iterdir():
        if f.suffix == ".json" and f.name != "manifest.json" or f.name.startswith("tokenizer"):
            shutil.copy(f, hf / f.name)
    return hf


def held(device: torch.device, when: str) -> None:
    """One line: what the device has free, what torch's allocator holds (the blocker included), and the largest
    CUDA tensors still alive (a row that leaked memory shows here, before the next row's budget)."""
    import gc
    import warnings

    free = torch.cuda.mem_get_info(device)[0]
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    live = []
    with warnings.catch_warnings():  # isinstance on some deprecated module objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.dim() and obj.numel() < 1 << 36:
                    live.append(obj)
            except Exception:  # noqa: BLE001 - some objects refuse isinstance checks
                continue
    live.sort(key=lambda t: -t.untyped_storage().nbytes())
    biggest = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in live[:4])
    out(f"small GPU {when}: free {free / 1e9:.2f} GB; torch allocated {allocated / 1e9:.2f} GB, reserved "
        f"{reserved / 1e9:.2f} GB (the blocker included); {len(live)} live CUDA tensors (largest: {biggest})")


# --- the table --------------------------------------------------------------------------------------

def report(rows: list[dict], free, device: torch.device) -> bool:
    ours = next((r.get("tokens") for r in rows if r["system"].startswith("ours") and r["weights"] == "fp16"
                 and "tokens" in r), None)
    out("```")
    out()
    out(f"| system | weights | task | placement | s/token | seconds | peak device GB (free {_gb(free)}) | tokens "
        f"| free at open GB |")
    out("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        if "skipped" in r or "error" in r:
            ok &= not r["system"].startswith("ours")
            out(f"| {r['system']} | {r['weights']} | {r['task']} | {r.get('skipped') or 'FAILED: ' + r['error']} "
                f"||||| {_gb(r.get('free_before'))} |")
            continue
        within = free is None or r["peak"] <= free
        ok &= within or not r["system"].startswith("ours")  # peers are recorded, not judged
        same = "-" if "tokens" not in r or ours is None or r["weights"] != "fp16" else \
            ("same as ours" if r["tokens"] == ours else "DIFFER")
        if r["system"].startswith("ours") and r["weights"] == "fp16" and "tokens" in r:
            same = "reference"
        s_tok = f"{r['s_per_token']:.3f}" if "s_per_token" in r else "-"
        out(f"| {r['system']} | {r['weights']} | {r['task']} | {r.get('places', '-')} | {s_tok} | "
            f"{r['seconds']:.2f} | {_gb(r['peak'])}{'' if within else ' OVER'} | {same} | {_gb(r.get('free_before'))} |")
    out()
    out("```")
    return ok


def _gb(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e9:.2f}"


class _peak:
    """Peak device bytes this process took inside the block (allocator reserved, above before); None on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.result = device, {"bytes": None}

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_reserved(self.device)
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result["bytes"] = torch.cuda.max_memory_reserved(self.device) - self.before
            torch.cuda.empty_cache()


def _copy_tokenizer(src: Path, folder: Path) -> None:
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
