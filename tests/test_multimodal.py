"""A vision-language checkpoint converts as its language model (reshard/multimodal.py): Qwen2.5-VL,
Qwen3-VL (dense, tied; and MoE, its experts transposed as published), Qwen3.5 (linear attention
beside full attention), Gemma 3 and 4 (whose causal LM in transformers was the whole model),
GLM-4.1V and GLM-4.5V (as GLM-4 and GLM-4.5), Llama 4 (its routed experts), Llama 3.2 Vision (its
cross-attention layers, which text skips),
Mistral Small 3.x (`mistral3`), Kimi-K2.5 (DeepSeek-V3's MoE) and LLaVA, each a random model of transformers' saved as the hub
has it (transformers writes the published names and layouts). The folder holds the causal LM alone,
the vision tower left out; its logits on text equal transformers' vision-language model's own, bit
for bit in float32, streamed and resident, with the same greedy tokens."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import assert_runs_as
from gguf_files import TOKENIZER_VOCAB

from reshard.convert import convert
from reshard.format import read_manifest

IDS = torch.tensor([[1, 504, 345, 282, 649, 314, 2, 77, 900]])
TEXT = dict(vocab_size=TOKENIZER_VOCAB,  # the GGUF tests' tokenizer's (tests/test_formats_gguf_vl.py)
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
QWEN3_ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
GLM_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
GLM_VISION = {**QWEN_VISION, "patch_size": 4}
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
# name -> (vision-language class prefix, its config's arguments, the causal LM the folder holds)
MODELS = {
    "qwen2.5-vl": ("Qwen2_5_VL", dict(text_config={**TEXT, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}, vision_config={
        **QWEN_VISION, "fullatt_block_indexes": [0]}), "Qwen2ForCausalLM"),
    "qwen3-vl": ("Qwen3VL", dict(text_config={**TEXT, "head_dim": 16, "rope_parameters": QWEN3_ROPE},
                                 vision_config={**QWEN_VISION, "patch_size": 4}, tie_word_embeddings=True),
                 "Qwen3ForCausalLM"),
    "qwen3-vl-moe": ("Qwen3VLMoe", dict(text_config={
        **TEXT, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "rope_parameters": QWEN3_ROPE}, vision_config={**QWEN_VISION, "patch_size": 4}), "Qwen3MoeForCausalLM"),
    "qwen3.5": ("Qwen3_5", dict(text_config={
        **TEXT, "num_hidden_layers": 4, "head_dim": 16, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4}, vision_config={**QWEN_VISION, "patch_size": 4}),
                "Qwen3_5ForCausalLM"),
    "llama4": ("Llama4", dict(text_config={
        **TEXT, "head_dim": 16, "intermediate_size": 32, "intermediate_size_mlp": 128, "num_local_experts": 8,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 2}, vision_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
        "patch_size": 8, "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32}),
               "Llama4ForCausalLM"),
    "mistral3": ("Mistral3", dict(text_config={**TEXT, "model_type": "mistral", "head_dim": 16},
                                  vision_config={**SIGLIP, "model_type": "pixtral", "head_dim": 16},
                                  tie_word_embeddings=False), "MistralForCausalLM"),
    "kimi-k2.5": ("Kimi_K25", dict(text_config={
        **TEXT, "model_type": "deepseek_v3", "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "n_group": 1, "topk_group": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": 4, "pos_emb_height": 8, "pos_emb_width": 8}, tie_word_embeddings=False),
                 "DeepseekV3ForCausalLM"),
    "gemma3": ("Gemma3", dict(text_config={**TEXT, "head_dim": 16}, vision_config=SIGLIP, mm_tokens_per_image=4),
               "Gemma3ForCausalLM"),
    "gemma4": ("Gemma4", dict(text_config={**TEXT, "head_dim": 16, "hidden_size_per_layer_input": 16, "pad_token_id": 0,
                                           "vocab_size_per_layer_input": TEXT["vocab_size"],
                                           "layer_types": ["sliding_attention", "full_attention"]}), "Gemma4ForCausalLM"),
    "glm4v": ("Glm4v", dict(text_config={**TEXT, "head_dim": 16, "rope_parameters": GLM_ROPE},
                            vision_config=GLM_VISION), "Glm4ForCausalLM"),
    "glm4.5v": ("Glm4vMoe", dict(text_config={
        **TEXT, "head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "first_k_dense_replace": 1, "n_shared_experts": 1, "rope_parameters": GLM_ROPE}, vision_config=GLM_VISION),
                "Glm4MoeForCausalLM"),
    "llama3.2-vision": ("Mllama", dict(text_config={**TEXT, "num_hidden_layers": 4, "cross_attention_layers": [1]},
                                       vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                      "num_global_layers": 1, "attention_heads": 2, "image_size": 32,
                                                      "patch_size": 8, "vision_output_dim": 64,
                                                      "intermediate_layers_indices": [0]}), "MllamaForCausalLM"),
    "llava": ("Llava", dict(text_config={**TEXT, "model_type": "llama"}, vision_config={**SIGLIP, "model_type": "clip_vision_model"},
                            tie_word_embeddings=False), "LlamaForCausalLM"),
}


def vision_language_model(name: str):
    """A random vision-language model `name` of MODELS, its norms and biases random around their init."""
    import transformers as tf

    prefix, kwargs, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(tf, f"{prefix}ForConditionalGeneration")(getattr(tf, f"{prefix}Config")(**kwargs)).eval()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.dim() == 1 and t.is_floating_point():
                t.add_(torch.randn(t.shape) * 0.1)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (the vision-language model, the folder its checkpoint converts to), made once each."""

    @functools.cache
    def get(name: str):
        root = tmp_path_factory.mktemp(name)
        model = vision_language_model(name)
        model.save_pretrained(root / "checkpoint")
        convert(str(root / "checkpoint"), root / "out", progress=False)
        return model, root / "out"

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_text_logits_and_tokens_equal_the_vision_language_model(converted, name):
    model, folder = converted(name)
    assert_runs_as(model, folder, IDS, new_tokens=4, model_class=MODELS[name][2], packed=False)


