"""Per-sequence choices for served requests: the next token, and the text so far.

`Sampling` holds one request's options. `pick_token` chooses a token from one row of logits:
greedy (argmax, as transformers' greedy search) at temperature 0, else softmax at the
temperature, cut to the top-p nucleus, drawn with the sequence's own `torch.Generator` (so a
seed gives the same draw whatever else shares the batch). `TextTail` turns the growing token
list into text increments, holding back what may still become a stop string or an incomplete
character, and reports where a stop string ends the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reshard.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # new tokens at most (an end-of-sequence token counts)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # seeds this sequence's generator; None draws a random seed
    stop: tuple[str, ...] = ()  # the text ends before the first of these

    def __post_init__(self):
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be 1 or more, not {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise UsageError(f"temperature must be between 0 and 2, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be above 0 and at most 1, not {self.top_p}")
        if any(not s for s in self.stop):
            raise UsageError("stop strings must not be empty")

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (V,)."""
    logits = logits.float()
    if sampling.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(token_probs(logits, sampling), 1, generator=generator))


def token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution (V,) a sampled token is drawn from: softmax at the temperature, cut to top-p."""
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs = _nucleus(probs, sampling.top_p)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with all but the smallest most-likely set reaching `top_p` zeroed (never empty)."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above each one
    sorted_p[before >= top_p] = 0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


class TextTail:
    """The decoded text of a growing token list, handed out in increments."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # the text so far, cut before a stop string once one appeared
        self.sent = 0  # characters of `text` handed out
        self.stopped = False  # a stop string appeared

    def add(self, token: int) -> str:
        """Take one more token; return the new text that is safe to hand out."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        safe = len(self.text) - self._held_back()
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:safe], safe
        return piece

    def flush(self) -> str:
        """Everything not handed out yet (at the end of the sequence)."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def _stop_at(self) -> int | None:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end that must wait: a partial character, or a prefix of a stop string."""
        if self.text.endswith("\ufffd"):  # the tokens so far end inside a multi-byte character
            return len(self.text) - len(self.text.rstrip("\ufffd"))
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0
