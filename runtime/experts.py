"""Expert-sparse streaming: a mixture-of-experts layer brings only the experts its tokens use.

For a streamed layer with an experts module (see reshard.plan.find_experts), the loader brings
the layer's other tensors as usual (attention, router, norms, shared experts: one span of the
file, see GroupLoader.partial) and leaves the expert tensors out. A forward pre-hook on the
experts module, where transformers dispatches the routed tokens, reads the router's
`top_k_index`, and copies only those experts (each one contiguous byte range of the file, see
reshard.format.expert_range) into a full-size [E, ...] buffer that becomes the module's
parameter. The module indexes it as usual; rows of experts no token picked hold stale (finite)
values from earlier layers and are never read. So the math is transformers' own, unchanged.

The buffer remembers which layer's experts it holds: several forwards through one layer load
(runtime/lockstep.py) add only the experts still missing, so a pass brings the union of its
tokens' experts once. An `ExpertCache` keeps recently used experts (LRU, a byte budget) on the
compute device across passes; an expert it holds is copied from there instead of re-read.
"""

from __future__ import annotations

import collections
import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from reshard.errors import CorruptFileError
from reshard.format import ST_TO_DTYPE, dense_range, expert_range, expert_tensors, quant_part_names, scheme_of

from . import budget
from .quantized import expand_param

READERS = 4  # expert reads in flight at once (NVMe drives want several)


