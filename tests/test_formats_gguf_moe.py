"""A mixture-of-experts GGUF (Qwen3-MoE, as llama.cpp writes one: each layer's experts one
[E, out, in] tensor per projection) keeps its expert blocks (issue 22): gate and up, which
transformers merges into one gate_up_proj, are stored as their blocks' rows in transformers'
order (Q4_K kept, Q8_0 re-packed, IQ2_XXS kept), down as its own (Q6_K kept, Q4_1 re-packed, MXFP4 kept), each expert one
byte range; the runtime, streaming only the routed experts, equals transformers' own
`from_pretrained(..., gguf_file=...)` of the same file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_BUDGETS
from gguf import GGMLQuantizationType as Q
from gguf_files import TOKENIZER_VOCAB, tokenizer_gguf, write_random_qwen3moe

from reshard.convert import convert
from reshard.format import ST_TO_DTYPE, quant_part_names, read_manifest

LAYERS, EXPERTS = 3, 8
# layer 0's experts kept as K-quant blocks, layer 1's re-packed into int8/int4 (Q8_0, Q4_1), layer 2's
# kept as the lowest-bit blocks (IQ2_XXS, MXFP4: reshard/ggml_iquants.py)
TYPES = {"blk.1.ffn_gate_exps.weight": Q.Q8_0, "blk.1.ffn_up_exps.weight": Q.Q8_0,
         "blk.1.ffn_down_exps.weight": Q.Q4_1, "blk.2.ffn_gate_exps.weight": Q.IQ2_XXS,
         "blk.2.ffn_up_exps.weight": Q.IQ2_XXS, "blk.2.ffn_down_exps.weight": Q.MXFP4}
SCHEMES = {"model.layers.0.mlp.experts.gate_up_proj": "q4_k", "model.layers.0.mlp.experts.down_proj": "q6_k",
           "model.layers.1.mlp.experts.gate_up_proj": "int8", "model.layers.1.mlp.experts.down_proj": "int4",
           "model.layers.2.mlp.experts.gate_up_proj": "iq2_xxs",
           "model.layers.2.mlp.experts.down_proj": "mxfp4_blocks"}
IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2]])


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("moe-gguf") / "qwen3moe.gguf"
    write_random_qwen3moe(path, tokenizer_gguf(), layers=LAYERS, hidden=256, experts=EXPERTS, used=2, heads=4,
                          kv_heads=2, vocab=TOKENIZER_VOCAB, types=TYPES)
    return path


@pytest.fixture(scope="module")
def moe_converted(moe_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe-gguf-out")
    convert(str(moe_gguf), out, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(moe_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_gguf.parent, gguf_file=moe_gguf.name, dtype=torch.float32).eval()


def test_expert_blocks_are_kept_one_range_per_expert(moe_converted, moe_gguf):
    """Each layer's experts under the scheme of their GGUF type, every part [E, ...] (so each
    expert is one byte range of each part); the decoder layers' bytes at most 1.1x the source's."""
    from gguf import GGUFReader

    manifest = read_manifest(moe_converted)
    schemes = {p: q["scheme"] for g in manifest.groups for p, q in g.quantized.items() if ".experts." in p}
    assert schemes == SCHEMES
    for g in manifest.groups:
        for p, q in g.quantized.items():
            if ".experts." in p:
                assert q["shape"][0] == EXPERTS
                assert all(g.tensors[n]["shape"][0] == EXPERTS for n in quant_part_names(p, q["scheme"]).values())
                assert list(g.experts.values())[0]["tensors"]  # a MoE layer: routed experts stream alone
    source = sum(int(t.n_bytes) for t in GGUFReader(moe_gguf).tensors if t.name.startswith("blk."))
    stored = sum(np.prod(i["shape"]) * ST_TO_DTYPE[i["dtype"]].itemsize
                 for g in manifest.groups if g.kind == "layer" for i in g.tensors.values())
    assert stored <= 1.1 * source, (stored, source)


def test_the_merged_gate_and_up_blocks_expand_to_transformers_weights(moe_converted, reference):
    """gate_up_proj from its stored blocks equals transformers' merge of the two GGUF tensors."""
    from safetensors import safe_open

    from reshard.quant import dequantize

    manifest = read_manifest(moe_converted)
    weights = dict(reference.named_parameters())
    for g in manifest.groups:
        for p, q in g.quantized.items():
            if ".experts." not in p:
                continue
            with safe_open(moe_converted / g.file, framework="pt") as f:
                parts = {part: f.get_tensor(n) for part, n in quant_part_names(p, q["scheme"]).items()}
            for e in (0, EXPERTS - 1):
                got = dequantize({k: v[e] for k, v in parts.items()}, q["scheme"], columns=q["shape"][-1],
                                 dtype=torch.float32)
                assert torch.equal(got, weights[p][e]), (p, e)


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
def test_logits_and_tokens_equal_transformers(moe_converted, reference, resident):
    from runtime import LayeredModel

    with torch.no_grad():
        want = reference(IDS).logits
        want_tokens = reference.generate(IDS, max_new_tokens=4, do_sample=False)
    kwargs = {"max_cpu_memory": CPU_BUDGETS["resident" if resident else "streamed"]}
    # packed=False: exact float32 math (the CPU kernels quantize the activations)
    with LayeredModel.from_pretrained(moe_converted, device="cpu", packed=False, **kwargs) as model:
        assert torch.equal(model(IDS).logits, want)
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), want_tokens)
        if not resident:  # a decode pass reads its routed experts only: 2 of 8 per layer for one token
            last = model.stats.per_pass[-1]
            assert 0 < last.experts_read <= 2 * LAYERS and last.expert_bytes > 0


