"""Multi-turn chat with a converted model: the conversation, and the loop that reads turns.

`Chat` keeps the messages and answers each user turn by generating from the whole conversation
put through the tokenizer's chat template (one prefill pass, then one pass per token), so an
answer is exactly what `generate` gives on that templated conversation. `run_chat` reads turns
(a prompt when stdin is a terminal, else one turn per line), streams each answer to `out`,
and understands `/reset` and `/exit`. Ctrl-C during an answer stops it after the current token
and keeps the chat going; a second Ctrl-C before it stops interrupts for good.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from reshard.errors import UsageError

from .batch import chat_ids

PROMPT = ">>> "
HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


class StopFlag(StoppingCriteria):
    """Stops generation (after the token being made) once `set` is true; Ctrl-C sets it."""

    def __init__(self):
        self.set = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.set, dtype=torch.bool, device=input_ids.device)


class Printer(TextStreamer):
    """Writes the answer's text to `out` as tokens arrive (whole words: transformers' TextStreamer)."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="", file=self.out, flush=True)


class Chat:
    """The messages of one conversation with `model`, and how to answer the next turn."""

    def __init__(self, model, *, system: str | None = None, generate_options: dict | None = None,
                 stats: bool = False):
        tokenizer = model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UsageError("this folder's tokenizer has no chat template; `runtime chat` needs one "
                             "(use `runtime generate` for plain text)")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.options = generate_options or {}
        self.stats = stats  # --stats: each answer's tree speculation figures on stderr
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, text: str) -> torch.Tensor:
        """Token ids of the conversation so far plus the user turn `text`, ready for the answer."""
        return torch.tensor([chat_ids(self.tokenizer, self.messages + [{"role": "user", "content": text}])])

    def ask(self, text: str, *, streamer=None, stop: StopFlag | None = None) -> str:
        """Answer the user turn `text` (streamed to `streamer`); both join the conversation."""
        ids = self.prompt_ids(text)
        check_length(self.model, ids.shape[1] + self.options.get("max_new_tokens", 0))
        gc = self.model.generation_config
        out = self.model.generate(ids.to(self.model.device), attention_mask=torch.ones_like(ids).to(self.model.device),
                                  streamer=streamer, stopping_criteria=StoppingCriteriaList([stop] if stop else []),
                                  pad_token_id=gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id,
                                  **self.options)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if self.stats and "draft" in self.options:  # tokens per pass, tree size, acceptance of this answer
            print(json.dumps({"speculation": self.model.speculation}), file=sys.stderr, flush=True)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def check_length(model, length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and length > limit:
        raise UsageError(f"the conversation plus --max-new-tokens is {length} tokens, more than the model's "
                         f"context of {limit}; /reset to start again or lower --max-new-tokens")


@contextmanager
def ctrl_c_stops(flag: StopFlag):
    """While inside: the first Ctrl-C sets `flag`, a second one raises KeyboardInterrupt."""
    def handle(signum, frame):
        if flag.set:
            raise KeyboardInterrupt
        flag.set = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def read_turn(interactive: bool, stdin) -> str | None:
    """The next user turn, or None at the end of input. A Ctrl-C at the prompt gives a new prompt."""
    while True:
        try:
            line = input(PROMPT) if interactive else stdin.readline()
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr)
            continue
        if not interactive and line == "":
            return None
        return line.rstrip("\n")


def run_chat(chat: Chat, *, stdin=None, out=None, interactive: bool | None = None) -> int:
    """Read turns until /exit or the end of input, answering each; the number of answers."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty() if interactive is None else interactive
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chat: {HELP}", file=sys.stderr)
    answers = 0
    while (text := read_turn(interactive, stdin)) is not None:
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            chat.reset()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not command:
            continue
        answer_turn(chat, text, out)
        answers += 1
    return answers


def answer_turn(chat: Chat, text: str, out) -> None:
    try:
        with ctrl_c_stops(StopFlag()) as stop:
            chat.ask(text, streamer=Printer(chat.tokenizer, out), stop=stop)
    except UsageError as e:
        print(f"Error: {e}", file=sys.stderr)
        return
    print(" [stopped]" if stop.set else "", file=out, flush=True)
