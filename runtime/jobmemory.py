"""Memory for each job of a `LayeredModel` (runtime/model.py), on top of the plan made at open.

Every call (`model(...)`, `generate`, `score`, `generate_batch`, the engine's steps) first asks
`fit_job` for room for its activations, KV cache and logits (runtime.allowance): resident groups
move to host RAM or disk if the job needs their space, read-ahead stops where two groups in flight
no longer fit, the expert cache shrinks, and a prompt whose routed experts do not fit at once is
prefilled in chunks; a job that fits nowhere is one MemoryBudgetError naming the budget it needs.
On the CPU a job past the budget runs anyway (host RAM pages). `LayeredModel` inherits these; they
read its plan (`memory`, `costs`, `places`) and move its groups (`_demote`).
"""

from __future__ import annotations

import dataclasses
import sys

from reshard.errors import MemoryBudgetError

from . import allowance, budget
from .opening import routed_tokens
from .stream import Prefetcher


class JobMemory:
    """The job-fitting half of LayeredModel (see the module docstring)."""

    def job_bytes(self, shape: allowance.JobShape) -> int:
        """Device bytes a job of `shape` needs besides the weights (runtime.allowance). On CUDA that
        includes the cuBLAS handles of its forward threads, or of earlier jobs' where there were more:
        torch keeps them for the life of the process."""
        return allowance.job_bytes(self.model.config, self.loader.dtype, shape, self._cuda_threads(shape))

    def _cuda_threads(self, shape: allowance.JobShape) -> int:
        if self.memory is None or not self.memory.cuda:
            return 0
        return max(self.cuda_threads, shape.in_flight if shape.threads else 0)

    def fits(self, shape: allowance.JobShape) -> bool:
        """Whether a job of `shape` fits the budget, once resident groups make room for it.
        Always on the CPU, where a job larger than the budget runs anyway (host RAM pages)."""
        if self.memory is None or not self.memory.cuda:
            return True
        job, routed = self.job_bytes(shape), self._routed(shape)
        places = budget.demote(self.costs, self.places, self.memory, job, routed)
        if budget.device_need(self.costs, places, self.memory, job, routed) <= self.memory.capacity:
            return True
        return self._expert_rounds(job, routed) is not None  # its experts would come in rounds

    def _routed(self, shape: allowance.JobShape) -> int | None:
        """The tokens a pass of `shape` routes through sparse MoE layers (budget.GroupCost.flight),
        None where none streams its experts sparsely."""
        return routed_tokens(self.costs, shape.batch * shape.tokens)

    def fit_job(self, shape: allowance.JobShape, *, chunkable: bool = False) -> int | None:
        """Make room for a job of `shape` before it starts: resident groups move to host RAM or
        disk if its activations, KV cache and logits need their space (said once on stderr).
        On CUDA, a job that does not fit even with every group streamed next turns read-ahead off
        (one group in flight instead of `prefetch + 1`), and if that is not enough either raises
        MemoryBudgetError naming the --max-gpu-memory it needs; on the CPU it runs anyway.
        `chunkable` (generate): where the prompt's pass would not fit only for the slots of the
        experts its tokens route, the prompt tokens per pass that do fit, without moving weights
        (the prompt is then prefilled in chunks, a weight pass each); else None.
        A job that does not fit for its experts' slots alone, and is not chunked, computes each MoE
        layer's routed experts in rounds of the most experts that fit (runtime/expertrounds.py)."""
        if self.memory is None:
            return None
        self.experts.round_experts = None
        chunk = self._prefill_chunk(shape) if chunkable else None
        if chunk:
            if not getattr(self, "_chunk_said", False):  # said once: a server's every prompt would repeat it
                print(f"runtime: the experts a {shape.tokens}-token prompt routes do not fit on the device at "
                      f"once; prefilling it {chunk} tokens a pass (said once)", file=sys.stderr)
                self._chunk_said = True
            shape = dataclasses.replace(shape, tokens=chunk)
        job, routed = self.job_bytes(shape), self._routed(shape)
        places = budget.demote(self.costs, self.places, self.memory, job, routed)
        if self.memory.cuda and budget.device_need(self.costs, places, self.memory, job, routed) > self.memory.capacity:
            rounds = self._expert_rounds(job, routed)
            if rounds is not None:  # slots for `rounds` tokens' experts: that many experts a round
                routed = rounds
                self.experts.round_experts = max(c.per_token for c in self.costs if c.experts) * rounds
                self._say_rounds(shape, self.experts.round_experts)
                places = budget.demote(self.costs, self.places, self.memory, job, routed)
        if self.memory.cuda and budget.device_need(self.costs, places, self.memory, job, routed) > self.memory.capacity:
            alone = dataclasses.replace(self.memory, prefetch=0)
            least = budget.smallest_capacity(self.costs, alone, job, routed)
            job_text = f"{shape.describe()} (about {budget.gib(job)})"
            if least > self.memory.capacity:  # fails before anything moved
                raise MemoryBudgetError(budget.too_small(alone, least, job_text, self.device))
            self._stop_read_ahead(alone, job_text)
            places = budget.demote(self.costs, self.places, self.memory, job, routed)
        if places != self.places:
            self._demote(places, shape, job)
        self.cuda_threads = self._cuda_threads(shape)
        self._fit_expert_cache(shape, job, routed)
        return chunk

    def _prefill_chunk(self, shape: allowance.JobShape) -> int | None:
        """The most prompt tokens per row a pass can take where the whole prompt's does not fit on
        CUDA with the groups where they are but a shorter one does, because sparse MoE layers need
        slots for the experts the tokens route; None where the prompt fits, or chunks do not help."""
        if not self.memory.cuda or shape.tokens <= 1 or self._routed(shape) is None:
            return None

        def fits(tokens: int) -> bool:
            part = dataclasses.replace(shape, tokens=tokens)
            need = budget.device_need(self.costs, self.places, self.memory, self.job_bytes(part), self._routed(part))
            return need <= self.memory.capacity

        if fits(shape.tokens) or not fits(1):
            return None
        low, high = 1, shape.tokens - 1  # fits(low), the answer is at most high
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def _expert_rounds(self, job: int, routed: int | None) -> int | None:
        """The most tokens whose experts' slots let a job of `job` bytes fit on CUDA (resident groups
        moved off as needed), where `routed` tokens' do not but fewer do: a round then brings that
        many tokens' worth of experts (budget.GroupCost.flight); else None."""
        if routed is None or routed <= 1 or not self.experts.rounds_possible:
            return None

        def fits(tokens: int) -> bool:
            places = budget.demote(self.costs, self.places, self.memory, job, tokens)
            return budget.device_need(self.costs, places, self.memory, job, tokens) <= self.memory.capacity

        if not fits(1):
            return None
        low, high = 1, routed - 1  # fits(low), the answer is at most high
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def _say_rounds(self, shape: allowance.JobShape, experts: int) -> None:
        if getattr(self, "_rounds_said", None) != experts:  # said once per size: a server's every job would repeat it
            print(f"runtime: the experts {shape.describe()} routes do not fit on the device at once; each MoE "
                  f"layer brings them {experts} at a time", file=sys.stderr)
            self._rounds_said = experts

    def _fit_expert_cache(self, shape: allowance.JobShape, job: int, routed: int | None) -> None:
        """On CUDA the expert cache gives way to the job: it keeps only what the plan leaves (said
        when it shrinks). On the CPU a job past the budget runs anyway, so the cache stays."""
        cache = self.experts.cache
        if not self.memory.cuda or cache.capacity == 0:  # nothing to do (and no sums on every call)
            return
        room = max(0, self.memory.capacity - budget.device_need(self.costs, self.places, self.memory, job, routed))
        if cache.capacity > room:
            print(f"runtime: {shape.describe()} needs about {budget.gib(job)} next to the weights; the expert "
                  f"cache shrinks from {budget.gib(cache.capacity)} to {budget.gib(room)}", file=sys.stderr)
            cache.resize(room)

    def restart_read_ahead(self) -> None:
        """Read ahead anew over the groups that stream, but the decoder layers passes skip (`idle`)."""
        self.prefetcher.close()
        self.prefetcher = Prefetcher(self.loader.load, [i for i in self.streamed if i not in self.idle], self.depth,
                                     self.stats)

    def _stop_read_ahead(self, memory: budget.Budget, job_text: str) -> None:
        """Stream with one group in flight from now on (`memory` is the budget with prefetch 0)."""
        print(f"runtime: {job_text} does not fit next to {self.depth + 1} groups in flight; reading each group "
              f"when it is needed (--prefetch 0)", file=sys.stderr)
        self.memory, self.depth = memory, 0
        self.restart_read_ahead()

    def _demote(self, places: list[str], shape: allowance.JobShape, job: int) -> None:
        """Move the groups that `places` takes off the device there, and stream them from now on."""
        self.prefetcher.close()
        moved = [i for i, (old, new) in enumerate(zip(self.places, places)) if old != new]
        for i in moved:
            for slot in self._slots[i]:
                slot.clear()
            self._count_resident(i, -1)
            self.places[i] = places[i]
            self._count_resident(i, +1)
            if places[i] == budget.HOST:
                self.loader.hold(i)
            else:
                self.loader.release_pages(i)
        self.loader.reset_staging()  # sized anew for the groups that stream now
        self.streamed = [i for i, p in enumerate(self.places) if p != budget.DEVICE]
        self.restart_read_ahead()
        freed = sum(self.costs[i].held for i in moved)
        where = ", ".join(f"{sum(self.places[i] == p for i in moved)} to {p}" for p in (budget.HOST, budget.DISK)
                          if any(self.places[i] == p for i in moved))
        print(f"runtime: {shape.describe()} needs about {budget.gib(job)} of device memory next to the weights; "
              f"moved {len(moved)} resident groups ({budget.gib(freed)}) off the device ({where}) to make room",
              file=sys.stderr)

    def _count_resident(self, i: int, sign: int) -> None:
        place = self.places[i]
        self.stats.resident_bytes[place] = self.stats.resident_bytes.get(place, 0) + sign * self._resident_bytes(i, place)
