"""Scoring, activation offload and batched generation on CUDA. Run where a GPU is present."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import ARCHS
from test_score import ITEMS, assert_close, open_tiny

from runtime import LayeredModel, allowance
from runtime.batch import generate_batch
from runtime.lockstep import Job, Lockstep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_score_equals_cpu(arch, offload, tiny_converted):
    want = open_tiny(tiny_converted[arch]).score(ITEMS, batch_size=2)
    model = LayeredModel.from_pretrained(tiny_converted[arch], device="cuda", max_gpu_memory=0)
    model.tokenizer = open_tiny(tiny_converted[arch]).tokenizer
    got = model.score(ITEMS, batch_size=2, offload=offload)
    assert_close(got, [{k: w[k] for k in ("scores", "logprob", "tokens") if k in w} for w in want], ITEMS)
    assert model.stats.layer_loads == len(model.groups)


def test_cuda_offload_moves_activations_to_host(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cuda", max_gpu_memory=0)
    inputs = [torch.randint(3, 300, (2, 64), device="cuda") for _ in range(3)]
    want = [model(ids).logits for ids in inputs]
    seen = []
    layer1 = model.model.get_submodule(model.manifest.layers_path)[1]
    layer1.register_forward_pre_hook(lambda _, args: seen.append(args[0].device.type))
    lockstep = Lockstep(model, offload=torch.device("cpu"))
    got = lockstep.run([Job(lambda ids=ids: model.model(ids).logits) for ids in inputs])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert lockstep.offloaded_bytes > 0 and seen == ["cuda"] * 3  # back on the device when each layer runs


def test_cuda_batched_generation_equals_one_by_one(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["gpt2"], device="cuda", max_gpu_memory=0)
    prompts = ["w5 w6 w7", "w20 w21 w22 w23 w24 w25 w26 w27 w28", "w40"]
    together = generate_batch(model, prompts, keep_logits=True, do_sample=False, max_new_tokens=10)
    for prompt, got in zip(prompts, together):
        [alone] = generate_batch(model, [prompt], keep_logits=True, do_sample=False, max_new_tokens=10)
        assert got.tokens == alone.tokens
        assert (got.logits - alone.logits).abs().max().item() < 1e-4


def test_a_forward_thread_costs_no_more_than_its_allowance():
    """Every thread that runs a matmul gets its own cuBLAS handle and workspace, for good: what 24
    new threads take from the device stays within 24 x allowance.CUDA_THREAD."""
    a = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    b = torch.randn(1024, 1024, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    n, barrier = 24, threading.Barrier(24)

    def work():
        barrier.wait()  # all alive at once: no thread hands its handle on to another
        a @ b
        torch.cuda.synchronize()
        barrier.wait()

    free = torch.cuda.mem_get_info()[0]
    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert free - torch.cuda.mem_get_info()[0] <= n * allowance.CUDA_THREAD


def test_scoring_many_forwards_stays_within_the_gpu_budget(tiny_converted):
    """49 items at batch 1 would be 84 forward threads in one pass, 6 GB of cuBLAS handles on an
    H200; with a 1 GiB budget the scorer reads the weights several times instead, what the process
    takes from the device stays within the budget (and the default budget's 256 MiB margin), and
    the scores equal the CPU's."""
    items = ITEMS * 7
    want = open_tiny(tiny_converted["llama"]).score(items, batch_size=1)
    torch.cuda.empty_cache()
    free, limit = torch.cuda.mem_get_info()[0], 1 << 30
    with LayeredModel.from_pretrained(tiny_converted["llama"], device="cuda", max_gpu_memory=limit,
                                      max_cpu_memory=0) as model:
        model.tokenizer = open_tiny(tiny_converted["llama"]).tokenizer
        got = model.score(items, batch_size=1)
        took = free - torch.cuda.mem_get_info()[0]
        assert model.stats.passes > 1  # more than one read of the weights
        assert 1 < model.cuda_threads < 84
    assert took <= limit + (256 << 20)
    assert_close(got, [{k: w[k] for k in ("scores", "logprob", "tokens") if k in w} for w in want], items)
