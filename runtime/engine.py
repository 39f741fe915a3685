"""`Engine`: continuous batching over one `LayeredModel`, for a server's many requests.

A streamed model costs one read of its weights per forward pass, whatever the pass carries,
so one scheduler thread owns the model and makes every pass serve every waiting request:

    loop:  admit waiting requests (up to `max_batch` running)  ->  one prefill pass for them
           ->  one decode pass for every running sequence  ->  finished ones leave

A request is admitted only while the batch it would join fits the model's memory budget
(`LayeredModel.fits`: the rows' activations and their KV cache at its longest, next to the
weights; resident groups make room first): one that does not waits for rows to leave, and
one that does not fit even alone fails with the budget's one-line error.

Rows decode together in one left-padded KV cache (runtime.kvcache); each row keeps its own
positions and attends only to its own tokens, so a greedy sequence gets the tokens it gets
alone. Sampling is per sequence (runtime.sampling). Callers `submit` token ids with a
`deliver` callback, which the scheduler thread calls with each `Event`; `cancel` frees a slot
at the next pass boundary. The queue of requests not yet admitted is bounded: past
`max_queue`, `submit` raises `QueueFullError`. With `solo` (runtime/solo.py), a sequence that
runs alone decodes with tree speculation, several tokens a pass, until another one joins.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from reshard.errors import ReshardError, UsageError

from .allowance import JobShape
from .batch import eos_ids, pad_id
from .kvcache import BatchCache
from .sampling import Sampling, TextTail, pick_token
from .score import cache_arg, last_logits_only, pad_batch


class QueueFullError(ReshardError):
    """Every slot is busy and the queue of waiting requests is full."""


class ContextLengthError(UsageError):
    """A prompt plus its new tokens would pass the model's context length."""


@dataclass
class Event:
    """What the scheduler tells a request: new text, and at the end why it finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of sequence or stop string), "length", or "error"
    error: str | None = None  # with finish_reason "error": what went wrong
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """One request's tokens and state while it waits or runs."""

    id: int
    prompt: list[int]
    sampling: Sampling
    deliver: Callable[[Event], None]
    tail: TextTail
    generator: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)
    solo: tuple | None = None  # (TreeSpeculator, Place) while it decodes alone with speculation


@dataclass
class Counters:
    requests: int = 0  # requests admitted to the queue
    rejected: int = 0  # requests turned away because the queue was full
    prompt_tokens: int = 0  # prompt tokens prefilled
    generated_tokens: int = 0  # tokens generated, all sequences
    finished: int = 0  # sequences that finished (any reason, cancellations included)


