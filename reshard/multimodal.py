"""The language model of a vision-language checkpoint, converted as the causal LM it is on text.

A vision-language checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense and MoE, Qwen3.5, Llama 4 Scout
and Maverick, Llama 3.2 Vision, Gemma 3 and 4, GLM-4.1V and GLM-4.5V/4.6V, Mistral Small 3.x and Magistral,
Kimi-K2.5, LLaVA and its kin) holds a vision tower, a projector and a language model. transformers
builds the whole `...ForConditionalGeneration` for it and has no causal LM for its config (or
builds the language model alone, which does not know the checkpoint's other tensors; or, for
Gemma 3 and 4, takes the whole model as the causal LM). On text, such a model computes its
language model alone: the vision tower runs only on images. So reshard converts the language
model, as a causal LM, and a pass never reads the vision tower:
- its config: the checkpoint's text config (with the top level's quantization, dtype and token
  ids), for the causal LM transformers has for it; Qwen's and GLM's VL decoders, for which it has
  none, as the plain models they equal on text (`EQUIVALENT`: their multimodal rotary embedding
  gives every section the token's one position, which makes it the plain rotary embedding);
- its tensors: the checkpoint's names brought to the vision-language model's by transformers'
  own rules for that model (renamings, and conversions such as Qwen3-VL-MoE's transposed
  experts), then from the language model's place in it to the causal LM's (`LanguagePart.place`);
  the vision tower's tensors are left out, never read.
tests/test_multimodal.py checks each against transformers' vision-language model's logits on text.
"""

from __future__ import annotations

import copy
import re

from torch import nn

from .emptymodel import large_tensors_on_meta
from .errors import SourceError

# text model type -> the model type it equals on text (transformers has no causal LM for the former)
EQUIVALENT = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3",
              "qwen3_vl_moe_text": "qwen3_moe", "glm4v_text": "glm4", "glm4v_moe_text": "glm4_moe"}
# what the VL model does whatever its config says (Qwen3-VL-MoE's router, and llama.cpp's graph for it,
# always normalize the chosen experts' weights)
ALWAYS = {"qwen3_vl_moe_text": {"norm_topk_prob": True}}
# text model type -> its causal LM, which transformers' AutoModelForCausalLM maps by the vision-language
# config alone (`register_text_causal_lm` maps it by the text config too)
TEXT_CAUSAL = {"mllama_text_model": "MllamaForCausalLM"}
CARRIED = ("quantization_config", "dtype", "bos_token_id", "eos_token_id", "pad_token_id")  # top level -> text


class LanguagePart:
    """The language model of vision-language model `outer` (built on `meta`): its causal-LM `config`,
    and where its parameters sit in `outer`."""

    def __init__(self, config, outer: nn.Module):
        self.config, self.outer = config, outer
        self.names = {n for n, _ in outer.named_parameters()} | {n for n, _ in outer.named_buffers()}
        self._places: list[tuple[str, str]] = []

    def bind(self, model: nn.Module) -> None:
        """Learn where the causal LM `model` keeps what `outer` keeps: all of it where `outer` holds such a
        causal LM whole (Llama 4's, Nemotron-H Omni's), else its decoder and its head."""
        whole = next((name for name, m in self.outer.named_modules() if name and type(m) is type(model)), None)
        if whole is not None:
            self._places = [(whole + ".", "")]
            return
        places = [(_decoder(self.outer), _decoder(model)),
                  (_path(self.outer, self.outer.get_output_embeddings()), _path(model, model.get_output_embeddings()))]
        # (a part either model lacks leaves its parameters unplaced: the key check names them)
        self._places = [(a + ".", b + ".") for a, b in places if a is not None and b is not None]

    def place(self, name: str) -> str | None:
        """`outer`'s parameter `name` as the causal LM's; None for one outside the language model (the
        vision tower's); a name `outer` does not have, as it is (for the checks to name)."""
        for theirs, ours in self._places:
            if name.startswith(theirs):
                return ours + name[len(theirs):]
        return None if name in self.names else name


def language_part(config, *, trust_remote_code: bool = False) -> LanguagePart | None:
    """The language model of `config`'s vision-language model, or None where `config` is a causal LM's (no
    text config of its own, or a model whose own code the checkpoint names for AutoModelForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    text = config.get_text_config()
    if text is config or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}) \
            or getattr(config, "is_encoder_decoder", False):  # an encoder-decoder is refused as one (reshard/plan.py)
        return None
    if text.model_type not in CAUSAL and text.model_type not in EQUIVALENT and text.model_type not in TEXT_CAUSAL:
        raise SourceError(f"model type {config.model_type!r} is a vision-language model whose language model "
                          f"({text.model_type!r}) transformers has no causal LM for; reshard cannot convert it yet")
    outer = _build_outer(config, trust_remote_code)
    return LanguagePart(_text_config(config, text, outer), outer)


def _text_config(config, text, outer: nn.Module):
    """The causal LM's config: `text` (or the config of the model it equals), with what the top level
    says for the whole model, tied as `outer` ties its head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    kind = text.model_type
    if kind in CAUSAL or kind in TEXT_CAUSAL:
        out = copy.deepcopy(text)
    else:
        dropped = ("model_type", "architectures", "transformers_version")
        fields = {k: v for k, v in text.to_dict().items() if k not in dropped}
        rope = fields.get("rope_parameters") or {}
        fields["rope_parameters"] = {k: v for k, v in rope.items() if not k.startswith("mrope")}
        out = AutoConfig.for_model(EQUIVALENT[kind], **{**fields, **ALWAYS.get(kind, {})})
    for name in CARRIED:
        value = getattr(config, name, None)
        if value is not None and getattr(out, name, None) is None:
            setattr(out, name, value)
    head, embed = outer.get_output_embeddings(), outer.get_input_embeddings()
    out.tie_word_embeddings = head is not None and embed is not None and head.weight is embed.weight
    out.architectures = [CAUSAL.get(out.model_type) or TEXT_CAUSAL[out.model_type]]
    return out


def register_text_causal_lm(config) -> None:
    """Let AutoModelForCausalLM build the causal LM of a text config it maps by its vision-language
    config alone (`TEXT_CAUSAL`: Llama 3.2 Vision's MllamaForCausalLM)."""
    import transformers
    from transformers import AutoModelForCausalLM

    name = TEXT_CAUSAL.get(getattr(config, "model_type", None))
    if name is not None:
        AutoModelForCausalLM.register(type(config), getattr(transformers, name), exist_ok=True)


def _build_outer(config, trust_remote_code: bool) -> nn.Module:
    """transformers' vision-language model for `config`, on `meta`, its head tied as it ties it."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    classes = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    try:
        with init_empty_weights(include_buffers=False), large_tensors_on_meta():
            if any(c is not None for c in classes):
                outer = next(c for c in classes if c is not None)(config)
            else:
                outer = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as e:  # ImportError: a vision tower that needs another library (timm)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        installs = re.findall(r"`pip install [^`]+`", str(e))  # a missing library's, as transformers says it
        reason = f"{lines[0].split(' You can install')[0]} ({', '.join(installs)})" if installs else lines[0]
        raise SourceError(f"transformers cannot build a causal language model for model type "
                          f"{config.model_type!r}: {reason}") from None
    outer.tie_weights()
    return outer


def _decoder(model: nn.Module) -> str | None:
    """The path of `model`'s decoder (its stack of layers, with its embeddings and final norm): the
    module that holds the input embeddings."""
    path = _path(model, model.get_input_embeddings())
    return path.rpartition(".")[0] if path is not None else None


def _path(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None
