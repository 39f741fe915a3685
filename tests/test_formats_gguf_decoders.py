"""GGUF files of decoders transformers' GGUF loader does not read convert by reshard's own mapping
(reshard/gguf_tables.py, configs in reshard/gguf_configs.py, gguf_dense_configs.py, gguf_ssm_configs.py): Command-R,
Cohere2, ERNIE 4.5 (dense and MoE), HunYuan (dense and MoE), Seed-OSS, EXAONE 4, GLM-4, Granite (dense and
MoE with shared experts), SmolLM3, AFM (Arcee), OLMo 2 and 3, Ministral 3 and Mistral Small's text model,
OLMoE, dots.llm1, LFM2-MoE, K-EXAONE, Arcee Trinity, Qwen3-Next, Llama 4, and the state-space and hybrid Mamba 2, Granite 4.0-H
(and Granite-4.0-micro, written as `granite`), Nemotron-H (dense and MoE), Jamba and Falcon-H1 (its muP
multipliers, which the converter folds into the weights, powers of two here so the folding is exact). Each file is written from a
transformers model as llama.cpp's converter writes it (tests/gguf_decoder_files.py), its matrices Q8_0
(the model rounded to Q8_0 first); the runtime equals that model: logits bit-identical in float32,
streamed and resident, and the same greedy tokens; the Q8_0 blocks stay blocks."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from conftest import assert_runs_as
from gguf_decoder_files import decoder_model, write_decoder
from gguf_files import TOKENIZER_VOCAB, tokenizer_gguf

from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2, 77, 900]])
ARCHS = ["command-r", "cohere2", "ernie4_5", "ernie4_5-moe", "hunyuan-moe", "hunyuan-dense", "seed_oss", "exaone4",
         "glm4", "granite", "granitemoe", "smollm3", "arcee", "olmo2", "olmoe", "dots1", "qwen3next", "llama4",
         "mamba2", "granitehybrid", "granite-micro", "nemotron_h", "nemotron_h_moe", "jamba", "olmo3", "ministral3",
         "mistral-small", "lfm2moe", "exaone-moe", "afmoe", "falcon-h1"]
MODEL_CLASSES = {"command-r": "CohereForCausalLM", "granitemoe": "GraniteMoeSharedForCausalLM",
                 "exaone4": "Exaone4ForCausalLM", "arcee": "ArceeForCausalLM"}


def q8_0(name: str):
    """Q8_0 for the matrices (experts, embeddings and head among them), F32 for norms, biases and routers."""
    if name.endswith("dt_proj.weight"):  # Jamba's dt rank of 4
        return None
    return Q.Q8_0 if name.endswith(("_proj.weight", "gate_up_proj", "experts.up_proj", "down_proj", "embed_tokens.weight",
                                    "lm_head.weight", "input_linear.weight", "in_proj_qkvz.weight", "in_proj_ba.weight")) \
        else None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (the model, the folder its GGUF converts to), made once per architecture."""
    made = {}

    def get(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(arch.replace("_", "-"))
            # Falcon-H1's folded multipliers would push Q8_0's float16 block scales below float16's normal range
            types = q8_0 if arch != "falcon-h1" else (lambda name: None)
            model = decoder_model(arch, TOKENIZER_VOCAB, types=types)
            write_decoder(root / f"{arch}.gguf", tokenizer_gguf(), arch, model, types=types)
            convert(str(root / f"{arch}.gguf"), root / "out", progress=False)
            made[arch] = (model, root / "out")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_tokens_equal_the_model_the_file_was_written_from(converted, arch):
    model, folder = converted(arch)
    assert_runs_as(model, folder, IDS, new_tokens=4, model_class=type(model).__name__, packed=False)


KEPT = {  # arch -> parameters of layer 1 whose Q8_0 rows stay int8 blocks
    "granite": ["self_attn.q_proj.weight", "self_attn.k_proj.weight"],  # rows permuted back
    "granitemoe": ["self_attn.q_proj.weight", "block_sparse_moe.experts.gate_up_proj", "shared_mlp.input_linear.weight"],
    "dots1": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qwen3next": ["linear_attn.in_proj_qkvz.weight", "mlp.experts.gate_up_proj"],  # rows regrouped per key head
    "granitehybrid": ["mamba.in_proj.weight", "block_sparse_moe.experts.gate_up_proj"],
    "nemotron_h_moe": ["mixer.experts.up_proj", "mixer.experts.down_proj"],  # experts without a gate
    "llama4": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],  # (in, out) matrices
}


