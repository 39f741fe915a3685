"""GGUF sources: read and de-quantized one tensor at a time, equal to transformers' own GGUF
loading, split files, and peak memory of about one layer on a GGUF of over 1 GB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import smollm2_gguf
from gguf_files import write_random_llama, write_split
from reshard.convert import convert
from reshard.errors import SourceError
from reshard.format import read_manifest

# Peak RSS of a conversion in a fresh process, from VmHWM (see tests/test_convert.py for why).
PEAK_RSS = """
import sys
from reshard.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(peak, file=open(sys.argv[1], "w"))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def smollm2_gguf_converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-gguf-out")
    convert(str(smollm2_gguf()), out, progress=False)
    return out


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for group in read_manifest(folder).groups:
        if group.file:
            with safe_open(folder / group.file, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def test_gguf_tensors_and_logits_equal_transformers(smollm2_gguf_converted, smollm2_checkpoint):
    """`smollm2_checkpoint` is transformers' `from_pretrained(gguf_file=...)` in float32, saved."""
    from transformers import AutoModelForCausalLM

    from runtime import LayeredModel

    ref = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    want = ref.state_dict()
    got = stored_tensors(smollm2_gguf_converted)
    assert set(got) == set(want) - {"lm_head.weight"}  # tied: stored once
    for name, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, want[name]), name
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        want_logits = ref(ids).logits
    with LayeredModel.from_pretrained(smollm2_gguf_converted, device="cpu", max_cpu_memory=0) as model:
        assert torch.equal(model(ids).logits, want_logits)


def test_split_gguf_converts_like_the_single_file(tmp_path, small_gguf):
    parts = write_split(small_gguf, tmp_path / "smol.gguf", parts=3)
    assert [p.name for p in parts] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    manifest = convert(str(parts[1]), tmp_path / "out", progress=False)  # any part names the whole
    single = convert(str(small_gguf), tmp_path / "single", progress=False)
    assert [(g.name, g.sha256) for g in manifest.groups] == [(g.name, g.sha256) for g in single.groups]
    assert manifest.source["id"] == str(parts[0].resolve())


def test_split_gguf_with_a_missing_part_is_refused(tmp_path, small_gguf):
    parts = write_split(small_gguf, tmp_path / "smol.gguf", parts=3)
    parts[2].unlink()
    with pytest.raises(SourceError, match="smol-00003-of-00003.gguf is missing"):
        convert(str(parts[0]), tmp_path / "out", progress=False)


@pytest.mark.slow
def test_large_gguf_converts_in_one_layer_of_memory(tmp_path):
    """A 1.09 GB llama GGUF (Q8_0 and Q4_K) converts with peak RSS <= 1.5 GB, and every tensor
    equals transformers' GGUF loading (`load_gguf_checkpoint`, what `from_pretrained` runs for llama)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from reshard.plan import build_empty_model

    gguf = tmp_path / "big.gguf"
    size = write_random_llama(gguf, smollm2_gguf(), layers=22, hidden=2048, inter=5632, heads=32, kv_heads=4)
    assert size > 1 << 30
    out, report = tmp_path / "out", tmp_path / "rss.txt"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(report), "convert", str(gguf), str(out),
                           "--dtype", "bfloat16", "--quiet"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    peak = int(report.read_text())
    assert peak <= 1.5e9, peak

    from transformers import AutoConfig

    model = build_empty_model(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
    want = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.bfloat16)["tensors"]
    manifest = read_manifest(out)
    assert sum(len(g.tensors) for g in manifest.groups) == len(want) == 22 * 9 + 3
    for group in manifest.groups:
        with safe_open(out / group.file, framework="pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), want.pop(name)), name
