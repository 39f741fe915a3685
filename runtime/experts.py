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
import time

import torch
from torch import nn

from reshard.format import ST_TO_DTYPE, dense_range, expert_range, expert_tensors

from . import budget


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
        self.staging: torch.Tensor | None = None  # CUDA: pinned bytes of the experts being read
        self.staging_done: torch.cuda.Event | None = None
        self.hooks: list = []
        self.read_seconds = 0.0

    def install(self, model: nn.Module) -> None:
        """Make every streamed group with experts load without them, and hook the experts modules
        of `model` (the transformers model)."""
        for i, group in enumerate(self.loader.manifest.groups):
            if not group.experts or self.loader.places[i] == budget.DEVICE or set(group.quantized) & set(
                    expert_tensors(group)):
                continue  # resident groups keep all experts; quantized expert tensors load whole
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
        for e in missing:
            key = (i, e, *entry["tensors"])
            cached = self.cache.get(key)
            if cached is not None:
                for name, b in bufs.items():
                    b.tensor[e].copy_(cached[name])
                self.stats.experts_cached += 1
            else:
                self._read(i, e, entry, bufs)
                self.cache.put(key, {name: b.tensor[e] for name, b in bufs.items()})
            for b in bufs.values():
                b.present.add(e)
        self.read_seconds += time.perf_counter() - t0
        for name, b in bufs.items():
            module._parameters[name.rpartition(".")[2]] = nn.Parameter(b.tensor, requires_grad=False)

    def _buffer(self, name: str, i: int) -> _Buffer:
        info = self.loader.files[i].infos[name]
        key = (name.rpartition(".")[2], tuple(info.shape))
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = _Buffer(info.shape, self._dtype(info), self.device)
        if buf.owner != i:  # another layer's experts: none of them count
            buf.owner, buf.present = i, set()
        return buf

    def _dtype(self, info) -> torch.dtype:
        stored = ST_TO_DTYPE[info.dtype]
        return self.dtype if stored.is_floating_point else stored

    def _read(self, i: int, e: int, entry: dict, bufs: dict[str, _Buffer]) -> None:
        """Expert e's rows of every tensor of `entry`, from group i's file (or pinned host copy)."""
        gf, held = self.loader.files[i], self.loader.host_data(i)
        count, nbytes = entry["num_experts"], 0
        for name, b in bufs.items():
            info = gf.infos[name]
            begin, end = expert_range(info, count, e)
            if held is not None:
                src = held[begin:end]
            else:
                gf.touch((begin, end))
                src = gf.data((begin, end))
            self._copy(src, b.tensor[e], info)
            nbytes += end - begin
        self.stats.experts_read += 1
        self.stats.expert_bytes += nbytes
        self.stats.bytes_read += nbytes
        self.stats.bytes_streamed += nbytes

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, info) -> None:
        """Raw bytes `src` (one expert of tensor `info`) -> `dst`, cast to its dtype."""
        rows = src.view(ST_TO_DTYPE[info.dtype]).view(dst.shape)
        if dst.device.type == "cpu" or src.is_pinned():
            dst.copy_(rows, non_blocking=True)
            return
        staged = self._stage(src.numel())
        staged.copy_(src)
        dst.copy_(staged.view(ST_TO_DTYPE[info.dtype]).view(dst.shape), non_blocking=True)
        self.staging_done = torch.cuda.Event()
        self.staging_done.record(torch.cuda.current_stream(self.device))

    def _stage(self, n: int) -> torch.Tensor:
        """A pinned buffer of n bytes, free again (its last copy to the device finished)."""
        if self.staging_done is not None:
            self.staging_done.synchronize()
        if self.staging is None or self.staging.numel() < n:
            self.staging = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        return self.staging[:n]



def load_persistent_buffers(model: nn.Module, loader) -> None:
    """Buffers the checkpoint holds (a router's score bias, say) replace the computed ones, once."""
    for i, group in enumerate(loader.manifest.groups):
        for name in group.buffers:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._buffers[attr] = loader.files[i].tensor(name).to(loader.device, copy=True)


def cache_budget(loader, device: torch.device, prefetch: int, max_gpu_memory, max_cpu_memory, asked) -> int:
    """Bytes for the expert cache: `asked`, or what the memory budget leaves once the groups are placed."""
    asked = budget.parse_size(asked)
    if asked is not None:
        return asked
    if not any(g.experts for g, p in zip(loader.manifest.groups, loader.places) if p != budget.DEVICE):
        return 0
    sizes = [loader.group_bytes(i) for i in range(len(loader.files))]
    placed = sum(s for s, p in zip(sizes, loader.places) if p == budget.DEVICE)
    if device.type != "cuda":
        cpu = budget.parse_size(max_cpu_memory)
        return max(0, (budget.default_cpu_budget() if cpu is None else cpu) - placed)
    gpu = budget.parse_size(max_gpu_memory)
    gpu = budget.default_gpu_budget(device) if gpu is None else gpu
    return max(0, gpu - placed - (prefetch + 2) * max(sizes, default=0))
