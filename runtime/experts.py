"""Expert-sparse streaming: a mixture-of-experts layer brings only the experts its tokens use.

For a streamed layer with an experts module (see reshard.plan.find_experts), the loader brings
the layer's other tensors as usual (attention, router, norms, shared experts: one span of the
file, see GroupLoader.partial) and leaves the expert tensors out. A forward pre-hook on the
experts module, where transformers dispatches the routed tokens, reads the router's
`top_k_index` and copies only those experts (each one contiguous byte range of the file, see
reshard.format.expert_range) into slots: [S, ...] tensors, S the experts this layer load routes
(k at batch 1 decode, the union for a prefill or batch), never E. The hook hands the module the
slots as its parameters, its routed ids (`top_k_index`, gpt-oss's `router_indices`) mapped to slot
ids by an increasing map (so the module visits and sums its experts in the same order), and
`num_experts` = S for the call (restored after): transformers' own experts code computes on the
slots, its math unchanged. A module without an int `num_experts` gets full-size [E, ...] tensors
holding the routed experts only (rows of others are never read); one whose forward takes no
routed ids at all gets all its experts, and the streamer says so once.

Several forwards through one layer load (runtime/lockstep.py) add only the experts still
missing, so a pass brings the union of its tokens' experts once; the slots go when the layer
is unloaded. An `ExpertCache` (runtime/expertcache.py) keeps experts used lately on the compute
device across passes, as stored (quantized ones as their parts): one it holds is expanded from
there instead of re-read. With `predict`, runtime/prediction.py reads the next MoE layer's likely
experts ahead while a layer computes.

Where a job's slots do not fit on the device (a scoring pass or batch on a small GPU routes most
of each layer's experts), calls that route more than `round_experts` experts run in rounds that do
(runtime/expertrounds.py).

A prefill or batch that routes most of a layer's experts: by bytes, reading its routed experts
never loses (slots keep experts in file order, so the reads of consecutive experts merge, see
runtime/expertread.py, and a pass routing every expert reads each expert tensor in one sequential
read). What a whole-layer load has is timing: the prefetcher reads it while the previous layer
computes, where routed experts are read once the router has run. So a pass expected to route at
least WHOLE_AT of a layer's experts loads that layer whole, where that costs no memory: on the
CPU, for a folder used as stored (the load is views of the mapping, pages the OS can drop).
Elsewhere a whole load would bring back the [E, ...] memory the slots removed (expanded, for
quantized experts), which the budget does not plan for: those passes read their routed experts.
"""

from __future__ import annotations

import inspect
import sys
import time

import torch
from torch import nn

from reshard.format import ST_TO_DTYPE, dense_range, expert_range, expert_tensors, quant_part_names, scheme_of
from reshard.plan import ROUTED_ARGS, stacks_tokens

from . import budget, stackedexperts
from .expertcache import POLICIES, ExpertCache, kept_copy
from .expertrounds import Restore, in_rounds
from .expertslots import Slots, computes_on_slots, fill_rows, routed_experts, runs_in_rounds
from .expertread import ExpertReader, read_stored, typed
from .packedexperts import PACKED, by_attr, operands
from .prediction import ExpertPredictor

# A pass expected to route at least this share of a layer's experts (uniform picks: 1 - (1 - k/E)^tokens)
# loads that layer whole, where that costs no memory (the CPU, a folder used as stored): one read
# by the prefetcher while the previous layer computes (benchmarks/results/moe_prefill_cpu_cold.txt).
WHOLE_AT = 0.75


