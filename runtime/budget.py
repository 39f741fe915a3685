"""Where each layer group lives while the model runs: on the device, in host RAM, or on disk.

`plan` decides at load, from what each group takes (`GroupCost`: its bytes once in place on
the device, quantized weights expanded, and its stored bytes), a `Budget` and an allowance
for the job (runtime.allowance):
- DEVICE: the group's tensors stay on the compute device (never re-read);
- HOST: its bytes stay in host memory (pinned, on CUDA) and are copied to the device per pass;
- DISK: it streams from its mapped file every pass.
The device's capacity covers the resident groups, the groups in flight while streaming
(`prefetch + 1`, each at its largest while it is loaded) and the job's activations, KV cache
and logits. A job larger than the one planned for calls `demote` when it starts: resident
groups move off the device until it fits. On the CPU the device *is* host memory, so there
are only DEVICE and DISK groups and the budget that counts is `max_cpu_memory`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

import torch

from reshard.errors import UsageError

DEVICE, HOST, DISK = "device", "host", "disk"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float | None) -> int | None:
    """"12GiB", "500MB", "1.5GB" or a byte count -> bytes; None stays None (use the default)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"memory size {text!r} is not understood; write e.g. 12GiB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def host_available() -> int:
    """Bytes the host can give without swapping (MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def default_cpu_budget() -> int:
    """Keep a quarter of the available RAM (at least 2 GiB) for activations, the OS and others."""
    free = host_available()
    return max(0, int(min(free * 0.75, free - (2 << 30))))


def cuda_available(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: what the device has free plus what
    torch's allocator caches unused, and no more than a `set_per_process_memory_fraction` cap allows."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    available = free + reserved - allocated
    fraction = memory_fraction(device)
    if fraction < 1.0:
        available = min(available, int(fraction * total) - allocated)
    return max(0, available)


def memory_fraction(device: torch.device) -> float:
    """The per-process memory fraction set for `device` (1.0 where torch cannot say)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.7
    if get is None:
        return 1.0
    try:
        return float(get(device))
    except (RuntimeError, TypeError, ValueError):
        return 1.0


def default_gpu_budget(device: torch.device) -> int:
    """What the device can still give, less 5% and 256 MiB for the allocator's rounding and
    cuBLAS workspaces; the job's own memory is planned separately (runtime.allowance)."""
    return max(0, int(cuda_available(device) * 0.95) - (256 << 20))


def make_budget(device: torch.device, prefetch: int, max_gpu_memory, max_cpu_memory) -> Budget:
    """The memory the model may use (defaults: what is free now). On CUDA the device's capacity
    is --max-gpu-memory but never more than the device can give (see runtime.cuda_available);
    0 keeps no weights there (the device's free memory still bounds the job)."""
    cpu = parse_size(max_cpu_memory)
    cpu = default_cpu_budget() if cpu is None else cpu
    if device.type != "cuda":
        return Budget(cuda=False, capacity=cpu, host=0, residents=cpu > 0, prefetch=prefetch)
    gpu, free = parse_size(max_gpu_memory), default_gpu_budget(device)
    user = gpu is not None and 0 < gpu < free
    return Budget(cuda=True, capacity=gpu if user else free, host=cpu, residents=gpu != 0, prefetch=prefetch,
                         limit_from_user=user)


def set_aside(memory: Budget, host_bytes: int) -> Budget:
    """`memory` less `host_bytes` of host memory kept for something else (read-ahead guesses): from
    the host RAM for HOST groups on CUDA, from the whole budget on the CPU (host memory is the device's)."""
    if memory.cuda:
        return replace(memory, host=max(0, memory.host - host_bytes))
    return replace(memory, capacity=max(0, memory.capacity - host_bytes), residents=memory.capacity > host_bytes)


# --- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupCost:
    held: int  # bytes on the compute device once in place (quantized weights expanded)
    stored: int  # bytes of its file: what each pass reads, what host RAM holds for a HOST group
    kind: str  # "pre", "layer" or "post"
    made_anew: bool = False  # loading makes new tensors (expanded or cast), not views of its bytes
    # a MoE layer whose routed experts stream sparsely (runtime/experts.py): `experts` of them, each
    # `expert_held` bytes in its slot on the device and `expert_stored` in the file, `per_token` a token
    experts: int = 0
    expert_held: int = 0
    expert_stored: int = 0
    per_token: int = 0

    @property
    def in_flight(self) -> int:
        """Bytes while it is being loaded, the whole group: a group that is expanded or cast holds
        both forms for a moment."""
        return self.held + (self.stored if self.made_anew else 0)

    def flight(self, routed_tokens: int | None = None) -> int:
        """Bytes in flight for a pass of `routed_tokens` tokens: a sparsely streamed MoE layer brings
        its other tensors and slots for the experts those tokens route (at most all of them), never
        the [E, ...] tensors; None counts the whole group (`in_flight`)."""
        if routed_tokens is None or not self.experts:
            return self.in_flight
        slots = min(self.experts, max(1, routed_tokens) * self.per_token)
        rest_held = self.held - self.experts * self.expert_held
        rest_stored = self.stored - self.experts * self.expert_stored
        return rest_held + slots * self.expert_held + (rest_stored if self.made_anew else 0)


@dataclass(frozen=True)
class Budget:
    """The memory a model may use, kept by `LayeredModel` to fit each job when it starts."""

    cuda: bool  # the compute device is a GPU (else the CPU: device memory is host memory)
    capacity: int  # compute-device bytes for everything: resident weights, streaming buffers, the job
    host: int  # CUDA: host RAM for HOST groups and the pinned staging buffers
    residents: bool = True  # False for a budget of 0: no weights stay on the device
    prefetch: int = 1  # groups read ahead: that many more groups in flight
    limit_from_user: bool = False  # `capacity` is --max-gpu-memory's (else what the device has free)


