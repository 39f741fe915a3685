"""The experts a streamed MoE layer's module computes with, and which experts a call routes.

A streamed layer's experts module gets slots: [S, ...] tensors per expert tensor, S the experts
its tokens route, never E (runtime/experts.py brings them; runtime/cpuexperts.py does the same in
host memory). Expert ids map to slot ids by an increasing map, so the module visits and sums its
experts in the same order as over [E, ...].
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from reshard.format import quant_part_names, scheme_of
from reshard.plan import ROUTED_ARGS

from .quantized import expand_param


def routed_experts(index: torch.Tensor, count: int) -> list[int]:
    """The experts (ascending) a router's `top_k_index` sends tokens to; ids outside 0..count-1
    (padding of some routers) left out."""
    return [e for e in torch.unique(index).tolist() if 0 <= e < count]


def computes_on_slots(module: nn.Module) -> bool:
    """Whether a streamed experts module computes on [S, ...] slots (it takes routed expert ids,
    `top_k_index` or gpt-oss's `router_indices`, and loops over `num_experts`), rather than on
    full-size [E, ...] tensors holding the routed rows."""
    return routed_arg(module) is not None and isinstance(getattr(module, "num_experts", None), int)


def routed_arg(module: nn.Module) -> str | None:
    """The name a module's forward takes its routed expert ids by, or None."""
    signature = inspect.signature(module.forward)
    return next((a for a in ROUTED_ARGS if a in signature.parameters), None)


def runs_in_rounds(module: nn.Module) -> bool:
    """Whether a slots module can run its experts in rounds (runtime/expertrounds.py): the ones
    taking `top_k_index`, transformers' experts contract, skip the ids that a round leaves out as its
    sentinel (`num_experts`); gpt-oss's one-hot over `num_experts` cannot take one."""
    return computes_on_slots(module) and routed_arg(module) == "top_k_index"


class Slots:
    """The experts one streamed layer's module computes with: rows [S, ...] per expert tensor
    holding experts `held` (ascending), S sized by what the passes route, not by E."""

    def __init__(self, owner: int, held: list[int], tensors: dict[str, torch.Tensor], *, full: bool = False):
        self.owner, self.held, self.tensors, self.full = owner, held, tensors, full
        self.rows = {e: e if full else k for k, e in enumerate(held)}

    def row(self, expert: int) -> int:
        """Where `expert` (one of `held`) sits: its own row in full-size tensors, else its slot."""
        return self.rows[expert]

    def index(self, top_k_index: torch.Tensor, count: int) -> torch.Tensor:
        """Expert ids -> slot ids. The map is increasing, so the module visits its experts (and
        adds their outputs) in the same order as over [E, ...]; an id outside [0, count) (an
        expert-parallel sentinel) becomes the slots' own sentinel, S."""
        table = torch.full((count + 1,), len(self.held), dtype=top_k_index.dtype, device=top_k_index.device)
        table[torch.tensor(self.held, dtype=torch.long, device=top_k_index.device)] = torch.arange(
            len(self.held), dtype=top_k_index.dtype, device=top_k_index.device)
        return table[top_k_index.clamp(0, count).masked_fill(top_k_index < 0, count)]


def fill_rows(group, scheme: str | None, rows: dict[str, torch.Tensor], stored: dict[str, torch.Tensor],
              dtype: torch.dtype) -> None:
    """Slot rows {param: row} of one expert of `group` from its stored tensors (cached, read ahead,
    or just read): a weight copied (cast where the compute dtype differs: exact for a cached
    narrower copy), a quantized one expanded from its parts to `dtype` (`scheme`: the folder's):
    the one function every way in goes through."""
    for param, row in rows.items():
        if param not in group.quantized:
            row.copy_(stored[param])
            continue
        own = scheme_of(group, param, scheme)
        parts = {part: stored[name].to(row.device, non_blocking=True)
                 for part, name in quant_part_names(param, own).items()}
        info = {**group.quantized[param], "shape": group.quantized[param]["shape"][1:]}
        row.copy_(expand_param(parts, info, own, dtype))
