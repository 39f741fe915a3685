"""Published FP8 checkpoints (block scales, `quant_method: "fp8"`) convert keeping their bytes and
run exactly as transformers runs them once it has de-quantized them on the CPU.

The tests write tiny random checkpoints in the layout published models use: bfloat16 norms and
embeddings, each decoder linear weight float8_e4m3fn beside a float32 `weight_scale_inv` grid;
DeepSeek-V3's routed experts one tensor per expert, as on the hub."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import CPU_BUDGETS, PLACEMENTS, GroupWrites, assert_runs_as, converted_each, moe_config, save_published
from reshard.convert import convert
from reshard.format import GroupFile, expert_range, expert_tensors, read_header, read_manifest
from reshard.fp8 import quantize_fp8
from runtime import LayeredModel

IDS = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
# DeepSeek's grid is finer than its 128x128 so the tiny experts have several blocks per weight
BLOCKS = {"llama": [128, 128], "deepseek_v3": [8, 8]}


def config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return moe_config(arch)


def is_fp8(key: str) -> bool:
    """The tensors DeepSeek-V3's checkpoint stores in fp8: the decoder's linear weights, not the router."""
    return ".layers." in key and key.endswith(".weight") and "_proj" in key


def save_fp8(arch: str, folder, plain, block: list[int] | None = None):
    """A tiny random fp8 checkpoint of `arch` in `folder` (its hub layout written first to `plain`)."""
    block = block or BLOCKS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch)).to(torch.bfloat16)
    for name, buf in model.named_buffers():  # DeepSeek's router bias: a checkpoint value, not zeros
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand(buf.shape) * 0.1)
    model.save_pretrained(plain)
    tensors = {}
    for path in plain.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if is_fp8(key):
                    tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(t, block)
                else:
                    tensors[key] = t
    return save_published(folder, plain, tensors, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                   "weight_block_size": block})


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """arch -> (fp8 checkpoint, its conversion with default options)."""
    return converted_each(tmp_path_factory.mktemp("fp8"), BLOCKS, save_fp8)


def reference(src):
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def source_bytes(src) -> dict[int, int]:
    """Bytes of each decoder layer's tensors in the source checkpoint."""
    out = {}
    for key, info in read_header(src / "model.safetensors")[0].items():
        if ".layers." in key:
            i = int(key.split(".layers.")[1].split(".")[0])
            out[i] = out.get(i, 0) + info.nbytes
    return out


@pytest.mark.parametrize("arch", BLOCKS)
def test_fp8_weights_are_stored_as_published(arch, fp8):
    src, out = fp8[arch]
    manifest = read_manifest(out)
    assert manifest.quantization["scheme"] == "fp8-block"
    assert manifest.quantization["block_size"] == BLOCKS[arch]
    with safe_open(src / "model.safetensors", "pt") as f:
        group = manifest.group("layers.1")
        gf = GroupFile(out / group.file, group)
        name = "model.layers.1.self_attn.o_proj.weight"
        assert group.tensors[f"{name}.qweight"]["dtype"] == "F8_E4M3"
        assert torch.equal(gf.tensor(f"{name}.qweight").view(torch.uint8), f.get_tensor(name).view(torch.uint8))
        assert torch.equal(gf.tensor(f"{name}.scale_inv"), f.get_tensor(name + "_scale_inv"))


@pytest.mark.parametrize("arch", BLOCKS)
def test_layer_bytes_at_most_the_sources(arch, fp8):
    src, out = fp8[arch]
    have = source_bytes(src)
    for group in read_manifest(out).groups:
        if group.name.startswith("layers."):
            assert group.bytes <= 1.1 * have[int(group.name.split(".")[1])], group.name


