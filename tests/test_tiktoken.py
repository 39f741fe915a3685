"""Kimi-K2 as published: `model_type: kimi_k2` with its own config and modeling code (`auto_map`), and a
tiktoken vocabulary read by its own tokenizer code (`tiktoken.model`, `tokenization_kimi.TikTokenTokenizer`).
reshard reads the config as transformers' DeepSeek-V3 (reshard/plan.py NATIVE) and writes the tokenizer as a
fast one (reshard/tiktoken_vocab.py), so no code of the checkpoint's runs. The vocabulary here is a byte-level
BPE trained on a few lines; the reference encoding is tiktoken's own, with Kimi's split pattern."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from conftest import assert_runs_as, moe_config

from reshard.convert import convert
from reshard.tiktoken_vocab import PATTERNS

TEXTS = ["Hello world! It's 12345 yen, isn't it?", "東京タワーis tall; 北京 and 東京.", "def f(x):\n    return x**2  # ok\n\n",
         "  spaces\tand\ttabs  ", "Über naïve café — 3.14159", "<|im_user|>hi<|im_end|>[EOS]"]
SPECIALS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|reserved_token_5|>"]
KIMI = "tokenization_kimi.TikTokenTokenizer"


def ranks_of_a_trained_bpe() -> dict[bytes, int]:
    """A tiktoken vocabulary: the 256 bytes, then the merges of a byte-level BPE trained on TEXTS, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(decode[c] for c in a + b), len(ranks))
    return ranks


def write_kimi_tokenizer(folder, ranks: dict[bytes, int], specials=SPECIALS) -> None:
    """`folder`'s tokenizer files as Kimi-K2's repo has them (its code file itself left out: it never runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": [KIMI, None]}, "tokenizer_class": "TikTokenTokenizer",
        "added_tokens_decoder": {str(len(ranks) + i): {"content": t, "special": True, "normalized": False}
                                 for i, t in enumerate(specials)},
        "bos_token": {"content": "[BOS]"}, "eos_token": "[EOS]",
        "chat_template": "{% for m in messages %}<|im_{{ m.role }}|>{{ m.content }}<|im_end|>{% endfor %}"}))


def tiktoken_reference(ranks: dict[bytes, int]):
    import tiktoken

    return tiktoken.Encoding("kimi-test", pat_str=PATTERNS[KIMI], mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIALS)})


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(a Kimi-K2-style checkpoint: DeepSeek-V3 weights, `kimi_k2` config, tiktoken tokenizer; its
    conversion; the model; its tiktoken vocabulary)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("kimi")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config("deepseek_v3")).eval()
    model.save_pretrained(root / "kimi")
    config = json.loads((root / "kimi" / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (root / "kimi" / "config.json").write_text(json.dumps(config))
    ranks = ranks_of_a_trained_bpe()
    write_kimi_tokenizer(root / "kimi", ranks)
    convert(str(root / "kimi"), root / "out", progress=False)
    return root / "kimi", root / "out", model, ranks


def test_the_fast_tokenizer_encodes_as_tiktoken(kimi):
    from transformers import AutoTokenizer

    _, out, _, ranks = kimi
    tokenizer, reference = AutoTokenizer.from_pretrained(out), tiktoken_reference(ranks)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, allowed_special="all"), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token == "[BOS]" and tokenizer.eos_token_id == len(ranks) + 1
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_user|>hi<|im_end|>"


def test_a_kimi_k2_checkpoint_runs_as_deepseek_v3_without_its_code(kimi):
    """Its config read as transformers' DeepSeek-V3 (no `--trust-remote-code`); the folder's config.json is that
    one, and the model computes what transformers' DeepSeek-V3 computes with the weights, streamed and resident."""
    _, out, model, _ = kimi
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert_runs_as(model, out, torch.tensor([[5, 17, 99, 3, 250, 41, 7]]), new_tokens=4)


def test_vocabulary_problems_are_one_line(kimi, tmp_path, capsys):
    from test_gguf import cli_convert

    source, n = kimi[0], len(kimi[3])
    for name, edit, line in [
        ("bad-line", lambda f: (f / "tiktoken.model").write_text("not base64 at all\n"),
         "{}/tiktoken.model line 1 is not '<base64 token> <rank>'; download it again"),
        ("bad-id", lambda f: write_kimi_tokenizer(f, ranks_of_a_trained_bpe(), specials=["[BOS]"] * 2),
         "{}/tokenizer_config.json gives '[BOS]' the id " + f"{n + 1}, not the one after the {n} tokens of "
         "tiktoken.model and the special tokens before it"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        for f in source.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        edit(folder)
        code, got = cli_convert(capsys, folder, tmp_path / f"{name}-out")
        assert (code, got) == (1, "Error: " + line.format(folder)), got
