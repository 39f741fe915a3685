"""`TokenTree`: the draft's guesses for the next tokens, and the attention masks that let one
forward check them all.

The root is the newest accepted token (not in the KV cache yet, or the last of several that
are not). Every other node is a token the draft proposes after its parent; nodes are numbered
in the order they were added, so a parent's number is always below its children's. The tree
grows best-first by cumulative draft probability: each draft step forwards the nodes added
last (on top of the draft's KV cache, which holds the prefix and the earlier nodes) and
offers their top children; the best offers not yet taken join the tree, until the budget.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

CHILDREN = 8  # top candidates the draft offers after each node


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)  # node j's token
    parents: list[int] = field(default_factory=list)  # node j's parent (-1: the root)
    depths: list[int] = field(default_factory=list)  # node j's depth (the root's children: 1)
    logq: list[float] = field(default_factory=list)  # node j's cumulative draft log-probability

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, logq: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.logq.append(logq)
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        """Node `node`'s children (-1: the root's), best draft guess first."""
        return [j for j, p in enumerate(self.parents) if p == node]

    def ancestry(self) -> torch.Tensor:
        """(N, N) bool: [j, a] is True where node a is node j or one of its ancestors."""
        n = len(self)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for j, p in enumerate(self.parents):
            if p >= 0:
                anc[j] = anc[p]
            anc[j, j] = True
        return anc


def tree_mask(tree: TokenTree, nodes: range, *, past: int, pending: int, dtype) -> torch.Tensor:
    """The additive (1, 1, Q, K) mask of one forward: `pending` tokens in causal order (the last
    is the root), then the tree's `nodes`, on top of a KV cache of `past` columns of which the
    first `past - nodes.start` are the prefix and the rest the tree's earlier nodes.
    Q = pending + len(nodes); K = past + Q."""
    prefix = past - nodes.start  # columns before the tree's first node
    q = pending + len(nodes)
    allowed = torch.zeros(q, past + q, dtype=torch.bool)
    for i in range(pending):  # causal over everything before it
        allowed[i, :past + i + 1] = True
    anc = tree.ancestry()
    first = past + pending  # where nodes.start's column lands
    for r, j in enumerate(nodes, start=pending):
        allowed[r, :prefix + pending] = True  # the prefix and the pending tokens (the root among them)
        on_tree = anc[j, :nodes.stop]
        cols = torch.nonzero(on_tree).flatten()
        earlier = cols[cols < nodes.start]
        allowed[r, prefix + earlier] = True  # ancestors already in the cache
        later = cols[cols >= nodes.start]
        allowed[r, first + later - nodes.start] = True  # itself (and ancestors in this forward)
    return _additive(allowed, dtype)


def tree_positions(tree: TokenTree, nodes: range, *, root_position: int, pending: int) -> torch.Tensor:
    """(1, Q) position ids: the pending tokens end at `root_position`; a node sits at root + depth."""
    head = list(range(root_position - pending + 1, root_position + 1))
    return torch.tensor([head + [root_position + tree.depths[j] for j in nodes]])


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """0 where attention is allowed, the dtype's lowest value elsewhere (eager and sdpa both take it)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def grow_tree(draft_step, root_logits: torch.Tensor, budget: int, *, width: int, depth: int) -> TokenTree:
    """The tree of `budget` nodes the draft likes best, `depth` deep at most. `root_logits` (V,) are
    the draft's after the root; `draft_step(tree, nodes)` forwards the range of new nodes and returns
    their logits (len(nodes), V). Each step adds the `width` best offers not yet taken."""
    tree = TokenTree()
    offers: list[tuple[float, int, int, int]] = []  # (-cumulative log q, order, parent, token)
    order = 0

    def offer(parent: int, logits: torch.Tensor, base: float) -> None:
        nonlocal order
        logp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(logp, min(CHILDREN, logp.shape[-1]))
        for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
            if math.isfinite(lp):
                heapq.heappush(offers, (-(base + lp), order, parent, tok))
                order += 1

    offer(-1, root_logits, 0.0)
    while len(tree) < budget and offers:
        start = len(tree)
        while offers and len(tree) - start < width and len(tree) < budget:
            neg, _, parent, tok = heapq.heappop(offers)
            tree.add(tok, parent, -neg)
        nodes = range(start, len(tree))
        if len(tree) >= budget:
            break  # the last nodes' children would not fit: no draft step for them
        logits = draft_step(tree, nodes)
        for j, row in zip(nodes, logits):
            if tree.depths[j] < depth:  # deeper tokens would pass the tokens still wanted
                offer(j, row, tree.logq[j])
    return tree