def test_each_fp8_expert_is_one_range_of_its_bytes_and_scales(fp8):
    """DeepSeek's per-expert fp8 tensors fused to [E, ...] parts: expert e's rows of the fused
    qweight and scale_inv are expert e's own gate (then up) bytes and scales from the source."""
    src, out = fp8["deepseek_v3"]
    group = read_manifest(out).group("layers.1")
    gf = GroupFile(out / group.file, group)
    counts = expert_tensors(group)
    assert set(counts) == {f"model.layers.1.mlp.experts.{p}.{part}" for p in ("gate_up_proj", "down_proj")
                           for part in ("qweight", "scale_inv")}
    with safe_open(src / "model.safetensors", "pt") as f:
        for e in (0, 5):
            for part, suffix in (("qweight", ""), ("scale_inv", "_scale_inv")):
                name = f"model.layers.1.mlp.experts.gate_up_proj.{part}"
                lo, hi = expert_range(gf.infos[name], counts[name], e)
                got = gf.data((lo, hi))
                want = torch.cat([f.get_tensor(f"model.layers.1.mlp.experts.{e}.{p}.weight{suffix}") for p in
                                  ("gate_proj", "up_proj")])
                assert torch.equal(got, want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", BLOCKS)
def test_logits_equal_transformers(arch, placement, fp8):
    src, out = fp8[arch]
    ref = reference(src)
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32,
                                         max_cpu_memory=CPU_BUDGETS[placement])
    with torch.no_grad():
        want = ref(IDS).logits
    assert torch.equal(model(IDS).logits, want)
    if placement == "streamed" and arch == "deepseek_v3":  # routed experts read and expanded one by one
        assert model.stats.experts_read > 0


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", BLOCKS)
def test_greedy_tokens_equal_transformers(arch, placement, fp8):
    src, out = fp8[arch]
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32,
                                         max_cpu_memory=CPU_BUDGETS[placement])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    got = model.generate(ids, **GREEDY)
    assert got.shape[1] == ids.shape[1] + 8
    assert torch.equal(got, reference(src).generate(ids, **GREEDY))


