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
Several sequences share each pass: every unfinished sequence's tree is verified by a forward of its
own, all of them through one read of the weights (runtime/lockstep.py: layers outermost, sequences
innermost), so each sequence's tokens are the ones it gets alone. The draft must share the target's
tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from reshard.errors import UsageError

from .allowance import JobShape
from .kvcache import keep_columns
from .lockstep import Job, Lockstep
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
    """Generates for one sequence or several with `lm` (the target) checking trees grown by `draft`,
    or with `draft` None, trees of prompt lookup's continuations (runtime/lookup.py)."""

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
        hear = None if on_tokens is None else (lambda k, new: on_tokens(new))
        return self.generate_many([prompt], max_new_tokens, hear)[0]

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, on_tokens=None) -> list[list[int]]:
        """`generate` for several prompts at once: each pass verifies the tree of every sequence not
        yet done, all through one read of the weights. `on_tokens(k, list)` hears sequence k's
        accepted tokens of each pass, and stops that sequence by returning True."""
        places, outs = [self.start(p) for p in prompts], [[] for _ in prompts]
        active = list(range(len(prompts))) if max_new_tokens > 0 else []
        while active:
            news = self.step_many([places[k] for k in active], [max_new_tokens - len(outs[k]) for k in active])
            still = []
            for k, new in zip(active, news):
                outs[k] += new
                stop = on_tokens is not None and on_tokens(k, new)  # a caller's stop (chat's Ctrl-C)
                if not stop and new[-1] not in self.eos and len(outs[k]) < max_new_tokens:
                    still.append(k)
            active = still
        self.stats.new_tokens += sum(map(len, outs))
        return outs

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
        return self.step_many([place], [limit])[0]

    def step_many(self, places: list[Place], limits: list[int]) -> list[list[int]]:
        """`step` for several sequences in one target pass: each one's tree, verified by a forward of
        its own; with more than one, the forwards run through one read of the weights (Lockstep)."""
        trees = [self.propose(place, limit) for place, limit in zip(places, limits)]
        calls = [self.verify_call(place.target, place.pending, tree) for place, tree in zip(places, trees)]
        logits = self._forward_all(calls)
        news = []
        for place, tree, rows, limit in zip(places, trees, logits, limits):
            new, _ = self.take(place.target, place.pending, tree, rows)
            new = new[:limit]
            stop = next((k for k, t in enumerate(new) if t in self.eos), None)
            new = new if stop is None else new[:stop + 1]
            # the target's cache holds the accepted path; the draft's only what came before dpending
            place.pending, place.dpending = new[-1:], new
            place.context += new
            news.append(new)
        return news

    def propose(self, place: Place, limit: int) -> TokenTree:
        """The tree to verify next for `place`: no deeper than `limit - 1` (deeper guesses would
        pass the tokens wanted)."""
        depth = limit - 1
        if self.draft is None:
            return lookup_tree(place.context, self.budget, depth=depth)
        return self.grow(place.drafted, place.dpending, depth)

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
        logits = self._forward_all([self.verify_call(cache, pending, tree)])[0]
        return self.take(cache, pending, tree, logits)

    def verify_call(self, cache, pending: list[int], tree: TokenTree) -> dict:
        """The target forward's arguments that check `tree` after `pending`, on top of `cache`."""
        lm, past = self.lm, cache.get_seq_length()
        nodes = range(len(tree))
        mask = tree_mask(tree, nodes, past=past, pending=len(pending), dtype=lm.dtype)
        pos = tree_positions(tree, nodes, root_position=past + len(pending) - 1, pending=len(pending))
        dev = lm.device
        return {"input_ids": torch.tensor([pending + tree.tokens], device=dev), "attention_mask": mask.to(dev),
                "position_ids": pos.to(dev), "use_cache": True, **cache_arg(lm, cache)}

    def _forward_all(self, calls: list[dict]) -> list[torch.Tensor]:
        """Each call's logits (1, Q, V); one call is a plain forward, several share one weight pass."""
        lm = self.lm
        self.stats.passes += 1
        if len(calls) == 1:
            with torch.inference_mode():
                return [lm(**calls[0]).logits]
        tokens = [c["input_ids"].shape[1] for c in calls]
        context = max(c["attention_mask"].shape[-1] for c in calls)
        lm.fit_job(JobShape(batch=len(calls), tokens=max(tokens), context=context, logits_rows=max(tokens),
                            in_flight=len(calls), threads=True))
        jobs = [Job(lambda c=c: lm.model(**c).logits) for c in calls]
        return Lockstep(lm).run(jobs)

    def take(self, cache, pending: list[int], tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """From the target's `logits` (1, Q, V) of the forward `verify_call` made: the new tokens and
        the accepted nodes; `cache` keeps the prefix, the pending tokens and the accepted nodes."""
        logits = logits[0, len(pending) - 1:].float().cpu()  # (1 + N, V): after the root, after each node
        past = cache.get_seq_length() - len(pending) - len(tree)
        self.stats.tree_tokens += len(tree)
        new, path = self.walk(tree, logits)
        self.stats.accepted += len(path)
        keep = list(range(past + len(pending))) + [past + len(pending) + j for j in path]
        keep_columns(cache, torch.tensor(keep, device=self.lm.device))
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
                  generator: torch.Generator | None = None, stopping_criteria=None, attention_mask=None,
                  pad_token_id: int | None = None, **unused) -> torch.Tensor:
    """`LayeredModel.generate(input_ids, draft=..., tree_budget=...)`: the prompts and their new tokens
    (B, L + new), as transformers' generate returns them (a row that ends early is padded with
    `pad_token_id`). `draft` is a model or a folder (a checkpoint or a converted folder, loaded whole
    on the target's device); `tree_budget` the tree nodes per pass and sequence, or "auto"
    (runtime.treecost: measured once per model, chosen for the batch's rows). `draft="prompt-lookup"`
    makes the trees from the context's n-gram matches instead (no model). Rows are the tokens where
    `attention_mask` is 1 (padding on either side)."""
    from .batch import eos_ids, pad_id

    if unused.get("min_new_tokens"):
        raise UsageError("min_new_tokens is not supported with a draft; drop it or generate without --draft")
    rows = input_ids.shape[0]
    if streamer is not None and rows != 1:
        raise UsageError(f"a streamer takes one sequence, not {rows}; stream one prompt at a time")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]
    draft = open_draft(lm, draft)
    budget = resolve_budget(lm, draft, tree_budget, rows=rows)
    sampling = Sampling(max_tokens=max(1, max_new_tokens), temperature=temperature if do_sample else 0.0,
                        top_p=top_p or 1.0)
    spec = TreeSpeculator(lm, draft, budget=budget, sampling=sampling, generator=generator, eos=eos_ids(lm))
    if streamer is not None:
        streamer.put(input_ids.cpu())
    so_far: list[list[int]] = [[] for _ in prompts]

    def on_tokens(k: int, new: list[int]) -> bool:
        so_far[k] += new
        if streamer is not None:
            streamer.put(torch.tensor(new))
        ids = torch.tensor([prompts[k] + so_far[k]])
        return any(bool(stop(ids, None)) for stop in stopping_criteria or ())

    outs = spec.generate_many(prompts, max_new_tokens, on_tokens)
    if streamer is not None:
        streamer.end()
    lm.speculation = {**spec.stats.as_dict(), "tree_budget": budget}
    pad = pad_id(lm) if pad_token_id is None else pad_token_id
    width = max(map(len, outs))
    tail = torch.tensor([out + [pad] * (width - len(out)) for out in outs], dtype=input_ids.dtype)
    return torch.cat([input_ids.cpu(), tail.view(rows, width)], dim=1).to(input_ids.device)


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


def resolve_budget(lm, draft, tree_budget, *, rows: int = 1) -> int:
    """`tree_budget` as given, or for "auto" the best budget per sequence for measured costs (measured
    at first use) when `rows` sequences share each pass."""
    if tree_budget != "auto":
        if not isinstance(tree_budget, int) or tree_budget < 1:
            raise UsageError(f"tree budget must be a number of tokens (1 or more) or 'auto', not {tree_budget!r}")
        return tree_budget
    from .treecost import measure_costs

    if getattr(lm, "tree_costs", None) is None or lm.tree_costs[0] is not draft:
        lm.tree_costs = (draft, measure_costs(lm, draft))
    return lm.tree_costs[1].best_budget(rows)
