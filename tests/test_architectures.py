"""Architectures beyond conftest's ARCHS and MOE_ARCHS, from safetensors checkpoints as transformers
saves them: state-space and hybrid decoders (Mamba 2, which has no attention heads; Jamba; Granite 4's
GraniteMoeHybrid; Nemotron-H; Qwen3-Next's gated DeltaNet) and Llama 4 (chunked attention, rotary-free
layers, experts computed for every token, streamed as routed all the same, and ids its model moves to
the embedding weight's device before the lookup). Streamed (nothing resident) and resident, the runtime equals transformers' own
model: logits bit-identical in float32 and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BUDGETS, assert_runs_as

from reshard.convert import convert
from reshard.format import expert_bytes, read_manifest

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=None, bos_token_id=1, eos_token_id=2)


def config(arch: str):
    import transformers as tf

    attention_free = {k: v for k, v in BASE.items() if k not in ("num_attention_heads", "num_key_value_heads",
                                                                  "intermediate_size", "max_position_embeddings")}
    make = {
        "mamba2": lambda: tf.Mamba2Config(**{**attention_free, "num_hidden_layers": 2}, num_heads=8, head_dim=16,
                                          state_size=16, n_groups=1, chunk_size=16),
        "jamba": lambda: tf.JambaConfig(**BASE, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
                                        attn_layer_offset=3, expert_layer_period=2, expert_layer_offset=1,
                                        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **BASE, layer_types=["mamba", "mamba", "mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16, num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=64),
        "nemotron_h": lambda: tf.NemotronHConfig(**{k: v for k, v in BASE.items() if k != "num_hidden_layers"},
                                                 hybrid_override_pattern="M-M*", mamba_num_heads=8, mamba_head_dim=16,
                                                 ssm_state_size=16, n_groups=1, chunk_size=16),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **BASE, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=32),
        "llama4": lambda: tf.Llama4TextConfig(**{**BASE, "intermediate_size": 32}, intermediate_size_mlp=128,
                                              head_dim=16, num_local_experts=8, num_experts_per_tok=1,
                                              interleave_moe_layer_step=2, attention_chunk_size=8),
    }
    make["llama4_wide"] = lambda: tf.Llama4TextConfig(**BASE, head_dim=16, intermediate_size_mlp=128, num_local_experts=8,
                                                      num_experts_per_tok=1, interleave_moe_layer_step=2,
                                                      attention_chunk_size=8)  # experts 128 wide: the kernels' widths
    return make[arch]()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config(arch)).eval()
            root = tmp_path_factory.mktemp(arch.replace("_", "-"))
            model.save_pretrained(root / "hf")
            convert(str(root / "hf"), root / "out", progress=False)
            made[arch] = (model, root / "out")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["mamba2", "jamba", "granitemoehybrid", "nemotron_h", "qwen3_next", "llama4"])
def test_streamed_and_resident_equal_transformers(converted, arch):
    model, folder = converted(arch)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128, 64, 12, 200]])  # longer than Llama 4's chunk of 8
    assert_runs_as(model, folder, ids, new_tokens=5)


def test_llama4_streams_only_the_routed_experts(converted):
    """Llama 4's experts module takes no routed ids: it gets its tokens stacked per expert, zero rows
    where the router did not send them (runtime/stackedexperts.py). Streamed, a layer brings only the
    experts with a routed token, onto slots (one expert beside an expanded copy of itself), and the
    logits stay bit-identical."""
    from runtime import LayeredModel

    model, folder = converted("llama4")
    moe = [g for g in read_manifest(folder).groups if g.experts]
    assert [g.name for g in moe] == ["layers.1", "layers.3"]
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128, 64, 12, 200]])
    with torch.no_grad():
        want, want_tokens = model(ids).logits, model.generate(ids, max_new_tokens=3, do_sample=False)
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, expert_cache=0) as lm:
        lm.experts.whole_at = None  # the prompt reads its routed experts alone too, several per layer
        assert torch.equal(lm(ids).logits, want)
        assert len(moe) < lm.stats.per_pass[-1].experts_read < 8 * len(moe)
        assert torch.equal(lm.generate(ids, max_new_tokens=3, do_sample=False), want_tokens)
        last = lm.stats.per_pass[-1]  # one token, k = 1: one expert per MoE layer
        assert last.experts_read == len(moe)
        assert last.expert_bytes == sum(expert_bytes(g) for g in moe) // 8


def test_llama4_quantized_experts_stream_as_resident(converted, tmp_path, monkeypatch):
    """`--quantize int4` keeps Llama 4's (in, out) experts per expert as (out, in) groups (each expert one
    byte range) and leaves the router as it is. Streamed expert by expert equals resident, expanded
    (`packed=False`) and computed as stored by the native kernels (runtime/packedexperts.py
    `run_stacked`, which the CPU's default takes), the two close."""
    from runtime import LayeredModel, native, packedexperts

    _, folder = converted("llama4_wide")
    out = tmp_path / "int4"
    convert(str(folder.parent / "hf"), out, progress=False, quantize="int4")
    layer = read_manifest(out).group("layers.1")
    experts = {k: v for k, v in layer.quantized.items() if ".experts." in k}
    assert set(experts) == {f"model.layers.1.feed_forward.experts.{p}" for p in ("gate_up_proj", "down_proj")}
    assert all(v["transposed"] for v in experts.values())
    assert "model.layers.1.feed_forward.router.weight" not in layer.quantized
    calls = []
    run = packedexperts.run_stacked
    monkeypatch.setattr(packedexperts, "run_stacked", lambda *a: calls.append(1) or run(*a))
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    got = {}
    for packed in (False, True):
        for placement in ("resident", "streamed"):
            with LayeredModel.from_pretrained(out, device="cpu", max_cpu_memory=CPU_BUDGETS[placement],
                                              packed=packed) as lm:
                got[packed, placement] = lm(ids).logits, lm.generate(ids, max_new_tokens=3, min_new_tokens=3,
                                                                     do_sample=False)
                reads = lm.stats.per_pass[-1].experts_read
            assert reads == (2 if placement == "streamed" else 0)
        assert torch.equal(got[packed, "streamed"][0], got[packed, "resident"][0]), packed
        assert torch.equal(got[packed, "streamed"][1], got[packed, "resident"][1]), packed
    if native.lowbit() is not None and native.int_kernels():
        assert calls  # the experts ran through the kernels
    torch.testing.assert_close(got[True, "streamed"][0], got[False, "streamed"][0], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("routed", [[3], [0, 5], [1, 2, 7]])
def test_llama4_experts_on_slots_equal_all_experts(routed):
    """Transformers' Llama 4 experts module on the routed experts' slots and rows, its results put back
    (runtime/stackedexperts.py), equals the module over all its experts, bit for bit: one routed
    expert too, where torch's batched matmul over a single matrix would round otherwise."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from runtime import stackedexperts

    torch.manual_seed(0)
    module = Llama4TextExperts(config("llama4")).requires_grad_(False)
    for p in module.parameters():
        p.normal_()
    hidden = torch.zeros(8, 9, 64)  # (E, tokens, hidden): zero rows where an expert gets no token
    hidden[routed] = torch.randn(len(routed), 9, 64)
    want = module(hidden.reshape(-1, 64))
    assert stackedexperts.routed(hidden.reshape(-1, 64), 8) == routed
    rows, call = stackedexperts.compact(hidden.reshape(-1, 64), routed, 8)
    full = {name: p for name, p in module._parameters.items()}
    for name, p in full.items():
        module._parameters[name] = torch.nn.Parameter(p[routed], requires_grad=False)
    stackedexperts.pad(module, list(full))
    assert torch.equal(stackedexperts.spread(module(rows), call), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_llama4_streams_its_routed_experts_on_cuda(converted):
    """On a GPU a streamed Llama 4 layer brings its routed experts into slots too: transformers' model on the
    GPU (float32, to matmul tolerance: a batched matmul over fewer experts may take another kernel) and
    the same greedy tokens, with one expert per MoE layer read for a decoded token."""
    from runtime import LayeredModel

    model, folder = converted("llama4")
    ref, ids = model.to("cuda"), torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128, 64, 12, 200]], device="cuda")
    try:
        with torch.no_grad():
            want, tokens = ref(ids).logits, ref.generate(ids, max_new_tokens=4, do_sample=False)
        with LayeredModel.from_pretrained(folder, device="cuda", max_gpu_memory=0, max_cpu_memory=0,
                                          expert_cache=0) as lm:
            torch.testing.assert_close(lm(ids).logits, want, rtol=1e-4, atol=1e-4)
            assert torch.equal(lm.generate(ids, max_new_tokens=4, do_sample=False), tokens)
            assert lm.stats.per_pass[-1].experts_read == 2
    finally:
        model.to("cpu")


def test_llama4_experts_computed_as_stored_follow_the_module():
    """`run_stacked` (runtime/packedexperts.py) on int4 operands gives Llama 4's experts module's own output
    over the same weights expanded, to the kernels' rounding (activations quantized per block of 32):
    the routed experts' rows computed, gate before up, the other rows zero."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from reshard.quant import dequantize, quantize
    from runtime import native, packedexperts
    from runtime.lowbit import PackSpec, pack_param

    if native.lowbit() is None or not native.int_kernels():
        pytest.skip("the native int4 kernels are not built here")
    torch.manual_seed(0)
    module = Llama4TextExperts(config("llama4_wide")).requires_grad_(False)
    packed = {}
    for name, p in module.named_parameters():  # each expert's (in, out) matrix quantized as (out, in)
        p.normal_(std=0.1)
        out_features, in_features = p.shape[2], p.shape[1]
        spec = PackSpec("int4", 32, out_features, in_features, "native", torch.float32)
        parts = [quantize(w.t().contiguous(), "int4", group=32, dtype=torch.float32) for w in p]
        p.copy_(torch.stack([dequantize(q, "int4", columns=in_features, dtype=torch.float32).t() for q in parts]))
        packed[name] = {e: pack_param(q, spec) for e, q in enumerate(parts)}
    specs = {name: PackSpec("int4", 32, p.shape[2], p.shape[1], "native", torch.float32)
             for name, p in module.named_parameters()}
    hidden = torch.zeros(8, 3, 64)  # (E, tokens, hidden)
    hidden[[1, 6]] = torch.randn(2, 3, 64)
    want = module(hidden.reshape(-1, 64))
    got = packedexperts.run_stacked(module, specs, packed, hidden.reshape(-1, 64))
    assert torch.equal(got.view(8, 3, 64)[[0, 2, 3, 4, 5, 7]], torch.zeros(6, 3, 64))
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_llama4_experts_run_on_the_host_with_cpu_experts(converted):
    """`cpu_experts="on"` computes Llama 4's routed experts on the host too (runtime/cpuexperts.py), its
    routing read from the stacked rows: the logits bit-identical, no expert read by the device's streamer."""
    from runtime import LayeredModel
    from runtime.cpuexperts import routing

    model, folder = converted("llama4")
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    with torch.no_grad():
        want, tokens = model(ids).logits, model.generate(ids, max_new_tokens=4, do_sample=False)
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, cpu_experts="on") as lm:
        assert torch.equal(lm(ids).logits, want)
        assert lm.stats.per_pass[-1].cpu_experts == dict.fromkeys(["layers.1", "layers.3"], "cpu: --cpu-experts on")
        assert lm.stats.experts_read == 0 and lm.cpu_experts.host.stats.experts_read > 0
        assert torch.equal(lm.generate(ids, max_new_tokens=4, do_sample=False), tokens)
    rows = torch.zeros(8, 3, 64)  # (E, tokens, hidden): expert 2 gets tokens 0 and 2, expert 5 token 1
    rows[2, 0, 1] = rows[2, 2, 7] = rows[5, 1, 0] = 1.0
    assert routing(rows.reshape(-1, 64), 8, stacked=True) == ([2, 5], 3)