def test_default_options_run_close_to_transformers(moe_converted, reference):
    """With the CPU kernels (Q4_K/Q6_K weights and experts as stored, activations quantized per block
    of 32) the logits stay near the exact ones: each call within a few percent (tested per experts
    call below), compounding over the layers of a random model whose blocks' 6-bit scales make large
    activations; a wrong expert or weight would be off by the logits' own size."""
    from runtime import LayeredModel

    with torch.no_grad():
        want = reference(IDS).logits
    with LayeredModel.from_pretrained(moe_converted, device="cpu", dtype="float32", max_cpu_memory=0) as model:
        got = model(IDS).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 0.15, err


def exact_experts(module_name: str, reference, hidden, index, weights) -> torch.Tensor:
    """transformers' experts math in float64 on the reference's weights (gguf's de-quantized values)."""
    experts = reference.get_submodule(module_name)
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for slot, e in enumerate(index[t].tolist()):
            gate, up = (gate_up[e] @ hidden[t].double()).chunk(2)
            out[t] += weights[t, slot].double() * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.fixture(scope="module")
def moe_int4(moe_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe-gguf-int4")
    convert(str(moe_gguf), out, quantize="int4", progress=False)
    return out


@pytest.mark.parametrize("folder", ["blocks", "int4"])
def test_streamed_experts_are_computed_as_stored(folder, moe_converted, moe_int4, reference, kernels):
    """By default on the CPU a streamed layer's routed experts are computed from their stored bits by
    the native kernels (runtime/packedexperts.py): Q4_K/Q6_K blocks (layer 0 of the GGUF folder),
    Q8_0's int8 with a scale per block of 32 (layer 1) and int4 (every layer of the --quantize int4
    one); layer 2's IQ2_XXS and MXFP4 blocks (runtime/kernels/iquant_cpu.c). Each call's output is
    transformers' experts math on the stored weights, within the kernels' error (activations
    quantized per block of 32)."""
    from runtime import LayeredModel

    path = moe_converted if folder == "blocks" else moe_int4
    seen = {}
    with LayeredModel.from_pretrained(path, device="cpu", dtype="float32", max_cpu_memory=0) as model:
        assert set(model.loader.expert_packing) == {f"model.layers.{i}.mlp.experts" for i in range(LAYERS)}
        for i in range(LAYERS):
            name = f"model.layers.{i}.mlp.experts"

            def args_in(module, args, i=i):  # before the streamer's hook maps expert ids to its slots
                seen[i] = tuple(a.clone() for a in args[:3])

            def out(module, args, result, i=i):
                seen[i] += (result.clone(),)

            experts = model.model.get_submodule(name)
            experts.register_forward_pre_hook(args_in, prepend=True)
            experts.register_forward_hook(out)
        model(IDS)
        assert 0 < model.stats.experts_read <= LAYERS * EXPERTS
    if folder == "int4":  # the reference holds what the int4 folder stores, expanded
        from reshard.format import GroupFile
        from runtime.quantized import expand_param

        reference = __import__("copy").deepcopy(reference)
        for g in read_manifest(path).groups:
            gf = GroupFile(path / g.file, g)
            for param, info in g.quantized.items():
                parts = {part: gf.tensor(n) for part, n in quant_part_names(param, "int4").items()}
                with torch.no_grad():
                    reference.get_parameter(param).copy_(expand_param(parts, info, "int4", torch.float32))
    for i in range(LAYERS):
        hidden, index, weights, out = seen[i]
        want = exact_experts(f"model.layers.{i}.mlp.experts", reference, hidden, index, weights)
        err = ((out.double() - want).abs().max() / want.abs().max()).item()
        assert 1e-5 < err < 0.03, (i, err)  # the kernels' price: not zero, small


def test_cached_experts_give_the_same_bits_as_read_ones(moe_int4, kernels):
    """The expert cache holds experts as stored: one served from it is computed exactly as one read
    from the file (the same operands, the same kernel): greedy decoding gives the same logits."""
    from runtime import LayeredModel

    kwargs = dict(device="cpu", dtype="float32", max_cpu_memory=0)
    with LayeredModel.from_pretrained(moe_int4, expert_cache=0, **kwargs) as plain:
        want = plain.generate(IDS, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with LayeredModel.from_pretrained(moe_int4, expert_cache="64MB", **kwargs) as cached:
        got = cached.generate(IDS, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert cached.stats.experts_cached > 0
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


def test_cpu_experts_compute_the_same_packed_experts(moe_int4, kernels):
    """--cpu-experts on (here the host is the device too) computes the routed experts as stored with
    the same kernels: the same bits as the default path, and the planner counts no expansion."""
    from runtime import LayeredModel

    kwargs = dict(device="cpu", dtype="float32", max_cpu_memory=0, expert_cache=0)
    with LayeredModel.from_pretrained(moe_int4, **kwargs) as default:
        want = default(IDS).logits
    with LayeredModel.from_pretrained(moe_int4, cpu_experts="on", **kwargs) as hosted:
        assert set(hosted.cpu_experts.host.packed) == set(hosted.loader.expert_packing)
        got = hosted(IDS).logits
        assert all(v.startswith("cpu") for v in hosted.cpu_experts.log.values())
        stored, _, traffic = next(iter(hosted.cpu_experts.sizes.values()))
        assert traffic == {"int4": stored}  # read as stored by the int4 kernel, nothing expanded
    assert torch.equal(got, want)


@pytest.mark.parametrize("folder", ["blocks", "int4"])
def test_resident_experts_stay_as_stored(folder, moe_converted, moe_int4, kernels):
    """A resident MoE layer keeps its packed experts as stored (views of the file, all E of them,
    planned at their stored bytes, not expanded ones) and computes them as the streamed path
    does: the same logits, bit for bit."""
    from runtime import LayeredModel
    from runtime.packedexperts import PACKED

    path = moe_converted if folder == "blocks" else moe_int4
    kwargs = dict(device="cpu", dtype="float32", expert_cache=0)
    with LayeredModel.from_pretrained(path, max_cpu_memory=0, **kwargs) as streamed:
        want = streamed(IDS).logits
    with LayeredModel.from_pretrained(path, max_cpu_memory="64GiB", **kwargs) as resident:
        packed = resident.loader.expert_packing
        assert packed and resident.stats.resident_bytes.get("device", 0) > 0
        for i, group in enumerate(resident.groups):
            for path_ in group.experts:
                if path_ in packed:
                    operands = resident.model.get_submodule(path_).__dict__[PACKED]
                    assert all(len(per) == EXPERTS for per in operands.values())
                    # planned at about the file's bytes (the layer's other tensors are float32 as stored)
                    assert resident.costs[i].held <= 1.05 * group.bytes, (resident.costs[i].held, group.bytes)
        got = resident(IDS).logits
        assert resident.stats.per_pass[-1].bytes == 0  # nothing streamed
    assert torch.equal(got, want)


# --- on a GPU (benchmarks/gpu_check.sh runs these) ----------------------------------------------

@pytest.mark.gpu
def test_gguf_moe_on_cuda_equals_transformers(moe_converted, reference):
    """Streamed on CUDA the routed experts' blocks expand on the device: transformers' logits within
    float32's CPU/GPU rounding; greedy tokens the same."""
    from runtime import LayeredModel

    with torch.no_grad():
        want = reference(IDS).logits
        want_tokens = reference.generate(IDS, max_new_tokens=4, do_sample=False)
    with LayeredModel.from_pretrained(moe_converted, device="cuda", dtype="float32", max_gpu_memory=0,
                                      max_cpu_memory=0) as model:
        got = model(IDS.cuda()).logits.cpu()
        assert model.stats.per_pass[-1].experts_read > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
        assert torch.equal(model.generate(IDS.cuda(), max_new_tokens=4, do_sample=False).cpu(), want_tokens)


@pytest.mark.gpu
def test_cpu_experts_beside_cuda_compute_as_stored_from_pinned_copies(moe_int4, kernels):
    """--cpu-experts on beside a GPU: the int4 experts are computed on the host as stored, read from
    the groups' pinned copies (nothing from the files, nothing across the link), close to the
    all-GPU run (the CPU kernels quantize the activations)."""
    from runtime import LayeredModel

    pinned = dict(device="cuda", dtype="float32", max_gpu_memory=0, max_cpu_memory="1GB")
    with LayeredModel.from_pretrained(moe_int4, **pinned) as plain:
        want = plain(IDS.cuda()).logits.cpu()
    with LayeredModel.from_pretrained(moe_int4, cpu_experts="on", **pinned) as model:
        assert set(model.cpu_experts.host.packed) == {f"model.layers.{i}.mlp.experts" for i in range(LAYERS)}
        got = model(IDS.cuda()).logits.cpu()
        host = model.cpu_experts.host.stats
        assert model.stats.experts_read == 0 and host.experts_read > 0 and host.bytes_read == 0
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 0.03, err


@pytest.mark.gpu
def test_streamed_embedding_rows_on_cuda(tiny_converted):
    """On CUDA a streamed embedding group copies the looked-up rows: the resident run's logits."""
    from conftest import pass_bytes
    from runtime import LayeredModel

    ids = torch.tensor([[5, 17, 42, 17, 9]]).cuda()
    with LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cuda", dtype="float32", max_gpu_memory="4GiB",
                                      max_cpu_memory="4GiB") as resident:
        want = resident(ids).logits
    with LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cuda", dtype="float32", max_gpu_memory=0,
                                      max_cpu_memory=0) as streamed:
        got = streamed(ids).logits
        assert streamed.stats.per_pass[-1].bytes == pass_bytes(streamed, ids) < streamed.manifest.total_bytes
    assert torch.equal(got, want)
