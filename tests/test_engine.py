"""The serving engine: sequences that join and leave a running batch get the tokens they get
alone; sampling is per sequence; stop strings cut the text, also while it streams."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import ARCHS
from runtime import LayeredModel
from runtime.batch import generate_batch, prompt_ids
from runtime.engine import Engine
from runtime.sampling import Sampling, TextTail, pick_token

PROMPTS = ["w5 w6 w7", "w20 w21 w22 w23 w24 w25 w26 w27 w28", "w40", "w100 w101 w102 w100 w7 w9"]
MAX_TOKENS = [14, 6, 20, 9]  # different, so rows leave the batch at different passes


class Collector:
    """deliver() callbacks for several sequences; wait() until all finished."""

    def __init__(self, n: int):
        self.texts, self.events, self.done = [""] * n, [None] * n, threading.Event()
        self.first = [threading.Event() for _ in range(n)]

    def deliver(self, i: int):
        def on_event(ev):
            self.texts[i] += ev.text
            self.first[i].set()
            if ev.finish_reason is not None:
                self.events[i] = ev
                if all(e is not None for e in self.events):
                    self.done.set()
        return on_event

    def wait(self, timeout: float = 120) -> None:
        assert self.done.wait(timeout), "the engine did not finish every sequence"


def open_model(folder) -> LayeredModel:
    return LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory=0)


def alone_tokens(lm, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy generate for one unpadded prompt: the tokens a sequence gets alone."""
    out = lm.generate(input_ids=torch.tensor([ids], device=lm.device), do_sample=False, max_new_tokens=max_tokens,
                      pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_rows_get_alone_tokens(lm) -> None:
    prompts = [[5, 6, 7], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40], [100, 101, 102, 100, 7, 9]]
    alone = [alone_tokens(lm, ids, m) for ids, m in zip(prompts, MAX_TOKENS)]
    engine, got = Engine(lm, max_batch=8), Collector(len(prompts))
    try:
        seqs = []
        for i, (ids, m) in enumerate(zip(prompts, MAX_TOKENS)):
            if i == 2:  # the later two join a batch that has decoded already (a longer cache than theirs)
                assert got.first[0].wait(60) and got.first[1].wait(60)
            seqs.append(engine.submit(ids, Sampling(m, temperature=0), got.deliver(i)))
        got.wait()
    finally:
        engine.close()
    for i, ref in enumerate(alone):
        assert seqs[i].tokens == ref, i
        assert got.events[i].finish_reason == ("length" if len(ref) == MAX_TOKENS[i] else "stop")
        assert got.events[i].completion_tokens == len(ref)
    assert engine.active == 0 and engine.counters.generated_tokens == sum(map(len, alone))


@pytest.mark.parametrize("arch", ARCHS)
def test_joining_and_leaving_rows_get_their_alone_tokens(tiny_converted, arch):
    assert_rows_get_alone_tokens(open_model(tiny_converted[arch]))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_joining_and_leaving_rows_on_cuda(tiny_converted, arch):
    lm = LayeredModel.from_pretrained(tiny_converted[arch], device="cuda", dtype="float32", max_gpu_memory=0,
                                      max_cpu_memory=0)
    assert_rows_get_alone_tokens(lm)
    assert lm.stats.passes > 0 and lm.stats.bytes_streamed > 0


def test_streamed_text_is_the_alone_text(tiny_converted):
    lm = open_model(tiny_converted["llama"])
    alone = [generate_batch(lm, [p], do_sample=False, max_new_tokens=m)[0] for p, m in zip(PROMPTS, MAX_TOKENS)]
    engine, got = Engine(lm, max_batch=2), Collector(len(PROMPTS))  # two at a time: the others wait their turn
    try:
        for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS)):
            engine.submit(prompt_ids(lm.tokenizer, p, chat=False), Sampling(m, temperature=0), got.deliver(i))
        got.wait()
    finally:
        engine.close()
    assert got.texts == [g.text for g in alone]
    assert [e.completion_tokens for e in got.events] == [len(g.tokens) for g in alone]


def test_seeded_sampling_does_not_depend_on_company(tiny_converted):
    lm = open_model(tiny_converted["llama"])
    ids = prompt_ids(lm.tokenizer, PROMPTS[0], chat=False)
    engine = Engine(lm, max_batch=8)
    try:
        alone = Collector(1)
        engine.submit(ids, Sampling(12, temperature=0.9, seed=7), alone.deliver(0))
        alone.wait()
        crowd = Collector(3)
        for i, seed in enumerate([7, 8, 7]):
            engine.submit(ids, Sampling(12, temperature=0.9, seed=seed), crowd.deliver(i))
        crowd.wait()
    finally:
        engine.close()
    assert crowd.texts[0] == crowd.texts[2] == alone.texts[0]
    assert crowd.texts[1] != crowd.texts[0]  # another seed draws otherwise (a random tiny model is near uniform)


