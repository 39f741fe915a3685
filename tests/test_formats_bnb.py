"""bitsandbytes 4-bit checkpoints (NF4 with double quantization, FP4 without) convert keeping their codes
(reshard/bnb.py). Each is written by transformers' own bitsandbytes integration on the CPU; the reference
is the same model with every 4-bit weight de-quantized by bitsandbytes' own `dequantize_4bit`, in float32:
the runtime's logits equal it bit for bit, streamed and resident, with the same greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_runs_as
from reshard.convert import convert
from reshard.format import read_manifest

bnb = pytest.importorskip("bitsandbytes")  # a test extra (pyproject.toml): CI installs it

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128]])
KINDS = {  # name -> (quant type, double quantization, the source's dtype: the one bitsandbytes rounds to)
    "nf4": ("nf4", True, torch.bfloat16),
    "fp4": ("fp4", False, torch.float16),
}


def _make(root, kind: str):
    """(folder of the bitsandbytes checkpoint, its float32 reference model)."""
    import transformers as tf

    quant_type, double, dtype = KINDS[kind]
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(root / "src")
    q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=dtype)
    quantized = tf.AutoModelForCausalLM.from_pretrained(root / "src", quantization_config=q, device_map="cpu")
    quantized.save_pretrained(root / "bnb")
    reference = tf.AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(w.float())
    return root / "bnb", reference


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """kind -> (checkpoint folder, float32 reference, converted folder), made once per kind."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"bnb-{kind}")
            folder, reference = _make(root, kind)
            convert(str(folder), root / "out", progress=False)
            cache[kind] = folder, reference, root / "out"
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_and_tokens_equal_the_bitsandbytes_dequantization(made, kind):
    _, reference, folder = made(kind)
    layer = read_manifest(folder).group("layers.1")
    schemes = {info["scheme"] for info in layer.quantized.values()}
    assert schemes == {f"bnb4-{str(KINDS[kind][2]).removeprefix('torch.')}"} and len(layer.quantized) == 7
    assert_runs_as(reference, folder, IDS, new_tokens=5, dtype=torch.float32)


def test_decoder_layers_keep_about_the_source_bytes(made, capsys):
    """The codes and table as published, the double-quantized scales as float32: at most 1.1x the
    source's bytes (36 bytes per 64 weights against 33 at full size); `reshard info` names the format."""
    from reshard.cli import main

    source, _, folder = made("nf4")
    state = load_file(source / "model.safetensors")
    manifest = read_manifest(folder)
    for group in (g for g in manifest.groups if g.kind == "layer"):
        prefix = f"model.{group.name}."
        stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(prefix))
        assert group.bytes <= 1.1 * stored
    assert main(["info", str(folder)]) == 0
    assert "quantization  nf4 (from bitsandbytes)" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("option", [["--dtype", "bfloat16"], ["--quantize", "int8"]])
def test_explicit_dtype_or_quantize_reads_the_dequantized_weights(made, option, tmp_path):
    """`--dtype` stores bitsandbytes' de-quantized values; `--quantize` re-quantizes them."""
    from reshard.cli import main

    source, reference, _ = made("nf4")
    assert main(["convert", str(source), str(tmp_path / "out"), "--quiet", *option]) == 0
    group = read_manifest(tmp_path / "out").group("layers.0")
    name = "model.layers.0.mlp.down_proj.weight"
    if option[0] == "--quantize":
        assert group.quantized[name].get("scheme", "int8") == "int8"
        return
    assert not group.quantized
    stored = load_file(tmp_path / "out" / group.file)[name]
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.float(), reference.get_parameter(name))


def test_a_state_reshard_cannot_keep_is_one_line(made, tmp_path, capsys):
    from test_gguf import cli_convert

    source, _, _ = made("nf4")
    folder = tmp_path / "odd"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    meta = json.loads(bytes(state[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))
    meta["dtype"] = "float64"
    state[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert cli_convert(capsys, folder, tmp_path / "out") == (
        1, f"Error: {key} is a 4-bit bitsandbytes weight of shape [128, 256] (dtype 'float64', 512 blocks) that "
           "reshard cannot keep; convert with --dtype float16 (or bfloat16) to de-quantize it")


def test_per_expert_4bit_weights_are_refused_unless_dequantized(moe_checkpoints, tmp_path, capsys):
    """A Mixtral whose experts were saved as 4-bit linear layers, one per expert (transformers 4's
    layout): transformers now stacks them, which 4-bit codes cannot take; --dtype de-quantizes them."""
    from test_gguf import cli_convert

    folder = tmp_path / "mixtral-bnb"
    folder.mkdir()
    source = moe_checkpoints["mixtral"]
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    for f in source.glob("*.safetensors"):
        state = load_file(f)
        for key in [k for k in state if ".experts." in k and k.endswith(".weight")]:
            packed, quant_state = bnb.functional.quantize_4bit(state[key], blocksize=64, quant_type="nf4")
            state[key] = packed
            state.update({f"{key}.{k}": v for k, v in quant_state.as_dict(packed=True).items()})
        save_file(state, folder / f.name, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    code, line = cli_convert(capsys, folder, tmp_path / "out")
    assert code == 1 and line.startswith("Error: model.layers.0.block_sparse_moe.experts.0.")
    assert line.endswith(" is a 4-bit bitsandbytes weight that transformers combines with others at load; convert "
                         "with --dtype float16 (or bfloat16) to de-quantize it")
    from reshard.cli import main

    assert main(["convert", str(folder), str(tmp_path / "out16"), "--dtype", "float16", "--quiet"]) == 0
    assert not any(g.quantized for g in read_manifest(tmp_path / "out16").groups)

