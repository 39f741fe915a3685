"""What every benchmark here prints and needs: the machine, page-cache eviction, peak memory."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_lines(dtype: str, threads: int | None = None) -> list[str]:
    import torch
    import transformers

    gpu = "none"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"commit: {commit()}",
            f"machine: {platform.node()}; cpu: {cpu} x{os.cpu_count()}; ram: {_ram_gib():.0f} GiB; gpu: {gpu}",
            f"load average: {load_average()} (1, 5, 15 min; other jobs on the same cores slow every figure)",
            f"software: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
            f"dtype: {dtype}; torch threads: {threads or torch.get_num_threads()}"]


def commit() -> str:
    """$RESHARD_COMMIT where it is set (gpu_check.sh sets it from .gpu/commit: a copy of the tree on
    another machine may carry a .git older than its files), else the commit this checkout is at
    (and whether files differ from it)."""
    if os.environ.get("RESHARD_COMMIT"):
        return os.environ["RESHARD_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"],  # the outputs being written are no change
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here, and RESHARD_COMMIT is not set)"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _ram_gib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def evict_page_cache(folder: str | Path) -> None:
    """Drop the folder's files from the page cache (POSIX_FADV_DONTNEED), so the next read hits the disk.

    Pages still mapped by a process stay; call this with the model's files unmapped.
    """
    for path in Path(folder).iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cached_fraction(folder: str | Path) -> float:
    """Fraction of the folder's bytes in the page cache (mincore over a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    total = cached = 0
    for path in Path(folder).iterdir():
        size = path.stat().st_size if path.is_file() else 0
        if not size:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(_address(mm)), ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            cached += sum(b & 1 for b in vec) * mmap.PAGESIZE
        total += size
    return min(1.0, cached / total) if total else 0.0


def _address(mm) -> int:
    import ctypes

    buf = (ctypes.c_char * 1).from_buffer(mm)
    addr = ctypes.addressof(buf)
    del buf
    return addr


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started (VmHWM).

    Not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across fork and exec.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class RssSampler:
    """Samples this process's RSS every `interval` s on a thread: peak over a window of code."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def out(line: str = "") -> None:
    print(line, flush=True)


@contextlib.contextmanager
def opened(folder: Path, device, gpu: str, cpu: str, dtype="float16"):
    """A LayeredModel on `folder` (prefetch 1) with explicit budgets, closed and its memory freed on exit."""
    from runtime.model import LayeredModel

    model = LayeredModel.from_pretrained(folder, device=str(device), dtype=dtype, max_gpu_memory=gpu,
                                         max_cpu_memory=cpu, prefetch=1)
    try:
        yield model
    finally:
        release(model)


def release(model) -> None:
    """Close a LayeredModel and give its memory back (the allocator's cache too, on CUDA), so the next
    model a benchmark opens plans with what it left."""
    import torch

    cuda = model.device.type == "cuda"
    model.close()
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def count_places(places) -> str:
    return ", ".join(f"{places.count(p)} {p}" for p in ("device", "host", "disk") if places.count(p))
