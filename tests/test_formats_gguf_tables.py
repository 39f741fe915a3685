"""GGUF files transformers' GGUF loader does not read (llama.cpp's `deepseek2`: DeepSeek-V3/R1, Kimi-K2,
DeepSeek-V2/V2-Lite; `glm4moe`: GLM-4.5; `gpt-oss`, which its mapping misnames) convert by reshard/gguf_tables.py's own mapping: the config
from the file's metadata (MLA sizes, routing groups, YaRN, GLM's partial rotary), experts kept as
blocks, MLA's `kv_b_proj` from llama.cpp's per-head `attn_k_b`/`attn_v_b` split (or from `attn_kv_b`, as
older files keep it), a multi-token-prediction layer dropped. The reference is the transformers model
the file was written from (its Q8_0 weights rounded to Q8_0 first): logits bit-identical in float32,
streamed and resident."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from conftest import CPU_BUDGETS
from gguf_table_files import (deepseek_v2_lite_config, deepseek_v3_config, glm4_moe_config, glm_dsa_config, gpt_oss_config,
                              kimi_linear_config, random_model, write_mapped)
from gguf_files import TOKENIZER_VOCAB, tokenizer_gguf
from test_gguf import cli_convert

from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2]])


def q8_0(name: str):
    """Q8_0 for the matrices 32-value blocks fit (the experts among them), F32 for the rest."""
    return Q.Q8_0 if name.endswith(("q_a_proj.weight", "q_b_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                          "down_proj.weight", "gate_up_proj", "down_proj", "embed_tokens.weight", "lm_head.weight")) else None


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> dict:
    """"split" (attn_k_b + attn_v_b, as llama.cpp writes since its MLA support) and "whole" (attn_kv_b)
    -> (GGUF, its conversion); "model" -> the transformers model they were written from."""
    root = tmp_path_factory.mktemp("deepseek-gguf")
    model = random_model(deepseek_v3_config(vocab=TOKENIZER_VOCAB), types=q8_0)
    out = {"model": model}
    for name, split in (("split", True), ("whole", False)):
        path = root / f"{name}.gguf"
        write_mapped(path, tokenizer_gguf(), model, types=q8_0, split_kv_b=split)
        convert(str(path), root / f"{name}-out", progress=False)
        out[name] = (path, root / f"{name}-out")
    return out


@pytest.mark.parametrize("layout", ["split", "whole"])
@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_logits_and_tokens_equal_the_model_the_file_was_written_from(deepseek, layout, placement):
    from runtime import LayeredModel

    ref = deepseek["model"]
    with torch.no_grad():
        want, want_tokens = ref(IDS).logits, ref.generate(IDS, max_new_tokens=5, do_sample=False)
    _, folder = deepseek[layout]
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert lm.model.config.rope_parameters["rope_type"] == "yarn"
        assert torch.equal(lm(IDS).logits, want)
        assert torch.equal(lm.generate(IDS, max_new_tokens=5, do_sample=False), want_tokens)


def test_a_split_file_converts_as_the_whole_one(deepseek, tmp_path):
    """DeepSeek-V3 GGUFs are published in many parts: the parts (any of them named) convert to the
    same group files, byte for byte, as the one file (the head and embeddings in different parts)."""
    from gguf_files import write_split

    path, folder = deepseek["split"]
    parts = write_split(path, tmp_path / "ds.gguf", parts=3)
    assert len(parts) == 3
    convert(str(parts[1]), tmp_path / "out", progress=False)
    whole, split = read_manifest(folder), read_manifest(tmp_path / "out")
    assert [(g.name, g.sha256) for g in split.groups] == [(g.name, g.sha256) for g in whole.groups]


def test_expert_blocks_stay_blocks_one_range_per_expert(deepseek):
    """The routed experts' Q8_0 blocks are re-packed as int8 (gate and up joined by rows), each layer's
    [E, ...] so a token reads only its experts; `kv_b_proj`, made from the transposed `attn_k_b`, is a
    float weight."""
    _, folder = deepseek["split"]
    manifest = read_manifest(folder)
    layer = manifest.group("layers.1")
    assert layer.quantized["model.layers.1.mlp.experts.gate_up_proj"]["scheme"] == "int8"
    assert layer.quantized["model.layers.1.mlp.experts.gate_up_proj"]["shape"] == [8, 64, 64]
    assert "model.layers.1.self_attn.kv_b_proj.weight" in layer.tensors
    assert list(layer.experts.values())[0]["num_experts"] == 8


def written_and_converted(tmp_path_factory, name: str, config, types, **kwargs):
    """(a random model of `config`, the conversion of the GGUF `write_mapped` writes from it)."""
    root = tmp_path_factory.mktemp(name)
    model = random_model(config, types=types)
    write_mapped(root / f"{name}.gguf", tokenizer_gguf(), model, types=types, **kwargs)
    convert(str(root / f"{name}.gguf"), root / "out", progress=False)
    return model, root / "out"


@pytest.fixture(scope="module")
def v2_lite(tmp_path_factory):
    """(a DeepSeek-V2-Lite-style model, the conversion of the GGUF written from it)."""
    return written_and_converted(tmp_path_factory, "v2-lite", deepseek_v2_lite_config(vocab=TOKENIZER_VOCAB), q8_0)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_deepseek_v2_lite_file_equals_its_model(v2_lite, placement):
    """A softmax-routed file (no expert_gating_func, as llama.cpp writes DeepSeek-V2's) with a plain
    q projection (no q LoRA, V2-Lite's) converts to a DeepseekV2 model equal to the one it came from."""
    from runtime import LayeredModel

    model, folder = v2_lite
    with torch.no_grad():
        want = model(IDS).logits
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert type(lm.model).__name__ == "DeepseekV2ForCausalLM"
        assert torch.equal(lm(IDS).logits, want)


@pytest.fixture(scope="module")
def glm5(tmp_path_factory):
    """(a GLM-5-style model, the conversion of the GGUF written from it with a multi-token-prediction layer)."""
    return written_and_converted(tmp_path_factory, "glm5", glm_dsa_config(vocab=TOKENIZER_VOCAB), q8_0, mtp=True)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_glm_dsa_file_equals_its_model(glm5, placement):
    """GLM-5 as llama.cpp writes it (`glm-dsa`: DeepSeek's MLA with `kv_b` split per head, the sparse-
    attention indexer's tensors, a multi-token-prediction layer counted in block_count): a GlmMoeDsa
    model equal to the one it came from, the indexer's layers told by their tensors."""
    from runtime import LayeredModel

    model, folder = glm5
    with torch.no_grad():
        want, want_tokens = model(IDS).logits, model.generate(IDS, max_new_tokens=4, do_sample=False)
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert type(lm.model).__name__ == "GlmMoeDsaForCausalLM"
        assert lm.model.config.indexer_types == model.config.indexer_types
        assert torch.equal(lm(IDS).logits, want)
        assert torch.equal(lm.generate(IDS, max_new_tokens=4, do_sample=False), want_tokens)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(a Kimi-Linear-style model, the conversion of the GGUF written from it)."""
    return written_and_converted(tmp_path_factory, "kimi", kimi_linear_config(vocab=TOKENIZER_VOCAB), q8_0)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_kimi_linear_file_equals_its_model(kimi, placement):
    """Kimi-Linear as llama.cpp writes it (`kimi-linear`: each delta-attention layer's q, k and v
    convolutions apart, `A_log` as -exp(A_log), MLA's `kv_b` split, per-layer key/value heads telling the
    layers apart): a KimiLinear model computing what the one it came from computes."""
    from runtime import LayeredModel

    model, folder = kimi
    with torch.no_grad():
        want, want_tokens = model(IDS).logits, model.generate(IDS, max_new_tokens=4, do_sample=False)
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert lm.model.config.layer_types == model.config.layer_types
        assert torch.equal(lm(IDS).logits, want)
        assert torch.equal(lm.generate(IDS, max_new_tokens=4, do_sample=False), want_tokens)


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """(a GLM-4.5-style model, the conversion of the GGUF written from it with a multi-token-prediction layer)."""
    return written_and_converted(tmp_path_factory, "glm", glm4_moe_config(vocab=TOKENIZER_VOCAB), q8_0, mtp=True)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_glm4moe_file_equals_its_model(glm, placement):
    """GLM-4.5 as llama.cpp writes it (biases, q/k norms, its multi-token-prediction layer counted in
    block_count and stored after the last layer): a Glm4Moe model equal to the one it came from."""
    from runtime import LayeredModel

    model, folder = glm
    with torch.no_grad():
        want, want_tokens = model(IDS).logits, model.generate(IDS, max_new_tokens=5, do_sample=False)
    manifest = read_manifest(folder)
    assert manifest.group("layers.1").quantized["model.layers.1.mlp.experts.gate_up_proj"]["scheme"] == "int8"
    assert len([g for g in manifest.groups if g.kind == "layer"]) == 3
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert type(lm.model).__name__ == "Glm4MoeForCausalLM"
        assert torch.equal(lm(IDS).logits, want)
        assert torch.equal(lm.generate(IDS, max_new_tokens=5, do_sample=False), want_tokens)


OSS_IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2, 55, 66, 77]])  # past gpt-oss's sliding window of 4


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(the transformers gpt-oss a GGUF was written from, with MXFP4 experts; that GGUF's conversion)."""
    experts = lambda name: Q.MXFP4 if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else None  # noqa: E731
    return written_and_converted(tmp_path_factory, "gpt-oss", gpt_oss_config(vocab=TOKENIZER_VOCAB), experts)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_gpt_oss_file_keeps_its_mxfp4_experts_and_equals_its_model(gpt_oss, placement):
    """gpt-oss as llama.cpp writes it: MXFP4 experts as (out, in) tensors, gate and up apart, which
    transformers holds as (in, out) matrices with gate and up interleaved. The blocks stay blocks
    (rows interleaved, marked transposed), one range per expert; biases and sinks as in the model."""
    from runtime import LayeredModel

    model, folder = gpt_oss
    with torch.no_grad():
        want, want_tokens = model(OSS_IDS).logits, model.generate(OSS_IDS, max_new_tokens=5, do_sample=False)
    entry = read_manifest(folder).group("layers.0").quantized["model.layers.0.mlp.experts.gate_up_proj"]
    assert entry["scheme"] == "mxfp4_blocks" and entry["transposed"] and entry["shape"] == [4, 64, 128]
    with LayeredModel.from_pretrained(folder, device="cpu", packed=False, max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        assert type(lm.model).__name__ == "GptOssForCausalLM"
        assert torch.equal(lm(OSS_IDS).logits, want)
        assert torch.equal(lm.generate(OSS_IDS, max_new_tokens=5, do_sample=False), want_tokens)


@pytest.mark.parametrize("placement", ["streamed", "resident"])
def test_gpt_oss_experts_run_through_the_cpu_kernels_with_their_biases(gpt_oss, placement, monkeypatch):
    """By default the MXFP4 experts are multiplied as stored by the native kernels, streamed (the
    routed experts' blocks and bias rows brought per call) and resident, their biases added after
    each product: close to the exact model (the kernels round activations to bfloat16); greedy
    tokens equal."""
    from runtime import LayeredModel, native, packedexperts

    if native.lowbit() is None:
        pytest.skip("no native CPU kernels on this machine")
    model, folder = gpt_oss
    with torch.no_grad():
        want, want_tokens = model(OSS_IDS).logits, model.generate(OSS_IDS, max_new_tokens=5, do_sample=False)
    calls = []
    run = packedexperts.run
    monkeypatch.setattr(packedexperts, "run", lambda module, specs, packed, *a: calls.append(sorted(packed)) or
                        run(module, specs, packed, *a))
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=CPU_BUDGETS[placement]) as lm:
        got = lm(OSS_IDS).logits
        tokens = lm.generate(OSS_IDS, max_new_tokens=5, do_sample=False)
    assert calls and all(c == ["down_proj", "down_proj_bias", "gate_up_proj", "gate_up_proj_bias"] for c in calls)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.03, err
    assert torch.equal(tokens, want_tokens)


def test_gpt_oss_experts_computed_on_the_host_with_cpu_experts(gpt_oss):
    """`cpu_experts="on"` (llama.cpp's --n-cpu-moe, KTransformers' CPU experts): gpt-oss's experts
    module, which takes `router_indices` rather than `top_k_index`, runs on the host through the
    native kernels, its MXFP4 experts read there as stored; the result is that of the packed run."""
    from runtime import LayeredModel, native

    if native.lowbit() is None:
        pytest.skip("no native CPU kernels on this machine")
    model, folder = gpt_oss
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0) as lm:
        want = lm(OSS_IDS).logits
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, cpu_experts="on") as lm:
        got = lm(OSS_IDS).logits
        names = [g.name for g in lm.manifest.groups if g.experts]
        assert lm.stats.per_pass[-1].cpu_experts == {n: "cpu: --cpu-experts on" for n in names}
        assert lm.stats.experts_read == 0 and lm.cpu_experts.host.stats.experts_read > 0
        # the planner's cost of one expert on the host: its MXFP4 blocks at that kernel's rate, biases as read
        assert set(lm.cpu_experts.sizes["model.layers.0.mlp.experts"][2]) == {"mxfp4_blocks", None}
        assert lm.cpu_experts.kernel_schemes() == ["mxfp4_blocks"]
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def plain_deepseek(tmp_path_factory):
    """A DeepSeek-V3 GGUF the error tests rewrite with one metadata value changed."""
    path = tmp_path_factory.mktemp("plain-deepseek") / "m.gguf"
    write_mapped(path, tokenizer_gguf(), random_model(deepseek_v3_config(vocab=TOKENIZER_VOCAB, yarn=False)))
    return path


