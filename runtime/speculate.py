"""Tree speculative decoding (SpecExec / SpecInfer) for a streamed `LayeredModel`.

A streamed pass costs the bytes it moves, whatever it carries, so each pass checks a whole tree
of guesses: a small draft model kept whole grows a token tree (runtime/tree.py), and the target
verifies every node in ONE forward through transformers' own modules, with a 4D attention mask
(each node sees the prefix in the KV cache and its own ancestors) and position ids prefix + depth.
The longest path the target agrees with is accepted, plus one token of the target's own; the KV
cache keeps only the accepted path (runtime.kvcache.keep_columns).

Greedy: at each node the target's argmax; the output equals plain greedy decoding token for token.
Sampling: at each node the multi-draft rule (`accept_child`): children are tried in order, x is
accepted with probability min(1, p(x)/q(x)), else p <- norm(max(p - q, 0)); a token is drawn from
what is left when all are rejected. The tree's children are the draft's top candidates (not drawn),
so each one's q is a point mass on it: the rule then keeps the output distribution equal to
plain sampling's (temperature and top-p as runtime.sampling applies them).
One sequence at a time; the draft must share the target's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from reshard.errors import UsageError

from .kvcache import keep_columns
from .lookup import lookup_tree
from .sampling import Sampling, token_probs
from .score import cache_arg
from .tree import TokenTree, grow_tree, tree_mask, tree_positions
from .treecost import DRAFT_STEPS


@dataclass
class SpecStats:
    passes: int = 0  # target forwards (the prefill included)
    new_tokens: int = 0
    tree_tokens: int = 0  # tree nodes verified, all passes
    accepted: int = 0  # tree nodes the target accepted, all passes
    draft_steps: int = 0  # draft forwards

    def as_dict(self) -> dict:
        return {"target_passes": self.passes, "tokens_per_pass": round(self.new_tokens / max(1, self.passes), 3),
                "tree_size": round(self.tree_tokens / max(1, self.passes), 1),
                "acceptance": round(self.accepted / max(1, self.tree_tokens), 4), "draft_steps": self.draft_steps}


def accept_child(p: torch.Tensor, children: list[int], q_rows: list[torch.Tensor],
                 generator: torch.Generator | None) -> tuple[int | None, int]:
    """The multi-draft acceptance rule at one node. `p` (V,) is the target's distribution there,
    `children` the candidate tokens in order and `q_rows` the distribution each was proposed from.
    Returns (index of the accepted child or None, the token that comes next)."""
    p = p.double() / p.double().sum()  # (top-p leaves it unnormalized)
    for i, (x, q) in enumerate(zip(children, q_rows)):
        q = q.double()
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if q[x] > 0 and u < min(1.0, float(p[x] / q[x])):
            return i, x
        rest = (p - q).clamp(min=0)
        if float(rest.sum()) <= 0:
            break
        p = rest / rest.sum()
    return None, int(torch.multinomial(p, 1, generator=generator))


def point_mass(token: int, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab, dtype=torch.float64)
    q[token] = 1.0
    return q


@dataclass
class Place:
    """One sequence's state between passes."""

    target: DynamicCache  # the target's KV cache: every context token but `pending`
    drafted: DynamicCache | None  # the draft's: every context token but `dpending` (None: prompt lookup)
    pending: list[int]  # tokens the target has not seen (the last is the tree's root)
    dpending: list[int]  # tokens the draft has not seen
    context: list[int]  # the prompt and every token so far


LOOKUP = "prompt-lookup"  # the draft that is no model: trees of the context's n-gram continuations


