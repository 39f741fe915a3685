"""GGUF files of the architectures transformers loads through its newer GGUF path (Qwen3.5 dense
and MoE, LFM2: reshard/gguf_conversions.py) convert with their names, norms, value-head order and
merged experts as transformers makes them; blocks stay blocks wherever the conversion only moves
whole rows (Qwen3.5's value-head regrouping, the gate and up experts joined) or a matrix's columns
(its output projection: the column order is stored beside the blocks), and the runtime, streamed
and resident, equals transformers' own `from_pretrained(..., gguf_file=...)` bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CPU_BUDGETS
from gguf import GGMLQuantizationType as Q
from gguf_files import TOKENIZER_VOCAB, tokenizer_gguf
from gguf_hybrid_files import lfm2_config, qwen35_config, write_random_hybrid

from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2]])
MODELS = ["qwen35moe", "qwen35", "lfm2"]


def quantized(name: str, columns: int):
    """Types as a llama.cpp Q4_K_M file mixes them: Q4_K most matrices, Q6_K the value-head outputs
    and the head, Q8_0 (re-packed as int8) the experts and the narrow ones, F32 what does not fit."""
    if name.endswith(("ssm_out.weight", "output.weight", "ffn_down.weight")) and columns % 256 == 0:
        return Q.Q6_K
    if "_exps" in name or (columns % 256 and columns % 32 == 0):
        return Q.Q8_0
    return Q.Q4_K if columns % 256 == 0 else Q.F32


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> dict:
    """name -> (the GGUF, its conversion with default options)."""
    root = tmp_path_factory.mktemp("hybrid-gguf")
    configs = {"qwen35moe": (qwen35_config(moe=True, layers=4, hidden=256, vocab=TOKENIZER_VOCAB), "qwen35"),
               "qwen35": (qwen35_config(moe=False, layers=4, hidden=256, vocab=TOKENIZER_VOCAB), "qwen35"),
               "lfm2": (lfm2_config(layers=4, hidden=256, vocab=TOKENIZER_VOCAB), "lfm2")}
    out = {}
    for name, (config, family) in configs.items():
        path = root / f"{name}.gguf"
        write_random_hybrid(path, tokenizer_gguf(), config, family, quantized=quantized, mtp=name == "qwen35moe")
        convert(str(path), root / f"{name}-out", progress=False)
        out[name] = (path, root / f"{name}-out")
    return out


def reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_logits_and_tokens_equal_transformers(hybrid, name, placement):
    from runtime import LayeredModel

    path, folder = hybrid[name]
    ref = reference(path)
    with torch.no_grad():
        want, want_tokens = ref(IDS).logits, ref.generate(IDS, max_new_tokens=5, do_sample=False)
    # packed=False: kept blocks expand (the CPU kernels compute in bfloat16)
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert torch.equal(lm(IDS).logits, want)
        assert torch.equal(lm.generate(IDS, max_new_tokens=5, do_sample=False), want_tokens)


def stored_schemes(folder) -> dict[str, str]:
    manifest = read_manifest(folder)
    return {name: q["scheme"] for g in manifest.groups for name, q in g.quantized.items()}


def test_blocks_stay_where_the_conversion_only_moves_rows(hybrid):
    """Qwen3.5-MoE: the linear attention's q/k/v and z projections (value heads regrouped: a row
    order) and the gate+up experts (two tensors joined) keep their blocks; so does its output
    projection, whose *columns* follow the value heads, with their order; the norms stored as
    `w + 1` are un-offset; the multi-token-prediction block is dropped, as transformers drops it."""
    from safetensors import safe_open

    path, folder = hybrid["qwen35moe"]
    schemes = stored_schemes(folder)
    assert schemes["model.layers.0.linear_attn.in_proj_qkv.weight"] == "q4_k"
    assert schemes["model.layers.0.linear_attn.in_proj_z.weight"] == "q4_k"
    assert schemes["model.layers.0.mlp.experts.gate_up_proj"] == "int8"  # Q8_0 re-packed
    assert schemes["model.layers.1.self_attn.q_proj.weight"] == "q4_k"
    assert schemes["lm_head.weight"] == "q6_k"
    assert schemes["model.layers.0.linear_attn.out_proj.weight"] == "q6_k-reordered"
    ref = reference(path).state_dict()
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
            for key in ("model.layers.0.input_layernorm.weight", "model.layers.0.linear_attn.A_log"):
                if key in f.keys():
                    assert torch.equal(f.get_tensor(key), ref[key]), key
    assert not any(n.startswith("mtp") for n in names) and "model.layers.0.linear_attn.A_log" in names
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["model_type"] == "qwen3_5_moe_text"


def test_a_split_file_converts_as_the_whole_one(hybrid, tmp_path):
    """A Qwen3.5-MoE GGUF in three parts (as the large ones are published) converts to the same group
    files, byte for byte, as the one file."""
    from gguf_files import write_split

    path, folder = hybrid["qwen35moe"]
    parts = write_split(path, tmp_path / "q.gguf", parts=3)
    convert(str(parts[0]), tmp_path / "out", progress=False)
    whole, split = read_manifest(folder), read_manifest(tmp_path / "out")
    assert [(g.name, g.sha256) for g in split.groups] == [(g.name, g.sha256) for g in whole.groups]


@pytest.mark.parametrize("half", [Q.F16, Q.BF16])
def test_a_file_of_half_weights_converts_in_its_own_type(half, tmp_path):
    """A Qwen3.5-MoE GGUF of float16 (or bfloat16) weights and float32 norms, as llama.cpp's
    converter writes an unquantized file: the folder takes the weights' type (transformers loads it
    in that type too), so a decoder layer is no larger than its source, and keeps the float32 norms
    float32: loaded in float32, the logits are transformers' own float32 load of the file, bit for bit."""
    from gguf import GGUFReader
    from runtime import LayeredModel

    config = qwen35_config(moe=True, layers=4, hidden=256, vocab=TOKENIZER_VOCAB)
    path = tmp_path / "half.gguf"
    write_random_hybrid(path, tokenizer_gguf(), config, "qwen35", quantized=lambda name, columns: half)
    manifest = convert(str(path), tmp_path / "out", progress=False)
    assert manifest.dtype == ("float16" if half == Q.F16 else "bfloat16")
    layer = manifest.group("layers.0")
    assert layer.tensors["model.layers.0.input_layernorm.weight"]["dtype"] == "F32"
    assert layer.tensors["model.layers.0.linear_attn.in_proj_qkv.weight"]["dtype"] == ("F16" if half == Q.F16 else "BF16")
    source = sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name.startswith("blk.0."))
    assert layer.bytes <= 1.1 * source
    with torch.no_grad():
        want = reference(path)(IDS).logits
    with LayeredModel.from_pretrained(tmp_path / "out", device="cpu", dtype="float32", max_cpu_memory=0) as lm:
        assert torch.equal(lm(IDS).logits, want)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_layers_are_at_most_the_sources_bytes(hybrid, name):
    """Every decoder layer stores at most 1.1x the bytes its GGUF tensors take."""
    from gguf import GGUFReader

    path, folder = hybrid[name]
    source = {}
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk."):
            source[int(t.name.split(".")[1])] = source.get(int(t.name.split(".")[1]), 0) + int(t.n_bytes)
    layers = [g for g in read_manifest(folder).groups if g.kind == "layer"]
    assert len(layers) == 4
    for i, group in enumerate(layers):
        assert group.bytes <= 1.1 * source[i], (name, i, group.bytes, source[i])


def test_reordered_blocks_run_through_the_cpu_kernels_with_their_input_gathered(hybrid):
    """Where the native kernels are built, the output projection's Q6_K blocks multiply as stored,
    the input's columns gathered into the stored order: close to transformers' product (the
    kernels round activations to bfloat16), and far from the product without the gather."""
    from runtime import LayeredModel, native
    from runtime.lowbit import PackedLinear

    if native.lowbit() is None:
        pytest.skip("no native CPU kernels on this machine")
    path, folder = hybrid["qwen35moe"]
    name = "model.layers.0.linear_attn.out_proj"
    want_weight = reference(path).get_submodule(name).weight
    with LayeredModel.from_pretrained(folder, device="cpu", dtype="float32", max_cpu_memory="64GiB") as lm:
        module = lm.model.get_submodule(name)
        assert isinstance(module, PackedLinear) and module.spec.permuted
        lm(IDS)  # resident: every group loaded and kept
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
        got, want = module(x), x @ want_weight.T
        unordered = x[:, torch.argsort(module.qorder)] @ want_weight.T
    err = ((got - want).norm() / want.norm()).item()
    assert err < 0.03 and ((unordered - want).norm() / want.norm()).item() > 0.3, err