@pytest.mark.parametrize("name", ["qwen2.5-vl", "llama4"])
def test_the_folder_holds_the_language_model_alone(converted, name):
    """config.json is the causal LM's, and no group holds a tensor of the vision tower."""
    model, folder = converted(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [MODELS[name][2]] and "vision_config" not in config
    params = {p for g in read_manifest(folder).groups for p in g.tensors}
    language = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n and "visual" not in n
                   and "multi_modal" not in n)
    assert not any("vision" in p or "visual" in p or "multi_modal" in p for p in params)
    assert len(params) < len(model.state_dict()) and language < sum(p.numel() for p in model.parameters())


def test_an_fp8_checkpoint_keeps_its_language_models_bytes(tmp_path):
    """Qwen3-VL published in FP8 (its language model's linear weights float8 with block scales, as the
    `*-FP8` uploads): stored as published, and the logits on text equal transformers' own load of the
    checkpoint (de-quantized on the CPU), bit for bit in float32."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Qwen3VLForConditionalGeneration

    from reshard.fp8 import quantize_fp8
    from runtime import LayeredModel

    vision_language_model("qwen3-vl").to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    tensors = {}
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if ".language_model.layers." in key and key.endswith("_proj.weight"):
                tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(t, [8, 8])
            else:
                tensors[key] = t
    (tmp_path / "fp8").mkdir()
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    convert(str(tmp_path / "fp8"), tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.quantization["scheme"] == "fp8-block"
    assert manifest.group("layers.1").tensors["model.layers.1.self_attn.o_proj.weight.qweight"]["dtype"] == "F8_E4M3"
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "fp8", dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(IDS).logits
    with LayeredModel.from_pretrained(tmp_path / "out", device="cpu", dtype=torch.float32, max_cpu_memory=0) as lm:
        assert torch.equal(lm(IDS).logits, want)


def test_a_language_model_transformers_has_no_causal_lm_for_is_one_line(tmp_path, capsys):
    """Qwen3-Omni's language model (`qwen3_omni_moe_text`) has no causal LM in transformers, nor one it
    equals here."""
    from safetensors.torch import save_file
    from transformers import Qwen3OmniMoeConfig

    from test_gguf import cli_convert

    Qwen3OmniMoeConfig().save_pretrained(tmp_path / "omni")
    save_file({"lm_head.weight": torch.zeros(1)}, tmp_path / "omni" / "model.safetensors")
    assert cli_convert(capsys, tmp_path / "omni", tmp_path / "out") == (
        1, "Error: model type 'qwen3_omni_moe' is a vision-language model whose language model ('qwen3_omni_moe_text') "
           "transformers has no causal LM for; reshard cannot convert it yet")
    assert not (tmp_path / "out").exists()


def test_an_int4_checkpoint_keeps_its_language_models_experts_packed(tmp_path):
    """Kimi-K2.5 as published: its language model's MLPs and routed experts compressed-tensors int4
    (pack-quantized, group 32, one tensor set per expert), attention, vision tower and head left as
    they are. Stored as int4, and the logits on text equal transformers' vision-language model with
    those weights de-quantized by the published formula (transformers needs a GPU library for them),
    bit for bit in float32 where the runtime expands them (the CPU kernels' closeness is
    tests/test_formats_gptq.py's), streamed and resident."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import transformers as tf
    from test_formats_gptq import pack_cols

    vision_language_model("kimi-k2.5").save_pretrained(tmp_path / "plain")
    gen = torch.Generator().manual_seed(0)
    packed, reference = {}, {}
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            reference[key] = packed[key] = t
            if ".mlp." in key and key.endswith("_proj.weight") and "language_model" in key:
                out, inp = t.shape
                q = torch.randint(-8, 8, (out, inp), generator=gen)
                s = (torch.rand(out, inp // 32, generator=gen) * 0.02 + 0.001).half()
                del packed[key]
                name = key[:-len(".weight")]
                packed.update({name + ".weight_packed": pack_cols(q + 8), name + ".weight_shape": torch.tensor([out, inp]),
                               name + ".weight_scale": s})
                reference[key] = q.float() * s.float().repeat_interleave(32, dim=1)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    quantization = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head", "re:.*self_attn.*"],
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}}}
    for folder, tensors, extra in (("int4", packed, quantization), ("reference", reference, {})):
        (tmp_path / folder).mkdir()
        save_file(tensors, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(json.dumps({**config, **extra}))
    convert(str(tmp_path / "int4"), tmp_path / "out", progress=False)
    layer = read_manifest(tmp_path / "out").group("layers.1")
    assert {info["scheme"] for info in layer.quantized.values()} == {"int4-sym"}
    assert "model.layers.1.mlp.experts.gate_up_proj" in layer.quantized
    model = tf.Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path / "reference", dtype=torch.float32).eval()
    assert_runs_as(model, tmp_path / "out", IDS, new_tokens=4, dtype=torch.float32, packed=False)  # expanded: exact


