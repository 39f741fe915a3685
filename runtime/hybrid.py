"""Where a host-resident group runs each pass: copied to the device (streamed) or computed in place on the CPU.

At batch 1 a streamed group's time is its copy over the link (stored bytes / link bytes/s);
computed on the CPU it is the time the CPU's matmul takes to read those bytes from host RAM,
and only a few KB of activations cross the link. With many tokens per pass the CPU becomes
compute-bound and the GPU wins. `choose` compares the two from measured `Speeds` (a roofline:
each side takes the longer of moving its bytes and doing its arithmetic); `calibrate` measures
them on this machine once per process (and keeps them on disk in the per-user cache).
The mechanism that runs a group on the CPU is runtime/hostcompute.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

CPU, STREAM = "cpu", "stream"


@dataclass(frozen=True)
class Speeds:
    """Measured rates the planner compares (bytes/s and FLOP/s)."""

    link: float  # host -> device copy bandwidth (pinned), bytes/s; 0 where there is no device link
    cpu_bytes: float  # weight bytes/s the CPU's matmul reads at one token (memory-bound)
    cpu_flops: float  # FLOP/s of the CPU's matmul with many tokens (compute-bound)
    gpu_flops: float  # FLOP/s of the device's matmul
    cpu_expand: float = 0.0  # stored bytes/s the CPU expands quantized (int4) weights at; 0: not measured
    cpu_packed: float = 0.0  # stored bytes/s the CPU's int4 kernel reads at one token; 0: no kernel (cpu_bytes then)
    # stored bytes/s each kernel scheme reads at one token ("q4_k", "iq2_xxs", "mxfp4_blocks", ...: the
    # grid types decode several times slower than the K-quants); a scheme not measured goes at cpu_packed
    packed_rates: dict = field(default_factory=dict)

    def packed_rate(self, scheme: str) -> float:
        """Stored bytes/s the CPU's kernel for `scheme` reads at one token (the int4 kernel's where not
        measured; the matmul's where there is no kernel)."""
        return self.packed_rates.get(scheme) or self.cpu_packed or self.cpu_bytes


@dataclass(frozen=True)
class Choice:
    """Where one group runs for one pass, and the estimates behind it."""

    where: str  # CPU or STREAM
    cpu_seconds: float
    stream_seconds: float

    @property
    def reason(self) -> str:
        return f"cpu {self.cpu_seconds * 1e3:.3g} ms vs stream {self.stream_seconds * 1e3:.3g} ms"


def cpu_seconds(stored: int, params: int, tokens: int, speeds: Speeds, expanded: int = 0,
                packed: dict | None = None) -> float:
    """The CPU's time for a group of `stored` bytes and `params` weights at `tokens` tokens, of
    which `expanded` stored bytes are quantized weights the CPU expands before its matmul (no
    kernel multiplies them as stored), every pass (unknown, so infinite, where that rate is not
    measured), and `packed` {kernel scheme: bytes} are read by the low-bit kernels, each at its
    scheme's measured rate (`Speeds.packed_rate`)."""
    packed = packed or {}
    expand = 0.0 if not expanded else expanded / speeds.cpu_expand if speeds.cpu_expand > 0 else float("inf")
    read = (stored - sum(packed.values())) / speeds.cpu_bytes + sum(n / speeds.packed_rate(s) for s, n in packed.items())
    return expand + max(read, 2 * params * tokens / speeds.cpu_flops)


def stream_seconds(stored: int, params: int, tokens: int, speeds: Speeds) -> float:
    """A streamed group's time: its copy overlaps the previous group's compute, so the longer of the two."""
    copy = stored / speeds.link if speeds.link > 0 else float("inf")
    return max(copy, 2 * params * tokens / speeds.gpu_flops)


def choose(stored: int, params: int, tokens: int, speeds: Speeds, expanded: int = 0,
           packed: dict | None = None) -> Choice:
    """CPU or STREAM for a host-resident group of `stored` bytes holding `params` weights (`expanded`
    of those bytes expanded on the CPU each pass, `packed` read by its low-bit kernels: `cpu_seconds`),
    for a pass of `tokens` tokens: the faster of the two estimates; a tie streams (the device path is
    the default)."""
    cpu = cpu_seconds(stored, params, tokens, speeds, expanded, packed)
    stream = stream_seconds(stored, params, tokens, speeds)
    return Choice(CPU if cpu < stream else STREAM, cpu, stream)