@pytest.mark.parametrize("arch", list(KEPT))
def test_q8_0_blocks_stay_blocks(converted, arch):
    """Q8_0 rows stay int8 blocks where the mapping only moves whole rows: permuted q/k rows, stacked
    experts, joined gate and up, Qwen3-Next's regrouped q/k/v/z."""
    _, folder = converted(arch)
    layer = read_manifest(folder).group("layers.1")
    schemes = {k: v["scheme"] for k, v in layer.quantized.items()}
    assert {p: schemes.get(f"model.layers.1.{p}") for p in KEPT[arch]} == dict.fromkeys(KEPT[arch], "int8")

def _set(**keys):
    """An edit setting metadata `keys` (dots written as __)."""
    return lambda tensors, metadata: metadata.update({k.replace("__", "."): v for k, v in keys.items()})


def _scale_rope_freqs(tensors, metadata):
    i = next(i for i, (name, _, _) in enumerate(tensors) if name == "rope_freqs.weight")
    name, values, kind = tensors[i]
    tensors[i] = (name, values * 1.5, kind)


REFUSED = {  # arch, what the file has -> the line after "Error: {path} "
    ("cohere2", _set(rope__dimension_count=8)): "is a cohere2 GGUF whose rotary embedding covers part of each head, "
    "which transformers' Cohere2 model does not; convert the model's safetensors checkpoint instead",
    ("jamba", _set(attention__head_count_kv=[0, 2, 2, 0])): "is a jamba GGUF whose layers [1, 2] do not repeat with "
    "one period, as transformers' Jamba places them; convert the model's safetensors checkpoint instead",
    ("hunyuan-moe", _set(expert_feed_forward_length=16)): "is a hunyuan-moe GGUF with experts 16 wide and 1 shared "
    "expert(s), which transformers' HunYuan model cannot hold; convert the model's safetensors checkpoint instead",
    ("smollm3", _set(attention__head_count_kv=[2, 2, 2, 2])): "is a smollm3 GGUF with a per-layer key/value head "
    "count, which reshard cannot read yet; convert the model's safetensors checkpoint instead",
    ("exaone4", _scale_rope_freqs): ": its rope_freqs are not Llama 3's scaling with factor 24.0; convert the "
    "model's safetensors checkpoint instead",
}


@pytest.mark.parametrize("arch, edit", list(REFUSED), ids=[arch for arch, _ in REFUSED])
def test_a_file_transformers_cannot_hold_is_one_line(arch, edit, tmp_path, capsys):
    from test_gguf import cli_convert

    path = tmp_path / f"{arch}.gguf"
    write_decoder(path, tokenizer_gguf(), arch, decoder_model(arch, TOKENIZER_VOCAB), edit=edit)
    line = REFUSED[(arch, edit)]
    assert cli_convert(capsys, path, tmp_path / "out") == (1, f"Error: {path}{'' if line[0] == ':' else ' '}{line}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pre, digits", [("command-r", ["1", "2", "3", "4", "5"]), ("hunyuan", ["1", "2", "3", "4", "5"]),
                                         ("hunyuan-dense", ["123", "45"]), ("kimi-k2", ["123", "45"])])
def test_pre_tokenizers_transformers_lacks_split_digits_as_llama_cpp(converted, pre, digits):
    """transformers' GGUF tokenizer builder falls back to GPT-2's splits (digits kept whole) for these
    files' `tokenizer.ggml.pre`; the folder's tokenizer splits digits as llama.cpp does for them."""
    from transformers import AutoTokenizer

    from reshard.gguf_tables import split_pre_tokens

    tokenizer = AutoTokenizer.from_pretrained(converted("command-r")[1])
    split_pre_tokens(tokenizer, pre)
    words = [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Price: 12345 yen")]
    assert words[words.index("Ġ") + 1:][:len(digits)] == digits, words
    if pre == "kimi-k2":  # Han characters apart from the kana and Latin letters after them
        words = [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("東京タワーis")]
        assert words == ["æĿ±äº¬", "ãĤ¿ãĥ¯ãĥ¼is"], words