def per_expert(tensors: dict, fp8: bool) -> tuple[dict, dict]:
    """Llama 4's stacked experts (`experts.gate_up_proj` [E, H, 2I], `experts.down_proj` [E, I, H]) as its FP8
    and 4-bit uploads store them, one Linear per expert (`experts.N.gate_proj.weight` [I, H], ...), each FP8
    with one float32 scale per output row (compressed-tensors' "channel") where `fp8`; and the stacked
    tensors of what those weights de-quantize to."""
    out, reference = {}, dict(tensors)
    for key, t in tensors.items():
        if not key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[key] = t
            continue
        base, kind = key.rsplit(".", 1)
        halves = t.chunk(2, dim=2) if kind == "gate_up_proj" else (t,)
        names = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        made = []
        for name, half in zip(names, halves):
            rows = []
            for e in range(t.shape[0]):
                w = half[e].t().contiguous()
                if fp8:
                    scale = w.float().abs().amax(dim=1, keepdim=True) / 448
                    q = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                    out[f"{base}.{e}.{name}.weight"], out[f"{base}.{e}.{name}.weight_scale"] = q, scale
                    w = q.float() * scale
                else:
                    out[f"{base}.{e}.{name}.weight"] = w
                rows.append(w.t())
            made.append(torch.stack(rows))
        reference[key] = torch.cat(made, dim=2).to(t.dtype if not fp8 else torch.float32)
    return out, reference


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_llama4_experts_one_linear_each_as_its_fp8_upload(tmp_path, fp8):
    """Llama 4 Maverick's FP8 upload (compressed-tensors float8, per output row) keeps one Linear per
    expert, which transformers loads by swapping the experts module; reshard stacks them into the
    model's experts (reshard/keymap.py `per_expert_conversions`), FP8 bytes and scales kept: logits on
    text equal the vision-language model with those experts (de-quantized by the formula), bit for bit in
    float32, streamed (reading only the routed experts) and resident."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import transformers as tf

    vision_language_model("llama4").save_pretrained(tmp_path / "plain")
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        split, reference = per_expert({k: f.get_tensor(k) for k in f.keys()}, fp8)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    quantization = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*vision.*", "re:.*shared_expert.*", "lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}}
    for folder, tensors, extra in (("source", split, quantization if fp8 else {}), ("reference", reference, {})):
        (tmp_path / folder).mkdir()
        save_file(tensors, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(json.dumps({**config, **extra}))
    convert(str(tmp_path / "source"), tmp_path / "out", progress=False)
    layer = read_manifest(tmp_path / "out").group("layers.1")
    stored = layer.tensors.get("model.layers.1.feed_forward.experts.gate_up_proj.qweight")
    assert (stored is not None and stored["dtype"] == "F8_E4M3") == fp8
    model = tf.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "reference", dtype=torch.float32).eval()

    def routed_reads(lm, placement):
        if placement == "streamed":
            assert lm.stats.per_pass[-1].experts_read > 0

    assert_runs_as(model, tmp_path / "out", IDS, new_tokens=4, check=routed_reads, dtype=torch.float32)


def test_llama4_experts_one_linear_each_in_nvfp4_are_one_line(tmp_path, capsys):
    """NVFP4's packed codes cannot be turned into Llama 4's (in, out) experts: one line saying what to do."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from test_formats_nvfp4 import write_nvfp4
    from test_gguf import cli_convert

    vision_language_model("llama4").save_pretrained(tmp_path / "plain")
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        split, _ = per_expert({k: f.get_tensor(k) for k in f.keys()}, fp8=False)
    save_file(split, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    write_nvfp4(tmp_path / "plain", tmp_path / "nvfp4")
    assert cli_convert(capsys, tmp_path / "nvfp4", tmp_path / "out") == (
        1, "Error: 'model.layers.1.feed_forward.experts.gate_up_proj' is made from NVFP4 tensors that transformers "
           "transposes at load, which their packing does not allow; de-quantize the checkpoint with --dtype bfloat16")


def test_a_vision_tower_that_needs_another_library_is_one_line(tmp_path, capsys):
    """Gemma 3n's vision tower is a timm model: without timm transformers cannot build it, and the line says
    what to install."""
    import importlib.util

    from safetensors.torch import save_file
    from transformers import Gemma3nConfig

    from test_gguf import cli_convert

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    Gemma3nConfig().save_pretrained(tmp_path / "gemma3n")
    save_file({"lm_head.weight": torch.zeros(1)}, tmp_path / "gemma3n" / "model.safetensors")
    code, line = cli_convert(capsys, tmp_path / "gemma3n", tmp_path / "out")
    assert code == 1 and line.startswith("Error: transformers cannot build a causal language model for model type "
                                         "'gemma3n': TimmWrapperModel requires the ")
    assert line.endswith("`pip install timm`)") and "\n" not in line


def test_converting_says_that_it_takes_the_language_model(tmp_path, capsys):
    vision_language_model("llava").save_pretrained(tmp_path / "llava")
    convert(str(tmp_path / "llava"), tmp_path / "out", progress=True)
    assert (f"reshard: {tmp_path / 'llava'} is a vision-language model (LlavaForConditionalGeneration); converting its "
            f"language model (LlamaForCausalLM), the vision tower left out") in capsys.readouterr().err.splitlines()


def test_layers_text_skips_are_not_read_ahead(converted):
    """Llama 3.2 Vision's cross-attention layer runs only on images: once a pass has not entered it, the
    read-ahead leaves it out, so later streamed text passes never read it."""
    from runtime import LayeredModel

    model, folder = converted("llama3.2-vision")
    with torch.no_grad():
        want = model(IDS).logits
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0, packed=False) as lm:
        cross = [g.name for g in lm.groups].index("layers.1")  # cross_attention_layers=[1]
        reads, load = [], lm.loader.load
        lm.loader.load = lm.prefetcher.load = lambda i: reads.append(i) or load(i)
        first = lm(IDS).logits
        assert lm.idle == {cross}
        reads.clear()
        second = lm(IDS).logits
        assert torch.equal(first, want) and torch.equal(second, want)
        assert cross not in reads and len(reads) >= len(lm.streamed) - 2  # the rest streamed as before


def test_an_image_to_text_encoder_decoder_is_refused_as_one(tmp_path, capsys):
    """T5Gemma 2 reads images and text into an encoder: refused as the encoder-decoder it is, not as a vision-language
    decoder whose language model is missing."""
    from safetensors.torch import save_file
    from transformers import T5Gemma2Config

    from test_gguf import cli_convert

    T5Gemma2Config().save_pretrained(tmp_path / "t5gemma2")
    save_file({"lm_head.weight": torch.zeros(1)}, tmp_path / "t5gemma2" / "model.safetensors")
    assert cli_convert(capsys, tmp_path / "t5gemma2", tmp_path / "out") == (
        1, "Error: model type 't5gemma2' is an encoder-decoder model; only decoder-only causal LMs can be converted")