class ExpertStreamer:
    """Expert hooks for every streamed MoE group that `loader` (a GroupLoader) loads."""

    def __init__(self, loader, *, cache_bytes: int = 0, cache_policy: str = POLICIES[0], predict: bool = False):
        self.loader, self.stats = loader, loader.stats  # no reference to the LayeredModel: no cycle
        self.device, self.dtype = loader.device, loader.dtype
        self.cache = ExpertCache(cache_bytes, cache_policy)
        self.predict, self.predictor = predict, None  # runtime/prediction.py, made by install
        self.slots: dict[str, Slots] = {}  # experts module path -> its slots while its layer is loaded
        self.reader = ExpertReader(self.device)  # file ranges -> buffers (runtime/expertread.py)
        self.hooks: list = []
        self.warned: set[type] = set()  # experts classes read whole (said once per class)
        self.empty: dict[str, dict] = {}  # experts module path -> its placeholder parameters
        self.placed: set[str] = set()  # experts modules computing on slots this call
        self.stacked: dict[str, stackedexperts.StackedCall] = {}  # Llama 4's modules on slots this call
        self.whole_at: float | None = WHOLE_AT  # None: every pass reads routed experts alone
        self.wholes: dict[int, tuple] = {}  # group -> (sparse span, E, k): may load whole for a pass
        self.elsewhere = lambda path: False  # this call of `path` runs on the host (runtime/cpuexperts.py)
        self.packed = loader.expert_packing  # experts module path -> {attr: PackSpec}: computed as stored
        # the most experts a slot-computing experts call brings at once, more in rounds (runtime/expertrounds.py):
        # set per job by LayeredModel.fit_job where a job's slots do not fit on the device, else None
        self.round_experts: int | None = None
        self.rounds_possible = False  # some streamed experts module computes on slots (so can run in rounds)

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
                self.empty[path] = {a: module._parameters[a] for a in (n.rpartition(".")[2] for n in entry["tensors"])}
                self.hooks.append(module.register_forward_pre_hook(self._hook(i, path, module, entry), with_kwargs=True))
                self.hooks.append(module.register_forward_hook(self._restore(path, module)))
                if stacks_tokens(module):
                    self.hooks.append(module.register_forward_hook(self._spread(path)))
                if runs_in_rounds(module):
                    module.forward = in_rounds(module, module.forward, self._round_limit(path))
                    self.hooks.append(Restore(module))
                    self.rounds_possible = True
        top_k = getattr(model.config, "num_experts_per_tok", None)
        for i in self.loader.partial:  # where a whole load is views of the mapping: no memory of its own
            group = self.loader.manifest.groups[i]
            if self.device.type == "cpu" and not self.loader.made_anew(i) and self.loader.places[i] == budget.DISK \
                    and isinstance(top_k, int) and len(group.experts) == 1:
                count = next(iter(group.experts.values()))["num_experts"]
                self.wholes[i] = (self.loader.partial[i], count, top_k)
        if self.wholes:
            self.hooks.append(model.register_forward_pre_hook(self._plan, with_kwargs=True))
        if self.predict and self.hooks and isinstance(top_k, int):
            self.predictor = ExpertPredictor(self.loader, model, self.read_ahead, self._cached, top_k=top_k)

    def close(self) -> None:
        if self.predictor is not None:  # its reads use the pool
            self.predictor.close()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.slots.clear()
        self.cache.clear()
        self.reader.close()

    def release(self, i: int) -> None:
        """Group i is unloaded: its slots go (the next load of it starts from none)."""
        for path in [p for p, s in self.slots.items() if s.owner == i]:
            del self.slots[path]
        if self.predictor is not None:
            self.predictor.drop(i)

    def _plan(self, module, args, kwargs) -> None:
        """A forward begins: per group, read its routed experts alone or load it whole (its expected
        routed share >= whole_at): a prefill or batch reads its layers in one go, ahead."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        tokens = ids.shape[0] * ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 1
        for i, (span, count, k) in self.wholes.items():
            if self.whole_at is not None and 1 - (1 - k / count) ** tokens >= self.whole_at:
                self.loader.partial.pop(i, None)
            else:
                self.loader.partial[i] = span

    def on_device(self, i: int, path: str, routed: list[int]) -> int:
        """How many of `routed`, experts of group i's module `path`, are on the device already: in
        its slots (an earlier forward through this load brought them) or in the cache."""
        slots = self.slots.get(path)
        have = set(slots.held) if slots is not None and slots.owner == i else set()
        names = self.loader.manifest.groups[i].experts[path]["tensors"]
        return sum(1 for e in routed if e in have or (i, e, *names) in self.cache.entries)

    def _cached(self, i: int, e: int) -> bool:
        entry = next(iter(self.loader.manifest.groups[i].experts.values()))
        return (i, e, *entry["tensors"]) in self.cache.entries

    # --- the hooks -------------------------------------------------------------------------
    def _hook(self, i: int, path: str, module: nn.Module, entry: dict):
        signature = inspect.signature(module.forward)
        count = entry["num_experts"]
        compact, rounds, stacked = computes_on_slots(module), runs_in_rounds(module), stacks_tokens(module)
        routes = stacked or any(a in signature.parameters for a in ROUTED_ARGS)
        if not routes and type(module) not in self.warned:
            self.warned.add(type(module))
            print(f"runtime: {path} ({type(module).__name__}) takes no routed expert ids: "
                  f"each pass through it reads all {count} of its experts", file=sys.stderr)

        def pre_hook(mod, args, kwargs):
            if any(mod._parameters[a] is not p for a, p in self.empty[path].items()):
                return None  # the group was loaded whole (see _plan): its [E, ...] tensors are in place
            if self.elsewhere(path):  # computed on the host: bring nothing to the device
                return None
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                bound = None
            if stacked and bound is not None:
                return self._on_slots(i, path, mod, entry, bound)
            arg = next((a for a in ROUTED_ARGS if bound is not None and a in bound.arguments), None)
            if arg is None:
                self.bring(i, path, mod, entry, range(count), full=True)
                return None
            index = bound.arguments[arg]
            routed = routed_experts(index, count)
            if rounds and self.round_experts is not None and len(routed) > self.round_experts:
                return None  # the forward splits the call into rounds (runtime/expertrounds.py), each brought here
            if path in self.packed:  # the kernels take the experts as read, by E's ids (any routed module)
                self.bring_packed(i, path, mod, entry, routed)
                self._guess(i, bound.arguments)
                return None
            if not compact:  # ids index the module's own [E, ...] tensors: the routed rows, in place
                self.bring(i, path, mod, entry, routed, full=True)
                self._guess(i, bound.arguments)
                return None
            slots = self.bring(i, path, mod, entry, routed, alone=self.round_experts is not None)
            mod.num_experts = len(slots.held)  # the module's own loops and bins run over the slots
            bound.arguments[arg] = slots.index(index, count)
            self._guess(i, bound.arguments)
            return bound.args, bound.kwargs

        return pre_hook

    def _on_slots(self, i: int, path: str, module: nn.Module, entry: dict, bound):
        """A stacked experts module (Llama 4's, runtime/stackedexperts.py) gets its experts with a
        row that is not zero in slots, and their rows alone; `_spread` puts the results back."""
        hidden, count = bound.arguments["hidden_states"], entry["num_experts"]
        routed = stackedexperts.routed(hidden, count) or [0]  # no expert has a row: the first computes zeros
        guess = self.predictor is not None  # the rows' sum (what a guess reads) only where something guesses
        if path in self.packed:  # the kernels take the experts as read and the stacked rows as they are
            self.bring_packed(i, path, module, entry, routed)
            if guess:
                self._guess(i, {"hidden_states": stackedexperts.summed(hidden, count)})
            return None
        slots = self.bring(i, path, module, entry, routed, alone=self.round_experts is not None)
        if guess:
            self._guess(i, {"hidden_states": stackedexperts.summed(hidden, count)})
        bound.arguments["hidden_states"], self.stacked[path] = stackedexperts.compact(hidden, slots.held, count)
        stackedexperts.pad(module, [name.rpartition(".")[2] for name in entry["tensors"]])
        return bound.args, bound.kwargs

    def _spread(self, path: str):
        def post_hook(mod, args, output):
            call = self.stacked.pop(path, None)
            return None if call is None else stackedexperts.spread(output, call)

        return post_hook

    def _guess(self, i: int, arguments: dict) -> None:
        """Layer i's routed experts are in place: guess the next MoE layer's from its hidden state
        (not for a layer this pass loads whole)."""
        j = self.predictor.next.get(i) if self.predictor is not None else None
        if j is not None and (j not in self.wholes or j in self.loader.partial) \
                and isinstance(arguments.get("hidden_states"), torch.Tensor):
            self.predictor.guess(i, arguments["hidden_states"])

    def _restore(self, path: str, module: nn.Module):
        experts = getattr(module, "num_experts", None)

        def post_hook(mod, *_):
            if path not in self.placed:  # computed on its group's whole load: the model clears those
                return
            self.placed.discard(path)
            mod.__dict__.pop(PACKED, None)
            mod._parameters.update(self.empty[path])
            if experts is not None:
                mod.num_experts = experts

        return post_hook

    def _round_limit(self, path: str):
        """What runtime/expertrounds.py asks per call of `path`: the experts a round brings, or None
        (no rounds: none set, or this call computes on the host)."""
        return lambda: None if self.round_experts is None or self.elsewhere(path) else self.round_experts

    def bring(self, i: int, path: str, module: nn.Module, entry: dict, routed, *, full: bool = False,
              alone: bool = False) -> Slots:
        """Put group i's experts module in place with slots for (at least) experts `routed`:
        the experts this layer load already brought (several forwards through one load, see
        runtime/lockstep.py, share it) keep theirs, the others come from the cache, a guess read
        ahead (runtime/prediction.py) or the file.
        `full`: [E, ...] tensors, expert e in row e (for modules that index by expert id).
        `alone` (rounds of experts): the slots hold `routed` only; the experts earlier calls brought go
        first (their memory is what the round may use), the ones needed again re-read or cached."""
        for other in [p for p, s in self.slots.items() if s.owner != i]:
            del self.slots[other]  # another layer's experts (not released): their memory goes first
        old = self.slots.pop(path, None)
        if alone and old is not None and not set(old.held).issuperset(routed):
            old = None
        have = set(old.held) if old is not None else set()
        if old is not None and have.issuperset(routed):
            slots = old
        else:
            held = sorted(have.union(routed))
            size = entry["num_experts"] if full else len(held)
            tensors = {name: torch.empty((size, *shape), dtype=dtype, device=self.device)
                       for name, (shape, dtype) in self._rows(i, entry).items()}
            slots = Slots(i, held, tensors, full=full)
            t0 = time.perf_counter()
            to_read, fresh = [], {}  # experts to read; expert -> stored tensors for the cache
            for e in held:
                rows = {name: t[slots.row(e)] for name, t in tensors.items()}
                if e in have:
                    at = old.row(e)
                    for name, row in rows.items():
                        row.copy_(old.tensors[name][at])
                    continue
                stored = self.cache.get((i, e, *entry["tensors"]))
                if stored is not None:
                    self.stats.experts_cached += 1
                elif self.predictor is not None and (stored := self._guessed(i, e)) is not None:
                    fresh[e] = stored
                if stored is None:
                    to_read.append((e, rows))
                    continue
                fill_rows(self.loader.manifest.groups[i], self.loader.scheme, rows, stored, self.dtype)
            old = None
            for e, stored in self._read(i, to_read, entry).items():
                fresh[e] = kept_copy(self.loader.files[i].infos, entry, stored) if self.cache.capacity else None
            for e, stored in fresh.items():
                if stored is not None:
                    self.cache.put((i, e, *entry["tensors"]), stored)
            self.stats.wait_seconds += time.perf_counter() - t0  # compute waits for its routed experts
        self.slots[path] = slots
        self.placed.add(path)
        for name, t in slots.tensors.items():
            module._parameters[name.rpartition(".")[2]] = nn.Parameter(t, requires_grad=False)
        return slots

    def bring_packed(self, i: int, path: str, module: nn.Module, entry: dict, routed: list[int]) -> None:
        """As `bring`, for a module computing on its experts as stored (runtime/packedexperts.py):
        each routed expert's stored tensors (from the cache, a guess, or read from the file) become
        its kernel operands on the module, made once per layer load (later forwards through the same
        load keep those of the experts they share)."""
        for other in [p for p, s in self.slots.items() if s.owner != i]:
            del self.slots[other]
        old = self.slots.pop(path, None)
        ready = dict(old.tensors) if old is not None else {}  # expert -> its kernel operands
        fresh = {}  # expert -> its stored tensors
        t0 = time.perf_counter()
        to_read = []
        for e in (e for e in routed if e not in ready):
            stored = self.cache.get((i, e, *entry["tensors"]))
            if stored is not None:
                self.stats.experts_cached += 1
            elif self.predictor is not None:
                stored = self._guessed(i, e)
            if stored is None:
                to_read.append(e)
            else:
                fresh[e] = stored
        if to_read:
            held = self.loader.host_data(i)
            read, reads = self.read_ahead(i, to_read, entry, held)
            self.stats.expert_reads += reads
            self._count_read(len(read), sum(t.nbytes for s in read.values() for t in s.values()), held is None)
            for e, stored in read.items():
                fresh[e] = stored
                if self.cache.capacity:
                    self.cache.put((i, e, *entry["tensors"]), stored)
        group, specs = self.loader.manifest.groups[i], self.packed[path]
        names = {name.rpartition(".")[2]: name for name in entry["tensors"]}
        ready.update({e: operands(group, names, specs, stored, self.loader.scheme) for e, stored in fresh.items()})
        self.stats.wait_seconds += time.perf_counter() - t0
        self.slots[path] = Slots(i, sorted(ready), ready)
        self.placed.add(path)
        module.__dict__[PACKED] = by_attr(ready)

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

    def _guessed(self, i: int, e: int) -> dict[str, torch.Tensor] | None:
        """Expert e of group i if a guess read it ahead (waiting for that read), counted as read."""
        stored = self.predictor.take(i, e)
        if stored is None:
            return None
        stored = {name: t.to(self.device) for name, t in stored.items()}
        nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        self._count_read(1, nbytes, self.loader.host_data(i) is None)
        return stored

    def _count_read(self, experts: int, nbytes: int, from_file: bool) -> None:
        self.stats.experts_read += experts
        self.stats.expert_bytes += nbytes
        self.stats.bytes_read += nbytes if from_file else 0
        self.stats.bytes_copied += nbytes if self.device.type == "cuda" else 0
        self.stats.bytes_streamed += nbytes

    def _read(self, i: int, jobs: list[tuple[int, dict[str, torch.Tensor]]], entry: dict) -> dict:
        """For each (expert, {tensor name: its slot row}) of `jobs`, the expert's rows from group
        i's file (or its pinned host copy): one read per expert and stored tensor, several at once,
        straight into the slot where it can; quantized expert weights are read as their parts and
        expanded into the slot. Returns {expert: its stored tensors} (slot rows, parts)."""
        if not jobs:
            return {}
        gf, held, count = self.loader.files[i], self.loader.host_data(i), entry["num_experts"]
        quantized = self.loader.manifest.groups[i].quantized
        pieces, out = [], {}  # (stored info, destination, byte range); expert -> stored tensors
        for e, rows in jobs:
            out[e] = stored = {}
            for param, row in rows.items():
                if param not in quantized:
                    stored[param] = row
                    pieces.append((gf.infos[param], row, expert_range(gf.infos[param], count, e)))
                    continue
                scheme = scheme_of(self.loader.manifest.groups[i], param, self.loader.scheme)
                for name in quant_part_names(param, scheme).values():
                    info = gf.infos[name]
                    stored[name] = torch.empty(info.shape[1:], dtype=ST_TO_DTYPE[info.dtype], device=self.device)
                    pieces.append((info, stored[name], expert_range(info, count, e)))
        nbytes = sum(end - begin for _, _, (begin, end) in pieces)
        if held is not None:  # pinned host memory -> device
            for info, dst, (begin, end) in pieces:
                dst.copy_(typed(held[begin:end], info, dst), non_blocking=True)
        else:
            self.stats.expert_reads += self.reader.read(gf, pieces)
        for e, rows in jobs:
            fill_rows(self.loader.manifest.groups[i], self.loader.scheme,
                      {p: row for p, row in rows.items() if p in quantized}, out[e], self.dtype)
        self._count_read(len(jobs), nbytes, held is None)
        return out

    def read_ahead(self, i: int, experts: list[int], entry: dict, held: torch.Tensor | None = None
                   ) -> tuple[dict, int]:
        """Experts of group i from its file (or `held`, its data section in host memory) into host
        memory as stored, for a guess (runtime/prediction.py, on its thread) or a packed call:
        ({expert: {stored tensor name: tensor}}, file reads taken); see expertread.read_stored."""
        return read_stored(self.reader, self.loader.files[i], self.loader.manifest.groups[i], entry, experts, held)
