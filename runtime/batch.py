"""Generation for many prompts at once, and more than one token per pass.

When every pass reads the whole model, a pass that serves a whole batch costs about what a
pass for one prompt costs. `generate_batch` left-pads the prompts (so every row's next token
is in the last column) and runs transformers' `generate` once for all of them.

`load_assistant` opens a small draft model kept whole on the device, for transformers'
assisted decoding (`assistant_model=`); prompt lookup (`prompt_lookup_num_tokens=`) needs
nothing extra. With greedy decoding both give exactly the plain greedy tokens, in fewer passes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from reshard.errors import UsageError
from reshard.format import MANIFEST, read_manifest

from .allowance import shape_of_generate
from .score import pad_batch


@dataclass
class Generated:
    prompt: str
    text: str  # the new tokens, decoded without special tokens
    tokens: list[int]  # the new tokens, up to and including the first end-of-sequence token
    logits: torch.Tensor | None = None  # (len(tokens), vocab): the logits each token was chosen from


def generate_batch(lm, prompts: list[str], *, chat: bool = False, keep_logits: bool = False,
                   **generate_kwargs) -> list[Generated]:
    """Generate for all `prompts` together: each pass of the model serves the whole batch."""
    if not prompts:
        return []
    tok = _tokenizer(lm)
    seqs = [prompt_ids(tok, p, chat=chat) for p in prompts]
    return generate_ids(lm, seqs, prompts, keep_logits=keep_logits, **generate_kwargs)


def generate_ids(lm, seqs: list[list[int]], prompts: list[str] | None = None, *, keep_logits: bool = False,
                 **generate_kwargs) -> list[Generated]:
    """`generate_batch` on prompts given as token ids (`prompts`, their texts, only label the results)."""
    tok = _tokenizer(lm)
    prompts = prompts or [""] * len(seqs)
    rows = fitting_rows(lm, seqs, generate_kwargs)
    if rows < len(seqs):  # each prompt gets the tokens it gets alone, so smaller batches change nothing
        print(f"runtime: generating for {rows} prompts at a time instead of {len(seqs)}, so that the "
              f"activations and KV cache fit on the device", file=sys.stderr)
        return [g for k in range(0, len(seqs), rows) for g in
                generate_ids(lm, seqs[k:k + rows], prompts[k:k + rows], keep_logits=keep_logits, **generate_kwargs)]
    pad = pad_id(lm)
    ids, mask = pad_batch(seqs, pad, left=True)
    dev = lm.device
    if generate_kwargs.get("draft") is not None:  # tree speculation (runtime/speculate.py): token ids back
        if keep_logits:
            raise UsageError("keeping each token's logits cannot be combined with a draft; drop one")
        sequences, steps = lm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), pad_token_id=pad,
                                       **generate_kwargs), None
    else:
        out = lm.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), pad_token_id=pad,
                          return_dict_in_generate=True, output_logits=keep_logits, **generate_kwargs)
        sequences, steps = out.sequences, out.logits
    new = sequences[:, ids.shape[1]:].cpu()
    eos = eos_ids(lm)
    results = []
    for r, prompt in enumerate(prompts):
        tokens = _until_eos(new[r].tolist(), eos)
        logits = torch.stack([step[r] for step in steps[:len(tokens)]]).cpu() if keep_logits else None
        results.append(Generated(prompt, tok.decode(tokens, skip_special_tokens=True), tokens, logits))
    return results


def fitting_rows(lm, seqs: list[list[int]], generate_kwargs: dict) -> int:
    """The most prompts (halving from all of them) whose generation fits the device next to the weights."""
    rows, longest = len(seqs), max(len(s) for s in seqs)
    while rows > 1:
        ids = torch.empty(rows, longest, device="meta")
        if lm.fits(shape_of_generate((), {**generate_kwargs, "input_ids": ids}, lm.generation_config)):
            break
        rows = (rows + 1) // 2
    return rows


def prompt_ids(tok, text: str, *, chat: bool) -> list[int]:
    """The prompt's tokens, wrapped in the tokenizer's chat template with `chat`."""
    if not chat:
        return tok(text)["input_ids"]
    return chat_ids(tok, [{"role": "user", "content": text}])


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """The tokens of a conversation (`{"role", "content"}` dicts) in the tokenizer's chat template,
    ending with the assistant's turn begun."""
    if not getattr(tok, "chat_template", None):
        raise UsageError("this tokenizer has no chat template; drop --chat")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def pad_id(lm) -> int:
    """The generation config's pad token, else its (first) end-of-sequence token, else 0."""
    gc = lm.generation_config
    if gc.pad_token_id is not None:
        return gc.pad_token_id
    eos = eos_ids(lm)
    return eos[0] if eos else 0


def load_assistant(path, *, device: torch.device, dtype: torch.dtype):
    """A draft model for assisted decoding, whole on `device`: a transformers checkpoint folder
    or a folder written by `reshard convert`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / MANIFEST).is_file():
        return _load_converted(path, device, dtype)
    if not (path / "config.json").is_file():
        raise UsageError(f"assistant {path} is neither a converted folder nor a transformers checkpoint folder")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def other_tokenizer(lm, path):
    """The tokenizer of the draft folder `path` when it differs from `lm`'s (None when they agree,
    or when either has none)."""
    from .opening import load_tokenizer

    theirs = load_tokenizer(Path(path))
    if lm.tokenizer is None or theirs is None or theirs.get_vocab() == lm.tokenizer.get_vocab():
        return None
    return theirs


def assistant_options(lm, path) -> dict:
    """generate() options for the assistant folder `path`: the model, and with a tokenizer and a
    vocabulary size other than the target's, both tokenizers (transformers' universal assisted
    decoding: the draft's tokens go through text and are re-tokenized by the target). Transformers
    tells the two cases apart by vocabulary size: with the same size it takes the ids as shared."""
    assistant = load_assistant(path, device=lm.device, dtype=lm.dtype)
    options = {"assistant_model": assistant}
    sizes = {m.config.get_text_config().vocab_size for m in (lm, assistant)}
    if len(sizes) > 1 and (theirs := other_tokenizer(lm, path)) is not None:
        options.update(tokenizer=lm.tokenizer, assistant_tokenizer=theirs)
    return options


def _load_converted(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig

    from reshard.plan import build_empty_model

    from .opening import load_generation_config, place_buffers
    from .stream import GroupLoader, StreamStats

    manifest = read_manifest(path)
    model = build_empty_model(AutoConfig.from_pretrained(path), dtype=dtype)
    loader = GroupLoader(path, manifest, device, dtype, StreamStats())
    state = {name: t for i in range(len(manifest.groups)) for name, t in loader.load(i).tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UsageError(f"assistant {path} lacks weights for {missing[:3]}; convert it again")
    place_buffers(model, device)
    load_generation_config(model, path)
    return model.eval()


def eos_ids(lm) -> list[int]:
    """The generation config's end-of-sequence tokens (none, one or several)."""
    eos = lm.generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for k, t in enumerate(tokens):
        if t in eos:
            return tokens[:k + 1]
    return tokens


def _tokenizer(lm):
    if lm.tokenizer is None:
        raise UsageError("this folder has no tokenizer files; convert a checkpoint that has them")
    return lm.tokenizer
