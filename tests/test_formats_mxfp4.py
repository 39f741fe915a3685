"""gpt-oss MXFP4 checkpoints convert keeping their experts' blocks and scales, re-packed exactly into
GGML's MXFP4 blocks (the bytes the native CPU kernels multiply), each expert one range, and run exactly
as transformers runs them once it has de-quantized them on the CPU (expanded: `packed=False`), or
through the kernels, close to it."""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import CPU_BUDGETS, PLACEMENTS, save_published
from reshard.convert import convert
from reshard.format import GroupFile, expert_range, read_header, read_manifest
from runtime import LayeredModel

IDS = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
EXPERTS = ("gate_up_proj", "down_proj")


def save_mxfp4(folder, plain):
    """A tiny random gpt-oss in its hub layout: bfloat16 attention, router and biases, each experts
    weight as random fp4 `_blocks` [E, out, in / 32, 16] and e8m0 `_scales` [E, out, in / 32]."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GptOssConfig(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=128, sliding_window=8,
                             rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(plain)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(plain / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(tuple(f"experts.{p}" for p in EXPERTS)):
                experts, inp, out = t.shape
                tensors[key + "_blocks"] = torch.randint(0, 256, (experts, out, inp // 32, 16), generator=g,
                                                         dtype=torch.uint8)
                tensors[key + "_scales"] = torch.randint(118, 130, (experts, out, inp // 32), generator=g,
                                                         dtype=torch.uint8)
            else:
                tensors[key] = t
    return save_published(folder, plain, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """(gpt-oss MXFP4 checkpoint, its conversion with default options)."""
    root = tmp_path_factory.mktemp("mxfp4")
    src = save_mxfp4(root / "src", root / "plain")
    convert(str(src), root / "out", progress=False)
    return src, root / "out"


def reference(src, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()


def test_blocks_and_scales_are_stored_per_expert_as_ggml_blocks(mxfp4):
    """Each expert's published blocks and scales, re-packed (`to_ggml_blocks`), are one range of the
    stored `blocks` part (scheme "mxfp4_blocks", 17 bytes per 32 values as published); expanded, the
    experts equal transformers' own de-quantized parameter."""
    from reshard.mxfp4 import to_ggml_blocks
    from runtime.quantized import expand_param

    src, out = mxfp4
    manifest = read_manifest(out)
    assert manifest.quantization["scheme"] == "mxfp4"  # the source's method; each weight names its own scheme
    group = manifest.group("layers.1")
    gf = GroupFile(out / group.file, group)
    ref = reference(src)
    with safe_open(src / "model.safetensors", "pt") as f:
        for proj in EXPERTS:
            name = f"model.layers.1.mlp.experts.{proj}"
            entry = group.quantized[name]
            assert entry["shape"] == list(ref.get_parameter(name).shape) and entry["scheme"] == "mxfp4_blocks"
            blocks, scales = f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")
            info = gf.infos[f"{name}.blocks"]
            assert info.nbytes == blocks.numel() + scales.numel()
            for e in range(blocks.shape[0]):  # expert e: one range, its own bytes
                lo, hi = expert_range(info, blocks.shape[0], e)
                assert torch.equal(gf.data((lo, hi)), to_ggml_blocks(blocks[e], scales[e]).reshape(-1))
            expanded = expand_param({"blocks": gf.tensor(f"{name}.blocks")}, entry, "mxfp4_blocks", torch.float32)
            assert torch.equal(expanded, ref.get_parameter(name))


def test_layer_bytes_at_most_the_sources(mxfp4):
    src, out = mxfp4
    have = {}
    for key, info in read_header(src / "model.safetensors")[0].items():
        if ".layers." in key:
            i = int(key.split(".layers.")[1].split(".")[0])
            have[i] = have.get(i, 0) + info.nbytes
    layers = [g for g in read_manifest(out).groups if g.name.startswith("layers.")]
    assert layers and all(g.bytes <= 1.1 * have[int(g.name.split(".")[1])] for g in layers)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logits_and_tokens_equal_transformers(placement, mxfp4):
    src, out = mxfp4
    ref = reference(src)
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, packed=False,
                                         max_cpu_memory=CPU_BUDGETS[placement])
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    if placement == "streamed":  # the routed experts' blocks and scales were read one expert at a time
        assert model.stats.experts_read > 0
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(model.generate(ids, **GREEDY), ref.generate(ids, **GREEDY))