def test_deepseek_v3s_pre_tokenizer_splits_digits_and_cjk_as_its_own(plain_deepseek, tmp_path):
    """transformers' GGUF tokenizer builder has no splits for `tokenizer.ggml.pre = deepseek-v3` (it
    would fall back to GPT-2's): the folder's tokenizer splits as llama.cpp splits DeepSeek-V3 text,
    digits in runs of at most three, kana and CJK apart from Latin letters."""
    from gguf import GGUFReader, GGUFWriter
    from transformers import AutoTokenizer

    _copy_with(GGUFReader(plain_deepseek), GGUFWriter(tmp_path / "v3.gguf", "deepseek2"),
               {"tokenizer.ggml.pre": "deepseek-v3"})
    convert(str(tmp_path / "v3.gguf"), tmp_path / "out", progress=False)
    pre = AutoTokenizer.from_pretrained(tmp_path / "out").backend_tokenizer.pre_tokenizer
    words = [w for w, _ in pre.pre_tokenize_str("Price: 12345 yen, 東京タワーis tall")]
    assert words[:4] == ["Price", ":", "Ġ", "123"] and words[4] == "45"
    assert "æĿ±äº¬ãĤ¿ãĥ¯ãĥ¼" in words and "is" in words  # 東京タワー, then "is" on its own


