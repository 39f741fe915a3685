"""The mixed path on a GPU: some layers computed on the CPU beside a CUDA model (runtime/hostcompute.py).
CPU and GPU float32 kernels round differently, so logits are compared to the all-GPU run within
1e-4; greedy tokens must be equal. `benchmarks/gpu_check.sh` runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from runtime import LayeredModel, hybrid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PINNED = dict(device="cuda", dtype="float32", max_gpu_memory=0, max_cpu_memory="1GB")
GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def _ids(vocab):
    return torch.randint(3, vocab, (1, 9), generator=torch.Generator().manual_seed(3)).cuda()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cpu_layers_on_cuda_match_the_all_gpu_run(arch, tiny_converted):
    with LayeredModel.from_pretrained(tiny_converted[arch], **PINNED) as plain:
        ids = _ids(plain.config.vocab_size)
        want, want_tokens = plain(ids).logits, plain.generate(ids, **GEN)
    with LayeredModel.from_pretrained(tiny_converted[arch], cpu_layers=2, **PINNED) as model:
        out = model(ids, use_cache=True)
        assert out.logits.device.type == "cuda"
        torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-4)
        assert torch.equal(model.generate(ids, **GEN), want_tokens)
        on_cpu = {model.host.candidates[i].index for i in model.host.active}
        devices = {k: layer.keys.device.type for k, layer in enumerate(out.past_key_values.layers)}
        assert on_cpu and all(devices[k] == ("cpu" if k in on_cpu else "cuda") for k in devices)


def test_auto_moves_layers_and_their_cache_between_passes(tiny_converted):
    with LayeredModel.from_pretrained(tiny_converted["llama"], **PINNED) as plain:
        ids = _ids(plain.config.vocab_size)
        want = plain.generate(ids, **GEN)
    with LayeredModel.from_pretrained(tiny_converted["llama"], cpu_layers="auto", **PINNED) as model:
        # speeds for which the 9-token prefill streams and the 1-token decode passes run on the CPU
        first = next(iter(model.host.candidates.values()))
        stored, params = first.stored, first.params
        model.host._known = hybrid.Speeds(link=stored / 1e-3, cpu_bytes=stored / 0.5e-3,
                                          cpu_flops=2 * params * 4 / 1e-3, gpu_flops=1e15)
        assert torch.equal(model.generate(ids, **GEN), want)
        where = [set(v.split(":")[0] for v in p.cpu_layers.values()) for p in model.stats.per_pass]
        assert where[0] == {"stream"} and all(w == {"cpu"} for w in where[1:])


def test_calibration_measures_the_link_on_cuda(tmp_path):
    speeds = hybrid.calibrate(torch.device("cuda"), torch.float32, cache_file=tmp_path / "s.json")
    assert speeds.link > 1e8 and speeds.gpu_flops > speeds.cpu_flops > 0


def test_int4_cpu_layers_on_cuda_are_multiplied_as_stored(tmp_path):
    """Beside a GPU an int4 layer computed on the CPU runs its weights as stored (PackedLinear,
    native or torch's kernel) and puts the plain modules back after: with every layer on the CPU,
    the logits are the CPU-only packed model's within 1e-4 (the embeddings and head run on the GPU)
    and the greedy tokens are its tokens."""
    from transformers import LlamaConfig

    from reshard.synthetic import write_random_model

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=300, tie_word_embeddings=False)
    write_random_model(config, tmp_path / "int4", dtype=torch.float32, quantize="int4", quantize_group=32)
    ids = _ids(300)
    with LayeredModel.from_pretrained(tmp_path / "int4", device="cpu", dtype="float32", max_cpu_memory=0) as cpu:
        want, want_tokens = cpu(ids.cpu()).logits, cpu.generate(ids.cpu(), **GEN)
    with LayeredModel.from_pretrained(tmp_path / "int4", cpu_layers=2, **PINNED) as model:
        assert model.host.swapped and model.loader.packing == {}
        got = model(ids).logits
        layers = model.model.get_submodule(model.manifest.layers_path)
        assert all(type(layer.mlp.down_proj) is torch.nn.Linear for layer in layers)  # put back after the pass
        assert {sum(c.packed.values()) > 0 and c.expanded == 0 for c in model.host.candidates.values()} == {True}
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)
        assert torch.equal(model.generate(ids, **GEN).cpu(), want_tokens)