class TreeSpeculator:
    """Generates for one sequence with `lm` (the target) checking trees grown by `draft`, or with
    `draft` None, trees of prompt lookup's continuations (runtime/lookup.py)."""

    def __init__(self, lm, draft, *, budget: int, sampling: Sampling, generator=None, eos=(), width=None):
        if budget < 1:
            raise UsageError(f"tree budget must be 1 or more, not {budget}")
        self.lm, self.draft, self.budget, self.sampling = lm, draft, budget, sampling
        self.generator, self.eos = generator, set(eos)
        self.width = width or max(1, -(-budget // DRAFT_STEPS))  # about DRAFT_STEPS draft forwards a tree
        self.stats = SpecStats()
        keep_columns(DynamicCache(config=lm.config), torch.arange(0))  # refuses sliding-window caches now, not later
        self._draft_lm = SimpleNamespace(model=draft)  # what score.cache_arg reads the forward's arguments from

    def generate(self, prompt: list[int], max_new_tokens: int, on_tokens=None) -> list[int]:
        """New tokens after `prompt` (at most `max_new_tokens`, through the first end of sequence);
        `on_tokens(list)` hears each pass's accepted tokens, and stops generation by returning True."""
        place, out = self.start(prompt), []
        while len(out) < max_new_tokens:
            new = self.step(place, max_new_tokens - len(out))
            out += new
            if on_tokens is not None and on_tokens(new):  # a caller's stop (chat's Ctrl-C)
                break
            if new[-1] in self.eos:
                break
        self.stats.new_tokens += len(out)
        return out

    def start(self, prompt: list[int], target=None) -> Place:
        """Where a sequence stands before its first pass: `prompt` after the target's KV cache
        `target` (None: an empty one; else it holds every context token but the last of `prompt`)."""
        target = DynamicCache(config=self.lm.config) if target is None else target
        pending = list(prompt) if target.get_seq_length() == 0 else list(prompt[-1:])
        drafted = DynamicCache(config=self.draft.config) if self.draft is not None else None
        return Place(target, drafted, pending, list(prompt), list(prompt))

    def step(self, place: Place, limit: int) -> list[int]:
        """One target pass: the next tokens (at most `limit`, through the first end of sequence);
        `place` moves past them (the target's cache holds all but the last)."""
        depth = limit - 1  # deeper guesses would pass the tokens wanted
        if self.draft is None:
            tree = lookup_tree(place.context, self.budget, depth=depth)
        else:
            tree = self.grow(place.drafted, place.dpending, depth)
        new, _ = self.verify(place.target, place.pending, tree)
        new = new[:limit]
        stop = next((k for k, t in enumerate(new) if t in self.eos), None)
        new = new if stop is None else new[:stop + 1]
        # the target's cache holds the accepted path; the draft's only what came before dpending
        place.pending, place.dpending = new[-1:], new
        place.context += new
        return new

    # --- the draft grows a tree ----------------------------------------------------------
    def grow(self, cache, pending: list[int], depth: int | None = None) -> TokenTree:
        """The draft's tree after `pending` (its cache holds what came before; it is left so),
        `depth` deep at most (default: the budget)."""
        root = self._draft_forward(torch.tensor([pending]), cache, None, None)[-1]
        base = cache.get_seq_length()

        def step(tree: TokenTree, nodes: range) -> torch.Tensor:
            mask = tree_mask(tree, nodes, past=base + nodes.start, pending=0, dtype=self.draft.dtype)
            pos = tree_positions(tree, nodes, root_position=base - 1, pending=0)
            ids = torch.tensor([[tree.tokens[j] for j in nodes]])
            return self._draft_forward(ids, cache, mask, pos)

        depth = self.budget if depth is None else depth
        tree = grow_tree(step, root, self.budget, width=self.width, depth=depth) if depth > 0 else TokenTree()
        keep_columns(cache, torch.arange(base, device=self.draft.device))  # the nodes go
        return tree

    def _draft_forward(self, ids, cache, mask, positions) -> torch.Tensor:
        dev = self.draft.device
        kwargs = {} if mask is None else {"attention_mask": mask.to(dev), "position_ids": positions.to(dev)}
        with torch.inference_mode():
            out = self.draft(input_ids=ids.to(dev), use_cache=True, **cache_arg(self._draft_lm, cache), **kwargs)
        self.stats.draft_steps += 1
        return out.logits[0].float().cpu()  # (Q, V)

    # --- the target checks it ------------------------------------------------------------
    def verify(self, cache, pending: list[int], tree: TokenTree) -> tuple[list[int], list[int]]:
        """One target pass over `pending` then the tree; returns the new tokens and the accepted
        nodes, and leaves in `cache` the prefix, the pending tokens and the accepted nodes."""
        lm, past = self.lm, cache.get_seq_length()
        nodes = range(len(tree))
        mask = tree_mask(tree, nodes, past=past, pending=len(pending), dtype=lm.dtype)
        pos = tree_positions(tree, nodes, root_position=past + len(pending) - 1, pending=len(pending))
        ids = torch.tensor([pending + tree.tokens])
        dev = lm.device
        with torch.inference_mode():
            out = lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                     **cache_arg(lm, cache))
        logits = out.logits[0, len(pending) - 1:].float().cpu()  # (1 + N, V): after the root, after each node
        self.stats.passes += 1
        self.stats.tree_tokens += len(tree)
        new, path = self.walk(tree, logits)
        self.stats.accepted += len(path)
        keep = list(range(past + len(pending))) + [past + len(pending) + j for j in path]
        keep_columns(cache, torch.tensor(keep, device=dev))
        return new, path

    def walk(self, tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """From the root down the tree while the target agrees: the new tokens and the nodes taken."""
        node, new, path, vocab = -1, [], [], logits.shape[-1]
        while True:
            kids = tree.children(node)
            row = logits[node + 1]
            if self.sampling.temperature == 0:
                token = int(row.argmax())
                i = next((k for k, j in enumerate(kids) if tree.tokens[j] == token), None)
            else:
                p = token_probs(row, self.sampling)
                cands = [tree.tokens[j] for j in kids]
                i, token = accept_child(p, cands, [point_mass(t, vocab) for t in cands], self.generator)
            new.append(token)
            if i is None or token in self.eos:
                return new, path
            node = kids[i]
            path.append(node)


def generate_tree(lm, input_ids: torch.Tensor, draft, *, tree_budget="auto", max_new_tokens: int = 20,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, streamer=None,
                  generator: torch.Generator | None = None, stopping_criteria=None, **unused) -> torch.Tensor:
    """`LayeredModel.generate(input_ids, draft=..., tree_budget=...)`: the prompt and its new tokens
    (1, L + new), as transformers' generate returns them. `draft` is a model or a folder (a
    checkpoint or a converted folder, loaded whole on the target's device); `tree_budget` the tree
    nodes per pass, or "auto" (runtime.treecost: measured once per model). `draft="prompt-lookup"`
    makes the trees from the context's n-gram matches instead (no model)."""
    from .batch import eos_ids

    if unused.get("min_new_tokens"):
        raise UsageError("min_new_tokens is not supported with a draft; drop it or generate without --draft")
    if input_ids.shape[0] != 1:
        raise UsageError(f"tree speculation generates one sequence at a time, not {input_ids.shape[0]}; "
                         "pass one prompt, or generate without a draft")
    draft = open_draft(lm, draft)
    budget = resolve_budget(lm, draft, tree_budget)
    sampling = Sampling(max_tokens=max(1, max_new_tokens), temperature=temperature if do_sample else 0.0,
                        top_p=top_p or 1.0)
    spec = TreeSpeculator(lm, draft, budget=budget, sampling=sampling, generator=generator, eos=eos_ids(lm))
    prompt = input_ids[0].tolist()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out: list[int] = []

    def on_tokens(new: list[int]) -> bool:
        out.extend(new)
        if streamer is not None:
            streamer.put(torch.tensor(new))
        so_far = torch.tensor([prompt + out])
        return any(bool(stop(so_far, None)) for stop in stopping_criteria or ())

    if max_new_tokens > 0:
        spec.generate(prompt, max_new_tokens, on_tokens)
    if streamer is not None:
        streamer.end()
    lm.speculation = {**spec.stats.as_dict(), "tree_budget": budget}
    return torch.tensor([prompt + out], device=input_ids.device)


def open_draft(lm, draft):
    """A draft model object as is; "prompt-lookup" None (no model); a folder loaded whole on the
    target's device, after checking that it shares the target's tokenizer."""
    if isinstance(draft, torch.nn.Module):
        return draft
    if draft == LOOKUP:
        return None
    from .batch import load_assistant, other_tokenizer

    if other_tokenizer(lm, draft) is not None:
        raise UsageError(f"draft {draft} uses a different tokenizer than the target; tree speculation needs a "
                         "draft with the same tokenizer (for a different one, use --assistant)")
    return load_assistant(draft, device=lm.device, dtype=lm.dtype)


def resolve_budget(lm, draft, tree_budget) -> int:
    """`tree_budget` as given, or for "auto" the best budget for measured costs (measured at first use)."""
    if tree_budget != "auto":
        if not isinstance(tree_budget, int) or tree_budget < 1:
            raise UsageError(f"tree budget must be a number of tokens (1 or more) or 'auto', not {tree_budget!r}")
        return tree_budget
    from .treecost import measure_costs

    if getattr(lm, "tree_costs", None) is None or lm.tree_costs[0] is not draft:
        lm.tree_costs = (draft, measure_costs(lm, draft))
    return lm.tree_costs[1].best_budget()
