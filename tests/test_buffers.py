"""Buffers that transformers computes when it builds a model (rotary tables, embedding scales,
masks) must be what `from_pretrained(dtype=...)` gives them, in value and dtype, whatever the
dtype of the folder and the compute dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS
from reshard.convert import convert
from runtime import LayeredModel

FOLDER_DTYPES = [torch.float16, torch.bfloat16]
COMPUTE_DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def typed_checkpoints(tiny_checkpoints, tmp_path_factory):
    """(arch, folder dtype) -> (transformers checkpoint saved in that dtype, its converted folder)."""
    root = tmp_path_factory.mktemp("typed")
    out = {}
    for arch in ARCHS:
        for dtype in FOLDER_DTYPES:
            name = f"{arch}-{str(dtype).removeprefix('torch.')}"
            hf = root / name
            model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=dtype)
            model.save_pretrained(hf)
            (hf / "tokenizer_config.json").write_bytes((tiny_checkpoints[arch] / "tokenizer_config.json").read_bytes())
            (hf / "tokenizer.json").write_bytes((tiny_checkpoints[arch] / "tokenizer.json").read_bytes())
            convert(str(hf), root / f"{name}-out", progress=False)
            out[arch, dtype] = hf, root / f"{name}-out"
    return out


@pytest.mark.parametrize("compute", COMPUTE_DTYPES, ids=str)
@pytest.mark.parametrize("folder_dtype", FOLDER_DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_buffers_equal_from_pretrained(arch, folder_dtype, compute, typed_checkpoints):
    hf, converted = typed_checkpoints[arch, folder_dtype]
    want = dict(AutoModelForCausalLM.from_pretrained(hf, dtype=compute).named_buffers())
    with LayeredModel.from_pretrained(converted, device="cpu", dtype=compute, max_cpu_memory=0) as model:
        got = dict(model.model.named_buffers())
        assert sorted(got) == sorted(want)
        for name, buf in want.items():
            assert got[name].dtype == buf.dtype, name
            assert got[name].device == torch.device("cpu"), name
            assert torch.equal(got[name], buf), name


def test_gemma_scale_keeps_compute_dtype(typed_checkpoints):
    """The case that was wrong: Gemma's embedding scale followed the folder's dtype (bfloat16)
    when float32 compute was asked; transformers builds it in float32, unrounded."""
    _, converted = typed_checkpoints["gemma", torch.bfloat16]
    with LayeredModel.from_pretrained(converted, device="cpu", dtype=torch.float32, max_cpu_memory=0) as model:
        scale = model.model.model.embed_tokens.embed_scale
        assert scale.dtype == torch.float32
        assert scale.item() == model.config.hidden_size ** 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_logits_equal_transformers(arch, typed_checkpoints):
    hf, converted = typed_checkpoints[arch, torch.bfloat16]
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    with LayeredModel.from_pretrained(converted, device="cpu", dtype=torch.bfloat16, max_cpu_memory=0) as model:
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
