"""Reading layer groups and keeping the next ones ready: the mechanism behind `LayeredModel`.

`GroupLoader.load(i)` turns group i's file into tensors on the compute device:
- CPU, same dtype: views of the memory-mapped file (no copy); the pages are faulted in
  by the background thread so compute never waits on the disk.
- CUDA: one bulk copy file -> pinned staging buffer (reused, sized to the largest group),
  then one non-blocking host-to-device copy on a side stream; an event tells the compute
  stream when the weights are there.
- CUDA, a HOST group (see runtime.budget): its bytes sit in pinned memory from load time on;
  only the host-to-device copy is left per pass.
`Prefetcher` runs loads on one background thread, `depth` groups ahead of the consumer, in
the cyclic order of the groups that stream: at the end of a pass it is already reading the
next pass's first groups. Groups resident on the device are loaded once and never pass here.
`StreamStats` keeps totals and one `PassStats` per forward pass (read, copy, wait, compute, bytes).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reshard.format import ST_TO_DTYPE, GroupFile, Manifest, param_names, quant_part_names, scheme_of
from reshard.quant import SCHEMES as QUANT_SCHEMES

from . import expansion
from .budget import DISK, HOST
from .lowbit import PackSpec
from .quantized import expand_group, expand_param, held_bytes, held_names, param_held_bytes

try:
    _LIBC_TRIM = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # glibc only
except (OSError, AttributeError, TypeError):
    _LIBC_TRIM = None


@dataclass
class Loaded:
    """One group's tensors on the compute device, ready once `event` (if any) has fired."""

    index: int
    tensors: dict[str, torch.Tensor]
    event: torch.cuda.Event | None = None
    nbytes: int = 0


@dataclass
class PassStats:
    """One forward pass: where its time went and how many weight bytes it moved."""

    seconds: float  # wall time of the pass
    read_seconds: float  # background thread: file -> host memory
    copy_seconds: float  # background thread: host -> device copies
    wait_seconds: float  # compute waiting for weights that were not ready yet
    compute_seconds: float  # the rest: the pass itself (seconds - wait_seconds)
    bytes: int  # weight bytes streamed to the compute device for this pass
    gb_per_s: float  # bytes / seconds
    experts_read: int = 0  # routed experts brought from files or host memory (runtime/experts.py)
    experts_cached: int = 0  # routed experts served from the expert cache
    expert_bytes: int = 0  # bytes of the experts read (part of `bytes`)
    expert_reads: int = 0  # file reads they took (consecutive experts are one read)
    experts_predicted: int = 0  # routed experts read ahead on a guess (runtime/prediction.py)
    predicted_used: int = 0  # of those, experts their layer routed (the hits)
    predicted_wasted_bytes: int = 0  # bytes of the others (read, never used)
    cpu_layers: dict = field(default_factory=dict)  # --cpu-layers: group -> "cpu|stream: why" (runtime/hostcompute.py)
    cpu_experts: dict = field(default_factory=dict)  # --cpu-experts: MoE layer -> "cpu|stream: why" (runtime/cpuexperts.py)


