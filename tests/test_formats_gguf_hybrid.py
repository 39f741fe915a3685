"""GGUF files of the architectures transformers loads through its newer GGUF path (Qwen3.5 dense
and MoE, LFM2: reshard/gguf_conversions.py) convert with their names, norms, value-head order and
merged experts as transformers makes them; blocks stay blocks wherever the conversion only moves
whole rows (Qwen3.5's value-head regrouping, the gate and up experts joined), and the runtime,
streamed and resident, equals transformers' own `from_pretrained(..., gguf_file=...)` bit for bit."""

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
    order) and the gate+up experts (two tensors joined) keep their blocks; its output projection,
    whose *columns* follow the value heads, is de-quantized; the norms stored as `w + 1` are un-offset;
    the multi-token-prediction block is dropped, as transformers drops it."""
    from safetensors import safe_open

    path, folder = hybrid["qwen35moe"]
    schemes = stored_schemes(folder)
    assert schemes["model.layers.0.linear_attn.in_proj_qkv.weight"] == "q4_k"
    assert schemes["model.layers.0.linear_attn.in_proj_z.weight"] == "q4_k"
    assert schemes["model.layers.0.mlp.experts.gate_up_proj"] == "int8"  # Q8_0 re-packed
    assert schemes["model.layers.1.self_attn.q_proj.weight"] == "q4_k"
    assert schemes["lm_head.weight"] == "q6_k"
    assert "model.layers.0.linear_attn.out_proj.weight" not in schemes
    ref = reference(path).state_dict()
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
            for key in ("model.layers.0.linear_attn.out_proj.weight", "model.layers.0.input_layernorm.weight",
                        "model.layers.0.linear_attn.A_log"):
                if key in f.keys():
                    assert torch.equal(f.get_tensor(key), ref[key]), key
    assert not any(n.startswith("mtp") for n in names) and "model.layers.0.linear_attn.A_log" in names
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["model_type"] == "qwen3_5_moe_text"


@pytest.mark.parametrize("name", MODELS)
def test_decoder_layers_are_at_most_the_sources_bytes(hybrid, name):
    """Every decoder layer stores at most 1.1x the bytes its GGUF tensors take, but for the output
    projections a Qwen3.5 file's de-quantization costs (float32 where the file holds Q6_K)."""
    from gguf import GGUFReader

    path, folder = hybrid[name]
    source = {}
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and not t.name.endswith("ssm_out.weight"):
            source[int(t.name.split(".")[1])] = source.get(int(t.name.split(".")[1]), 0) + int(t.n_bytes)
    manifest = read_manifest(folder)
    for i, group in enumerate(g for g in manifest.groups if g.kind == "layer"):
        out_proj = group.tensors.get(f"model.layers.{i}.linear_attn.out_proj.weight")
        dense = 4 * torch.Size(out_proj["shape"]).numel() if out_proj else 0
        assert group.bytes - dense <= 1.1 * source[i], (name, i)
