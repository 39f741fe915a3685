"""The expert cache: routed experts kept on the compute device across passes, as stored.

An entry is one expert's stored tensors as runtime/experts.py reads them from the layer file: a
quantized weight's parts (packed bytes and scales: int8, int4, fp8, mxfp4, GGML blocks) exactly
as the file holds them, an unquantized weight in the narrower of its stored and compute dtypes
(a widening cast is exact both ways). The streamer expands an entry into its slot when a pass
routes the expert, with the same function a freshly read expert goes through, so the numbers
are the same either way, and the same bytes hold 2-4x more int8/int4 experts than expanded
copies would.

Which expert leaves when the cache is full is the policy's call:
- "lru": the least recently used one;
- "lfu" (the default): the least frequently used one (ties: the least recent), its counts halved
  every `aging` x (entries held) accesses so that experts popular a while ago fade.
benchmarks/moe_cache_policy.py replays routing traces against both (benchmarks/results/
moe_cache_policy.txt): where tokens reuse the previous token's experts LRU and LFU (aging 2) are
within a few percent, where popularity rules (skewed routing, a cache smaller than one token's
experts over all layers, which LRU cycles through and never hits) LFU is ahead by up to 0.3.
"""

from __future__ import annotations

import collections
import heapq
import itertools

import torch

from reshard.format import ST_TO_DTYPE

from . import budget

POLICIES = ("lfu", "lru")  # the first is the default
AGING = 2  # lfu: counts halve every AGING x len(entries) accesses (the best measured, see above)


class ExpertCache:
    """Experts' stored tensors on the compute device, at most `capacity` bytes, under `policy`."""

    def __init__(self, capacity: int, policy: str = POLICIES[0], *, aging: int = AGING):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: runtime.expertcache knows {', '.join(POLICIES)}")
        self.capacity, self.used, self.policy, self.aging = max(0, int(capacity)), 0, policy, aging
        self.entries: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.sizes: dict[tuple, int] = {}
        self.counts: collections.Counter = collections.Counter()  # lfu: accesses per key (aged)
        self.stamps: dict[tuple, tuple[int, int]] = {}  # lfu: key -> (count, tick) of its heap entry
        self.heap: list[tuple[int, int, tuple]] = []  # lfu: (count, tick, key), stale entries skipped
        self.tick = itertools.count()
        self.since_aging = 0

    def get(self, key: tuple) -> dict[str, torch.Tensor] | None:
        """The stored tensors of expert `key`, or None; either way one access for the policy."""
        self._count(key)
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self._stamp(key)
        return found

    def put(self, key: tuple, tensors: dict[str, torch.Tensor]) -> None:
        """Hold `tensors` (one expert's stored tensors; the cache keeps them as they are, so they
        must be no view into memory that is to be freed or written) if they fit, making room."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.capacity or key in self.entries:
            return
        while self.used + size > self.capacity:
            self._evict()
        self.entries[key], self.sizes[key] = tensors, size
        self.used += size
        self._stamp(key)

    def resize(self, capacity: int) -> None:
        """Hold at most `capacity` bytes from now on, dropping experts as the policy says."""
        self.capacity = max(0, int(capacity))
        while self.used > self.capacity:
            self._evict()

    def clear(self) -> None:
        self.entries.clear()
        self.sizes.clear()
        self.stamps.clear()
        self.heap.clear()
        self.used = 0

    # --- the policies ------------------------------------------------------------------------
    def _evict(self) -> None:
        key = self._victim()
        del self.entries[key]
        self.stamps.pop(key, None)
        self.used -= self.sizes.pop(key)

    def _victim(self) -> tuple:
        if self.policy == "lru":
            return next(iter(self.entries))
        while True:  # lfu: the heap's least entry still current
            count, tick, key = heapq.heappop(self.heap)
            if self.stamps.get(key) == (count, tick):
                return key

    def _count(self, key: tuple) -> None:
        if self.policy != "lfu":
            return
        self.counts[key] += 1
        self.since_aging += 1
        if self.since_aging >= self.aging * max(1, len(self.entries)):
            self._age()

    def _stamp(self, key: tuple) -> None:
        if self.policy != "lfu":
            return
        self.stamps[key] = stamp = (self.counts[key], next(self.tick))
        heapq.heappush(self.heap, (*stamp, key))
        if len(self.heap) > 4 * len(self.entries) + 64:
            self._rebuild()

    def _age(self) -> None:
        """Halve every count (keys at 0 forgotten) and rebuild the heap with them."""
        self.since_aging = 0
        self.counts = collections.Counter({k: c // 2 for k, c in self.counts.items() if c // 2})
        for key in self.entries:
            self.stamps[key] = (self.counts[key], self.stamps[key][1])
        self._rebuild()

    def _rebuild(self) -> None:
        self.heap = [(*self.stamps[key], key) for key in self.entries]
        heapq.heapify(self.heap)


def cache_budget(loader, costs: list[budget.GroupCost], memory: budget.Budget, job: int, asked,
                 routed_tokens: int | None = None) -> int:
    """Bytes for the expert cache: `asked`, or what the memory budget leaves once the groups are
    placed and a job of `job` bytes (`routed_tokens` a pass: budget.device_need) has its room (0
    where no streamed group has experts). The cache is the first to give way:
    `LayeredModel.fit_job` shrinks it for a larger job."""
    asked = budget.parse_size(asked)
    if asked is not None:
        return asked
    if not any(g.experts for g, p in zip(loader.manifest.groups, loader.places) if p != budget.DEVICE):
        return 0
    return max(0, memory.capacity - budget.device_need(costs, loader.places, memory, job, routed_tokens))


def kept_copy(infos, entry: dict, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One read expert's stored tensors as the cache keeps them: quantized parts as read (their
    own tensors, in the file's precision); a weight's slot row copied (a view would keep the
    whole slot tensor alive), in its stored dtype (`infos`: its file's) where that is narrower
    (the cast back is exact)."""
    kept = {}
    for name, t in stored.items():
        if name not in entry["tensors"]:  # a quantized weight's part
            kept[name] = t
            continue
        narrow = ST_TO_DTYPE[infos[name].dtype]
        narrower = narrow.is_floating_point and narrow.itemsize < t.element_size()
        kept[name] = t.to(narrow) if narrower else t.clone()
    return kept
