"""Which CPU kernel can run a quantized linear weight at batch 1 near the memory's speed (issue 17).

Decode at batch 1 reads every weight once per token, so its floor is (weight bytes / memory
bandwidth). This measures, on the linear weights of a 1.1B-class llama (TinyLlama's shapes, 22
layers: the model of benchmarks/cpu_llamacpp.py, 0.97 GB as int8), one matrix-vector product per
weight, all weights in turn (so none stays in the CPU's caches):
- the memory floor: a plain read of the same bytes (a sum over them);
- torch's weight-only kernels, runtime/lowbit.py's path where the project's do not build:
  `_weight_int8pack_mm` (int8 per channel) and `_weight_int4pack_mm_for_cpu` (int4, groups of
  32), bfloat16 activations;
- kernels that also quantize the activations: fbgemm's dynamic int8 linear (per-tensor activation
  scale; with the rows scaled to their absolute maximum first it is per token), oneDNN's int8
  linear (activations given already quantized), `torch._int_mm` (int8 x int8 -> int32), and the
  project's own int8 and int4 kernels (runtime/native.py: per block of 32, as llama.cpp), which
  the packed path takes where they build.
Then the price of quantizing activations: SmolLM2-135M-Instruct's perplexity on
tests/data/english.txt with its int8 folder's linear layers run through fbgemm per token, through
torch's weight-only kernel and through the project's kernel, and its int4 folder through the last
two (the issue's bounds: int8 +1%, int4 +2% over the float folder; issue 26: the project's int4
kernel within +0.5% of the weight-only kernel's). The models compute in float32 (`--ppl-dtype`;
`auto` is the folder's CPU default, bfloat16 where the CPU is fast at it), as tests/test_quant.py
scores them.

With `--baseline-source OLD.c` (another version of runtime/kernels/lowbit_cpu.c, e.g. from
`git show REV:runtime/kernels/lowbit_cpu.c`), that version is built too: its int8 and int4 kernels
are timed against this one's, calls alternated so that other work on the machine slows both
alike, and its perplexities are printed next to this one's.

  python benchmarks/cpu_kernels.py [--threads 2] [--repeat 5] [--skip-ppl] [--skip-table] [--ppl-dtype float32]
                                   [--baseline-source OLD.c]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from common import machine_lines  # noqa: E402

H, I, LAYERS = 2048, 5632, 22  # TinyLlama-1.1B: hidden, intermediate; q and o are H x H, k and v 256 x H
SHAPES = [(H, H), (256, H), (256, H), (H, H), (I, H), (I, H), (H, I)] * LAYERS  # (out, in)


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def candidates(weights: list[torch.Tensor]) -> dict:
    """{label: (a function running every weight once, bytes it reads per call)}."""
    g = torch.Generator().manual_seed(1)
    x = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for k in (H, I)}
    int8_bytes = sum(w.numel() for w in weights)
    scales = [torch.rand(w.shape[0], generator=g).to(torch.bfloat16) for w in weights]
    runs = {"memory read (sum over the int8 bytes)": (lambda: [w.view(torch.int64).sum() for w in weights], int8_bytes),
            "_weight_int8pack_mm (weight-only int8)": (lambda: [
                torch.ops.aten._weight_int8pack_mm(x[w.shape[1]], w, s) for w, s in zip(weights, scales)], int8_bytes)}
    packed4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu((w.to(torch.int32) & 0xF), 1) for w in weights]
    sz4 = [torch.rand(w.shape[1] // 32, w.shape[0], 2, generator=g).to(torch.bfloat16) for w in weights]
    runs["_weight_int4pack_mm_for_cpu (weight-only int4 g32)"] = (lambda: [
        torch.ops.aten._weight_int4pack_mm_for_cpu(x[w.shape[1]], p, 32, s) for w, p, s in zip(weights, packed4, sz4)],
        int8_bytes // 2)
    xf = {k: v.float() for k, v in x.items()}
    fb = fbgemm_packed(weights)
    if fb is not None:
        runs["fbgemm dynamic int8 linear (activations quantized per tensor)"] = (lambda: [
            torch.ops.quantized.linear_dynamic(xf[w.shape[1]], p, True) for w, p in zip(weights, fb)], int8_bytes)
    if hasattr(torch.ops.onednn, "qlinear_pointwise"):
        xq = {k: torch.randint(0, 255, (1, k), dtype=torch.uint8, generator=g) for k in (H, I)}
        od = [torch.ops.onednn.qlinear_prepack(w, [1, w.shape[1]]) for w in weights]
        wsc = [torch.rand(w.shape[0], generator=g) * 0.01 for w in weights]
        wzp = [torch.zeros(w.shape[0], dtype=torch.int32) for w in weights]
        runs["oneDNN int8 linear (activations given as uint8)"] = (lambda: [
            torch.ops.onednn.qlinear_pointwise(xq[w.shape[1]], 0.05, 128, p, s, z, None, 1.0, 0, torch.float32, "none",
                                               [], "") for w, p, s, z in zip(weights, od, wsc, wzp)], int8_bytes)
    from runtime import native

    if native.lowbit() is not None:  # the project's kernels (runtime/native.py), float32 activations
        f32 = {k: v.float() for k, v in x.items()}
        scales32 = [s.float() for s in scales]
        runs["project's int8 kernel (runtime/native.py: activations per block of 32, VNNI)"] = (lambda: [
            native.int8_gemm(f32[w.shape[1]], w, s) for w, s in zip(weights, scales32)], int8_bytes)
        packed = [w[:, : w.shape[1] // 2].contiguous().view(torch.uint8) for w in weights]
        tables = [native.int4_scales(torch.rand(w.shape[0], w.shape[1] // 32, generator=g).to(torch.bfloat16),
                                     torch.rand(w.shape[0], w.shape[1] // 32, generator=g).to(torch.bfloat16), 32)
                  for w in weights]
        runs["project's int4 g32 kernel (runtime/native.py, the same way)"] = (lambda: [
            native.int4_gemm(f32[p.shape[1] * 2], p, t, 32) for p, t in zip(packed, tables)],
            sum(p.numel() + t.numel() * 2 for p, t in zip(packed, tables)))
    xi = {k: torch.randint(-127, 127, (1, k), dtype=torch.int8, generator=g) for k in (H, I)}
    runs["torch._int_mm (int8 x int8 -> int32)"] = (lambda: [torch._int_mm(xi[w.shape[1]], w.t()) for w in weights],
                                                    int8_bytes)
    return runs


def fbgemm_packed(weights: list[torch.Tensor]):
    """fbgemm's prepacked int8 weights (through quantized tensors, which torch 2.13 deprecates), or None."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
            w, torch.full((w.shape[0],), 0.01, dtype=torch.double), torch.zeros(w.shape[0], dtype=torch.long), 0),
            None) for w in weights]