def test_explicit_dtype_dequantizes_at_convert(mxfp4, tmp_path):
    """--dtype bfloat16: the experts stored de-quantized, equal to transformers' own bfloat16 load."""
    src, _ = mxfp4
    manifest = convert(str(src), tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert manifest.quantization is None
    ref = reference(src, torch.bfloat16)
    group = manifest.group("layers.0")
    gf = GroupFile(tmp_path / "bf16" / group.file, group)
    for proj in EXPERTS:
        name = f"model.layers.0.mlp.experts.{proj}"
        assert torch.equal(gf.tensor(name), ref.get_parameter(name))


def test_decode_pass_reads_only_the_routed_experts(mxfp4):
    """One token routes to 2 of the 4 experts per layer: a streamed decode pass reads those alone."""
    _, out = mxfp4
    manifest = read_manifest(out)
    layers = [g for g in manifest.groups if g.experts]
    assert len(layers) == 2 and all(g.experts["model.layers.1.mlp.experts" if g.name == "layers.1" else
                                             "model.layers.0.mlp.experts"]["num_experts"] == 4 for g in layers)
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, max_cpu_memory=0, expert_cache=0)
    model(torch.tensor([[7]]))
    assert model.stats.experts_read == 2 * len(layers)


def test_cache_and_guesses_keep_logits_and_tokens(mxfp4):
    """gpt-oss with an expert cache (each expert's fp4 blocks and e8m0 scales kept as stored) and
    guessed experts (its router has a bias): logits and tokens stay transformers' own."""
    from test_moe_cache import assert_cached_and_guessed_as_transformers, one_expert_bytes

    src, out = mxfp4
    ref = reference(src)
    six = 6 * max(one_expert_bytes(g) for g in read_manifest(out).groups if g.experts)  # of 8: some misses
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, max_cpu_memory=0,
                                         expert_cache=six, predict_experts=True, packed=False)
    assert model.experts.predictor.next  # layer 0 guesses for layer 1
    assert_cached_and_guessed_as_transformers(model, ref, IDS, GREEDY)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_experts_run_through_the_cpu_kernels_by_default(placement, mxfp4, monkeypatch):
    """Where the native kernels are built, the re-packed experts are multiplied as stored (their biases
    added after each product), streamed and resident: close to transformers' float32 model (the
    kernels quantize activations per block of 32, as llama.cpp's do; this test's random fp4 weights,
    std 3.5, make that about 1% per experts call and a few % after two layers: too far apart for
    this random model's near-tied greedy tokens to be asserted; `packed=False` runs exactly)."""
    from runtime import native, packedexperts

    if native.lowbit() is None:
        pytest.skip("no native CPU kernels on this machine")
    src, out = mxfp4
    ref = reference(src)
    calls = []
    run = packedexperts.run
    monkeypatch.setattr(packedexperts, "run", lambda module, specs, packed, *a: calls.append(1) or
                        run(module, specs, packed, *a))
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, max_cpu_memory=CPU_BUDGETS[placement])
    with torch.no_grad():
        want = ref(IDS).logits
        got = model(IDS).logits
    assert calls
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.06, err


def test_streamed_experts_come_into_slots_of_the_routed_ones(mxfp4, monkeypatch):
    """gpt-oss's experts module takes `router_indices`: expanded (`packed=False`), a streamed layer's
    routed experts come into slots of those experts alone, ids mapped, never full-size [E, ...]
    tensors; a decode token's 2 experts take 2 slots."""
    from runtime.expertslots import Slots

    src, out = mxfp4
    held, bring = [], Slots.__init__

    def record(self, owner, experts, tensors, **kwargs):
        held.append((len(experts), kwargs.get("full", False)))
        bring(self, owner, experts, tensors, **kwargs)

    monkeypatch.setattr(Slots, "__init__", record)
    with LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, packed=False, max_cpu_memory=0,
                                      expert_cache=0) as model:
        model(torch.tensor([[7]]))
    assert held and not any(full for _, full in held) and max(n for n, _ in held) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placement", ["disk", "pinned"])
