"""reshard.synthetic.write_random_model: random folders, plain and quantized, that the runtime opens."""

from __future__ import annotations

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
    return root


def test_quantized_random_folders_are_a_fraction_of_fp16(folders):
    fp16 = _layer_file_bytes(folders / "fp16")
    assert _layer_file_bytes(folders / "int8") <= 0.53 * fp16
    assert _layer_file_bytes(folders / "int4") <= 0.33 * fp16
    assert read_manifest(folders / "int4").quantization == {"scheme": "int4", "group_size": 32, "embeddings": False}
    assert read_manifest(folders / "fp16").quantization is None


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4"])
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