@dataclass
class StreamStats:
    passes: int = 0  # forward passes through the whole model
    layer_loads: int = 0  # groups put in place for compute
    bytes_read: int = 0  # bytes of group files read (resident groups once, at load)
    bytes_copied: int = 0  # bytes copied host -> device (CUDA)
    read_seconds: float = 0.0  # background thread: file -> host memory
    copy_seconds: float = 0.0  # background thread: host -> device copies issued and completed
    wait_seconds: float = 0.0  # compute waiting for weights that were not ready yet
    seconds: float = 0.0  # wall time inside forward passes
    bytes_streamed: int = 0  # weight bytes brought to the compute device during passes
    experts_read: int = 0  # routed experts brought from files or host memory
    experts_cached: int = 0  # routed experts served from the expert cache
    expert_bytes: int = 0  # bytes of the experts read (part of bytes_streamed)
    expert_reads: int = 0  # file reads they took (consecutive experts are one read)
    experts_predicted: int = 0  # routed experts read ahead on a guess (runtime/prediction.py)
    predicted_used: int = 0  # of those, experts their layer routed (the hits)
    predicted_wasted_bytes: int = 0  # bytes of the others (read, never used; part of bytes_read)
    resident_bytes: dict = field(default_factory=dict)  # "device"/"host"/"disk" -> bytes placed there
    per_group_loads: collections.Counter = field(default_factory=collections.Counter)
    per_pass: list = field(default_factory=list)  # one PassStats per forward pass
    _mark: tuple = (0.0, 0.0, 0.0, 0, 0.0, (0,) * 7)

    def _experts(self) -> tuple[int, ...]:
        return (self.experts_read, self.experts_cached, self.expert_bytes, self.expert_reads,
                self.experts_predicted, self.predicted_used, self.predicted_wasted_bytes)

    def start_pass(self) -> None:
        self._mark = (self.read_seconds, self.copy_seconds, self.wait_seconds, self.bytes_streamed,
                      time.perf_counter(), self._experts())

    def end_pass(self) -> PassStats:
        read, copy, wait, nbytes, t0, experts = self._mark
        seconds = time.perf_counter() - t0
        wait = self.wait_seconds - wait
        moved = self.bytes_streamed - nbytes
        p = PassStats(seconds, self.read_seconds - read, self.copy_seconds - copy, wait,
                      seconds - wait, moved, moved / seconds / 1e9 if seconds else 0.0,
                      *(now - then for now, then in zip(self._experts(), experts)))
        self.passes += 1
        self.seconds += seconds
        self.per_pass.append(p)
        return p

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("per_group_loads", "per_pass", "_mark")}
        d["read_gb_per_s"] = round(self.bytes_read / self.read_seconds / 1e9, 3) if self.read_seconds else None
        d["stream_gb_per_s"] = round(self.bytes_streamed / self.seconds / 1e9, 3) if self.seconds else None
        d["compute_seconds"] = self.seconds - sum(p.wait_seconds for p in self.per_pass)
        d["expansion_fallbacks"] = expansion.fallbacks()  # this process's: the expansion is shared
        d["per_pass"] = [{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(p).items()}
                         for p in self.per_pass]
        return d