def test_deepseek2_file_with_an_unknown_routing_is_one_line(plain_deepseek, tmp_path, capsys):
    from gguf import GGUFReader, GGUFWriter

    _copy_with(GGUFReader(plain_deepseek), GGUFWriter(tmp_path / "odd.gguf", "deepseek2"),
               {"deepseek2.expert_gating_func": 3})
    assert cli_convert(capsys, tmp_path / "odd.gguf", tmp_path / "out") == (
        1, f"Error: {tmp_path / 'odd.gguf'} is a deepseek2 GGUF with expert_gating_func 3, which reshard cannot "
           f"read yet; convert the model's safetensors checkpoint instead")


def test_deepseek2_file_missing_a_size_is_one_line(plain_deepseek, tmp_path, capsys):
    from gguf import GGUFReader, GGUFWriter

    _copy_with(GGUFReader(plain_deepseek), GGUFWriter(tmp_path / "cut.gguf", "deepseek2"),
               drop="deepseek2.attention.kv_lora_rank")
    assert cli_convert(capsys, tmp_path / "cut.gguf", tmp_path / "out") == (
        1, f"Error: {tmp_path / 'cut.gguf'} is a deepseek2 GGUF without deepseek2.attention.kv_lora_rank; "
           f"download it again")


def test_k_b_that_does_not_match_the_metadata_is_one_line(plain_deepseek, tmp_path, capsys):
    """A file whose MLA sizes in the metadata do not fit its `attn_k_b` tensors."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(plain_deepseek)
    wrong = int(reader.fields["deepseek2.attention.key_length_mla"].contents()) + 8
    _copy_with(reader, GGUFWriter(tmp_path / "bad.gguf", "deepseek2"), {"deepseek2.attention.key_length_mla": wrong})
    code, line = cli_convert(capsys, tmp_path / "bad.gguf", tmp_path / "out")
    assert code == 1 and line == ("Error: blk.0.attn_k_b.weight has shape [4, 32, 16], not [heads, kv_lora_rank, "
                                  "qk_nope_head_dim]; is the file's metadata the one of these weights?"), line


def _copy_with(reader, writer, overrides: dict | None = None, drop: str | None = None) -> None:
    """`reader`'s file rewritten by `writer` with some metadata values replaced or one key dropped."""
    import numpy as np
    from gguf_files import copy_metadata

    copy_metadata(writer, reader, overrides, drop)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
