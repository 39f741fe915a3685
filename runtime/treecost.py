"""How big a tree to verify per pass, from what passes cost on this machine.

Measured once per target and draft (and kept in `LayeredModel.tree_costs`): a target pass over 1
token and over `PROBE` tokens, a draft forward over 1 and over `PROBE`. Costs are taken as linear
in the tokens (a fixed part, the weights moved, and a part per token, the compute). The expected
tokens a pass yields from a tree of B nodes is taken as 1 + log2(1 + B) / 2 (a prior, about what
SpecExec and Sequoia report for real pairs; trees yield roughly logarithmically in their size).
The budget maximizes that over the pass's time (verification plus the draft's steps): large
when streaming dominates a pass, small on a CPU where each verified token costs compute, and
smaller per sequence when several sequences share a pass (their trees' compute adds up, the
weights move once).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .score import cache_arg

PROBE = 64  # tokens of the larger measured forward
BUDGETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
DRAFT_STEPS = 8  # draft forwards a tree takes (runtime.speculate: width = budget / 8)


@dataclass(frozen=True)
class TreeCosts:
    target_fixed: float  # seconds of a target pass that do not grow with its tokens
    target_per_token: float
    draft_fixed: float
    draft_per_token: float

    def pass_seconds(self, budget: int, rows: int = 1) -> float:
        """One pass of `rows` sequences, each with a tree of `budget` nodes: the weights are moved
        once, every sequence's tokens computed and its tree drafted."""
        width = -(-budget // DRAFT_STEPS)
        draft = (DRAFT_STEPS + 1) * self.draft_fixed + (budget + DRAFT_STEPS * width) * self.draft_per_token
        return self.target_fixed + rows * ((budget + 1) * self.target_per_token + draft)

    def best_budget(self, rows: int = 1) -> int:
        """The tree size per sequence that yields the most tokens per second when `rows` share a pass."""
        return max(BUDGETS, key=lambda b: rows * expected_tokens(b) / self.pass_seconds(b, rows))


def expected_tokens(budget: int) -> float:
    return 1 + math.log2(1 + budget) / 2


def measure_costs(lm, draft) -> TreeCosts:
    """Time one target pass and one draft forward over 1 and over PROBE tokens (fresh caches);
    `draft` None (prompt lookup) costs nothing."""
    first = _timed(lm, lm, 1)  # (a streamed target's first pass may read from disk, the next from the page cache)
    tn = _timed(lm, lm, PROBE)
    t1 = min(first, _timed(lm, lm, 1))
    if draft is None:  # prompt lookup: no draft forwards
        return TreeCosts(max(1e-9, t1 - (tn - t1) / (PROBE - 1)), max(0.0, (tn - t1) / (PROBE - 1)), 0.0, 0.0)
    draft_lm = SimpleNamespace(model=draft)
    _timed(draft, draft_lm, 1)  # warm-up: a first forward pays for one-time setup
    d1, dn = _timed(draft, draft_lm, 1), _timed(draft, draft_lm, PROBE)
    per_t, per_d = max(0.0, (tn - t1) / (PROBE - 1)), max(0.0, (dn - d1) / (PROBE - 1))
    return TreeCosts(max(1e-9, t1 - per_t), per_t, max(1e-9, d1 - per_d), per_d)


def _timed(model, lm, tokens: int) -> float:
    from transformers import DynamicCache

    ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **cache_arg(lm, DynamicCache(config=model.config)))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start
