"""The mixed path on a GPU: a CUDA MoE model whose routed experts are computed on the CPU
(runtime/cpuexperts.py). CPU and GPU float32 kernels round differently, so logits are compared to
the all-GPU run within 1e-4; greedy tokens must be equal. `benchmarks/gpu_check.sh` runs these."""

from __future__ import annotations

import pytest
import torch

from conftest import MOE_ARCHS
from runtime import LayeredModel, hybrid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# every group held in pinned host RAM (HOST), none on the GPU: the routed experts wait on the host
PINNED = dict(device="cuda", dtype="float32", max_gpu_memory=0, max_cpu_memory="1GB")
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def _ids(vocab):
    return torch.randint(3, vocab, (1, 9), generator=torch.Generator().manual_seed(4)).cuda()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_cpu_experts_on_cuda_match_the_all_gpu_run(arch, moe_converted):
    with LayeredModel.from_pretrained(moe_converted[arch], **PINNED) as plain:
        ids = _ids(plain.config.vocab_size)
        want, want_tokens = plain(ids).logits, plain.generate(ids, **GEN)
    with LayeredModel.from_pretrained(moe_converted[arch], cpu_experts="on", **PINNED) as model:
        assert model.cpu_experts is not None
        out = model(ids)
        assert out.logits.device.type == "cuda"
        torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-4)
        names = sorted(model.cpu_experts.groups.values())
        assert sorted(model.stats.per_pass[-1].cpu_experts) == names
        assert set(model.stats.per_pass[-1].cpu_experts.values()) == {"cpu: --cpu-experts on"}
        # no routed expert crossed the link; the host's streamer filled CPU slots from the pinned copies
        host = model.cpu_experts.host.stats
        assert model.stats.experts_read == 0 and host.experts_read > 0 and host.bytes_read == 0
        assert torch.equal(model.generate(ids, **GEN), want_tokens)


def test_auto_streams_the_prefill_and_computes_decode_experts_on_the_cpu(moe_converted):
    folder = moe_converted["mixtral"]  # 8 experts, 2 per token
    with LayeredModel.from_pretrained(folder, **PINNED) as plain:
        ids = _ids(plain.config.vocab_size)
        want = plain.generate(ids, **GEN)
    # no expert cache: every streamed call copies its routed experts (cached ones would cost nothing)
    with LayeredModel.from_pretrained(folder, cpu_experts="auto", expert_cache=0, **PINNED) as model:
        stored, params, traffic = next(iter(model.cpu_experts.sizes.values()))
        assert set(traffic) == {None}  # float experts: all of it at the matmul's rate
        traffic = traffic[None]
        # with t = stored / link: the CPU moves an expert's bytes in t/4 and computes a token-expert pair
        # in t/2. Decode (2 experts, 2 pairs): CPU t vs stream 2t. Prefill (9 tokens, 18 pairs, at most
        # 8 experts): CPU 9t vs stream at most 8t.
        t = 1e-3
        speeds = hybrid.Speeds(link=stored / t, cpu_bytes=4 * traffic / t, cpu_flops=2 * params / (t / 2),
                               gpu_flops=1e18)
        model.cpu_experts.measure = lambda: speeds
        assert torch.equal(model.generate(ids, **GEN), want)
        where = [{v.split(":")[0] for v in p.cpu_experts.values()} for p in model.stats.per_pass]
        assert where[0] == {"stream"} and all(w == {"cpu"} for w in where[1:])
