"""A tokenizer shipped as a tiktoken vocabulary with the model's own Python code (Kimi-K2's
`tiktoken.model` and `tokenization_kimi.TikTokenTokenizer`), written as a fast tokenizer
(`tokenizer.json`), so that the converted folder needs neither that code nor the `tiktoken` package:
- the vocabulary: `tiktoken.model`'s lines ("<base64 bytes> <rank>", as tiktoken reads them), its
  merges made from the ranks as transformers' `TikTokenConverter` makes them (its Llama 3 conversion);
- the split pattern: the code's `pat_str`, known here by the code's class (`PATTERNS`; llama.cpp
  hand-codes the same one for Kimi-K2's GGUF files: reshard/gguf_tables.py);
- the special tokens: tokenizer_config.json's `added_tokens_decoder`, at the ids it gives them (the
  ones after the vocabulary's, as the code numbers them), its special-token names and chat template.
tests/test_tiktoken.py checks the encodings against tiktoken's own.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .errors import SourceError
from .gguf_tables import PRE_TOKENIZER_SPLITS

VOCAB = "tiktoken.model"
PATTERNS = {"tokenization_kimi.TikTokenTokenizer": PRE_TOKENIZER_SPLITS["kimi-k2"][0]}  # the code's class -> pat_str
NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def tiktoken_class(folder: Path) -> str | None:
    """The tokenizer code's class (a key of PATTERNS) where `folder`'s tokenizer is such a tiktoken one."""
    config = folder / "tokenizer_config.json"
    if not (folder / VOCAB).is_file() or not config.is_file():
        return None
    auto = (json.loads(config.read_text()).get("auto_map") or {}).get("AutoTokenizer") or [None]
    name = auto[0] if isinstance(auto, list) else auto
    return name.split("--")[-1] if isinstance(name, str) and name.split("--")[-1] in PATTERNS else None


def write_fast_tokenizer(folder: Path, out: Path) -> None:
    """`folder`'s tiktoken tokenizer (see `tiktoken_class`) as a fast tokenizer in `out`."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    config = json.loads((folder / "tokenizer_config.json").read_text())
    ranks = read_ranks(folder / VOCAB)

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_):
            return ranks

    tokenizer = Converter(vocab_file=str(folder / VOCAB), pattern=PATTERNS[tiktoken_class(folder)]).converted()
    added = sorted(((int(i), t) for i, t in (config.get("added_tokens_decoder") or {}).items()))
    for i, token in added:
        made = tokenizer.add_special_tokens([AddedToken(token["content"], normalized=False, special=True)])
        if made != 1 or tokenizer.token_to_id(token["content"]) != i:
            raise SourceError(f"{folder / 'tokenizer_config.json'} gives {token['content']!r} the id {i}, not the one "
                              f"after the {len(ranks)} tokens of {VOCAB} and the special tokens before it")
    names = {n: (v["content"] if isinstance(v, dict) else v) for n in NAMES if (v := config.get(n)) is not None}
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names, chat_template=template,
                                   model_max_length=config.get("model_max_length", int(1e30)))
    fast.save_pretrained(out)


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken vocabulary: {token bytes: rank}, one "<base64> <rank>" line each."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise SourceError(f"{path} line {number} is not '<base64 token> <rank>'; download it again") from None
    return ranks