class GroupLoader:
    """Loads group i of `manifest` from `folder` onto `device` in `dtype`.

    `places[i]` (see runtime.budget) says where group i lives between passes; `hold(i)`
    puts a HOST group's bytes in (pinned) host memory once, and `load(i)` reads from there.
    `packing` (runtime.lowbit.plan_packing) names the quantized weights loaded packed for a
    low-bit kernel rather than expanded; `expert_packing` (runtime.packedexperts.plan) the experts
    modules whose streamed experts are computed as stored.
    """

    def __init__(self, folder: Path, manifest: Manifest, device: torch.device, dtype: torch.dtype,
                 stats: StreamStats, *, places: list[str] | None = None,
                 packing: dict[str, PackSpec] | None = None, expert_packing: dict[str, dict] | None = None):
        self.manifest, self.device, self.dtype, self.stats = manifest, device, dtype, stats
        self.packing, self.expert_packing = packing or {}, expert_packing or {}
        # expert weights computed as stored: loaded as their parts, never expanded (runtime/packedexperts.py)
        self.kept = frozenset(f"{path}.{attr}" for path, specs in self.expert_packing.items() for attr in specs)
        self.files = [GroupFile(folder / g.file, g) if g.file else None for g in manifest.groups]
        self.scheme = (manifest.quantization or {}).get("scheme")
        self.places = places or [DISK] * len(self.files)
        home = {name: i for i, g in enumerate(manifest.groups) for name in param_names(g, self.scheme)}
        # alias param -> (index of the group whose file holds it, tensor name there)
        self.aliases = [{a: (home[t], t) for a, t in g.aliases.items()} for g in manifest.groups]
        self.cuda = device.type == "cuda"
        self._host: dict[int, torch.Tensor] = {}  # HOST groups: their data section, pinned
        self._staging: list[torch.Tensor] = []  # CUDA: two pinned buffers, made on first use
        self._staging_done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.expand_stream = torch.cuda.Stream(device) if self.cuda else None  # casts and expansions (_load_cuda)
        # groups whose loads bring one span of their data section, without the tensors named
        # (their routed experts come separately, see runtime/experts.py): i -> (span, names left out)
        self.partial: dict[int, tuple[tuple[int, int], frozenset]] = {}
        self._made = [self.made_anew(i) for i in range(len(self.files))]
        # a published format's parts reach its expansion as stored (fp8's float32 scales are not
        # rounded to the compute dtype first); int8/int4 parts are cast as before
        own = self.scheme in QUANT_SCHEMES or not self.scheme
        self._parts = [set() if own else {n for p in g.quantized
                                          for n in quant_part_names(p, scheme_of(g, p, self.scheme)).values()}
                       for g in manifest.groups]

    def tensor_names(self, i: int) -> list[str]:
        """The names load(i)'s tensors carry: parameters (a packed weight with its scales), then aliases."""
        group = self.manifest.groups[i]
        names = [n for n in param_names(group, self.scheme) if n not in self.kept]  # kept: put in place as operands
        return [*held_names(names, self.packing), *group.aliases]

    def group_bytes(self, i: int) -> int:
        """Bytes group i takes once loaded: its file plus the tied tensors it borrows."""
        own = self.files[i].nbytes if self.files[i] else 0
        return own + sum(self._stored_bytes(j, name) for j, name in self.aliases[i].values())

    def held_bytes(self, i: int) -> int:
        """Bytes group i takes once in place on the device. Parameters made anew (quantized ones
        packed or expanded, others cast to the compute dtype) take runtime.quantized.held_bytes; on the CPU
        a group used as it is stored is its mapped file, and a tied tensor it borrows unchanged
        is a view of another group's mapping; on CUDA every tensor is a copy of its own."""
        group = self.manifest.groups[i]
        own = 0
        if self.files[i] is not None:
            as_stored = not self.cuda and not self.made_anew(i)
            own = self.files[i].nbytes if as_stored else held_bytes(group, self.scheme, self.dtype, self.device,
                                                                    self.packing)
            if not as_stored:  # experts computed as stored take their stored bytes, not expanded ones
                own += sum(self._stored_bytes(i, n) - param_held_bytes(group, n, self.dtype, self.device)
                           for n in group.quantized if n in self.kept)
        return own + sum(param_held_bytes(self.manifest.groups[j], name, self.dtype, self.device, self.packing)
                         for j, name in self.aliases[i].values() if self.cuda or self._param_made_anew(j, name))

    def made_anew(self, i: int) -> bool:
        """Whether loading group i makes new tensors (expanded or cast) rather than views of its bytes."""
        group = self.manifest.groups[i]
        return any(self._param_made_anew(i, name) for name in param_names(group, self.scheme))

    def _param_made_anew(self, j: int, name: str) -> bool:
        group = self.manifest.groups[j]
        if name in group.quantized:
            return True
        stored = ST_TO_DTYPE[group.tensors[name]["dtype"]]
        return stored.is_floating_point and stored != self.dtype

    def expanded_bytes(self, i: int) -> int:
        """Stored bytes of group i's quantized weights that loading expands (no kernel takes them as stored)."""
        group = self.manifest.groups[i]
        return sum(self._stored_bytes(i, n) for n in group.quantized if n not in self.packing and n not in self.kept)

    def packed_bytes(self, i: int) -> dict[str, int]:
        """{kernel scheme: stored bytes} of group i's quantized weights the low-bit kernels read as stored."""
        out: dict[str, int] = {}
        for n in self.manifest.groups[i].quantized:
            if n in self.packing:
                out[self.packing[n].scheme] = out.get(self.packing[n].scheme, 0) + self._stored_bytes(i, n)
        return out

    def _stored_bytes(self, j: int, name: str) -> int:
        """Bytes parameter `name` takes in group j's file (all its parts if quantized)."""
        infos = self.files[j].infos
        if name not in self.manifest.groups[j].quantized:
            return infos[name].nbytes
        return sum(infos[n].nbytes for n in quant_part_names(name, scheme_of(self.manifest.groups[j], name, self.scheme)).values())

    def hold(self, i: int) -> None:
        """Keep group i's file bytes in host memory from now on (pinned when the device is CUDA)."""
        gf = self.files[i]
        if gf is None or not self.cuda:
            return
        t0 = time.perf_counter()
        data = gf.data()
        self._host[i] = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=True).copy_(data)
        gf.evict()
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += gf.nbytes

    def close(self) -> None:
        """Drop pinned host copies, staging buffers and cached views (the file mappings go with the object)."""
        self._host.clear()
        self._free_staging()
        for gf in self.files:
            if gf is not None:
                gf.forget_views()

    def drop_staging(self) -> None:
        """Free the staging buffers if no group streams from disk (they served resident loads only)."""
        if DISK not in self.places:
            self._free_staging()

    def reset_staging(self) -> None:
        """Free the staging buffers; the next load from disk makes them anew, sized to the groups that stream then."""
        self._free_staging()

    def _free_staging(self) -> None:
        self._staging, self._staging_done = [], [None, None]

    def load(self, i: int) -> Loaded:
        if self.cuda:
            return self._load_cuda(i)
        return self._load_cpu(i)

    def host_data(self, i: int) -> torch.Tensor | None:
        """Group i's data section held in (pinned) host memory, if it is a HOST group."""
        return self._host.get(i)

    def _span(self, i: int) -> tuple[tuple[int, int] | None, frozenset, int]:
        """(span of the data section to bring or None for all, tensor names left out, its bytes)."""
        span, skip = self.partial.get(i, (None, frozenset()))
        gf = self.files[i]
        nbytes = (span[1] - span[0]) if span else (gf.nbytes if gf else 0)
        return span, skip, nbytes

    def load_from(self, i: int, data: torch.Tensor) -> Loaded:
        """Group i's tensors on the CPU as views of `data`, its data section held elsewhere (another
        loader's pinned copy, see hold): nothing is read from its file."""
        gf = self.files[i]
        tensors = self._expand(i, {name: self._cast(gf.view_of(data, name), name, i) for name in gf.infos})
        for alias, (j, name) in self.aliases[i].items():
            tensors[alias] = self._param(j, name, lambda t: t)
        return Loaded(i, tensors, None, 0)

    def _load_cpu(self, i: int) -> Loaded:
        t0 = time.perf_counter()
        gf, tensors = self.files[i], {}
        span, skip, nbytes = self._span(i)
        if gf is not None:
            gf.touch(span)
            names = [n for n in gf.infos if n not in skip]
            tensors = self._expand(i, {name: self._cast(gf.tensor(name), name, i) for name in names})  # views made once
            if _copied_out(gf, tensors):
                gf.evict()  # compute reads the copies (cast, packed, expanded); views left fault back in when used
        for alias, (j, name) in self.aliases[i].items():
            tensors[alias] = self._param(j, name, lambda t: t)
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += nbytes
        return Loaded(i, tensors, None, nbytes)

    def _cast(self, t: torch.Tensor, name: str | None = None, i: int | None = None) -> torch.Tensor:
        """`t` in the compute dtype if floating, unless it is a quantized part (of group i): the
        expansion reads those as stored (an fp8 weight's float32 scales are not to be rounded first)."""
        if i is not None and name in self._parts[i]:
            return t
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def _expand(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group i's stored tensors -> its parameters: quantized ones expanded to the compute dtype."""
        group = self.manifest.groups[i]
        if not group.quantized:
            return tensors
        return expand_group(tensors, group, self.scheme, self.dtype, self.packing, self.kept)

    def _param(self, j: int, name: str, move) -> torch.Tensor:
        """Parameter `name` from group j's file, moved by `move` (to the device), expanded if quantized."""
        group, gf = self.manifest.groups[j], self.files[j]
        if name not in group.quantized:
            return self._cast(move(gf.tensor(name)))
        scheme = scheme_of(group, name, self.scheme)
        parts = {part: move(gf.tensor(n)) for part, n in quant_part_names(name, scheme).items()}
        return expand_param(parts, group.quantized[name], scheme, self.dtype)

    def _load_cuda(self, i: int) -> Loaded:
        """Group i on the device: its bytes copied on the copy stream, then cast and expanded on the
        expand stream, which waits for that copy alone. The background thread returns once the copy
        is done, so the next group's copy starts while this one expands: the link stays busy, and
        a quantized pass costs max(copy, expansion) per group rather than their sum. Compute waits
        for the returned event (the expansion's end)."""
        gf, tensors, read = self.files[i], {}, 0.0
        span, skip, nbytes = self._span(i)
        t0 = time.perf_counter()
        with torch.cuda.stream(self.copy_stream):
            flat, read = self._to_device(i, gf, span) if gf is not None else (None, 0.0)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        with torch.cuda.stream(self.expand_stream):
            self.expand_stream.wait_event(copied)
            if flat is not None:
                flat.record_stream(self.expand_stream)  # its memory outlives the kernels that read it here
                base = span[0] if span else 0
                tensors = self._expand(i, {name: self._cast(gf.view_of(flat, name, base), name, i)
                                           for name in gf.infos if name not in skip})
                if self.manifest.groups[i].quantized:  # own copies of the small rest, so `flat` goes now
                    tensors = {n: t.clone() if _shares(t, flat) else t for n, t in tensors.items()}
            for alias, (j, name) in self.aliases[i].items():
                tensors[alias] = self._param(j, name, lambda t: t.to(self.device))
            event = torch.cuda.Event()
            event.record(self.expand_stream)
        copied.synchronize()  # the background thread waits for its copy; compute waits for `event`
        self.stats.read_seconds += read
        self.stats.copy_seconds += time.perf_counter() - t0 - read
        self.stats.bytes_copied += nbytes
        return Loaded(i, tensors, event, nbytes)

    def _to_device(self, i: int, gf: GroupFile, span: tuple[int, int] | None = None) -> tuple[torch.Tensor, float]:
        """Group i's bytes (or bytes `span` of its data section) -> device on the copy stream;
        (device bytes, seconds spent reading the file).

        A HOST group is copied from its pinned buffer; a DISK group goes file -> pinned
        staging buffer (two, used in turn) -> device.
        """
        if i in self._host:
            held = self._host[i][span[0]:span[1]] if span else self._host[i]
            flat = torch.empty(held.numel(), dtype=torch.uint8, device=self.device)
            return flat.copy_(held, non_blocking=True), 0.0
        host = gf.data(span)
        if not self._staging:  # sized to the largest group read from its file
            largest = max(f.nbytes for f, p in zip(self.files, self.places) if f and p != HOST)
            self._staging = [torch.empty(largest, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        turn = self._turn
        self._turn ^= 1
        if self._staging_done[turn] is not None:
            self._staging_done[turn].synchronize()  # the copy that last used this buffer is done
        t0 = time.perf_counter()
        gf.touch(span)  # the whole file (or span) in one call: the kernel reads ahead, no fault per page
        staging = self._staging[turn][: host.numel()]
        staging.copy_(host)  # page cache -> pinned memory
        gf.evict()
        read = time.perf_counter() - t0
        self.stats.bytes_read += gf.nbytes if span is None else host.numel()
        flat = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
        flat.copy_(staging, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        self._staging_done[turn] = done
        return flat, read

    def release_pages(self, i: int) -> None:
        """Let the OS drop group i's mapped pages from this process (the page cache keeps them),
        and, where its tensors were made anew (expanded or cast), the heap pages they used."""
        if self.files[i] is not None:
            self.files[i].evict()
        if self._made[i]:
            trim_heap()


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc). Expanded weights are tens of MB each;
    once glibc has freed one such block it serves blocks of that size from its heap, which it
    does not shrink by itself, so a streamed model would keep every group's expanded size."""
    if _LIBC_TRIM is not None:
        _LIBC_TRIM(0)


def _copied_out(gf: GroupFile, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether some of `tensors` are copies, not views of `gf`'s mapping: then holding the
    file's pages too would count those bytes twice."""
    data = gf.data()
    start, end = data.data_ptr(), data.data_ptr() + data.numel()
    return any(not start <= t.data_ptr() < end for t in tensors.values())


def _shares(t: torch.Tensor, base: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


class Prefetcher:
    """Runs `load(i)` on a background thread, `depth` groups ahead, cyclically over `order`
    (the groups that stream; resident ones are not in it)."""

    def __init__(self, load, order: list[int], depth: int, stats: StreamStats):
        self.load, self.order, self.stats = load, list(order), stats
        self.depth = min(depth, len(self.order))
        self._next = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="runtime-prefetch")
        self.pending: collections.deque[tuple[int, Future]] = collections.deque()

    def get(self, i: int) -> Loaded:
        """Group i's weights, waiting only if the background thread is not done with them."""
        while self.pending and self.pending[0][0] != i:
            self.pending.popleft()[1].cancel()  # off the expected order: drop what was read ahead
        future = self.pending.popleft()[1] if self.pending else self.pool.submit(self.load, i)
        last = self.pending[-1][0] if self.pending else i
        while len(self.pending) < self.depth and last in self._next:  # a group off `order` reads nothing ahead
            last = self._next[last]
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
