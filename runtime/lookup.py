"""Prompt lookup as a tree: the continuations that follow earlier occurrences of the context's
last tokens, merged into one `TokenTree` (a trie), so one pass checks every candidate at once.
No draft model: what copy-heavy tasks (quoting, editing, extraction) speed up with."""

from __future__ import annotations

from .tree import TokenTree

MAX_NGRAM = 3  # the longest tail matched; shorter tails add their matches after the longer ones'


def lookup_tree(context: list[int], budget: int, *, depth: int, max_ngram: int = MAX_NGRAM) -> TokenTree:
    """Up to `budget` nodes, `depth` deep: for n = max_ngram down to 1, each earlier place where the
    context's last n tokens occur (the latest first) offers the `depth` tokens that followed it."""
    tree, nodes = TokenTree(), {}  # (parent, token) -> node
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] != tail:
                continue
            parent = -1
            for token in context[start + n:start + n + depth]:
                if (parent, token) not in nodes:
                    if len(tree) >= budget:
                        return tree
                    nodes[parent, token] = tree.add(token, parent, 0.0)
                parent = nodes[parent, token]
    return tree
