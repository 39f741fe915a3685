"""Scoring, activation offload and batched generation on CUDA. Run where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from test_score import ITEMS, assert_close, open_tiny

from runtime import LayeredModel
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