class Engine:
    """One scheduler thread running `lm` for every submitted sequence; see the module docstring."""

    def __init__(self, lm, *, max_batch: int = 8, max_queue: int = 64, solo=None):
        if lm.tokenizer is None:
            raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
        if max_batch < 1 or max_queue < 0:
            raise UsageError(f"max_batch must be 1 or more and max_queue 0 or more, not {max_batch} and {max_queue}")
        self.lm, self.max_batch, self.max_queue = lm, max_batch, max_queue
        self.solo = solo  # a runtime.solo.SoloSpeculation: a sequence running alone decodes with trees
        self.context = getattr(lm.config, "max_position_embeddings", None)
        self.counters = Counters()
        # Fast tokenizers may not encode and decode at once from two threads; callers encode under it.
        self.tokenizer_lock = threading.Lock()
        self._eos, self._pad = set(eos_ids(lm)), pad_id(lm)
        self._ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []  # in the order of self._batch's rows
        self._batch = self._empty_batch()
        self._cond = threading.Condition()
        self._closing = False
        self._admitted = 0  # sequences taken from the queue whose prefill has not joined the batch yet
        self._thread = threading.Thread(target=self._loop, name="runtime-engine", daemon=True)
        self._thread.start()

    # --- what callers use ------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, deliver: Callable[[Event], None]) -> Sequence:
        """Queue a sequence; `deliver` is called on the scheduler thread with each Event."""
        self.check_length(len(prompt), sampling.max_tokens)
        seq = Sequence(next(self._ids), list(prompt), sampling, deliver, TextTail(self.lm.tokenizer, sampling.stop),
                       sampling.generator())
        with self._cond:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self._free_slots() + self.max_queue:  # would wait past the next pass
                self.counters.rejected += 1
                raise QueueFullError(f"all {self.max_batch} slots are busy and {len(self._waiting)} requests wait "
                                     f"already; retry later")
            self._waiting.append(seq)
            self.counters.requests += 1
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` (its client left): it leaves the queue or the batch at the next pass boundary."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if not prompt_tokens:
            raise UsageError("the prompt is empty")
        if self.context and prompt_tokens + max_tokens > self.context:
            raise ContextLengthError(
                f"this model's context is {self.context} tokens, but the prompt has {prompt_tokens} and max_tokens "
                f"asks for {max_tokens} more; shorten the prompt or lower max_tokens")

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """What is left of the context after the prompt (at least 1)."""
        return max(1, (self.context or prompt_tokens + 256) - prompt_tokens)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop the scheduler; every waiting or running request ends with an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        for seq in [*self._waiting, *self._active]:
            self._finish(seq, "error", "the server is shutting down")
        self._waiting.clear()
        self._active.clear()

    # --- the scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._active or self._closing):
                        self._cond.wait()
                    if self._closing:
                        return
                    new = self._admit()
                self._step(new)
                self._admitted = 0  # (also when the prefill failed)

    def _step(self, new: list[Sequence]) -> None:
        try:
            if new:
                self._rejoin()
                self._prefill(new)
            self._drop_finished()
            if self._active and self.solo is not None and len(self._active) == 1:
                self._speculate()
                self._drop_finished()
            elif self._active:
                self._decode()
                self._drop_finished()
        except Exception as e:  # a failed pass fails its sequences, not the server
            message = f"{type(e).__name__}: {e}"
            for seq in [*self._active, *(s for s in new if s not in self._active)]:
                self._finish(seq, "error", message)
            self._active, self._batch = [], self._empty_batch()

    def _free_slots(self) -> int:
        return self.max_batch - len(self._active) - self._admitted

    def _admit(self) -> list[Sequence]:
        new = []
        while self._waiting and self._free_slots() > 0:
            seq = self._waiting[0]
            if seq.cancelled:
                self._finish(self._waiting.popleft(), "cancelled")
                continue
            crowd = [*self._active, *new]
            if crowd and not self.lm.fits(job_shape([*crowd, seq], new=[*new, seq])):
                break  # it waits until rows leave; alone, it runs (or fails with the budget's error)
            new.append(self._waiting.popleft())
            self._admitted += 1
        return new

    def _prefill(self, new: list[Sequence]) -> None:
        """One pass over the new prompts (left-padded together); they join the running batch."""
        from transformers import DynamicCache

        self.lm.fit_job(job_shape([*self._active, *new], new=new))  # resident groups make room if need be
        ids, mask = pad_batch([s.prompt for s in new], self._pad, left=True)
        dev = self.lm.device
        ids, mask = ids.to(dev), mask.to(dev)
        batch = BatchCache(DynamicCache(config=self.lm.config), mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, batch.cache)
        self.counters.prompt_tokens += sum(len(s.prompt) for s in new)
        self._batch.extend(batch)
        self._active.extend(new)
        self._admitted = 0
        self._advance(new, logits)

    def _decode(self) -> None:
        """One pass: the newest token of every running sequence."""
        ids = torch.tensor([[s.tokens[-1]] for s in self._active], device=self.lm.device)
        positions = self._batch.next_positions()
        logits = self._forward(ids, self._batch.grow_mask(), positions, self._batch.cache)
        self._advance(self._active, logits)

    def _speculate(self) -> None:
        """One pass checking a tree for the one running sequence (runtime/solo.py)."""
        seq = self._active[0]
        if seq.solo is None:
            seq.solo = self.solo.enter(self._batch, seq.sampling, seq.generator, seq.prompt + seq.tokens)
            self._batch = self._empty_batch()
        spec, place = seq.solo
        for token in spec.step(place, seq.sampling.max_tokens - len(seq.tokens)):
            spec.stats.new_tokens += 1
            if seq.cancelled or self._take(seq, token):
                break

    def _rejoin(self) -> None:
        """A sequence decoding alone goes back into the batch (others are about to join it)."""
        for seq in self._active:
            if seq.solo is not None:
                self._batch, seq.solo = self.solo.leave(seq.solo[1]), None

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **cache_arg(self.lm, cache), **last_logits_only(self.lm))
        return out.logits[:, -1].float().cpu()  # (B, V)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence takes its next token from its row of `logits`, and hears about it."""
        for seq, row in zip(seqs, logits):
            if not seq.cancelled:
                self._take(seq, pick_token(row, seq.sampling, seq.generator))

    def _take(self, seq: Sequence, token: int) -> bool:
        """`seq` takes its next token and hears about it; True when that finished it."""
        seq.tokens.append(token)
        self.counters.generated_tokens += 1
        with self.tokenizer_lock:
            text = seq.tail.add(token)
        if token in self._eos or seq.tail.stopped:
            self._finish(seq, "stop", text=text)
        elif len(seq.tokens) >= seq.sampling.max_tokens:
            self._finish(seq, "length", text=text)
        elif text:
            self._send(seq, Event(text=text))
        return seq.finish_reason is not None

    def _drop_finished(self) -> None:
        keep = [r for r, s in enumerate(self._active) if s.finish_reason is None and not s.cancelled]
        for s in self._active:
            if s.cancelled and s.finish_reason is None:
                self._finish(s, "cancelled")
        if len(keep) < len(self._active):
            self._batch.keep(keep)
            self._active = [self._active[r] for r in keep]

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, *, text: str = "") -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        self.counters.finished += 1
        if reason != "cancelled":
            text += seq.tail.flush()
            self._send(seq, Event(text=text, finish_reason=reason, error=error, prompt_tokens=len(seq.prompt),
                                  completion_tokens=len(seq.tokens)))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.deliver(event)
        except Exception:  # the listener is gone (its event loop closed): treat as a cancellation
            seq.cancelled = True

    def _empty_batch(self) -> BatchCache:
        from transformers import DynamicCache

        empty_mask = torch.zeros(0, 0, dtype=torch.long, device=self.lm.device)
        return BatchCache(DynamicCache(config=self.lm.config), empty_mask)


def job_shape(rows: list[Sequence], *, new: list[Sequence]) -> JobShape:
    """The memory shape of a batch of `rows` of which `new` are prefilled in this pass: every row's
    KV cache at its longest (prompt plus new tokens; the shorter rows are padded to the longest),
    the prefill's tokens, one row of logits each."""
    return JobShape(batch=len(rows), tokens=max(len(s.prompt) for s in new),
                    context=max(len(s.prompt) + s.sampling.max_tokens for s in rows), logits_rows=1)
