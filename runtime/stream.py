"""Reading layer groups and keeping the next ones ready: the mechanism behind `LayeredModel`.

`GroupLoader.load(i)` turns group i's file into tensors on the compute device:
- CPU, same dtype: views of the memory-mapped file (no copy); the pages are faulted in
  by the background thread so compute never waits on the disk.
- CUDA: one bulk copy file -> pinned staging buffer (reused, sized to the largest group),
  then one non-blocking host-to-device copy on a side stream; an event tells the compute
  stream when the weights are there.
`Prefetcher` runs loads on one background thread, `depth` groups ahead of the consumer, in
the cyclic order of a pass: at the end of a pass it is already reading the next pass's
first groups.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reshard.format import GroupFile, Manifest, param_names, quant_part_names

from .quantized import expand_group, expand_param


@dataclass
class Loaded:
    """One group's tensors on the compute device, ready once `event` (if any) has fired."""

    index: int
    tensors: dict[str, torch.Tensor]
    event: torch.cuda.Event | None = None
    nbytes: int = 0


@dataclass
class StreamStats:
    passes: int = 0  # forward passes through the whole model
    layer_loads: int = 0  # groups put in place for compute
    bytes_read: int = 0  # bytes of group files read for those loads
    read_seconds: float = 0.0  # background thread: file -> host memory
    copy_seconds: float = 0.0  # background thread: host -> device copies issued and completed
    wait_seconds: float = 0.0  # compute waiting for weights that were not ready yet
    seconds: float = 0.0  # wall time inside forward passes
    per_group_loads: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "per_group_loads"}
        d["read_gb_per_s"] = round(self.bytes_read / self.read_seconds / 1e9, 3) if self.read_seconds else None
        return d


class GroupLoader:
    """Loads group i of `manifest` from `folder` onto `device` in `dtype`."""

    def __init__(self, folder: Path, manifest: Manifest, device: torch.device, dtype: torch.dtype, stats: StreamStats):
        self.manifest, self.device, self.dtype, self.stats = manifest, device, dtype, stats
        self.files = [GroupFile(folder / g.file, g) if g.file else None for g in manifest.groups]
        self.scheme = (manifest.quantization or {}).get("scheme")
        home = {name: i for i, g in enumerate(manifest.groups) for name in param_names(g, self.scheme)}
        # alias param -> (index of the group whose file holds it, tensor name there)
        self.aliases = [{a: (home[t], t) for a, t in g.aliases.items()} for g in manifest.groups]
        self.cuda = device.type == "cuda"
        if self.cuda:
            largest = max((f.nbytes for f in self.files if f), default=0)
            self.copy_stream = torch.cuda.Stream(device)
            self._staging = [torch.empty(largest, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._staging_done: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0

    def load(self, i: int) -> Loaded:
        if self.cuda:
            return self._load_cuda(i)
        return self._load_cpu(i)

    def _load_cpu(self, i: int) -> Loaded:
        t0 = time.perf_counter()
        gf, tensors = self.files[i], {}
        if gf is not None:
            gf.touch()
            tensors = self._expand(i, {name: self._cast(gf.tensor(name)) for name in gf.infos})
        for alias, (j, name) in self.aliases[i].items():
            tensors[alias] = self._param(j, name, lambda t: t)
        self.stats.read_seconds += time.perf_counter() - t0
        return Loaded(i, tensors, None, gf.nbytes if gf else 0)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def _expand(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group i's stored tensors -> its parameters: quantized ones expanded to the compute dtype."""
        group = self.manifest.groups[i]
        return expand_group(tensors, group, self.scheme, self.dtype) if group.quantized else tensors

    def _param(self, j: int, name: str, move) -> torch.Tensor:
        """Parameter `name` from group j's file, moved by `move` (to the device), expanded if quantized."""
        group, gf = self.manifest.groups[j], self.files[j]
        if name not in group.quantized:
            return self._cast(move(gf.tensor(name)))
        parts = {part: move(gf.tensor(n)) for part, n in quant_part_names(name, self.scheme).items()}
        return expand_param(parts, group.quantized[name], self.scheme, self.dtype)

    def _load_cuda(self, i: int) -> Loaded:
        gf, tensors, nbytes, read = self.files[i], {}, 0, 0.0
        t0 = time.perf_counter()
        with torch.cuda.stream(self.copy_stream):
            if gf is not None:
                nbytes = gf.nbytes
                flat, read = self._to_device(gf.data())
                tensors = self._expand(i, {name: self._cast(gf.view_of(flat, name)) for name in gf.infos})
            for alias, (j, name) in self.aliases[i].items():
                tensors[alias] = self._param(j, name, lambda t: t.to(self.device))
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        event.synchronize()  # the background thread waits for its copy, compute does not
        self.stats.read_seconds += read
        self.stats.copy_seconds += time.perf_counter() - t0 - read
        return Loaded(i, tensors, event, nbytes)

    def _to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, float]:
        """file bytes -> pinned staging -> device on the copy stream; (device bytes, read seconds)."""
        turn = self._turn
        self._turn ^= 1
        if self._staging_done[turn] is not None:
            self._staging_done[turn].synchronize()  # the copy that last used this buffer is done
        t0 = time.perf_counter()
        staging = self._staging[turn][: host.numel()]
        staging.copy_(host)  # page cache (or disk) -> pinned memory
        read = time.perf_counter() - t0
        flat = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
        flat.copy_(staging, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        self._staging_done[turn] = done
        return flat, read

    def release_pages(self, i: int) -> None:
        """Let the OS drop group i's mapped pages from this process (the page cache keeps them)."""
        if self.files[i] is not None:
            self.files[i].evict()


class Prefetcher:
    """Runs `load(i)` on a background thread, `depth` groups ahead, cyclically over `n` groups."""

    def __init__(self, load, n: int, depth: int, stats: StreamStats):
        self.load, self.n, self.depth, self.stats = load, n, depth, stats
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="runtime-prefetch")
        self.pending: collections.deque[tuple[int, Future]] = collections.deque()

    def get(self, i: int) -> Loaded:
        """Group i's weights, waiting only if the background thread is not done with them."""
        while self.pending and self.pending[0][0] != i:
            self.pending.popleft()[1].cancel()  # off the expected order: drop what was read ahead
        future = self.pending.popleft()[1] if self.pending else self.pool.submit(self.load, i)
        last = self.pending[-1][0] if self.pending else i
        while len(self.pending) < self.depth:
            last = (last + 1) % self.n
            self.pending.append((last, self.pool.submit(self.load, last)))
        t0 = time.perf_counter()
        loaded = future.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        return loaded

    def close(self) -> None:
        for _, f in self.pending:
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)