def test_pick_token():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert pick_token(logits, Sampling(1, temperature=0), None) == 1
    # a nucleus this small holds the most likely token only, whatever the draw
    g = torch.Generator().manual_seed(0)
    assert {pick_token(logits, Sampling(1, temperature=2.0, top_p=1e-6), g) for _ in range(20)} == {1}
    draws = {pick_token(logits, Sampling(1, temperature=2.0), g) for _ in range(200)}
    assert draws == {0, 1, 2, 3}


def test_text_tail_holds_back_what_may_become_a_stop_string(tiny_converted):
    tok = LayeredModel.from_pretrained(tiny_converted["llama"], device="cpu", max_cpu_memory=0).tokenizer
    tail = TextTail(tok, stop=("w6 w9",))
    assert [tail.add(t) for t in (5, 6, 7)] == ["w5", " ", "w6 w7"]  # "w6" waits: it may start "w6 w9"
    tail = TextTail(tok, stop=("w7", "w9"))
    pieces = [tail.add(t) for t in (5, 6, 7)]
    assert tail.stopped and "".join(pieces) == "w5 w6 " and tail.text == "w5 w6 "


def test_stop_string_ends_the_sequence(tiny_converted):
    lm = open_model(tiny_converted["llama"])
    ids = prompt_ids(lm.tokenizer, PROMPTS[0], chat=False)
    [ref] = generate_batch(lm, [PROMPTS[0]], do_sample=False, max_new_tokens=10)
    words = ref.text.split()
    assert len(words) > 4
    stop = words[3]  # the text ends before the first occurrence of this word
    engine, got = Engine(lm), Collector(1)
    try:
        engine.submit(ids, Sampling(10, temperature=0, stop=(stop,)), got.deliver(0))
        got.wait()
    finally:
        engine.close()
    assert got.texts[0] == ref.text[:ref.text.index(stop)]
    assert got.events[0].finish_reason == "stop"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=-2), dict(max_tokens=4, temperature=-1),
                                 dict(max_tokens=4, top_p=0), dict(max_tokens=4, stop=("",))])
def test_bad_sampling_is_refused(bad):
    from reshard.errors import UsageError

    with pytest.raises(UsageError):
        Sampling(**bad)


def test_admission_keeps_the_batch_within_the_memory_budget(tiny_converted):
    """With a (GPU-like) budget that holds two rows' activations and KV cache but not three, four
    requests run two at a time (the others wait for rows to leave) and get their alone tokens."""
    from runtime.budget import Budget, stream_reserve
    from runtime.engine import job_shape

    lm = open_model(tiny_converted["llama"])
    prompts = [[5, 6, 7, 8], [20, 21, 22, 23], [40, 41, 42, 43], [100, 101, 102, 103]]
    alone = [alone_tokens(lm, ids, 10) for ids in prompts]
    fake = [type("S", (), {"prompt": ids, "sampling": Sampling(10, temperature=0)})() for ids in prompts]  # shapes only
    need = {n: stream_reserve(lm.costs, lm.memory) + lm.job_bytes(job_shape(fake[:n], new=fake[:n])) for n in (2, 3)}
    assert need[2] < need[3]
    lm.memory = Budget(cuda=True, capacity=need[2], host=0, prefetch=lm.depth, limit_from_user=True)
    rows = []
    lm.model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    engine, got = Engine(lm, max_batch=4), Collector(len(prompts))
    try:
        seqs = [engine.submit(ids, Sampling(10, temperature=0), got.deliver(i)) for i, ids in enumerate(prompts)]
        got.wait()
    finally:
        engine.close()
    assert [s.tokens for s in seqs] == alone
    assert max(rows) == 2 and rows.count(2) >= 9  # two rows decode together; never three


def test_a_request_that_does_not_fit_even_alone_fails_with_the_budget_error(tiny_converted):
    """Its sequence ends with finish_reason "error" and the budget's one line; the engine serves on."""
    from runtime.budget import Budget

    lm = open_model(tiny_converted["llama"])
    real = lm.memory
    lm.memory = Budget(cuda=True, capacity=1 << 20, host=0, prefetch=lm.depth, limit_from_user=True)
    engine = Engine(lm, max_batch=2)
    try:
        failed = Collector(1)
        engine.submit([5, 6, 7], Sampling(4, temperature=0), failed.deliver(0))
        failed.wait()
        lm.memory = real
        served = Collector(1)
        seq = engine.submit([5, 6, 7], Sampling(4, temperature=0), served.deliver(0))
        served.wait()
    finally:
        engine.close()
    event = failed.events[0]
    assert event.finish_reason == "error" and "\n" not in event.error
    assert event.error.startswith("MemoryBudgetError: streaming this model with a batch of 1 x 3 tokens")
    assert "use --max-gpu-memory" in event.error
    assert served.events[0].finish_reason == "length" and seq.tokens == alone_tokens(lm, [5, 6, 7], 4)