def choose_experts(routed: int, pairs: int, expert_stored: int, expert_params: int, speeds: Speeds, *,
                   on_device: int = 0, cpu_traffic: dict | None = None) -> Choice:
    """CPU or STREAM for one call of a MoE layer's experts module (runtime/cpuexperts.py): `routed`
    distinct experts of `expert_stored` bytes and `expert_params` weights each, `pairs` (token, expert)
    pairs to compute, 2 * expert_params FLOPs each. Streamed, the routed experts not `on_device`
    already (the device's expert cache, or brought for an earlier forward of this pass) cross the
    link; on the CPU, each routed expert costs `cpu_traffic` {kernel scheme, or None for the
    matmul: bytes} of host memory traffic, each part at its rate (default: its stored bytes read by
    the matmul, computed where they lie)."""
    traffic = {None: expert_stored} if cpu_traffic is None else cpu_traffic
    per_expert = sum(n / (speeds.packed_rate(s) if s else speeds.cpu_bytes) for s, n in traffic.items())
    cpu = max(routed * per_expert, 2 * expert_params * pairs / speeds.cpu_flops)
    stream = stream_seconds((routed - on_device) * expert_stored, expert_params, pairs, speeds)
    return Choice(CPU if cpu < stream else STREAM, cpu, stream)


# --- calibration -----------------------------------------------------------------------------

_MEASURED: dict[str, Speeds] = {}  # this process's measurements, by device and dtype
# How the calibration measures, for its cache: 2 reads the weights of the one-token rates from memory,
# not a cache (COLD_BYTES of them); entries of 1 (one 16 MB weight, read again: a server's L3 held it,
# and the CPU looked faster than its memory) are measured anew.
CALIBRATION_METHOD = 2
COLD_BYTES = 512 << 20  # more than a CPU's caches: what a model's layers are


def calibrate(device: torch.device, dtype: torch.dtype, *, cache_file: Path | None = None,
              schemes=()) -> Speeds:
    """Measure `Speeds` on this machine for `dtype` (link and GPU only where `device` is CUDA), with
    the kernel rate of each of `schemes` (the kernel schemes of a model's packed weights): once per
    process, and read back from `cache_file` (JSON, keyed by device name and dtype) when it has them."""
    key = f"{_device_name(device)}/{dtype}"
    speeds, fresh = _MEASURED.get(key), False
    if speeds is None:
        entry = _read_cache(cache_file).get(key, {})
        if entry.get("method") == CALIBRATION_METHOD:  # (entries an older way of measuring wrote: measured anew)
            speeds = Speeds(**{k: v for k, v in entry.items() if k != "method"})
        else:
            cpu_bytes, cpu_flops = measure_cpu(dtype)
            link, gpu_flops = (measure_link(device), measure_gpu(device, dtype)) if device.type == "cuda" else (0.0, 1.0)
            speeds = Speeds(link, cpu_bytes, cpu_flops, gpu_flops, measure_cpu_expand(dtype), measure_cpu_packed())
            fresh = True
    missing = [s for s in dict.fromkeys(schemes) if s not in speeds.packed_rates]
    if missing:
        speeds = replace(speeds, packed_rates={**speeds.packed_rates, **{s: measure_cpu_packed(s) for s in missing}})
    if cache_file is not None and (fresh or missing):
        _write_cache(cache_file, {**_read_cache(cache_file), key: {**asdict(speeds), "method": CALIBRATION_METHOD}})
    _MEASURED[key] = speeds
    return speeds


def default_cache_file() -> Path:
    """Where calibrations are kept between runs: speeds.json in the per-user cache (reshard/cache.py)."""
    from reshard.cache import cache_root

    return cache_root() / "speeds.json"


