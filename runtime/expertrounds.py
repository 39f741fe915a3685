"""Routed experts in rounds, where a call's experts do not fit on the device at once.

A streamed MoE layer computes on slots for the experts its tokens route (runtime/experts.py). A
scoring pass, a batch or a long prompt routes most of a layer's experts: DeepSeek-V3's 256 at
bfloat16 are 22.5 GB of slots, more than a 16 or 24 GB GPU has. Where a job's slots do not fit
(LayeredModel.fit_job, runtime/jobmemory.py), the streamer gets `round_experts`: the most experts
one call of an experts module brings at once. A call that routes more is split here into rounds
by expert: each round is an ordinary call of the module over all the tokens, its routed ids
outside the round's experts made the "no expert" sentinel transformers' experts code skips (the
one expert parallelism uses; its batched and grouped kernels mask the sentinel's rows where the
module's `_is_expert_parallel` says so, set for the rounds), so its hooks bring that round's experts
alone, into slots that replace the last round's. The rounds' outputs are summed.

Each routed expert is read once per layer, as without rounds, and computes on the same rows of
tokens, so its output is the same bits. What changes is how a token's sum over its experts is
grouped: the experts of one round are summed in order, then the rounds' sums are added, where
one call sums them all in order; float rounding may differ there, so rounds happen only where one
call's slots do not fit.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

from .expertslots import routed_experts


def in_rounds(module: nn.Module, original: Callable, limit: Callable[[], int | None]) -> Callable:
    """A forward for `module` (an experts module taking `top_k_index` and looping over its
    `num_experts`) that runs `original` as it is, or, where `limit()` is a number of experts smaller
    than the call routes, calls the module once per round of that many routed experts (ascending)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cap = limit()
        if cap is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        index, count = bound.arguments.get("top_k_index"), module.num_experts
        if not isinstance(index, torch.Tensor):
            return original(*args, **kwargs)
        routed = routed_experts(index, count)
        if len(routed) <= cap:
            return original(*args, **kwargs)
        valid = (index >= 0) & (index < count)
        parallel = getattr(module, "_is_expert_parallel", None)  # transformers' batched/grouped kernels
        total = None
        try:
            if parallel is not None:  # mask the sentinel's rows only where told: expert parallelism's flag
                module._is_expert_parallel = True
            for start in range(0, len(routed), cap):
                chosen = torch.zeros(count + 1, dtype=torch.bool, device=index.device)
                chosen[torch.tensor(routed[start:start + cap], device=index.device)] = True
                part = signature.bind(*args, **kwargs)
                part.arguments["top_k_index"] = torch.where(valid & chosen[index.clamp(0, count)], index, count)
                out = module(*part.args, **part.kwargs)  # its hooks bring this round's experts
                total = out if total is None else total + out
        finally:
            if parallel is not None:
                module._is_expert_parallel = parallel
        return total

    return forward


class Restore:
    """A handle that puts a module's own forward back (the instance attribute goes)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