def stream_reserve(costs: list[GroupCost], budget: Budget, streamed: list[int] | None = None,
                   routed_tokens: int | None = None) -> int:
    """Device bytes streaming takes: the group in use plus `prefetch` read ahead, each at its
    largest while loading (`streamed`: the groups that stream; default all of them), sparse MoE
    layers with the slots a pass of `routed_tokens` tokens routes (None: whole; see GroupCost.flight)."""
    idx = range(len(costs)) if streamed is None else streamed
    largest = max((costs[i].flight(routed_tokens) for i in idx), default=0)
    return (budget.prefetch + 1) * largest if largest else 0


def device_need(costs: list[GroupCost], places: list[str], budget: Budget, job: int,
                routed_tokens: int | None = None) -> int:
    """Device bytes the plan `places` needs for a job of `job` bytes (of `routed_tokens` tokens a pass)."""
    resident = sum(c.held for c, p in zip(costs, places) if p == DEVICE)
    streamed = [i for i, p in enumerate(places) if p != DEVICE]
    return resident + stream_reserve(costs, budget, streamed, routed_tokens) + job


def smallest_capacity(costs: list[GroupCost], budget: Budget, job: int, routed_tokens: int | None = None) -> int:
    """The least device memory with which every group streams next to a job of `job` bytes."""
    return stream_reserve(costs, budget, routed_tokens=routed_tokens) + job


def plan(costs: list[GroupCost], budget: Budget, job: int, routed_tokens: int | None = None) -> list[str]:
    """One of DEVICE/HOST/DISK per group, for a job of `job` bytes (see module docstring).

    Everything stays on the device if it fits with the job. Otherwise the device keeps room
    for streaming and the job, and the rest of it is filled first (groups outside the layers
    first: they run every pass too and are often small; then first fit in model order);
    on CUDA host RAM is filled next with what is left, keeping room for the staging buffers
    if anything still streams from disk.
    """
    if budget.residents and sum(c.held for c in costs) + job <= budget.capacity:
        return [DEVICE] * len(costs)
    order = sorted(range(len(costs)), key=lambda i: (costs[i].kind == "layer", i))
    places = [DISK] * len(costs)
    if budget.residents:
        _fill(places, order, [c.held for c in costs],
              budget.capacity - stream_reserve(costs, budget, routed_tokens=routed_tokens) - job, DEVICE)
    if not budget.cuda:
        return places
    stored = [c.stored for c in costs]
    rest = [i for i in order if places[i] == DISK]
    if sum(stored[i] for i in rest) <= budget.host:
        return _fill(places, order, stored, budget.host, HOST)
    staging = 2 * max(stored[i] for i in rest)  # two pinned buffers sized to the largest group read
    return _fill(places, order, stored, budget.host - staging, HOST)


def demote(costs: list[GroupCost], places: list[str], budget: Budget, job: int,
           routed_tokens: int | None = None) -> list[str]:
    """`places` with resident groups moved off the device until a job of `job` bytes fits next
    to them: decoder layers first, the last first; to host RAM where it has room (CUDA), else
    to disk. Unchanged if it fits already, or if even streaming everything would not make it fit
    (moving weights would then cost passes and gain nothing)."""
    streamed_all = [p if p != DEVICE else DISK for p in places]
    if device_need(costs, streamed_all, budget, job, routed_tokens) > budget.capacity:
        return list(places)
    places = list(places)
    host_used = sum(c.stored for c, p in zip(costs, places) if p == HOST)
    staging = 2 * max((c.stored for c in costs), default=0)
    order = sorted((i for i, p in enumerate(places) if p == DEVICE), key=lambda i: (costs[i].kind != "layer", -i))
    for i in order:
        if device_need(costs, places, budget, job, routed_tokens) <= budget.capacity:
            break
        to_host = budget.cuda and host_used + costs[i].stored + staging <= budget.host
        places[i] = HOST if to_host else DISK
        host_used += costs[i].stored if to_host else 0
    return places


def _fill(places: list[str], order: list[int], sizes: list[int], budget: int, tier: str) -> list[str]:
    for i in order:
        if places[i] == DISK and sizes[i] <= budget:
            places[i] = tier
            budget -= sizes[i]
    return places


def too_small(memory: Budget, need: int, job: str, device: torch.device) -> str:
    """The one-line reason a MemoryBudgetError gives: what is needed, what there is, what to do."""
    have = (f"--max-gpu-memory is {gib(memory.capacity)}" if memory.limit_from_user
            else f"{device} can give {gib(memory.capacity)} (free memory, less a margin)")
    fix = f"use --max-gpu-memory {gib(need)} or more" if memory.limit_from_user else \
        f"free device memory (--max-gpu-memory {gib(need)} is the least that works)"
    hint = ", or --prefetch 0" if memory.prefetch > 0 else ""
    groups = f"{memory.prefetch + 1} groups" if memory.prefetch else "1 group"
    return (f"streaming this model with {job} needs {gib(need)} of device memory ({groups} "
            f"in flight and the job's activations), but {have}; {fix}{hint}")


def gib(nbytes: int) -> str:
    """Bytes as GiB, rounded up to 0.01 (text parse_size reads back)."""
    return f"{math.ceil(nbytes / 2**30 * 100) / 100:.2f}GiB"
