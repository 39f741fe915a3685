"""reshard.synthetic.write_random_model: random folders, plain and quantized, that the runtime opens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import pass_bytes

from reshard.format import quant_part_names, read_manifest
from reshard.quant import quantize as quantize_weight
from reshard.synthetic import write_random_model
from runtime.model import LayeredModel

# big enough that per-row scales and file headers do not blur the byte ratios
SHAPES = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
              vocab_size=500, num_hidden_layers=2, tie_word_embeddings=False)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES)


def _layer_file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("layers.*.safetensors"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    made = {"fp16": write_random_model(_config(), root / "fp16")}
    made["int8"] = write_random_model(_config(), root / "int8", quantize="int8")
    made["int4"] = write_random_model(_config(), root / "int4", quantize="int4", quantize_group=32)
    made["fp8"] = write_random_model(_config(), root / "fp8", quantize="fp8")
    return root


def test_quantized_random_folders_are_a_fraction_of_fp16(folders):
    fp16 = _layer_file_bytes(folders / "fp16")
    assert _layer_file_bytes(folders / "int8") <= 0.53 * fp16
    assert _layer_file_bytes(folders / "int4") <= 0.33 * fp16
    assert read_manifest(folders / "int4").quantization == {"scheme": "int4", "group_size": 32, "embeddings": False}
    assert read_manifest(folders / "fp16").quantization is None
    assert _layer_file_bytes(folders / "fp8") <= 0.51 * fp16
    assert read_manifest(folders / "fp8").quantization["scheme"] == "fp8-block"


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4", "fp8"])
def test_random_folder_opens_and_gives_finite_logits(folders, scheme):
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    lm = LayeredModel.from_pretrained(folders / scheme, device="cpu", dtype="float32", max_cpu_memory=0)
    logits = lm(ids).logits
    want = pass_bytes(lm, ids)
    lm.close()
    assert logits.shape == (1, 7, 500)
    assert torch.isfinite(logits).all()
    assert lm.stats.per_pass[-1].bytes == want  # the stored bytes streamed


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int4", 32)])
def test_quantized_folder_holds_the_fp16_weights_quantized_as_convert_does(folders, scheme, group):
    """Same seed, same draws: every quantized part equals reshard.quant of the fp16 folder's weight,
    and everything left unquantized (norms, embeddings, head) is byte-identical."""
    manifest = read_manifest(folders / scheme)
    layer = manifest.group("layers.1")
    assert len(layer.quantized) == 7  # q, k, v, o, gate, up, down
    plain = load_file(folders / "fp16" / layer.file)
    stored = load_file(folders / scheme / layer.file)
    for param, info in layer.quantized.items():
        w = plain.pop(param)
        assert info == {"shape": list(w.shape), "dtype": "F16", "transposed": False}
        want = quantize_weight(w, scheme, group=group, dtype=torch.float16)
        for part, name in quant_part_names(param, scheme).items():
            assert torch.equal(stored.pop(name), want[part]), name
    assert stored.keys() == plain.keys() and all(torch.equal(stored[n], plain[n]) for n in plain)
    for name in ("embed", "norm", "head"):
        file = manifest.group(name).file
        assert (folders / scheme / file).read_bytes() == (folders / "fp16" / file).read_bytes()



def test_fp8_folder_holds_the_fp16_weights_with_block_scales(folders):
    """Same seed, same draws: each fp8 weight times its 128x128 block scales is the fp16 weight
    within fp8's rounding, and the runtime's logits equal a float32 model of those expanded weights."""
    from transformers import AutoModelForCausalLM

    from reshard.fp8 import dequantize_fp8

    manifest = read_manifest(folders / "fp8")
    state = {}
    for group in manifest.groups:
        plain, stored = load_file(folders / "fp16" / group.file), load_file(folders / "fp8" / group.file)
        for param in group.quantized:
            q, scale = stored.pop(f"{param}.qweight"), stored.pop(f"{param}.scale_inv")
            assert q.dtype == torch.float8_e4m3fn  # a grid of 128x128 blocks, or of their divisors at ragged edges
            assert all(n % g == 0 and n // g in (128, math.gcd(n, 128)) for n, g in zip(q.shape, scale.shape))
            w = dequantize_fp8(q, scale, dtype=torch.float32)
            assert (w - plain[param].float()).abs().max() <= 0.07 * plain[param].float().abs().max()
            state[param] = w
        state.update((n, t.float()) for n, t in stored.items())
    reference = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32).eval()
    reference.load_state_dict(state, strict=False)
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(1))
    lm = LayeredModel.from_pretrained(folders / "fp8", device="cpu", dtype="float32", max_cpu_memory=0)
    got = lm(ids).logits
    lm.close()
    with torch.no_grad():
        assert torch.equal(got, reference(ids).logits)


def test_fp8_moe_folder_keeps_one_range_per_expert(tmp_path):
    """DeepSeek-V3's layout at tiny width: [E, out, in] fp8 experts with [E, rows/128, cols/128]
    scales, and kv_a_proj's 48 rows on a grid of their own; the runtime streams routed experts only."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, n_routed_experts=8,
                              num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, num_attention_heads=2,
                              num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=32, qk_rope_head_dim=16,
                              qk_nope_head_dim=32, v_head_dim=32, num_hidden_layers=2, first_k_dense_replace=1,
                              vocab_size=300, tie_word_embeddings=False)
    manifest = write_random_model(config, tmp_path / "dsv3", quantize="fp8")
    layer = manifest.group("layers.1")
    experts = layer.tensors["mlp.experts.gate_up_proj.qweight".join(["model.layers.1.", ""])]
    assert experts["dtype"] == "F8_E4M3" and experts["shape"] == [8, 256, 256]
    assert layer.tensors["model.layers.1.mlp.experts.gate_up_proj.scale_inv"]["shape"] == [8, 2, 2]
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    lm = LayeredModel.from_pretrained(tmp_path / "dsv3", device="cpu", dtype="float32", max_cpu_memory=0)
    logits = lm(ids).logits
    lm.close()
    assert torch.isfinite(logits).all() and lm.stats.per_pass[-1].experts_read < 8 * 5
