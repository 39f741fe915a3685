"""NVFP4 checkpoints (compressed-tensors' nvfp4-pack-quantized: e2m1 codes, an fp8 scale per 16 weights, a
float32 global scale per tensor) convert keeping their bytes (reshard/nvfp4.py). Each is written with
compressed-tensors' own compressor from a tiny random model, a dense Llama and a Qwen3-MoE whose experts are
one tensor each as on the hub; the runtime's float32 logits equal transformers' own de-compressed load of
the same checkpoint bit for bit, streamed and resident, with the same greedy tokens."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_runs_as
from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 128]])
WEIGHTS = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True, dynamic=False)


def write_nvfp4(src, out) -> None:
    """`src` (a safetensors checkpoint) as an NVFP4 one: every decoder layer's projection weight through
    compressed-tensors' NVFP4 compressor (global scale 448 * 6 / amax, group scales amax / 6 in fp8), as
    llm-compressor's NVFP4 recipe writes them; the config says so."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**WEIGHTS))
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    for f in src.glob("*.safetensors"):
        state = {}
        for key, t in load_file(f).items():
            if not (".layers." in key and key.endswith("proj.weight") and t.dim() == 2):
                state[key] = t
                continue
            w = t.float()
            global_scale = torch.tensor([448.0 * 6.0]) / w.abs().max()
            scale = (w.view(w.shape[0], -1, 16).abs().amax(-1) / 6.0 * global_scale).to(torch.float8_e4m3fn).float()
            parts = NVFP4PackedCompressor.compress({"weight": t, "weight_scale": scale,
                                                    "weight_global_scale": global_scale}, scheme)
            state.update({key[:-len("weight")] + name: v for name, v in parts.items()})
        save_file(state, out / f.name, metadata={"format": "pt"})
    if (out / "model.safetensors.index.json").is_file():  # the index names the new tensors
        index = json.loads((out / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f.name for f in out.glob("*.safetensors") for k in load_file(f)}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"format": "nvfp4-pack-quantized", "targets": ["Linear"],
                                                             "weights": WEIGHTS, "input_activations": None}}}
    (out / "config.json").write_text(json.dumps(config))