def test_explicit_dtype_dequantizes_at_convert(fp8, tmp_path):
    """--dtype bfloat16: every weight stored de-quantized, equal to transformers' own bfloat16 load."""
    src, _ = fp8["deepseek_v3"]
    manifest = convert(str(src), tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert manifest.quantization is None
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    group = manifest.group("layers.1")
    gf = GroupFile(tmp_path / "bf16" / group.file, group)
    for name in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.gate_up_proj"):
        assert torch.equal(gf.tensor(name), ref.get_parameter(name))


def test_quantize_int8_requantizes_the_dequantized_weights(fp8, tmp_path):
    from reshard.quant import quantize

    src, _ = fp8["llama"]
    manifest = convert(str(src), tmp_path / "int8", quantize="int8", progress=False)
    assert manifest.quantization["scheme"] == "int8"
    ref = reference(src)
    group = manifest.group("layers.0")
    gf = GroupFile(tmp_path / "int8" / group.file, group)
    name = "model.layers.0.mlp.down_proj.weight"
    want = quantize(ref.get_parameter(name).detach(), "int8", dtype=torch.bfloat16)  # as from a float32 source
    assert torch.equal(gf.tensor(f"{name}.qweight"), want["qweight"])
    assert torch.equal(gf.tensor(f"{name}.scales"), want["scales"])


# --- compressed-tensors float8 (weight-only: per output row or one scale per tensor) ---------

def save_compressed_fp8(strategy: str, folder, plain):
    """A tiny Llama in compressed-tensors' float-quantized layout: `X.weight` float8_e4m3fn and its
    bfloat16 `X.weight_scale` ([out, 1] per row, [1], or a grid of CT_BLOCK blocks, the last ones
    partial where CT_BLOCK does not divide the weight)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("llama")).to(torch.bfloat16)
    model.save_pretrained(plain)
    tensors = {}
    with safe_open(plain / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if is_fp8(key) and strategy == "block":
                q, scale = quantize_fp8(t, CT_BLOCK)
                tensors[key], tensors[key[:-len("weight")] + "weight_scale"] = q, scale.to(torch.bfloat16)
            elif is_fp8(key):
                amax = t.float().abs().amax(dim=1, keepdim=True) if strategy == "channel" else t.float().abs().amax().reshape(1)
                scale = (amax / 448).to(torch.bfloat16)
                tensors[key] = (t.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
                tensors[key[:-len("weight")] + "weight_scale"] = scale
            else:
                tensors[key] = t
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               **({"block_structure": CT_BLOCK} if strategy == "block" else {})}
    return save_published(folder, plain, tensors, {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}})


STRATEGIES = ["channel", "tensor", "block"]
CT_BLOCK = [96, 96]  # 384 columns in 4 blocks, 256 rows in 3 (the last one partial)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """strategy -> (compressed-tensors checkpoint, its conversion with default options)."""
    return converted_each(tmp_path_factory.mktemp("ct-fp8"), STRATEGIES, save_compressed_fp8)


def formula_reference(src):
    """The published de-quantization, computed here: a plain float32 model of the checkpoint's
    config whose fp8 weights are `weight.float() * weight_scale.float()` (a block grid's scale of
    weight [i, j] being scale[i // block, j // block])."""
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    model = AutoModelForCausalLM.from_config(type(config("llama")).from_dict(cfg)).float().eval()
    with safe_open(src / "model.safetensors", "pt") as f:
        state = {}
        for key in f.keys():
            if key.endswith(("weight_scale", "input_scale", "k_scale", "v_scale")):
                continue
            t = f.get_tensor(key)
            if t.dtype == torch.float8_e4m3fn:
                scale = f.get_tensor(key + "_scale").float()
                if scale.dim() == 2 and scale.shape[1] > 1:
                    scale = scale[torch.arange(t.shape[0]) // CT_BLOCK[0]][:, torch.arange(t.shape[1]) // CT_BLOCK[1]]
                t = t.float() * scale
            state[key] = t.float()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compressed_fp8_is_stored_as_published(strategy, compressed):
    src, out = compressed[strategy]
    manifest = read_manifest(out)
    assert manifest.quantization["scheme"] == "fp8-block"
    assert manifest.quantization["source_method"] == "compressed-tensors"
    group = manifest.group("layers.0")
    gf = GroupFile(out / group.file, group)
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(src / "model.safetensors", "pt") as f:
        assert torch.equal(gf.tensor(f"{name}.qweight").view(torch.uint8), f.get_tensor(name).view(torch.uint8))
        stored, want = gf.tensor(f"{name}.scale_inv"), f.get_tensor(name + "_scale")
        if strategy == "block":  # 256 columns end in a partial block: sub-blocks of gcd(256, 96) = 32
            want = want[:, torch.arange(256 // 32) * 32 // CT_BLOCK[1]]
        assert torch.equal(stored, want)
    have = source_bytes(src)
    assert all(g.bytes <= 1.1 * have[int(g.name.split(".")[1])] for g in manifest.groups if g.name.startswith("layers."))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compressed_fp8_logits_and_tokens_equal_the_formula(strategy, placement, compressed):
    src, out = compressed[strategy]
    ref = formula_reference(src)
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32,
                                         max_cpu_memory=CPU_BUDGETS[placement])
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert torch.equal(model.generate(ids, **GREEDY), ref.generate(ids, **GREEDY))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compressed_fp8_logits_equal_transformers_own_load(strategy, compressed):
    """Where the compressed-tensors package is installed (the test extra), transformers' own load."""
    pytest.importorskip("compressed_tensors")
    src, out = compressed[strategy]
    ref = reference(src)
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, max_cpu_memory=0)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def plain_llama(folder) -> dict:
    """The tensors of a tiny bfloat16 llama, saved in `folder` (its config is the published checkpoints')."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config("llama")).to(torch.bfloat16).save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_modelopt_fp8_equals_the_formula(tmp_path):
    """NVIDIA ModelOpt's FP8 (`quant_method: "modelopt"`, `quant_algo: "FP8"`): `X.weight` float8, one float32
    `X.weight_scale` per tensor ([]), activation and KV-cache scales beside them (left out). Kept as published
    (scheme fp8-block, a 1x1 grid); float32 logits and greedy tokens those of the formula, streamed and resident."""
    tensors = plain_llama(tmp_path / "plain")
    for key, t in list(tensors.items()):
        if is_fp8(key):
            scale = t.float().abs().amax() / 448
            tensors[key] = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[key + "_scale"], tensors[key[:-len("weight")] + "input_scale"] = scale, torch.tensor(1.0)
    for kv in ("k", "v"):
        tensors[f"model.layers.0.self_attn.{kv}_proj.{kv}_scale"] = torch.tensor(1.0)
    src = save_published(tmp_path / "src", tmp_path / "plain", tensors, {
        "quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    convert(str(src), tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.quantization["scheme"] == "fp8-block" and manifest.quantization["source_method"] == "modelopt"
    assert len(manifest.group("layers.0").quantized) == 7
    assert_runs_as(formula_reference(src), tmp_path / "out", torch.tensor([[5, 17, 42, 99, 7]]), new_tokens=8,
                   dtype=torch.float32)


def test_fbgemm_fp8_equals_the_formula(tmp_path):
    """Meta's row-wise FP8 (`quant_method: "fbgemm_fp8"`, Llama-3.1-405B-Instruct-FP8): `X.weight` float8, one
    float32 `X.weight_scale` per output row ([out, 1]); transformers runs it only through fbgemm's CUDA kernels,
    so the reference is the published formula. Kept as published (scheme fp8-block, an [out, 1] grid); float32
    logits and greedy tokens those of the formula, streamed and resident."""
    tensors = plain_llama(tmp_path / "plain")
    for key, t in list(tensors.items()):
        if is_fp8(key) and ".self_attn." not in key:  # the 405B leaves attention unquantized
            scale = t.float().abs().amax(dim=1, keepdim=True) / 448
            tensors[key], tensors[key + "_scale"] = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    src = save_published(tmp_path / "src", tmp_path / "plain", tensors, {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]})
    convert(str(src), tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.quantization["scheme"] == "fp8-block" and manifest.quantization["source_method"] == "fbgemm_fp8"
    layer = manifest.group("layers.0")
    assert len(layer.quantized) == 3 and layer.tensors["model.layers.0.mlp.up_proj.weight.scale_inv"]["shape"][1] == 1
    assert_runs_as(formula_reference(src), tmp_path / "out", torch.tensor([[5, 17, 42, 99, 7]]), new_tokens=8,
                   dtype=torch.float32)


def test_interrupted_fp8_conversion_resumes_byte_identical(fp8, tmp_path, monkeypatch):
    src, done = fp8["deepseek_v3"]
    writes = GroupWrites(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        convert(str(src), tmp_path / "c", progress=False)
    writes.resume()
    convert(str(src), tmp_path / "c", progress=False)  # the same command again: resumes
    written = writes.names
    assert written[:2] == ["embed.safetensors", "layers.00000.safetensors"]
    assert "layers.00000.safetensors" not in written[2:] and "layers.00001.safetensors" in written[2:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == {
        p.name: p.read_bytes() for p in done.iterdir()}


def _fp8_llama(folder, layers: int) -> int:
    """An fp8 Llama of `layers` layers (hidden 512) in one shard; the bytes of one source layer."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=4, dtype="bfloat16")
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).state_dict()
    tensors = {}
    for key, t in state.items():
        if is_fp8(key):
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(t, (128, 128))
        else:
            tensors[key] = t.contiguous()
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return sum(info.nbytes for key, info in read_header(folder / "model.safetensors")[0].items()
               if ".layers.0." in key)


@pytest.fixture(scope="module")
def fp8_big_and_small(tmp_path_factory):
    """A 12-layer and a 1-layer fp8 llama built once per run, shared by both dtypes of the
    peak-memory test; returns their root folder and the bytes of one source layer."""
    from conftest import built_once

    def build(root):
        (root / "layer_bytes").write_text(str(_fp8_llama(root / "big", 12)))
        _fp8_llama(root / "small", 1)

    root = built_once(tmp_path_factory, "fp8-peak-llamas", build)
    return root, int((root / "layer_bytes").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # kept fp8; de-quantized while reading
def test_fp8_convert_peak_memory_is_about_one_layer(tmp_path, dtype, fp8_big_and_small):
    import subprocess
    import sys

    from test_convert import PEAK_RSS  # a conversion's peak RSS in a fresh process

    src, layer = fp8_big_and_small
    peaks = {}
    for name in ("small", "big"):
        report = tmp_path / f"rss-{name}.txt"
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(report), "convert", str(src / name),
                               str(tmp_path / f"{name}-out"), "--dtype", dtype, "--quiet"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        peaks[name] = int(report.read_text())
    # growth over a one-layer model: a few source layers (the group written, the next one read
    # ahead, allocator slack; de-quantizing holds a layer in float32, 4 bytes a weight where the
    # source has 1: 3 float32 layers), below the 12 layers of the source's one shard
    bound = (4 if dtype == "auto" else 12) * layer
    assert peaks["big"] - peaks["small"] < bound, (peaks, layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["fp8-block", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_expansion_equals_the_cpus(scheme, dtype):
    """On CUDA the published formats expand on the copy stream (compiled where exact): the same numbers."""
    from reshard.quant import dequantize
    from runtime.expansion import expand_weight

    g = torch.Generator().manual_seed(0)
    if scheme == "fp8-block":
        q, s = quantize_fp8(torch.randn(256, 384, generator=g), (128, 128))
        parts = {"qweight": q, "scale_inv": s}
    else:
        parts = {"blocks": torch.randint(0, 256, (128, 8, 16), generator=g, dtype=torch.uint8),
                 "scales": torch.randint(118, 130, (128, 8), generator=g, dtype=torch.uint8)}
    want = dequantize(parts, scheme, columns=0, dtype=dtype)
    got = expand_weight({k: v.cuda() for k, v in parts.items()}, scheme, columns=0, dtype=dtype)
    assert torch.equal(got.cpu(), want)


def test_partial_blocks_follow_the_published_formula(tmp_path):
    """Blocks of 16 on the tiny DeepSeek: kv_a_proj_with_mqa has 24 rows, a grid of 2 whose second
    block is partial (as DeepSeek-V3's 576 rows in blocks of 128). transformers refuses or mis-sizes
    such blocks; the reference is DeepSeek's formula, w[i, j] = q[i, j] * s[i // 16, j // 16],
    written out as a float32 checkpoint that transformers loads (and fuses) itself."""
    src = save_fp8("deepseek_v3", tmp_path / "src", tmp_path / "plain", block=[16, 16])
    tensors = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith("_scale_inv"):
                continue
            t = f.get_tensor(key)
            if t.dtype == torch.float8_e4m3fn:
                s = f.get_tensor(key + "_scale_inv")
                rows, cols = torch.arange(t.shape[0]) // 16, torch.arange(t.shape[1]) // 16
                t = t.float() * s[rows][:, cols]
            tensors[key] = t.float()
    (tmp_path / "formula").mkdir()
    save_file(tensors, tmp_path / "formula" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "formula" / "config.json").write_text(json.dumps(cfg))
    manifest = convert(str(src), tmp_path / "out", progress=False)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert manifest.group("layers.1").tensors[f"{name}.scale_inv"]["shape"] == [3, 4]  # 8-row sub-blocks
    ref = reference(tmp_path / "formula")
    model = LayeredModel.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32, max_cpu_memory=0)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


# --- error lines (listed in tests/test_errors.py) ---------------------------------------------

def _rewritten(src, folder, change):
    """A copy of checkpoint `src` in `folder` with its tensors passed through `change(tensors)`."""
    import shutil

    shutil.copytree(src, folder)
    with safe_open(src / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_scale_grid_that_does_not_divide_its_weight(fp8, tmp_path, capsys):
    from reshard.cli import main as reshard_main
    from test_robustness import only_error

    key = "model.layers.0.self_attn.o_proj.weight"
    src = _rewritten(fp8["llama"][0], tmp_path / "src",
                     lambda t: t.update({key + "_scale_inv": torch.ones(3, 2)}))
    code = reshard_main(["convert", str(src), str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: fp8 weight {key} has shape [256, 256], which its scale grid [3, 2] does not divide; "
        f"is the config the one of these weights?")


def test_experts_of_fp8_and_unquantized_tensors_are_not_kept_in_fp8(fp8, tmp_path, capsys):
    from reshard.cli import main as reshard_main
    from test_robustness import only_error

    key = "model.layers.1.mlp.experts.3.up_proj.weight"

    def unquantize_one(tensors):
        tensors[key] = tensors[key].to(torch.bfloat16)
        del tensors[key + "_scale_inv"]

    src = _rewritten(fp8["deepseek_v3"][0], tmp_path / "src", unquantize_one)
    code = reshard_main(["convert", str(src), str(tmp_path / "out"), "--quiet"])
    assert code == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: 'model.layers.1.mlp.experts.gate_up_proj' is made from fp8 tensors and unquantized ones such as "
        f"'{key}', so it cannot be kept in fp8; de-quantize the checkpoint with --dtype bfloat16")
    assert reshard_main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--quiet"]) == 0


@pytest.mark.slow  # compiles (Inductor, C++): seconds on a small machine
def test_compiled_cpu_expansion_equals_plain_torch():
    """On the CPU fp8 weights expand through the compiled function in half precision: the same
    numbers. (bfloat16 goes through it in the next test, whose logits are transformers' own.)"""
    from reshard.quant import dequantize
    from runtime.expansion import compiled_dequantize

    q, s = quantize_fp8(torch.randn(256, 384, generator=torch.Generator().manual_seed(0)), (128, 128))
    parts = {"qweight": q, "scale_inv": s}
    for dtype in (torch.float16,):
        want = dequantize(parts, "fp8-block", columns=384, dtype=dtype)
        assert torch.equal(compiled_dequantize()(parts, "fp8-block", columns=384, dtype=dtype), want)


@pytest.mark.slow  # bfloat16 on the CPU expands through the compiled function: a compile per weight shape
def test_bfloat16_logits_equal_transformers_bfloat16_load(fp8):
    src, out = fp8["llama"]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.bfloat16, max_cpu_memory=0)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)


def test_cache_and_guesses_keep_deepseek_fp8_tokens(fp8):
    """DeepSeek-V3 fp8 experts cached as their float8 bytes and scales, next layers' experts guessed:
    the logits and greedy tokens stay transformers' own."""
    from test_moe_cache import assert_cached_and_guessed_as_transformers, one_expert_bytes

    src, out = fp8["deepseek_v3"]
    ref = reference(src)
    ten = 10 * max(one_expert_bytes(g) for g in read_manifest(out).groups if g.experts)  # of 16: some misses
    model = LayeredModel.from_pretrained(out, device="cpu", dtype=torch.float32, max_cpu_memory=0,
                                         expert_cache=ten, predict_experts=True)
    assert_cached_and_guessed_as_transformers(model, ref, IDS, GREEDY)