class ExpertCache:
    """Experts kept on the compute device across passes, least recently used dropped first."""

    def __init__(self, capacity: int):
        self.capacity, self.used = max(0, int(capacity)), 0
        self.entries: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def resize(self, capacity: int) -> None:
        """Hold at most `capacity` bytes from now on, dropping the least recently used experts."""
        self.capacity = max(0, int(capacity))
        while self.used > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= sum(t.numel() * t.element_size() for t in old.values())

    def put(self, key: tuple, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a copy of `tensors` (one expert's rows) if they fit, dropping older experts."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.capacity or key in self.entries:
            return
        while self.used + size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= sum(t.numel() * t.element_size() for t in old.values())
        self.entries[key] = {n: t.clone() for n, t in tensors.items()}
        self.used += size


class _Buffer:
    """One full-size [E, ...] tensor on the compute device and which layer's experts it holds."""

    def __init__(self, shape, dtype, device):
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)  # zeros: unused rows stay finite
        self.owner: int | None = None  # the group whose experts are in it
        self.present: set[int] = set()


class ExpertStreamer:
    """Expert hooks for every streamed MoE group that `loader` (a GroupLoader) loads."""

    def __init__(self, loader, *, cache_bytes: int = 0):
        self.loader, self.stats = loader, loader.stats  # no reference to the LayeredModel: no cycle
        self.device, self.dtype = loader.device, loader.dtype
        self.cache = ExpertCache(cache_bytes)
        self.buffers: dict[tuple, _Buffer] = {}
        self.staging: torch.Tensor | None = None  # bytes of experts being read (pinned on CUDA)
        self.staging_done: torch.cuda.Event | None = None
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="runtime-experts")  # reads at once
        self.fds: dict = {}  # file path -> descriptor for the expert reads
        self.hooks: list = []

    def install(self, model: nn.Module) -> None:
        """Make every streamed group with experts load without them, and hook the experts modules
        of `model` (the transformers model)."""
        for i, group in enumerate(self.loader.manifest.groups):
            if not group.experts or self.loader.places[i] == budget.DEVICE:
                continue  # resident groups keep all their experts
            gf = self.loader.files[i]
            self.loader.partial[i] = (dense_range(gf.infos, group), frozenset(expert_tensors(group)))
            for path, entry in group.experts.items():
                module = model.get_submodule(path)
                empty = {a: module._parameters[a] for a in (n.rpartition(".")[2] for n in entry["tensors"])}
                self.hooks.append(module.register_forward_pre_hook(self._hook(i, module, entry), with_kwargs=True))
                self.hooks.append(module.register_forward_hook(lambda m, *_, empty=empty: m._parameters.update(empty)))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.buffers.clear()
        self.cache.entries.clear()
        self.staging = None
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # --- the hook --------------------------------------------------------------------------
    def _hook(self, i: int, module: nn.Module, entry: dict):
        signature = inspect.signature(module.forward)
        count = entry["num_experts"]

        def pre_hook(mod, args, kwargs):
            try:
                index = signature.bind(*args, **kwargs).arguments["top_k_index"]
            except (TypeError, KeyError):
                index = None
            routed = range(count) if index is None else [e for e in torch.unique(index).tolist() if 0 <= e < count]
            self.bring(i, mod, entry, routed)

        return pre_hook

    def bring(self, i: int, module: nn.Module, entry: dict, routed) -> None:
        """Put group i's experts module in place with (at least) experts `routed` filled in."""
        bufs = {name: self._buffer(name, i) for name in entry["tensors"]}
        missing = [e for e in routed if any(e not in b.present for b in bufs.values())]
        t0 = time.perf_counter()
        to_read = []
        for e in missing:
            cached = self.cache.get((i, e, *entry["tensors"]))
            if cached is None:
                to_read.append(e)
                continue
            for name, b in bufs.items():
                b.tensor[e].copy_(cached[name])
            self.stats.experts_cached += 1
        self._read(i, to_read, entry, bufs)
        for e in to_read:
            self.cache.put((i, e, *entry["tensors"]), {name: b.tensor[e] for name, b in bufs.items()})
        for b in bufs.values():
            b.present.update(missing)
        self.stats.wait_seconds += time.perf_counter() - t0  # compute waits for its routed experts
        for name, b in bufs.items():
            module._parameters[name.rpartition(".")[2]] = nn.Parameter(b.tensor, requires_grad=False)

    def _buffer(self, name: str, i: int) -> _Buffer:
        quantized = self.loader.manifest.groups[i].quantized.get(name)
        if quantized is not None:  # expanded to the compute dtype
            shape, dtype = tuple(quantized["shape"]), self.dtype
        else:
            info = self.loader.files[i].infos[name]
            shape, dtype = tuple(info.shape), self._dtype(info)
        key = (name.rpartition(".")[2], shape, dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = _Buffer(shape, dtype, self.device)
        if buf.owner != i:  # another layer's experts: none of them count
            buf.owner, buf.present = i, set()
        return buf

    def _dtype(self, info) -> torch.dtype:
        stored = ST_TO_DTYPE[info.dtype]
        return self.dtype if stored.is_floating_point else stored

    def _read(self, i: int, experts: list[int], entry: dict, bufs: dict[str, _Buffer]) -> None:
        """Rows `experts` of every tensor of `entry` from group i's file (or its pinned host copy):
        one read per expert and stored tensor, several at once, straight into the buffer where it
        can; quantized expert weights are read as their parts and expanded into the buffer."""
        if not experts:
            return
        gf, held, count = self.loader.files[i], self.loader.host_data(i), entry["num_experts"]
        quantized = self.loader.manifest.groups[i].quantized
        pieces, expand = [], []  # (stored info, destination, byte range); (row, parts, param info)
        for e in experts:
            for param, b in bufs.items():
                if param not in quantized:
                    pieces.append((gf.infos[param], b.tensor[e], expert_range(gf.infos[param], count, e)))
                    continue
                parts, scheme = {}, scheme_of(self.loader.manifest.groups[i], param, self.loader.scheme)
                for part, name in quant_part_names(param, scheme).items():
                    info = gf.infos[name]
                    parts[part] = torch.empty(info.shape[1:], dtype=ST_TO_DTYPE[info.dtype], device=self.device)
                    pieces.append((info, parts[part], expert_range(info, count, e)))
                expand.append((b.tensor[e], parts, {**quantized[param], "shape": quantized[param]["shape"][1:]}, scheme))
        nbytes = sum(end - begin for _, _, (begin, end) in pieces)
        if held is not None:  # pinned host memory -> device
            for info, dst, (begin, end) in pieces:
                dst.copy_(_typed(held[begin:end], info, dst), non_blocking=True)
        else:
            self._read_file(gf, pieces)
        for row, parts, info, scheme in expand:
            row.copy_(expand_param(parts, info, scheme, self.dtype))
        self.stats.experts_read += len(experts)
        self.stats.expert_bytes += nbytes
        self.stats.bytes_read += nbytes if held is None else 0
        self.stats.bytes_copied += nbytes if self.device.type == "cuda" else 0
        self.stats.bytes_streamed += nbytes

    def _read_file(self, gf, pieces: list) -> None:
        """File ranges -> their buffer rows: read in place into CPU rows of the stored dtype,
        else into (pinned) staging memory, then copied (and cast) to the rows."""
        direct = [p for p in pieces if p[1].device.type == "cpu" and p[1].dtype == ST_TO_DTYPE[p[0].dtype]]
        staged = [p for p in pieces if not any(p is d for d in direct)]
        staging = self._stage(sum(end - begin for _, _, (begin, end) in staged))
        jobs, at = [], 0
        for info, dst, (begin, end) in direct:
            jobs.append((dst.view(-1).view(torch.uint8), begin))
        for info, dst, (begin, end) in staged:
            jobs.append((staging[at:at + end - begin], begin))
            at += end - begin
        fd = self._fd(gf)
        list(self.pool.map(lambda job: _pread(fd, job[0], gf.data_start + job[1], gf.path), jobs))
        at = 0
        for info, dst, (begin, end) in staged:
            dst.copy_(_typed(staging[at:at + end - begin], info, dst), non_blocking=True)
            at += end - begin
        if staged and self.device.type == "cuda":
            self.staging_done = torch.cuda.Event()
            self.staging_done.record(torch.cuda.current_stream(self.device))

    def _fd(self, gf) -> int:
        fd = self.fds.get(gf.path)
        if fd is None:
            fd = self.fds[gf.path] = os.open(gf.path, os.O_RDONLY)
        return fd

    def _stage(self, n: int) -> torch.Tensor:
        """n bytes of staging memory (pinned on CUDA), free again (its last copy to the device finished)."""
        if self.staging_done is not None:
            self.staging_done.synchronize()
            self.staging_done = None
        if self.staging is None or self.staging.numel() < n:
            self.staging = torch.empty(n, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return self.staging[:n]


def _typed(raw: torch.Tensor, info, dst: torch.Tensor) -> torch.Tensor:
    """Raw bytes of one expert of tensor `info`, as its rows (stored dtype)."""
    return raw.view(ST_TO_DTYPE[info.dtype]).view(dst.shape)


def _pread(fd: int, dst: torch.Tensor, offset: int, path) -> None:
    """Read exactly dst.numel() bytes at `offset` into `dst` (uint8, contiguous, on the CPU)."""
    view, done = memoryview(dst.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptFileError(path, f"ends before byte {offset + done}")
        done += n

def load_persistent_buffers(model: nn.Module, loader) -> None:
    """Buffers the checkpoint holds (a router's score bias, say) replace the computed ones, once."""
    for i, group in enumerate(loader.manifest.groups):
        for name in group.buffers:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = loader.files[i].tensor(name).to(loader.device, copy=True)


def cache_budget(loader, costs: list[budget.GroupCost], memory: budget.Budget, job: int, asked) -> int:
    """Bytes for the expert cache: `asked`, or what the memory budget leaves once the groups are
    placed and a job of `job` bytes has its room (0 where no streamed group has experts). The
    cache is the first to give way: `LayeredModel.fit_job` shrinks it for a larger job."""
    asked = budget.parse_size(asked)
    if asked is not None:
        return asked
    if not any(g.experts for g, p in zip(loader.manifest.groups, loader.places) if p != budget.DEVICE):
        return 0
    return max(0, memory.capacity - budget.device_need(costs, loader.places, memory, job))