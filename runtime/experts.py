"""Expert-sparse streaming: a mixture-of-experts layer brings only the experts its tokens use.

For a streamed layer with an experts module (see reshard.plan.find_experts), the loader brings
the layer's other tensors as usual (attention, router, norms, shared experts: one span of the
file, see GroupLoader.partial) and leaves the expert tensors out. A forward pre-hook on the
experts module, where transformers dispatches the routed tokens, reads the router's
`top_k_index` and copies only those experts (each one contiguous byte range of the file, see
reshard.format.expert_range) into slots: [S, ...] tensors, S the experts this layer load routes
(k at batch 1 decode, the union for a prefill or batch), never E. The hook hands the module the
slots as its parameters, `top_k_index` mapped to slot ids by an increasing map (so the module
visits and sums its experts in the same order), and `num_experts` = S for the call (restored
after): transformers' own experts code computes on the slots, its math unchanged. A module
that routes by another name (gpt-oss's `router_indices`, whose routing weights are dense over
E) gets full-size [E, ...] tensors holding the routed experts only (rows of others are never read);
one whose forward takes no routed ids at all gets all its experts, and the streamer says so once.

Several forwards through one layer load (runtime/lockstep.py) add only the experts still
missing, so a pass brings the union of its tokens' experts once; the slots go when the layer
is unloaded. An `ExpertCache` keeps recently used experts (LRU, a byte budget) on the
compute device across passes; an expert it holds is copied from there instead of re-read.
"""

from __future__ import annotations

import collections
import inspect
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from reshard.errors import CorruptFileError
from reshard.format import ST_TO_DTYPE, dense_range, expert_range, expert_tensors, quant_part_names, scheme_of
from reshard.plan import ROUTED_ARGS

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


class _Slots:
    """The experts one streamed layer's module computes with: rows [S, ...] per expert tensor
    holding experts `held` (ascending), S sized by what the passes route, not by E."""

    def __init__(self, owner: int, held: list[int], tensors: dict[str, torch.Tensor], *, full: bool = False):
        self.owner, self.held, self.tensors, self.full = owner, held, tensors, full

    def row(self, expert: int) -> int:
        """Where `expert` (one of `held`) sits: its own row in full-size tensors, else its slot."""
        return expert if self.full else self.held.index(expert)

    def index(self, top_k_index: torch.Tensor, count: int) -> torch.Tensor:
        """Expert ids -> slot ids. The map is increasing, so the module visits its experts (and
        adds their outputs) in the same order as over [E, ...]; an id outside [0, count) (an
        expert-parallel sentinel) becomes the slots' own sentinel, S."""
        table = torch.full((count + 1,), len(self.held), dtype=top_k_index.dtype, device=top_k_index.device)
        table[torch.tensor(self.held, dtype=torch.long, device=top_k_index.device)] = torch.arange(
            len(self.held), dtype=top_k_index.dtype, device=top_k_index.device)
        return table[top_k_index.clamp(0, count).masked_fill(top_k_index < 0, count)]