def measure_cpu(dtype: torch.dtype, rows: int = 4096, cols: int = 2048, tokens: int = 256,
                cold_bytes: int = COLD_BYTES) -> tuple[float, float]:
    """(weight bytes/s at one token, FLOP/s at `tokens` tokens) of the CPU's matmul: the first over
    copies of the weight `cold_bytes` in all, each read once a round (from memory, as a model's
    layers are, not from a cache), the second on one weight (compute-bound)."""
    weight = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    one = _cold(lambda ops: torch.nn.functional.linear(x, *ops), _copies((weight,), cold_bytes))
    many_x = torch.randn(tokens, cols).to(dtype)
    many = _best(lambda: torch.nn.functional.linear(many_x, weight))
    return weight.numel() * weight.element_size() / one, 2 * rows * cols * tokens / many


def measure_cpu_expand(dtype: torch.dtype, rows: int = 4096, cols: int = 2048, group: int = 32) -> float:
    """Stored bytes/s at which the CPU expands an int4 weight (group `group`) to `dtype`: what a
    host-computed group pays each pass for quantized weights no CPU kernel multiplies as stored."""
    from reshard.quant import quantize

    from .expansion import expand_weight

    parts = quantize(torch.randn(rows, cols) * 0.02, "int4", group=group, dtype=torch.float16)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    return stored / _best(lambda: expand_weight(parts, "int4", columns=cols, dtype=dtype))


def measure_cpu_packed(scheme: str = "int4", rows: int = 8192, cols: int = 4096, group: int = 32,
                       cold_bytes: int = COLD_BYTES) -> float:
    """Stored bytes/s the project's kernel for `scheme` (runtime/native.py: "int4", "int8", or a GGML
    block scheme such as "q4_k") reads at one token, over copies of a weight `cold_bytes` in all
    (read from memory, not a cache); 0 where the kernel cannot run here. GGML blocks are random
    bytes: the kernels' work does not depend on the values."""
    from reshard.ggml_quants import BLOCK_TYPES
    from reshard.quant import quantize

    from . import lowbit, native

    if scheme in BLOCK_TYPES:
        if native.lowbit() is None or scheme not in native.BLOCK_SCHEMES:
            return 0.0
        _, size, nbytes = BLOCK_TYPES[scheme]
        spec = lowbit.PackSpec(scheme, 0, rows, cols, "native", torch.float32)
        blocks = torch.randint(0, 256, (rows, cols // size * nbytes), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        operands = lowbit.pack_param({"blocks": blocks}, spec)
    else:
        if not native.int_kernels():
            return 0.0
        spec = lowbit.PackSpec(scheme, group if scheme == "int4" else 0, rows, cols, "native", torch.float16)
        parts = quantize(torch.randn(rows, cols) * 0.02, scheme, group=group, dtype=torch.float16)
        operands = lowbit.pack_param(parts, spec)
    kernel, x = lowbit.native_kernel(spec), torch.randn(1, cols)
    nbytes = sum(t.numel() * t.element_size() for t in operands)
    return nbytes / _cold(lambda ops: kernel(x, *ops), _copies(operands, cold_bytes))


def measure_link(device: torch.device, nbytes: int = 64 << 20) -> float:
    """Host -> device bytes/s from pinned memory."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy():
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
    return nbytes / _best(copy)


def measure_gpu(device: torch.device, dtype: torch.dtype, n: int = 4096) -> float:
    """FLOP/s of the device's matmul (n x n by n x n)."""
    a = torch.randn(n, n, device=device).to(dtype)

    def mm():
        a @ a
        torch.cuda.synchronize(device)
    return 2 * n ** 3 / _best(mm)


def _copies(operands: tuple, total: int) -> list[tuple]:
    """`operands` (tensors) and copies of them, `total` bytes in all (at least the originals)."""
    nbytes = sum(t.numel() * t.element_size() for t in operands)
    return [operands] + [tuple(t.clone() for t in operands) for _ in range(-(-total // nbytes) - 1)]


def _cold(fn, operands: list, repeats: int = 3) -> float:
    """Seconds of one `fn(op)`, each of `operands` in turn (their memory larger than the caches, so
    each is read from memory): the best of `repeats` rounds, after a warm-up call."""
    fn(operands[0])
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for op in operands:
            fn(op)
        rounds.append((time.perf_counter() - t0) / len(operands))
    return max(min(rounds), 1e-9)


def _best(fn, repeats: int = 3) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return max(min(times), 1e-9)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: measure again and write it anew


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a measurement next time
