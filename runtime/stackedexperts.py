"""Llama 4's experts (reshard.plan.STACKED_EXPERTS) streamed expert by expert, bit-identical.

Such a module gets its tokens stacked per expert, [E * N, hidden] (N tokens), each expert's copy of
them scaled by its router score: rows of zeros for the tokens the router did not send it. It
computes every expert on every row, and its caller sums the E results per token. An expert whose
rows are all zero adds exactly zero (zero rows times finite weights, then silu(0) * 0), so a
streamed layer brings only the experts with a row that is not zero (`routed`), hands the module
their rows and its slots ([S, ...], runtime/experts.py), and puts the results back at their
experts' places, zeros at the others (`spread`): the caller sums the tensor the module would have
made over [E, ...].

torch's batched matmul over a single matrix takes another path than over several, whose results
differ in the last bit on the CPU; one expert is therefore computed beside a second copy of itself
(an expanded view: no memory) fed zeros, and that copy's result is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def routed(hidden: torch.Tensor, count: int) -> list[int]:
    """The experts (ascending) with a row of `hidden` ([E * N, hidden]) that is not zero."""
    rows = hidden.reshape(count, -1, hidden.shape[-1])  # (E, N, hidden)
    return torch.nonzero(rows.ne(0).flatten(1).any(1)).flatten().tolist()


def summed(hidden: torch.Tensor, count: int) -> torch.Tensor:
    """The tokens' hidden states times the sum of their router scores ([N, hidden]): what guessing the
    next layer's experts needs (a positive factor changes no router's top k when it has no bias)."""
    return hidden.reshape(count, -1, hidden.shape[-1]).sum(0)


@dataclass
class StackedCall:
    """One call of a stacked experts module on slots: which experts' rows it got, to put them back."""

    held: torch.Tensor  # (S,) int64: the experts the slots hold, ascending, on the input's device
    count: int  # E
    tokens: int  # N


def compact(hidden: torch.Tensor, held: list[int], count: int) -> tuple[torch.Tensor, StackedCall]:
    """`hidden` [E * N, hidden] -> the rows of experts `held`, [S * N, hidden] (a second block of
    zeros where S is 1: see `pad`), and what `spread` needs to put the results back."""
    width = hidden.shape[-1]
    rows = hidden.reshape(count, -1, width)  # (E, N, hidden)
    index = torch.tensor(held, dtype=torch.long, device=hidden.device)
    taken = rows.index_select(0, index)  # (S, N, hidden)
    if len(held) == 1:
        taken = torch.cat([taken, torch.zeros_like(taken)])
    return taken.reshape(-1, width), StackedCall(index, count, rows.shape[1])


def pad(module: nn.Module, names: list[str]) -> None:
    """A module on one slot computes on two: each parameter `names` [1, ...] seen as [2, ...] (a view)."""
    for name in names:
        p = module._parameters[name]
        if p.shape[0] == 1:
            module._parameters[name] = nn.Parameter(p.expand(2, *p.shape[1:]), requires_grad=False)


def spread(out: torch.Tensor, call: StackedCall) -> torch.Tensor:
    """The module's result over the slots [S' * N, hidden] -> over all experts [E * N, hidden], the
    rows of experts not held zero."""
    width = out.shape[-1]
    full = out.new_zeros(call.count, call.tokens, width)
    full.index_copy_(0, call.held, out.reshape(-1, call.tokens, width)[:len(call.held)])
    return full.reshape(-1, width)
