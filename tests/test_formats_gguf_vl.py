"""The text decoder of a vision-language GGUF (Qwen2-VL and Qwen2.5-VL as `qwen2vl`, Qwen3-VL as
`qwen3vl`, Qwen3-VL-MoE as `qwen3vlmoe`; the vision tower is llama.cpp's separate `mmproj` file)
converts by reshard's own mapping (reshard/gguf_vl_configs.py) to the text model it is on text:
Qwen2, Qwen3, Qwen3-MoE. Each file is written from a random vision-language model of transformers'
as llama.cpp's converter writes it (its rotary sections and DeepStack count among the keys), its
matrices Q8_0 (the model rounded to Q8_0 first); the runtime's logits on text equal that
vision-language model's own, bit for bit in float32, streamed and resident, with the same greedy
tokens, and the Q8_0 blocks stay blocks."""

from __future__ import annotations

import functools

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from conftest import assert_runs_as
from gguf_decoder_files import write_decoder
from gguf_files import tokenizer_gguf
from test_multimodal import IDS, MODELS, vision_language_model

from reshard.convert import convert
from reshard.format import read_manifest

# GGUF architecture -> the vision-language model of tests/test_multimodal.py it is written from
WRITTEN_FROM = {"qwen2vl": "qwen2.5-vl", "qwen3vl": "qwen3-vl", "qwen3vlmoe": "qwen3-vl-moe"}


def rounded_model(arch: str):
    """The vision-language model `arch` is written from, its language model's matrices rounded to Q8_0 (rows)."""
    model = vision_language_model(WRITTEN_FROM[arch])
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.startswith(("model.language_model.", "lm_head.")) and t.dim() > 1:
                rows = t.reshape(-1, t.shape[-1]).numpy()
                t.copy_(torch.from_numpy(dequantize(quantize(rows, Q.Q8_0), Q.Q8_0)).reshape(t.shape))
    return model


def text_model(model, cls: str):
    """The text decoder of vision-language `model` as a transformers model of class `cls`, its weights."""
    import transformers as tf

    text = model.config.text_config.to_dict()
    config_class = getattr(tf, cls.replace("ForCausalLM", "Config"))
    fields = {k: v for k, v in text.items() if k in config_class().to_dict() and k not in ("model_type", "architectures")}
    config = config_class(**{**fields, "rope_parameters": {"rope_type": "default",
                                                           "rope_theta": text["rope_parameters"]["rope_theta"]},
                             "tie_word_embeddings": model.config.tie_word_embeddings, "norm_topk_prob": True})
    out = getattr(tf, cls)(config).eval()
    weights = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
               for k, v in model.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    out.load_state_dict(weights, strict=True)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (the vision-language model, the folder its GGUF converts to), made once per architecture."""

    @functools.cache
    def get(arch: str):
        root = tmp_path_factory.mktemp(arch)
        model = rounded_model(arch)
        text = text_model(model, MODELS[WRITTEN_FROM[arch]][2])
        sections = model.config.text_config.rope_parameters["mrope_section"]
        keys = {"rope.dimension_sections": [*sections, 0]}
        if arch != "qwen2vl":
            keys["n_deepstack_layers"] = len(model.config.vision_config.deepstack_visual_indexes)
        if arch == "qwen3vlmoe":
            keys["expert_feed_forward_length"] = model.config.text_config.moe_intermediate_size
        write_decoder(root / f"{arch}.gguf", tokenizer_gguf(), arch, text,
                      types=lambda name: Q.Q8_0 if name.endswith(("proj.weight", "gate_up_proj", "down_proj",
                                                                   "embed_tokens.weight", "lm_head.weight")) else None,
                      edit=lambda tensors, metadata: metadata.update(keys))
        convert(str(root / f"{arch}.gguf"), root / "out", progress=False)
        return model, root / "out"

    return get


@pytest.mark.parametrize("arch", list(WRITTEN_FROM))
def test_text_logits_and_tokens_equal_the_vision_language_model(converted, arch):
    model, folder = converted(arch)
    assert_runs_as(model, folder, IDS, new_tokens=4, model_class=MODELS[WRITTEN_FROM[arch]][2], packed=False)


def test_q8_0_blocks_stay_blocks(converted):
    _, folder = converted("qwen3vlmoe")
    layer = read_manifest(folder).group("layers.1")
    schemes = {k: v["scheme"] for k, v in layer.quantized.items()}
    kept = [f"model.layers.1.{p}" for p in ("self_attn.q_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")]
    assert {p: schemes.get(p) for p in kept} == dict.fromkeys(kept, "int8")
