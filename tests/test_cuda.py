"""The CUDA path (pinned staging, side-stream copies, events). Runs where a GPU is present;
`benchmarks/gpu_check.sh` runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS
from runtime import LayeredModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


PLACEMENTS = {  # where the weights wait between passes: budgets that force each tier
    "disk": dict(max_gpu_memory=0, max_cpu_memory=0),
    "pinned": dict(max_gpu_memory=0, max_cpu_memory="1GB"),
    "device": dict(max_gpu_memory="1GB", max_cpu_memory=0),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_cuda_equals_transformers_on_cuda(arch, prefetch, placement, tiny_checkpoints, tiny_converted):
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=torch.float32).eval().to("cuda")
    model = LayeredModel.from_pretrained(tiny_converted[arch], device="cuda", prefetch=prefetch,
                                         **PLACEMENTS[placement])
    ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        want = ref(ids).logits
    got = model(ids).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
    streamed = 0 if placement == "device" else 13 * len(model.manifest.groups)
    assert model.stats.layer_loads == streamed
    model.close()


def test_cuda_memory_stays_at_a_few_groups(tiny_converted):
    model = LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cuda", prefetch=1,
                                         max_gpu_memory=0, max_cpu_memory=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(torch.tensor([[5, 6, 7, 8]], device="cuda"))
    torch.cuda.synchronize()
    largest = max(g.bytes for g in model.manifest.groups)
    # Two groups in flight (the running one and the one read ahead), plus small activations.
    assert torch.cuda.max_memory_allocated() - base < 3 * largest + (1 << 20)
    model.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_moe_cuda_equals_transformers_on_cuda(arch, placement, moe_checkpoints, moe_converted):
    """Routed experts only, through pinned staging (disk) or the pinned group copy (pinned);
    with the expert cache (holding experts as stored) too, and with guessed experts read ahead."""
    ref = AutoModelForCausalLM.from_pretrained(moe_checkpoints[arch], dtype=torch.float32).eval().to("cuda")
    ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        want = ref(ids).logits
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    for cache, predict in ((0, False), ("1MB", False), (0, True)):
        model = LayeredModel.from_pretrained(moe_converted[arch], device="cuda", expert_cache=cache,
                                             predict_experts=predict, **PLACEMENTS[placement])
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
        assert torch.equal(model.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))
        assert (model.stats.experts_read > 0) == (placement != "device")
        model.close()


@pytest.mark.parametrize("placement", ["disk", "pinned"])
def test_batch_tree_speculation_on_cuda_gives_each_row_plain_greedy(placement, tiny_checkpoints, tiny_converted):
    """Several rows' trees verified through one weight pass (Lockstep, a thread per row on the device):
    each row's tokens are its plain greedy ones, in fewer passes (the draft is the target itself)."""
    from runtime.batch import load_assistant
    from runtime.score import pad_batch

    model = LayeredModel.from_pretrained(tiny_converted["llama"], device="cuda", dtype="float32",
                                         **PLACEMENTS[placement])
    model.generation_config.eos_token_id = None  # the full length on every row
    draft = load_assistant(tiny_checkpoints["llama"], device=torch.device("cuda"), dtype=torch.float32)
    prompts = [[5, 17, 40, 9, 100, 3], [7, 7, 31], [12, 200, 45, 45, 3, 9, 80, 61]]
    ids, mask = pad_batch(prompts, 0, left=True)
    out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=10, draft=draft,
                         tree_budget=8)
    for row, prompt in zip(out[:, ids.shape[1]:].tolist(), prompts):
        plain = model.generate(input_ids=torch.tensor([prompt]).cuda(), max_new_tokens=10, min_new_tokens=10,
                               do_sample=False)
        assert row == plain[0, len(prompt):].tolist(), prompt
    assert model.speculation["tokens_per_pass"] > 3, model.speculation
    model.close()