def reference(folder):
    """transformers' own load of the checkpoint, its weights de-compressed by compressed-tensors."""
    import transformers as tf

    config = tf.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # "the model already has a quantization_config": the point of passing one
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`", category=UserWarning)
        return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()


def decompressed(folder, out):
    """The checkpoint with each NVFP4 weight de-compressed by compressed-tensors' own compressor, tensor by
    tensor, loaded by transformers (which fuses the experts): the reference for a MoE, whose de-compressed
    load transformers gets wrong (its stacked experts come out unscaled by the global scale)."""
    import transformers as tf
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**WEIGHTS))
    out.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    for f in folder.glob("*.safetensors"):
        state = load_file(f)
        for prefix in [k[:-len("weight_packed")] for k in state if k.endswith("weight_packed")]:
            parts = {n: state.pop(prefix + n) for n in ("weight_packed", "weight_scale", "weight_global_scale")}
            state[prefix + "weight"] = NVFP4PackedCompressor.decompress(parts, scheme)["weight"]
        save_file(state, out / f.name, metadata={"format": "pt"})
    if (out / "model.safetensors.index.json").is_file():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f.name for f in out.glob("*.safetensors") for k in load_file(f)}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory, moe_checkpoints):
    """"llama" / "qwen3_moe" -> (NVFP4 checkpoint, converted folder), made once each."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"nvfp4-{arch}")
            if arch == "llama":
                import transformers as tf

                config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False)
                torch.manual_seed(0)
                tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(root / "src")
                src = root / "src"
            else:
                src = moe_checkpoints[arch]
            write_nvfp4(src, root / "nvfp4")
            convert(str(root / "nvfp4"), root / "out", progress=False)
            cache[arch] = root / "nvfp4", root / "out"
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_logits_and_tokens_equal_transformers_load(made, arch, tmp_path):
    source, folder = made(arch)
    layer = read_manifest(folder).group("layers.1")
    assert layer.quantized and all(k.endswith(("proj.weight", "proj")) for k in layer.quantized)
    ref = reference(source) if arch == "llama" else decompressed(source, tmp_path / "reference")

    def experts_read_alone(lm, placement):
        if arch == "qwen3_moe" and placement == "streamed":
            assert lm.stats.per_pass[-1].experts_read > 0  # each expert's NVFP4 bytes read alone

    assert_runs_as(ref, folder, IDS, new_tokens=5, check=experts_read_alone, dtype=torch.float32)


def test_decoder_layers_keep_the_source_bytes(made, capsys):
    from reshard.cli import main

    source, folder = made("llama")
    state = load_file(source / "model.safetensors")
    for group in (g for g in read_manifest(folder).groups if g.kind == "layer"):
        prefix = f"model.{group.name}."
        stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(prefix))
        assert group.bytes <= 1.1 * stored
    assert main(["info", str(folder)]) == 0
    assert "quantization  nvfp4 group 16" in capsys.readouterr().out.splitlines()


def test_explicit_dtype_stores_the_decompressed_weights(made, tmp_path):
    from reshard.cli import main

    source, _ = made("llama")
    assert main(["convert", str(source), str(tmp_path / "out"), "--quiet", "--dtype", "bfloat16"]) == 0
    group = read_manifest(tmp_path / "out").group("layers.0")
    assert not group.quantized
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(load_file(tmp_path / "out" / group.file)[name].float(), reference(source).get_parameter(name))


def _edited(source, out, edit) -> None:
    shutil.copytree(source, out)
    for f in out.glob("*.safetensors"):
        state = load_file(f)
        edit(state)
        save_file(state, f, metadata={"format": "pt"})


def test_parts_that_make_no_weight_are_one_line(made, tmp_path, capsys):
    from test_gguf import cli_convert

    key = "model.layers.0.mlp.down_proj.weight"

    def edit(state):
        state[key + "_scale"] = state[key + "_scale"][:, :-1].contiguous()

    _edited(made("llama")[0], tmp_path / "src", edit)
    assert cli_convert(capsys, tmp_path / "src", tmp_path / "out") == (
        1, f"Error: {key} is an NVFP4 weight whose parts have shapes [128, 128], [128, 15] and [1], which do not make "
           "one (out, in) weight in groups of 16; is the config the one of these weights?")


def test_experts_of_nvfp4_and_unquantized_tensors_are_one_line(made, tmp_path, capsys):
    from test_gguf import cli_convert

    prefix = "model.layers.1.mlp.experts.3.up_proj."

    def edit(state):
        if prefix + "weight_packed" in state:  # this expert's up projection left unquantized
            packed = state.pop(prefix + "weight_packed")
            state.pop(prefix + "weight_scale"), state.pop(prefix + "weight_global_scale")
            state[prefix + "weight"] = torch.zeros(packed.shape[0], packed.shape[1] * 2, dtype=torch.bfloat16)

    _edited(made("qwen3_moe")[0], tmp_path / "src", edit)
    index = tmp_path / "src" / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: f.name for f in (tmp_path / "src").glob("*.safetensors") for k in load_file(f)}
        index.write_text(json.dumps(data))
    code, line = cli_convert(capsys, tmp_path / "src", tmp_path / "out")
    assert code == 1 and line.startswith("Error: 'model.layers.1.mlp.experts.")
    assert line.endswith(f"is made from NVFP4 tensors and unquantized ones such as '{prefix}weight', so it cannot be "
                         "kept in NVFP4; de-quantize the checkpoint with --dtype bfloat16")


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def write_modelopt(src, out, reference, *, beside: bool = False) -> None:
    """`src` as NVIDIA ModelOpt exports NVFP4 into `out` (`X.weight` the codes, `X.weight_scale` fp8 per 16,
    `X.weight_scale_2` F32 [] multiplying them, `X.input_scale`, and the FP8 KV cache's `k_scale`/`v_scale`),
    and into `reference` the same checkpoint unquantized, each weight by ModelOpt's published
    de-quantization (`NVFP4QTensor.dequantize`: `e2m1[q] * (float32(scale) * scale_2)`, the even column in
    the low nibble), computed here."""
    shutil.copytree(src, out)
    shutil.copytree(src, reference)
    table = torch.tensor(E2M1)
    for f in out.glob("*.safetensors"):
        state = load_file(f)
        dense = dict(state)
        for key in [k for k in state if ".layers." in k and k.endswith("proj.weight")]:
            w = state[key].float()
            scale_2 = w.abs().max() / (6.0 * 448.0)
            scale = (w.view(w.shape[0], -1, 16).abs().amax(-1) / 6.0 / scale_2).to(torch.float8_e4m3fn)
            divisor = (scale.float() * scale_2).repeat_interleave(16, dim=1)
            codes = (w / divisor).unsqueeze(-1).sub(table).abs().argmin(-1).to(torch.uint8)  # the nearest e2m1 value
            state[key] = codes[:, 0::2] | (codes[:, 1::2] << 4)
            state[key + "_scale"], state[key + "_scale_2"] = scale, scale_2.reshape(())
            state[key[:-len("weight")] + "input_scale"] = torch.tensor(1.0)
            dense[key] = table[codes.long()] * divisor
        if "model.layers.0.self_attn.k_proj.weight" in state:
            for kv in ("k", "v"):
                state[f"model.layers.0.self_attn.{kv}_proj.{kv}_scale"] = torch.tensor(1.0)
        save_file(state, f, metadata={"format": "pt"})
        save_file(dense, reference / f.name, metadata={"format": "pt"})
    if (out / "model.safetensors.index.json").is_file():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: f.name for f in out.glob("*.safetensors") for k in load_file(f)}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    quantization = {"quant_algo": "NVFP4", "group_size": 16, "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    if beside:  # older exports: hf_quant_config.json alone says it
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                              "quantization": quantization}))
        return
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", **quantization}
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch, where", [("llama", "config.json"), ("llama", "hf_quant_config.json"),
                                         ("qwen3_moe", "config.json")])
def test_modelopt_layout_equals_its_published_dequantization(made, moe_checkpoints, tmp_path, arch, where):
    """NVIDIA's ModelOpt NVFP4 (transformers cannot load it pre-quantized), its quantization said in
    config.json or, as older exports do, in hf_quant_config.json alone: the codes and scales kept (scheme
    nvfp4-modelopt; a MoE's per-expert codes fused part by part), the float32 logits those of the model
    holding ModelOpt's de-quantized weights, bit for bit, streamed and resident; activation and KV-cache
    scales left out."""
    import transformers as tf

    src = made("llama")[0].parent / "src" if arch == "llama" else moe_checkpoints[arch]
    write_modelopt(src, tmp_path / "modelopt", tmp_path / "reference", beside=where != "config.json")
    convert(str(tmp_path / "modelopt"), tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.quantization["scheme"] == "nvfp4-modelopt"
    layer = manifest.group("layers.1")
    if arch == "llama":
        assert len(layer.quantized) == 7
    else:  # each expert's codes and scales one range of the [E, ...] parts
        assert {k.rpartition(".")[2] for k in layer.quantized if ".experts." in k} == {"gate_up_proj", "down_proj"}
    assert not any(k.endswith(("input_scale", "k_scale", "v_scale", "weight_scale_2")) for k in layer.tensors)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32).eval()
    assert_runs_as(ref, tmp_path / "out", IDS, new_tokens=5, dtype=torch.float32)