def test_cuda_brings_the_routed_experts_into_slots(mxfp4, placement, monkeypatch):
    """On a GPU gpt-oss's experts module (it takes `router_indices`) gets slots of the routed experts,
    expanded from their GGML MXFP4 blocks on the device, not full-size [E, ...] tensors: the logits of
    transformers' float32 model on the GPU, the same greedy tokens."""
    from runtime.expertslots import Slots

    src, out = mxfp4
    ref = reference(src).to("cuda")
    ids = IDS.cuda()
    with torch.no_grad():
        want = ref(ids).logits
    budgets = {"disk": dict(max_gpu_memory=0, max_cpu_memory=0), "pinned": dict(max_gpu_memory=0, max_cpu_memory="1GB")}
    held = []
    bring = Slots.__init__

    def record(self, owner, experts, tensors, **kwargs):
        held.append((len(experts), kwargs.get("full", False)))
        bring(self, owner, experts, tensors, **kwargs)

    monkeypatch.setattr(Slots, "__init__", record)
    with LayeredModel.from_pretrained(out, device="cuda", dtype=torch.float32, expert_cache=0,
                                      **budgets[placement]) as model:
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-4)
        assert model.stats.experts_read > 0
        one = torch.tensor([[5, 17, 42, 99, 7]], device="cuda")
        assert torch.equal(model.generate(one, **GREEDY), ref.generate(one, **GREEDY))
    assert held and not any(full for _, full in held) and min(n for n, _ in held) <= 2  # a decode token's 2 experts


CT_WEIGHTS = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True, dynamic=False)


def save_ct_mxfp4(tmp_path, edit=lambda tensors: None):
    """A tiny Llama in compressed-tensors' MXFP4 layout, written with its own compressor (`edit(tensors)` first,
    where given): (the checkpoint, its tensors)."""
    import transformers as tf
    from compressed_tensors.compressors import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    config = tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**CT_WEIGHTS))
    tensors = {}
    for key, t in load_file(tmp_path / "plain" / "model.safetensors").items():
        if ".layers." in key and key.endswith("proj.weight"):
            amax = t.float().view(t.shape[0], -1, 32).abs().amax(-1)
            scale = torch.exp2(torch.floor(torch.log2(amax / 6.0)))  # a power of two: what e8m0 holds
            parts = MXFP4PackedCompressor.compress({"weight": t, "weight_scale": scale}, scheme)
            tensors.update({key[:-len("weight")] + name: v for name, v in parts.items()})
        else:
            tensors[key] = t
    edit(tensors)
    src = save_published(tmp_path / "src", tmp_path / "plain", tensors, {
        "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "format": "mxfp4-pack-quantized",
                                                             "weights": CT_WEIGHTS}}})
    return src, tensors


def test_compressed_tensors_mxfp4_is_kept_as_ggml_blocks_and_equals_transformers_load(tmp_path):
    """compressed-tensors' MXFP4 (`mxfp4-pack-quantized`: fp4 codes, an e8m0 exponent per 32), written with its
    own compressor: kept as GGML MXFP4 blocks (the native kernels' bytes, 17 per 32 weights as published),
    the float32 logits and greedy tokens those of transformers' own de-compressed load, streamed and resident."""
    import warnings

    import transformers as tf
    pytest.importorskip("compressed_tensors")

    src, tensors = save_ct_mxfp4(tmp_path)
    convert(str(src), tmp_path / "out", progress=False)
    layer = read_manifest(tmp_path / "out").group("layers.0")
    assert {info["scheme"] for info in layer.quantized.values()} == {"mxfp4_blocks"} and len(layer.quantized) == 7
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("model.layers.0."))
    assert layer.bytes <= 1.1 * stored
    with warnings.catch_warnings():  # "the model already has a quantization_config": the point of passing one
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`", category=UserWarning)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                   quantization_config=tf.CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want = ref(IDS).logits
    for placement in PLACEMENTS:
        model = LayeredModel.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32, packed=False,
                                             max_cpu_memory=CPU_BUDGETS[placement])
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, want), placement
        assert torch.equal(model.generate(ids, **GREEDY), ref.generate(ids, **GREEDY)), placement


def test_compressed_tensors_mxfp4_scales_that_do_not_fit_are_one_line(tmp_path, capsys):
    from test_gguf import cli_convert

    pytest.importorskip("compressed_tensors")
    key = "model.layers.0.mlp.down_proj.weight"

    def edit(tensors):
        tensors[key + "_scale"] = tensors[key + "_scale"][:, :-1].contiguous()

    src, _ = save_ct_mxfp4(tmp_path, edit)
    assert cli_convert(capsys, src, tmp_path / "out") == (
        1, f"Error: {key} is an MXFP4 weight whose codes [128, 128] and scales [128, 7] do not make one (out, in) "
           "weight in blocks of 32; is the config the one of these weights?")
