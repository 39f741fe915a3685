"""Scoring in one weight pass: log-probabilities of choices given a prompt, and of texts.

Input items are dicts, as JSONL lines:
- `{"prompt": str, "choices": [str, ...]}` gets `"scores"` (per choice, the summed log-probability
  of the choice's tokens given the prompt) and `"best"` (index of the highest score). Tokens
  are split as lm-evaluation-harness splits them: trailing spaces of the prompt move to the
  choice, prompt+choice and prompt are encoded separately (no special tokens), and the
  choice's tokens are those of prompt+choice after the prompt's own.
- `{"text": str}` gets `"logprob"` (summed over every token after the first) and `"tokens"`
  (how many tokens that sum covers).
Other keys pass through.

Items are cut into micro-batches of `batch_size` items, and every micro-batch is a few
ordinary transformers forwards run together by `Lockstep`: each layer group is read once
for all of them. A micro-batch of questions is two forwards: the prompts (left-padded, each
computed once), then all their choices (right-padded) on top of the prompts' KV cache, which
is handed over layer by layer as the choices' forward enters each layer. A layer's KV is
dropped once every forward has passed it, so memory holds activations, not whole caches.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch

from reshard.errors import UsageError

from .allowance import JobShape
from .lockstep import Job, Lockstep


def score(lm, items: list[dict], *, batch_size: int = 8, progress: bool = False,
          offload: bool = False) -> list[dict]:
    """Score `items` (see the module docstring) with the LayeredModel `lm`; new dicts, same order.

    `offload` keeps the activations of micro-batches waiting for their turn at a layer in host
    memory, for inputs whose activations do not all fit on the device at once."""
    if batch_size < 1:
        raise UsageError(f"batch size must be 1 or more, not {batch_size}")
    if not items:
        return []
    tok = _tokenizer(lm)
    encoded = [encode_item(tok, item, n) for n, item in enumerate(items)]
    results = score_encoded(lm, encoded, batch_size=batch_size, progress=progress, offload=offload)
    return _assemble(items, encoded, results)


def score_encoded(lm, encoded: list["Encoded"], *, batch_size: int = 8, progress: bool = False,
                  offload: bool = False) -> list[list[tuple[float, bool]]]:
    """The core of `score`, on tokens: per Encoded, per continuation, (summed log-probability,
    whether each of its tokens is the model's greedy pick). All items share one weight pass."""
    _check_lengths(lm, encoded)
    batch_size, offload, per_pass = _fit(lm, encoded, batch_size, offload)
    passes = _chunks(encoded, per_pass)
    results = []
    for k, part in enumerate(passes):
        label = f"layers, pass {k + 1} of {len(passes)}" if len(passes) > 1 else "layers"
        results += _one_pass(lm, part, batch_size, offload, progress and label)
    return results


def _one_pass(lm, encoded: list["Encoded"], batch_size: int, offload: bool, progress) -> list:
    """`score_encoded` for items whose forwards all run through one read of the weights."""
    pad = _pad_id(_tokenizer(lm))
    questions = [n for n, e in enumerate(encoded) if e.context is not None]
    texts = [n for n, e in enumerate(encoded) if e.context is None]
    layer_of = _layer_of(lm)
    prompts = [_Prompts(lm, [encoded[n] for n in chunk], pad, layer_of) for chunk in _chunks(questions, batch_size)]
    choices = [_Choices(lm, p, pad) for p in prompts]
    text_jobs = [_Texts(lm, [encoded[n] for n in chunk], pad) for chunk in _chunks(texts, batch_size)]
    parts = _run(lm, prompts + choices + text_jobs, progress, offload)
    return _collect(encoded, questions, texts, parts, len(prompts), batch_size)


class Encoded:
    """One item's tokens: `context` is None for a text item; `continuations` one list per choice."""

    def __init__(self, context: list[int] | None, continuations: list[list[int]]):
        self.context, self.continuations = context, continuations


def encode_item(tok, item: dict, n: int) -> Encoded:
    """Tokens of item number `n` (0-based), checked; see the module docstring for the split."""
    if not isinstance(item, dict):
        raise UsageError(f"item {n + 1} is not a JSON object")
    if "text" in item and "prompt" not in item:
        if not isinstance(item["text"], str):
            raise UsageError(f"item {n + 1}: \"text\" must be a string")
        return Encoded(None, [tok(item["text"], add_special_tokens=False)["input_ids"]])
    prompt, choices = item.get("prompt"), item.get("choices")
    if not isinstance(prompt, str) or not isinstance(choices, list) or not choices \
            or not all(isinstance(c, str) for c in choices):
        raise UsageError(f"item {n + 1} needs \"prompt\" (a string) and \"choices\" (a list of strings), "
                         f"or \"text\" (a string)")
    pairs = [encode_pair(tok, prompt, c) for c in choices]
    return Encoded(pairs[0][0], [cont for _, cont in pairs])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness's `_encode_pair` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    if not ctx:  # an empty prompt: condition on lm-eval's prefix token (BOS, else EOS)
        ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return ctx, whole
    return ctx, whole[len(ctx):]


# --- the forwards ------------------------------------------------------------------------

class _Prompts:
    """The prompts of a micro-batch of questions, left-padded; their KV cache feeds `_Choices`."""

    def __init__(self, lm, items: list[Encoded], pad: int, layer_of: dict[int, int]):
        from transformers import DynamicCache

        self.lm, self.layer_of, self.items = lm, layer_of, items
        self.ids, self.mask = pad_batch([e.context for e in items], pad, left=True)
        self.lengths = self.mask.sum(-1)
        self.firsts = [sorted({c[0] for c in e.continuations if c}) for e in items]
        self.cache = DynamicCache(config=lm.config)

    def job(self) -> Job:
        return Job(self.run)

    def run(self) -> list[tuple[dict[int, float], int]]:
        """Per prompt: log-probability of each choice's first token after the prompt, and the greedy token."""
        ids, mask = self.ids.to(self.lm.device), self.mask.to(self.lm.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **cache_arg(self.lm, self.cache), **last_logits_only(self.lm))
        logprobs = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
        greedy = logprobs.argmax(-1).tolist()
        return [({t: logprobs[b, t].item() for t in firsts}, greedy[b]) for b, firsts in enumerate(self.firsts)]


class _Choices:
    """Every choice of a micro-batch's questions, right-padded, continuing its prompt's KV cache."""

    def __init__(self, lm, prompts: _Prompts, pad: int):
        from transformers import DynamicCache

        self.lm, self.prompts = lm, prompts
        rows = [(b, c) for b, e in enumerate(prompts.items) for c in e.continuations if c]
        self.owner = torch.tensor([b for b, _ in rows], dtype=torch.long)
        self.ids, cont_mask = pad_batch([c for _, c in rows], pad, left=False)
        self.mask = torch.cat([prompts.mask[self.owner], cont_mask], dim=-1)
        self.positions = prompts.lengths[self.owner, None] + torch.arange(self.ids.shape[1])
        self.cache = DynamicCache(config=lm.config)
        # Stands for the prompts' KV until the real one is handed over layer by layer: the forward
        # reads the cache's lengths (for its masks: one per kind of layer) before any layer runs.
        stand_in = torch.zeros(len(rows), 1, prompts.ids.shape[1], 1, device=lm.device)
        for layer in self.cache.layers:
            layer.update(stand_in, stand_in)

    def job(self) -> Job:
        return Job(self.run, self.before_group)

    def before_group(self, i: int) -> None:
        layer = self.prompts.layer_of.get(i)
        if layer is not None:  # the prompts' forward has run this layer: take its KV, one copy per choice
            self.cache.layers[layer] = _rows_of(self.prompts.cache.layers[layer], self.owner)

    def run(self) -> list[tuple[float, bool]]:
        """Per choice row: summed log-probability of its tokens after the first, and whether all are greedy."""
        if not len(self.owner):
            return []
        dev = self.lm.device
        out = self.lm.model(input_ids=self.ids.to(dev), attention_mask=self.mask.to(dev),
                            position_ids=self.positions.to(dev), use_cache=True, **cache_arg(self.lm, self.cache))
        return _sum_next_token_logprobs(out.logits, self.ids, self.mask[:, -self.ids.shape[1]:])


class _Texts:
    """A micro-batch of texts, right-padded, no cache."""

    def __init__(self, lm, items: list[Encoded], pad: int):
        self.lm = lm
        self.ids, self.mask = pad_batch([e.continuations[0] for e in items], pad, left=False)
        self.cache = None

    def job(self) -> Job:
        return Job(self.run)

    def run(self) -> list[tuple[float, bool]]:
        if self.ids.shape[1] < 2:  # no text has a token after its first
            return [(0.0, True)] * len(self.ids)
        dev = self.lm.device
        out = self.lm.model(input_ids=self.ids.to(dev), attention_mask=self.mask.to(dev), use_cache=False)
        return _sum_next_token_logprobs(out.logits, self.ids, self.mask)


def _run(lm, forwards: list, progress: str | bool, offload: bool) -> list:
    from tqdm.auto import tqdm

    caches = [f.cache for f in forwards if f.cache is not None]
    layer_of = _layer_of(lm)

    def drop(i: int) -> None:  # every forward has passed group i: its KV is no longer needed
        if i in layer_of:
            for cache in caches:
                _drop_kv(cache, layer_of[i])

    with tqdm(total=len(lm.groups), desc=progress or "layers", unit="group", file=sys.stderr,
              disable=not progress) as bar:
        lockstep = Lockstep(lm, on_load=lambda i: bar.update(1), on_release=drop,
                            offload=torch.device("cpu") if offload else None)
        return lockstep.run([f.job() for f in forwards])


def _fit(lm, encoded: list[Encoded], batch_size: int, offload: bool) -> tuple[int, bool, int]:
    """(micro-batch size, offload, items per pass) for a job that fits the device next to the
    weights. In order, while it does not: resident groups make room (LayeredModel.fit_job),
    smaller micro-batches, waiting activations in host memory (all still one read of the
    weights); then several passes, each reading the weights once for as many micro-batches as
    fit. Changes are said once on stderr."""
    size, moved, per_pass = batch_size, offload, len(encoded)
    while size > 1 and not lm.fits(job_shape(encoded, size, offload)):
        size = (size + 1) // 2
    if not offload and not lm.fits(job_shape(encoded, size, False)) and lm.fits(job_shape(encoded, size, True)):
        moved = True
    if not lm.fits(job_shape(encoded, size, moved)):  # no single pass holds every forward
        size, moved, per_pass = _passes(lm, encoded, batch_size, offload)
    how = [f"micro-batches of {size} items instead of {batch_size}"] if size != batch_size else []
    how += ["waiting activations in host memory"] if moved != offload else []
    if per_pass < len(encoded):
        how += [f"{len(_chunks(encoded, per_pass))} reads of the weights ({per_pass} items each) instead of one"]
    shape = job_shape(encoded, size, moved, per_pass)
    if how and lm.fits(shape):  # else fit_job's error says what would
        print(f"runtime: scoring with {' and '.join(how)}, so that the activations fit on the device", file=sys.stderr)
    lm.fit_job(shape)
    return size, moved, per_pass


def _passes(lm, encoded: list[Encoded], batch_size: int, offload: bool) -> tuple[int, bool, int]:
    """(micro-batch size, offload, items per pass) with the fewest passes: the largest micro-batch
    for which one fits a pass, then as many per pass as fit, with activations in host memory
    where that fits more. (1, offload, 1) where nothing fits: fit_job then names the budget."""
    size = batch_size
    while True:
        options = [(_most_per_pass(lm, encoded, size, o), o) for o in ([True] if offload else [False, True])]
        most, moved = max(options, key=lambda option: (option[0], not option[1]))  # a tie: no host copies
        if most or size == 1:
            return size, moved, max(1, most) * size
        size = (size + 1) // 2


def _most_per_pass(lm, encoded: list[Encoded], size: int, offload: bool) -> int:
    """The most micro-batches of `size` items one pass can hold (0 if not even one)."""
    low, high = 0, -(-len(encoded) // size)
    while low < high:  # the largest k that fits: more micro-batches per pass never need less memory
        k = (low + high + 1) // 2
        if lm.fits(job_shape(encoded, size, offload, k * size)):
            low = k
        else:
            high = k - 1
    return low


def job_shape(encoded: list[Encoded], batch_size: int, offload: bool, per_pass: int | None = None) -> JobShape:
    """The shape of scoring `encoded` in micro-batches of `batch_size` items, `per_pass` items per
    read of the weights (default all): a pass's forwards are in flight at once (layers outermost),
    each in a thread of its own, and a choices forward has a row per choice."""
    forwards = max(_forwards(part, batch_size) for part in _chunks(encoded, per_pass or len(encoded)))
    longest = max(len(e.context or []) + max(len(c) for c in e.continuations) for e in encoded)
    rows = batch_size * max(len(e.continuations) for e in encoded)
    return JobShape(batch=rows, tokens=longest, context=longest, logits_rows=longest, in_flight=forwards,
                    whole_cache=False, offload=offload, threads=True)


def _forwards(encoded: list[Encoded], batch_size: int) -> int:
    """Forwards of one pass: two per micro-batch of questions (prompts, then choices), one per micro-batch of texts."""
    questions = sum(e.context is not None for e in encoded)
    return 2 * -(-questions // batch_size) + -(-(len(encoded) - questions) // batch_size)


def _collect(encoded, questions, texts, parts, n_prompt_jobs, batch_size) -> list[list[tuple[float, bool]]]:
    """The jobs' outputs put back per item: per continuation (log-probability, all greedy)."""
    out: list = [None] * len(encoded)
    firsts, rest = parts[:n_prompt_jobs], parts[n_prompt_jobs:2 * n_prompt_jobs]
    for chunk, first, rows in zip(_chunks(questions, batch_size), firsts, rest):
        rows = iter(rows)
        for n, (first_lp, greedy) in zip(chunk, first):
            out[n] = [_join(first_lp[c[0]], greedy == c[0], next(rows)) if c else (0.0, True)
                      for c in encoded[n].continuations]
    for chunk, sums in zip(_chunks(texts, batch_size), parts[2 * n_prompt_jobs:]):
        for n, result in zip(chunk, sums):
            out[n] = [result]
    return out


def _join(first_lp: float, first_greedy: bool, rest: tuple[float, bool]) -> tuple[float, bool]:
    return first_lp + rest[0], first_greedy and rest[1]


def _assemble(items, encoded, results) -> list[dict]:
    out = [dict(item) for item in items]
    for n, (e, result) in enumerate(zip(encoded, results)):
        if e.context is None:
            out[n]["logprob"] = result[0][0]
            out[n]["tokens"] = max(len(e.continuations[0]) - 1, 0)
            continue
        scores = [lp for lp, _ in result]
        out[n]["scores"] = scores
        out[n]["best"] = max(range(len(scores)), key=scores.__getitem__)
    return out


def _check_lengths(lm, encoded: list[Encoded]) -> None:
    limit = getattr(lm.config, "max_position_embeddings", None)
    for n, e in enumerate(encoded):
        length = len(e.context or []) + max(len(c) for c in e.continuations)
        if limit and length > limit:
            raise UsageError(f"item {n + 1} is {length} tokens, more than the model's context of {limit}; "
                             f"shorten it")


# --- helpers -----------------------------------------------------------------------------

def _sum_next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, bool]]:
    """Per row: sum over positions j >= 1 (where mask is 1) of log p(ids[j] | ids[:j]), and
    whether every such ids[j] is the most likely token there (lm-eval's `is_greedy`)."""
    logprobs = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    target = ids[:, 1:, None].to(logits.device)
    picked = logprobs.gather(-1, target).squeeze(-1)  # (B, T-1)
    valid = mask[:, 1:].to(picked.device).bool()
    greedy = (logprobs.argmax(-1) == target.squeeze(-1)) | ~valid  # (B, T-1)
    return list(zip((picked * valid).sum(-1).tolist(), greedy.all(-1).tolist()))


def pad_batch(seqs: list[list[int]], pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(seqs), longest), padded on the left or the right."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        if s:
            ids[r, span], mask[r, span] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def _rows_of(layer, rows: torch.Tensor):
    """A copy of one cache layer holding only batch rows `rows` (repeats allowed). A copy of the
    object, so whatever else the layer type tracks (a sliding window's length seen) comes along."""
    out = copy.copy(layer)
    out.keys, out.values = layer.keys[rows.to(layer.keys.device)], layer.values[rows.to(layer.values.device)]
    return out


def _drop_kv(cache, layer: int) -> None:
    slot = cache.layers[layer]
    if slot.is_initialized:
        slot.keys = slot.values = slot.keys.new_empty(0)


def last_logits_only(lm) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(lm) else {}


def cache_arg(lm, cache) -> dict:
    """transformers 5.2x names the cache argument `cache`; earlier versions `past_key_values`."""
    return {"cache": cache} if "cache" in _forward_params(lm) else {"past_key_values": cache}


def _forward_params(lm):
    return _params_of(type(lm.model))


@functools.lru_cache(maxsize=64)  # a class per opened model (runtime.opening.pin_device): bounded
def _params_of(cls) -> frozenset[str]:
    """The argument names of a model class's forward, read once per class (the engine asks every pass)."""
    import inspect

    return frozenset(inspect.signature(cls.forward).parameters)


def _layer_of(lm) -> dict[int, int]:
    """Group index -> decoder layer index, for the groups that are one layer."""
    return {i: int(g.name.split(".")[1]) for i, g in enumerate(lm.groups) if g.kind == "layer"}


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[k:k + size] for k in range(0, len(seq), size)]


def _tokenizer(lm):
    if lm.tokenizer is None:
        raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
    return lm.tokenizer


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if t is not None:
            return t
    return 0