class ExpertStreamer:
    """Expert hooks for every streamed MoE group that `loader` (a GroupLoader) loads."""

    def __init__(self, loader, *, cache_bytes: int = 0):
        self.loader, self.stats = loader, loader.stats  # no reference to the LayeredModel: no cycle
        self.device, self.dtype = loader.device, loader.dtype
        self.cache = ExpertCache(cache_bytes)
        self.slots: dict[str, _Slots] = {}  # experts module path -> its slots while its layer is loaded
        self.staging: torch.Tensor | None = None  # bytes of experts being read (pinned on CUDA)
        self.staging_done: torch.cuda.Event | None = None
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="runtime-experts")  # reads at once
        self.fds: dict = {}  # file path -> descriptor for the expert reads
        self.hooks: list = []
        self.warned: set[type] = set()  # experts classes read whole (said once per class)
        self.elsewhere = lambda path: False  # this call of `path` runs on the host (runtime/cpuexperts.py)

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
                self.hooks.append(module.register_forward_pre_hook(self._hook(i, path, module, entry), with_kwargs=True))
                self.hooks.append(module.register_forward_hook(self._restore(module, empty)))

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.slots.clear()
        self.cache.entries.clear()
        self.staging = None
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def release(self, i: int) -> None:
        """Group i is unloaded: its slots go (the next load of it starts from none)."""
        for path in [p for p, s in self.slots.items() if s.owner == i]:
            del self.slots[path]

    # --- the hooks -------------------------------------------------------------------------
    def _hook(self, i: int, path: str, module: nn.Module, entry: dict):
        signature = inspect.signature(module.forward)
        count = entry["num_experts"]
        compact = "top_k_index" in signature.parameters and isinstance(getattr(module, "num_experts", None), int)
        routes = any(a in signature.parameters for a in ROUTED_ARGS)
        if not routes and type(module) not in self.warned:
            self.warned.add(type(module))
            print(f"runtime: {path} ({type(module).__name__}) takes no routed expert ids: "
                  f"each pass through it reads all {count} of its experts", file=sys.stderr)

        def pre_hook(mod, args, kwargs):
            if self.elsewhere(path):  # computed on the host: bring nothing to the device
                return None
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None
            arg = next((a for a in ROUTED_ARGS if bound is not None and a in bound.arguments), None)
            if arg is None:
                self.bring(i, path, mod, entry, range(count), full=True)
                return None
            index = bound.arguments[arg]
            routed = [e for e in torch.unique(index).tolist() if 0 <= e < count]
            if not compact:  # ids index the module's own [E, ...] tensors: the routed rows, in place
                self.bring(i, path, mod, entry, routed, full=True)
                return None
            slots = self.bring(i, path, mod, entry, routed)
            mod.num_experts = len(slots.held)  # the module's own loops and bins run over the slots
            bound.arguments["top_k_index"] = slots.index(index, count)
            return bound.args, bound.kwargs

        return pre_hook

    def _restore(self, module: nn.Module, empty: dict):
        experts = getattr(module, "num_experts", None)

        def post_hook(mod, *_):
            mod._parameters.update(empty)
            if experts is not None:
                mod.num_experts = experts

        return post_hook

    def bring(self, i: int, path: str, module: nn.Module, entry: dict, routed, *, full: bool = False) -> _Slots:
        """Put group i's experts module in place with slots for (at least) experts `routed`:
        the experts this layer load already brought (several forwards through one load, see
        runtime/lockstep.py, share it) keep theirs, the others come from the cache or the file.
        `full`: [E, ...] tensors, expert e in row e (for modules that index by expert id)."""
        for other in [p for p, s in self.slots.items() if s.owner != i]:
            del self.slots[other]  # another layer's experts (not released): their memory goes first
        old = self.slots.pop(path, None)
        have = set(old.held) if old is not None else set()
        if old is not None and have.issuperset(routed):
            slots = old
        else:
            held = sorted(have.union(routed))
            size = entry["num_experts"] if full else len(held)
            tensors = {name: torch.empty((size, *shape), dtype=dtype, device=self.device)
                       for name, (shape, dtype) in self._rows(i, entry).items()}
            slots = _Slots(i, held, tensors, full=full)
            t0 = time.perf_counter()
            to_read = []
            for e in held:
                rows = {name: t[slots.row(e)] for name, t in tensors.items()}
                if e in have:
                    at = old.row(e)
                    for name, row in rows.items():
                        row.copy_(old.tensors[name][at])
                    continue
                cached = self.cache.get((i, e, *entry["tensors"]))
                if cached is None:
                    to_read.append((e, rows))
                    continue
                for name, row in rows.items():
                    row.copy_(cached[name])
                self.stats.experts_cached += 1
            old = None
            self._read(i, to_read, entry)
            for e, rows in to_read:
                self.cache.put((i, e, *entry["tensors"]), rows)
            self.stats.wait_seconds += time.perf_counter() - t0  # compute waits for its routed experts
        self.slots[path] = slots
        for name, t in slots.tensors.items():
            module._parameters[name.rpartition(".")[2]] = nn.Parameter(t, requires_grad=False)
        return slots

    def _rows(self, i: int, entry: dict) -> dict[str, tuple[tuple, torch.dtype]]:
        """Each expert tensor's row shape and the dtype the module computes with."""
        rows = {}
        for name in entry["tensors"]:
            quantized = self.loader.manifest.groups[i].quantized.get(name)
            if quantized is not None:  # expanded to the compute dtype
                rows[name] = tuple(quantized["shape"][1:]), self.dtype
            else:
                info = self.loader.files[i].infos[name]
                rows[name] = tuple(info.shape[1:]), self._dtype(info)
        return rows

    def _dtype(self, info) -> torch.dtype:
        stored = ST_TO_DTYPE[info.dtype]
        return self.dtype if stored.is_floating_point else stored

    def _read(self, i: int, jobs: list[tuple[int, dict[str, torch.Tensor]]], entry: dict) -> None:
        """For each (expert, {tensor name: its slot row}) of `jobs`, the expert's rows from group
        i's file (or its pinned host copy): one read per expert and stored tensor, several at once,
        straight into the slot where it can; quantized expert weights are read as their parts and
        expanded into the slot."""
        if not jobs:
            return
        gf, held, count = self.loader.files[i], self.loader.host_data(i), entry["num_experts"]
        quantized = self.loader.manifest.groups[i].quantized
        pieces, expand = [], []  # (stored info, destination, byte range); (row, parts, param info)
        for e, rows in jobs:
            for param, row in rows.items():
                if param not in quantized:
                    pieces.append((gf.infos[param], row, expert_range(gf.infos[param], count, e)))
                    continue
                parts, scheme = {}, scheme_of(self.loader.manifest.groups[i], param, self.loader.scheme)
                for part, name in quant_part_names(param, scheme).items():
                    info = gf.infos[name]
                    parts[part] = torch.empty(info.shape[1:], dtype=ST_TO_DTYPE[info.dtype], device=self.device)
                    pieces.append((info, parts[part], expert_range(info, count, e)))
                expand.append((row, parts, {**quantized[param], "shape": quantized[param]["shape"][1:]}, scheme))
        nbytes = sum(end - begin for _, _, (begin, end) in pieces)
        if held is not None:  # pinned host memory -> device
            for info, dst, (begin, end) in pieces:
                dst.copy_(_typed(held[begin:end], info, dst), non_blocking=True)
        else:
            self._read_file(gf, pieces)
        for row, parts, info, scheme in expand:
            row.copy_(expand_param(parts, info, scheme, self.dtype))
        self.stats.experts_read += len(jobs)
        self.stats.expert_bytes += nbytes
        self.stats.bytes_read += nbytes if held is None else 0
        self.stats.bytes_copied += nbytes if self.device.type == "cuda" else 0
        self.stats.bytes_streamed += nbytes

    def _read_file(self, gf, pieces: list) -> None:
        """File ranges -> their buffer rows: read in place into CPU rows of the stored dtype,
        else into (pinned) staging memory, then copied (and cast) to the rows."""
        direct = [p for p in pieces if p[1].device.type == "cpu" and p[1].dtype == ST_TO_DTYPE[p[0].dtype]]
        staged = sorted((p for p in pieces if not any(p is d for d in direct)), key=lambda p: p[2][0])
        staging = self._stage(sum(end - begin for _, _, (begin, end) in staged))
        jobs, at = [], 0
        for info, dst, (begin, end) in direct:
            jobs.append((dst.view(-1).view(torch.uint8), begin))
        for info, dst, (begin, end) in staged:
            jobs.append((staging[at:at + end - begin], begin))
            at += end - begin
        jobs = _coalesce(jobs)
        self.stats.expert_reads += len(jobs)
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


def _coalesce(jobs: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    """(destination bytes, file offset) reads merged where both the file ranges and the memory
    they go to follow on: consecutive experts (slots are in expert order) become one sequential
    read, so a prefill or batch that routes most of a layer's experts reads it nearly whole."""
    merged: list[tuple[torch.Tensor, int]] = []
    for dst, offset in sorted(jobs, key=lambda job: job[1]):
        if merged:
            last, at = merged[-1]
            if (at + last.numel() == offset and last.data_ptr() + last.numel() == dst.data_ptr()
                    and last.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr()):
                both = torch.empty(0, dtype=torch.uint8).set_(last.untyped_storage(), last.storage_offset(),
                                                              (last.numel() + dst.numel(),))
                merged[-1] = (both, at)
                continue
        merged.append((dst, offset))
    return merged


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