def baseline_lib(source: str):
    """The lowbit_cpu library built from another version of its source (runtime/native.py's build and load)."""
    from runtime import native

    return native.load(native.build(Path(source), os.environ.get("CC") or shutil.which("cc") or "gcc"))


def kernel_calls(weights: list[torch.Tensor], lib=None) -> dict:
    """{"int8": fn, "int4": fn, ...}: the project's kernels over every weight once (float32 activations,
    batch 1), through `lib` (native.load) where given."""
    from runtime import native

    g = torch.Generator().manual_seed(2)
    x = {k: torch.randn(1, k, generator=g) for k in (H, I)}
    scales = [torch.rand(w.shape[0], generator=g) for w in weights]
    packed = [w[:, : w.shape[1] // 2].contiguous().view(torch.uint8) for w in weights]
    tables = [native.int4_scales(torch.rand(w.shape[0], w.shape[1] // 32, generator=g).to(torch.bfloat16),
                                 torch.rand(w.shape[0], w.shape[1] // 32, generator=g).to(torch.bfloat16), 32)
              for w in weights]
    return {"int8": lambda: [native.int8_gemm(x[w.shape[1]], w, s, lib=lib) for w, s in zip(weights, scales)],
            "int4": lambda: [native.int4_gemm(x[p.shape[1] * 2], p, t, 32, lib=lib) for p, t in zip(packed, tables)],
            # the first 16 rows of each weight: the call's fixed part (quantizing x, the group sums) and little else
            "int4, 16 rows a weight": lambda: [native.int4_gemm(x[p.shape[1] * 2], p[:16], t[:16], 32, lib=lib)
                                               for p, t in zip(packed, tables)]}


def against_baseline(weights: list[torch.Tensor], source: str, repeat: int) -> None:
    """This version's kernels against `source`'s, each call of one next to one of the other, in turns."""
    ours, theirs = kernel_calls(weights), kernel_calls(weights, baseline_lib(source))
    print(f"\nthis kernel source against {source} (alternated calls, each first in turn, median of {repeat}):")
    print("| kernel | ms, this source | ms, baseline source | this / baseline | fastest of each: this / baseline |")
    print("|---|---|---|---|---|")
    for name in ours:
        ours[name](), theirs[name]()
        times = {"ours": [], "theirs": []}
        for r in range(repeat):  # ABBA: neither always runs first (the first of a pair ran faster here)
            pair = (("ours", ours[name]), ("theirs", theirs[name]))
            for who, fn in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                fn()
                times[who].append(time.perf_counter() - t0)
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        fa, fb = min(times["ours"]), min(times["theirs"])  # other work only ever adds time
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.3f}x | {fa * 1e3:.1f} / {fb * 1e3:.1f} = "
              f"{fa / fb:.3f}x |", flush=True)


def perplexities(dtype: str | None, baseline: str | None = None) -> None:
    """SmolLM2's int8 and int4 folders computing in `dtype`: the weight-only kernels, fbgemm with
    per-token activation quantization (int8) and the project's kernels, against the fp16 folder."""
    from models import smollm2_quantized

    from runtime import lowbit, native
    from runtime.model import LayeredModel

    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    folders = smollm2_quantized()

    def ppl(folder, swap=False, backend="native", lib=None) -> float:
        os.environ["RESHARD_NATIVE"] = "1" if backend == "native" else "0"
        native.lowbit.cache_clear()
        with LayeredModel.from_pretrained(folder, device="cpu", dtype=dtype, max_cpu_memory="64GiB") as lm:
            used = {m.spec.backend for m in lm.model.modules() if isinstance(m, lowbit.PackedLinear)}
            assert used <= {backend}, (used, backend)  # what the label says ran
            for m in lm.model.modules():
                if swap and isinstance(m, lowbit.PackedLinear) and m.spec.scheme == "int8":
                    m.forward = per_token_fbgemm(m)
                if lib is not None and isinstance(m, lowbit.PackedLinear):  # the baseline source's kernels
                    m.native = functools.partial(native.int8_gemm if m.spec.scheme == "int8" else native.int4_gemm,
                                                 **({"group": m.spec.group} if m.spec.group else {}), lib=lib)
            ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                logits = lm(ids).logits[0, :-1].float()
            return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())

    base = ppl(folders["fp16"])  # (no packed layers; RESHARD_NATIVE=1 so that native.lowbit() below says what builds)
    print(f"\nperplexity, SmolLM2-135M-Instruct on tests/data/english.txt ({text.count(' ') + 1} words), "
          f"computing in {dtype or 'the folders default dtype'}:")
    print(f"  fp16 folder (baseline): {base:.4f}")
    runs = [("int8 folder, _weight_int8pack_mm (weight-only)", "int8", False, "torch"),
            ("int8 folder, fbgemm dynamic linear, activations quantized per token", "int8", True, "torch")]
    if native.lowbit() is not None:
        runs += [("int8 folder, project's kernel, activations per block of 32", "int8", False, "native"),
                 ("int4 g32 folder, _weight_int4pack_mm_for_cpu (weight-only)", "int4-g32", False, "torch"),
                 ("int4 g32 folder, project's kernel, activations per block of 32", "int4-g32", False, "native")]
    if native.lowbit() is not None and baseline:
        lib = baseline_lib(baseline)
        runs += [(f"int8 folder, {baseline}'s kernel", "int8", False, "native", lib),
                 (f"int4 g32 folder, {baseline}'s kernel", "int4-g32", False, "native", lib)]
    for label, name, swap, backend, *lib in runs:
        p = ppl(folders[name], swap=swap, backend=backend, lib=lib[0] if lib else None)
        print(f"  {label}: {p:.4f} ({100 * (p / base - 1):+.2f}%)")
    os.environ.pop("RESHARD_NATIVE", None)
    native.lowbit.cache_clear()


def per_token_fbgemm(module):
    """A forward for an int8 PackedLinear through fbgemm: each row scaled to absolute maximum 1 so that
    fbgemm's one activation scale is per token, then scaled back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(module.weight, module.qscales.double(),
                                                      torch.zeros(module.out_features, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(qw, None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, module.in_features).float()
        s = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        y = (torch.ops.quantized.linear_dynamic(rows / s, packed, True) * s).to(x.dtype)
        y = y.view(*x.shape[:-1], module.out_features)
        return y if module.bias is None else y + module.bias
    return forward


def kernel_table(weights: list[torch.Tensor], repeat: int) -> None:
    print("| kernel | ms for all weights | GB/s of weight bytes | vs memory read |")
    print("|---|---|---|---|")
    floor = None
    for label, (fn, nbytes) in candidates(weights).items():
        seconds = timed(fn, repeat)
        rate = nbytes / seconds / 1e9
        floor = floor or rate
        print(f"| {label} | {seconds * 1e3:.1f} | {rate:.1f} | {rate / floor:.2f}x |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-table", action="store_true", help="leave out the table of every kernel")
    ap.add_argument("--baseline-source", help="another version of lowbit_cpu.c to compare the project's kernels with")
    ap.add_argument("--ppl-dtype", default="float32", help="what the perplexity runs compute in ('auto': the folder's default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for line in machine_lines("int8/int4 weights, bfloat16 or float32 activations", args.threads):
        print(line)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(-127, 127, s, dtype=torch.int8, generator=g) for s in SHAPES]
    print(f"weights: {len(weights)} linear weights of a 1.1B llama (TinyLlama's shapes), "
          f"{sum(w.numel() for w in weights) / 1e9:.3f} GB as int8; one product each with one row (batch 1); "
          f"median of {args.repeat}\n")
    if not args.skip_table:
        kernel_table(weights, args.repeat)
    from runtime import native

    if args.baseline_source and native.lowbit() is not None:
        against_baseline(weights, args.baseline_source, args.repeat)
    if not args.skip_ppl:
        perplexities(None if args.ppl_dtype == "auto" else args.ppl_dtype, args.baseline_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
