"""Routed experts in rounds of tokens, where a call's experts do not fit on the device at once.

A streamed MoE layer computes on slots for the experts its tokens route (runtime/experts.py). A
scoring pass, a batch or a long prompt routes most of a layer's experts: DeepSeek-V3's 256 at
bfloat16 are 22.5 GB of slots, more than a 16 or 24 GB GPU has. Where a job's slots do not fit
(LayeredModel.fit_job, runtime/jobmemory.py), the streamer gets `round_tokens`: the most tokens
one call of an experts module computes at once. A call with more is split here into rounds of
that many tokens, each an ordinary call of the module (its hooks bring that round's experts into
slots that replace the last round's), and the rounds' outputs are put back in token order.

Each token's output is the same sum over its own experts, in the same order, so the math is
unchanged; an expert's matmul then runs over fewer rows at a time, which a GPU's kernels may
round differently (as a prefill in chunks does). Attention and everything else in the layer run
once over all the tokens: only the experts' weights come in rounds, and a round re-reads an
expert an earlier one used (from the expert cache where it holds it).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn


def in_rounds(module: nn.Module, original: Callable, limit: Callable[[], int | None]) -> Callable:
    """A forward for `module` (an experts module taking `hidden_states` and `top_k_index`, a row
    per token) that runs `original` as it is, or, where `limit()` is a number of tokens smaller
    than the call's, calls the module once per round of that many tokens."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cap = limit()
        if cap is None:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        hidden, index = bound.arguments.get("hidden_states"), bound.arguments.get("top_k_index")
        if not isinstance(hidden, torch.Tensor) or not isinstance(index, torch.Tensor) or hidden.dim() != 2 \
                or index.shape[0] != hidden.shape[0] or hidden.shape[0] <= cap:
            return original(*args, **kwargs)
        tokens = hidden.shape[0]

        def rows(value, start):  # a per-token argument's rows of this round; others as they are
            per_token = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == tokens
            return value[start:start + cap] if per_token else value

        out = []
        for start in range(0, tokens, cap):
            part = signature.bind(*args, **kwargs)
            for name, value in part.arguments.items():
                part.arguments[name] = rows(value, start)
            out.append(module(*part.args, **part.kwargs))  # its hooks bring this round's experts
        return torch.cat(out)

    return forward


class Restore:
    """A handle that puts a module's own forward back (the instance attribute goes)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
