"""Tree speculation inside the serving `Engine`: while one sequence runs alone, every pass checks
a tree of guesses for it (runtime/speculate.py) instead of one token; as soon as another request
joins, its KV cache goes back into the batch and the batched passes carry on.

The two paths hand over at a pass boundary, where both hold the same thing: the target's KV cache
of every token but the newest, which the next pass feeds. Entering, the row's padding columns go
(positions come from the real columns, so the row's cache is the one it would have alone) and the
draft starts over on the whole context; leaving, the cache becomes a one-row `BatchCache`.
Greedy: the tokens are plain greedy's on either path, so a request's output does not depend on
when others came. Sampling: each accepted token follows the same distribution as plain sampling's
(the multi-draft rule), but the draws from the request's seeded generator are used differently,
so a seeded request's text can differ from what the batched path alone would draw.
"""

from __future__ import annotations

import torch

from .kvcache import BatchCache, keep_columns
from .speculate import Place, SpecStats, TreeSpeculator, open_draft, resolve_budget


class SoloSpeculation:
    """The draft (a model, a folder or "prompt-lookup") and tree budget an `Engine` speculates with."""

    def __init__(self, lm, draft, *, tree_budget="auto", eos=()):
        self.lm, self.eos = lm, tuple(eos)
        self.draft = open_draft(lm, draft)
        self.budget = resolve_budget(lm, self.draft, tree_budget)
        self.stats = SpecStats()  # every speculative pass of every sequence

    def enter(self, batch: BatchCache, sampling, generator, context: list[int]) -> tuple[TreeSpeculator, Place]:
        """The speculator and place of the one row of `batch`, whose tokens are `context`."""
        if batch.rows != 1:
            raise ValueError(f"speculation takes a batch of one row, not {batch.rows}")
        keep_columns(batch.cache, batch.mask[0].nonzero().flatten())
        spec = TreeSpeculator(self.lm, self.draft, budget=self.budget, sampling=sampling, generator=generator,
                              eos=self.eos)
        spec.stats = self.stats
        return spec, spec.start(context, batch.cache)

    def leave(self, place: Place) -> BatchCache:
        """The one-row batch holding what `place`'s target cache holds."""
        columns = place.target.get_seq_length()
        return BatchCache(place.target, torch.ones(1, columns, dtype=torch.long, device=self.lm.device))
