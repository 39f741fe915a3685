"""The text decoder of a vision-language GGUF (Qwen2-VL and Qwen2.5-VL as `qwen2vl`, Qwen3-VL as
`qwen3vl`, Qwen3-VL-MoE as `qwen3vlmoe`; the vision tower is llama.cpp's separate `mmproj` file)
converts by reshard's own mapping (reshard/gguf_vl_configs.py) to the text model it is on text:
Qwen2, Qwen3, Qwen3-MoE. Each file is written from a random vision-language model of transformers'
as llama.cpp's converter writes it (its rotary sections and DeepStack count among the keys), its
matrices Q8_0 (the model rounded to Q8_0 first); the runtime's logits on text equal that
vision-language model's own, bit for bit in float32, streamed and resident, with the same greedy
tokens, and the Q8_0 blocks stay blocks."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from conftest import assert_runs_as
from gguf_decoder_files import write_decoder
from gguf_files import TOKENIZER_VOCAB, tokenizer_gguf

from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2, 77, 900]])
TEXT = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
# GGUF architecture -> (vision-language class, its text config beyond TEXT, the text model's class)
MODELS = {
    "qwen2vl": ("Qwen2_5_VL", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
                "Qwen2ForCausalLM"),
    "qwen3vl": ("Qwen3VL", {"head_dim": 16, "rope_parameters": {
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}}, "Qwen3ForCausalLM"),
    "qwen3vlmoe": ("Qwen3VLMoe", {"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                                      "mrope_interleaved": True}}, "Qwen3MoeForCausalLM"),
}


def vision_language_model(arch: str, tied: bool):
    """A random vision-language model of `arch`, its language model's matrices rounded to Q8_0 (rows)
    and its norms and biases random around their init."""
    import transformers as tf

    name, text, _ = MODELS[arch]
    vision = {**VISION, "fullatt_block_indexes": [0]} if arch == "qwen2vl" else {**VISION, "patch_size": 4,
                                                                                  "deepstack_visual_indexes": [0]}
    config = getattr(tf, f"{name}Config")(text_config={**TEXT, **text}, vision_config=vision, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = getattr(tf, f"{name}ForConditionalGeneration")(config).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not key.startswith(("model.language_model.", "lm_head.")):
                continue
            if t.dim() == 1:
                t.add_(torch.randn(t.shape) * 0.1)
            else:
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
    made = {}

    def get(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            model = vision_language_model(arch, tied=arch == "qwen3vl")
            text = text_model(model, MODELS[arch][2])
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
            made[arch] = (model, root / "out")
        return made[arch]

    return get


@pytest.mark.parametrize("arch", list(MODELS))
def test_text_logits_and_tokens_equal_the_vision_language_model(converted, arch):
    model, folder = converted(arch)
    assert_runs_as(model, folder, IDS, new_tokens=4, model_class=MODELS[arch][2], packed=False)


def test_q8_0_blocks_stay_blocks(converted):
    _, folder = converted("qwen3vlmoe")
    layer = read_manifest(folder).group("layers.1")
    schemes = {k: v["scheme"] for k, v in layer.quantized.items()}
    kept = [f"model.layers.1.{p}" for p in ("self_attn.q_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")]
    assert {p: schemes.get(p) for p in kept} == dict.fromkeys(kept, "int8")
