"""Degrading instead of failing: a job larger than the plan made room for moves resident groups
off the device, scores in smaller micro-batches or generates fewer prompts at a time, says so
once on stderr, and gives the same results. A budget that says "CUDA" is put on a CPU model
(the planner only sees numbers); the real GPU is in test_budget_cuda.py."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from reshard.errors import MemoryBudgetError
from runtime import LayeredModel, allowance
from runtime.allowance import DEFAULT, JobShape
from runtime.budget import DEVICE, DISK, Budget, device_need, parse_size, stream_reserve
from runtime.score import job_shape

from test_score import ITEMS


def open_tiny(folder, **kwargs):
    model = LayeredModel.from_pretrained(folder, device="cpu", **kwargs)
    model.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model


def test_a_larger_job_demotes_resident_groups(tiny_checkpoints, tiny_converted, capsys):
    folder = tiny_converted["qwen2"]
    big = torch.randint(3, 300, (8, 120), generator=torch.Generator().manual_seed(0))
    big_job = JobShape(batch=8, tokens=120, context=120, logits_rows=120)
    with open_tiny(folder, max_cpu_memory="1GiB") as probe:
        everything = sum(c.held for c in probe.costs)
        capacity = stream_reserve(probe.costs, probe.memory) + probe.job_bytes(big_job)  # room to stream it all
        assert everything + probe.job_bytes(DEFAULT) <= capacity < everything + probe.job_bytes(big_job)
    model = open_tiny(folder, max_cpu_memory=capacity)  # every group fits next to the default job, not the big one
    n = len(model.groups)
    assert model.places == [DEVICE] * n
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"]).eval()
    small = torch.tensor([[5, 9, 17]])
    capsys.readouterr()
    with torch.inference_mode():
        assert torch.equal(model(small).logits, ref(small).logits)
    assert model.places == [DEVICE] * n and capsys.readouterr().err == ""
    with torch.inference_mode():
        want = ref(big).logits
        assert torch.equal(model(big).logits, want)
        assert torch.equal(model(big).logits, want)  # the second time there is nothing left to move
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"runtime: a batch of 8 x 120 tokens .* needs about \S+GiB of device memory "
                                      r"next to the weights; moved \d+ resident groups", err[0]), err
    assert DISK in model.places
    assert device_need(model.costs, model.places, model.memory, model.job_bytes(big_job)) <= capacity
    assert model.stats.resident_bytes["device"] == sum(c.held for c, p in zip(model.costs, model.places) if p == DEVICE)
    assert model.stats.resident_bytes["disk"] == sum(c.stored for c, p in zip(model.costs, model.places) if p == DISK)
    assert model.stats.layer_loads > 0  # the demoted groups stream now
    out = model.generate(small, max_new_tokens=4, do_sample=False)  # and generation still works
    assert torch.equal(out, ref.generate(small, max_new_tokens=4, do_sample=False))
    model.close()


def as_gpu(model, capacity: int) -> None:
    """Give a (streamed) CPU model the strict budget of a GPU of `capacity` bytes."""
    model.memory = Budget(cuda=True, capacity=capacity, host=0, prefetch=model.depth, limit_from_user=True)


def test_scoring_shrinks_micro_batches_to_fit(tiny_converted, capsys, monkeypatch):
    monkeypatch.setattr(allowance, "CUDA_THREAD", 0)  # activations alone decide here (threads: the next test)
    folder = tiny_converted["llama"]
    model = open_tiny(folder, max_cpu_memory=0)
    want = model.score(ITEMS, batch_size=8)
    tok = model.tokenizer
    from runtime.score import encode_item

    encoded = [encode_item(tok, item, n) for n, item in enumerate(ITEMS)]
    reserve = stream_reserve(model.costs, model.memory)
    need = {b: reserve + model.job_bytes(job_shape(encoded, b, False)) for b in (8, 4, 2)}
    assert need[8] > need[4] > need[2]
    as_gpu(model, need[2])
    capsys.readouterr()
    got = model.score(ITEMS, batch_size=8)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["runtime: scoring with micro-batches of 2 items instead of 8, so that the activations fit "
                   "on the device"]
    for g, w in zip(got, want):
        for key in ("scores", "logprob"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-4)
    assert model.stats.layer_loads == 2 * len(model.groups)  # still one read of each layer for all items
    model.close()


def test_scoring_whose_threads_do_not_fit_one_pass_takes_several(tiny_converted, capsys):
    """On CUDA each forward in flight has a thread, and each thread a cuBLAS handle: where one pass
    cannot hold them all, the items are scored in several reads of the weights, as many
    micro-batches per read as fit, with the same results; the handles stay counted afterwards."""
    model = open_tiny(tiny_converted["llama"], max_cpu_memory=0)
    want = model.score(ITEMS, batch_size=2)
    from runtime.score import encode_item

    encoded = [encode_item(model.tokenizer, item, n) for n, item in enumerate(ITEMS)]
    as_gpu(model, 1 << 40)
    reserve = stream_reserve(model.costs, model.memory)
    need = {k: reserve + model.job_bytes(job_shape(encoded, 2, False, 2 * k)) for k in (1, 2, 3, 4)}
    assert need[1] < need[3] < need[4]  # one pass (4 micro-batches) needs the most
    assert need[3] - need[1] >= 2 * allowance.CUDA_THREAD  # two more forwards in flight: two more threads
    as_gpu(model, need[3])
    capsys.readouterr()
    loads = model.stats.layer_loads
    got = model.score(ITEMS, batch_size=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["runtime: scoring with 2 reads of the weights (6 items each) instead of one, so that the "
                   "activations fit on the device"]
    for g, w in zip(got, want):
        for key in ("scores", "logprob", "best"):
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-4)
    assert model.stats.layer_loads - loads == 2 * len(model.groups)  # each pass reads every group once
    threads = job_shape(encoded, 2, False, 6).in_flight
    assert model.cuda_threads == threads == 5  # the first pass: 4 questions (2 micro-batches, 2 forwards each), 2 texts
    small = JobShape(batch=1, tokens=4, context=8)
    assert model.job_bytes(small) >= threads * allowance.CUDA_THREAD  # generating later: the handles are still there
    model.close()


def test_scoring_that_cannot_fit_names_the_budget_that_would(tiny_converted):
    model = open_tiny(tiny_converted["llama"], max_cpu_memory=0)
    as_gpu(model, 1 << 20)
    with pytest.raises(MemoryBudgetError, match=r"use --max-gpu-memory (\S+) or more") as e:
        model.score(ITEMS, batch_size=4)
    named = parse_size(re.search(r"--max-gpu-memory (\S+) or more", str(e.value)).group(1))
    as_gpu(model, named)
    assert len(model.score(ITEMS, batch_size=4)) == len(ITEMS)  # what it named is enough (with one item per batch)
    model.close()


def test_batched_generation_splits_the_prompts_to_fit(tiny_converted, capsys):
    model = open_tiny(tiny_converted["gpt2"], max_cpu_memory=0)
    prompts = ["w5 w6 w7", "w9", "w11 w12 w13 w14 w15", "w20 w21", "w30"]
    want = model.generate_batch(prompts, max_new_tokens=5, do_sample=False)
    shape = JobShape(batch=2, tokens=5, context=10)
    four = dataclasses.replace(shape, batch=4)
    budget_two = stream_reserve(model.costs, model.memory) + model.job_bytes(shape)
    assert model.job_bytes(four) > model.job_bytes(shape)
    as_gpu(model, budget_two)
    capsys.readouterr()
    got = model.generate_batch(prompts, max_new_tokens=5, do_sample=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("runtime: generating for ") and "instead of 5" in err[0]
    rows = int(err[0].split()[3])
    assert 1 <= rows < 5
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert device_need(model.costs, model.places, model.memory, model.job_bytes(shape)) <= budget_two
    model.close()


def test_a_job_that_fits_only_without_read_ahead_turns_it_off(tiny_converted, capsys):
    """Room for the job and one group in flight, not two: the model stops reading ahead, says so
    once, and computes what it computed before; less than that names the least budget."""
    model = open_tiny(tiny_converted["llama"], max_cpu_memory=0)
    ids = torch.tensor([[5, 9, 17, 23]])
    with torch.inference_mode():
        want = model(ids).logits
    job = model.job_bytes(JobShape(batch=1, tokens=4, context=4, logits_rows=4))
    one = stream_reserve(model.costs, dataclasses.replace(model.memory, prefetch=0)) + job
    two = stream_reserve(model.costs, model.memory) + job
    assert model.depth == 1 and one < two
    as_gpu(model, two - 1)
    capsys.readouterr()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model(ids).logits, want)  # said once
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"runtime: a batch of 1 x 4 tokens .* does not fit next to 2 groups in "
                                          r"flight; reading each group when it is needed \(--prefetch 0\)", err[0]), err
    assert model.depth == 0 and model.memory.prefetch == 0
    as_gpu(model, one - 1)
    with pytest.raises(MemoryBudgetError, match=r"\(1 group in flight .* use --max-gpu-memory \S+ or more$"):
        model(ids)
    model.close()
