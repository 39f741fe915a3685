"""GGUF sources: read and de-quantized one tensor at a time, equal to transformers' own GGUF
loading, split files, and a conversion's memory growth of a few layers on a 24-layer GGUF."""

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
from reshard.format import read_manifest



@pytest.fixture(scope="module")
def small_gguf_converted(small_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-gguf-out")
    convert(str(small_gguf), out, progress=False)
    return out


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's parameters, those kept as GGUF blocks expanded (reshard/ggml_quants.py)."""
    from runtime.quantized import expand_group

    tensors = {}
    for group in read_manifest(folder).groups:
        if group.file:
            with safe_open(folder / group.file, framework="pt") as f:
                own = {k: f.get_tensor(k) for k in f.keys()}
            tensors.update(expand_group(own, group, None, torch.float32))
    return tensors


def test_gguf_tensors_and_logits_equal_transformers(small_gguf_converted, small_gguf):
    """SmolLM2's own blocks (Q8_0 embeddings, Q4_1 layers), cut to 2 layers, against
    transformers' `from_pretrained(gguf_file=...)` in float32."""
    from transformers import AutoModelForCausalLM

    from runtime import LayeredModel

    ref = AutoModelForCausalLM.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name, dtype=torch.float32).eval()
    want = ref.state_dict()
    got = stored_tensors(small_gguf_converted)
    assert set(got) == set(want) - {"lm_head.weight"}  # tied: stored once
    for name, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, want[name]), name
    ids = torch.tensor([[1, 504, 265, 512, 269, 282, 426, 314, 2]])
    with torch.no_grad():
        want_logits = ref(ids).logits
    # packed=False: the Q4_1 layers, re-packed into int4, expand (the CPU kernels compute in bfloat16)
    with LayeredModel.from_pretrained(small_gguf_converted, device="cpu", max_cpu_memory=0, packed=False) as model:
        assert torch.equal(model(ids).logits, want_logits)



def test_tokenizer_splits_digits_as_smollm2s_own(small_gguf_converted, small_gguf):
    """SmolLM2's file says `tokenizer.ggml.pre = smollm`, which transformers' GGUF tokenizer builder
    does not know (it keeps GPT-2's splits: "12345" one piece); the folder's tokenizer splits digits
    one by one, as SmolLM2's own tokenizer (its `Digits` pre-tokenizer) and llama.cpp do."""
    from transformers import AutoTokenizer

    builder = AutoTokenizer.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name)
    assert AutoTokenizer.from_pretrained(small_gguf_converted).tokenize("Price: 12345")[-5:] == ["1", "2", "3", "4", "5"]
    assert builder.backend_tokenizer.pre_tokenizer.pre_tokenize_str(" 12345")[0][0] == "Ġ12345"

def test_split_gguf_converts_like_the_single_file(tmp_path, small_gguf, small_gguf_converted):
    parts = write_split(small_gguf, tmp_path / "smol.gguf", parts=3)
    assert [p.name for p in parts] == [f"smol-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    manifest = convert(str(parts[1]), tmp_path / "out", progress=False)  # any part names the whole
    single = read_manifest(small_gguf_converted)
    assert [(g.name, g.sha256) for g in manifest.groups] == [(g.name, g.sha256) for g in single.groups]
    assert manifest.source["id"] == str(parts[0].resolve())


# One process converts a 1-layer GGUF (imports and every code path warmed up), resets its peak
# RSS (clear_refs 5: VmHWM := VmRSS), then converts the large one: its growth is that conversion's.
GROWTH_RSS = """
import sys
from reshard.cli import main

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

small, small_out, big, big_out, report = sys.argv[1:]
assert main(["convert", small, small_out, "--quiet"]) == 0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
code = main(["convert", big, big_out, "--quiet"])
print(before, status("VmHWM:"), file=open(report, "w"))
sys.exit(code)
"""
LARGE = dict(hidden=2048, inter=2048, heads=32, kv_heads=4, vocab=1024)  # Q4_K attention, Q8_0 MLP: 18.7 MB a layer


@pytest.mark.slow  # about 15 s
def test_large_gguf_converts_in_one_layer_of_memory(tmp_path):
    """A 24-layer GGUF (Q4_K attention, Q8_0 MLP, 0.45 GB) converts with default options (blocks
    kept or re-packed, nothing de-quantized) growing the converting process by a few layers' bytes,
    5 at most, a quarter of the decoder layers' (holding them all would fail); stored weights equal
    gguf's de-quantization of their tensors."""
    from gguf import GGUFReader, dequantize

    from gguf_files import write_trimmed
    from runtime.quantized import expand_group

    layers = 24
    write_random_llama(tmp_path / "big.gguf", smollm2_gguf(), layers=layers, **LARGE)
    write_trimmed(tmp_path / "big.gguf", tmp_path / "one.gguf", layers=1, vocab=LARGE["vocab"])
    report = tmp_path / "rss.txt"
    proc = subprocess.run([sys.executable, "-c", GROWTH_RSS, *(str(tmp_path / n) for n in (
        "one.gguf", "one-out", "big.gguf", "big-out")), str(report)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, peak = map(int, report.read_text().split())
    manifest = read_manifest(tmp_path / "big-out")
    decoder = [g for g in manifest.groups if g.kind == "layer"]
    assert len(decoder) == layers and {q["scheme"] for g in decoder for q in g.quantized.values()} == {"q4_k", "int8"}
    layer = max(g.bytes for g in decoder)
    assert peak - before <= 5 * layer <= sum(g.bytes for g in decoder) / 4, (peak - before, layer)

    group = decoder[-1]  # its MLP weights are not permuted by transformers: compare with gguf's own values
    with safe_open(tmp_path / "big-out" / group.file, framework="pt") as f:
        stored = expand_group({k: f.get_tensor(k) for k in f.keys()}, group, None, torch.float32)
    tensors = {t.name: t for t in GGUFReader(tmp_path / "big.gguf").tensors}
    for name, gguf_name in (("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up")):
        t = tensors[f"blk.{layers - 1}.{gguf_name}.weight"]
        want = torch.from_numpy(dequantize(t.data, t.tensor_type))
        assert torch.equal(stored[f"model.layers.{layers - 1}.{name}.weight"], want), name


# --- error lines (listed in tests/test_errors.py) ---------------------------------------------

def cli_convert(capsys, *args) -> tuple[int, str]:
    """(exit code, the one `Error:` line) of `reshard convert ARGS --quiet`."""
    from reshard.cli import main
    from test_robustness import only_error

    code = main(["convert", *map(str, args), "--quiet"])
    return code, only_error(capsys.readouterr().err)


def test_split_gguf_with_a_missing_part_is_refused(tmp_path, small_gguf, capsys):
    parts = write_split(small_gguf, tmp_path / "smol.gguf", parts=3)
    parts[2].unlink()
    assert cli_convert(capsys, parts[0], tmp_path / "out") == (
        1, f"Error: {parts[0]} is part 1 of a 3-file GGUF, but smol-00003-of-00003.gguf is missing from {tmp_path}")


def test_gguf_that_is_not_gguf(tmp_path, capsys):
    from gguf import GGUFReader

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    try:
        GGUFReader(gguf)
    except ValueError as e:  # gguf's own reason, quoted in the line
        reason = str(e)
    assert cli_convert(capsys, gguf, tmp_path / "out") == (
        1, f"Error: {gguf} is not a readable GGUF file ({reason}); download it again")


def test_gguf_without_the_gguf_package_is_one_line(tmp_path, monkeypatch, capsys):
    """Converting a .gguf, or expanding a folder's grid blocks, where the gguf package is missing: one
    line naming the package and the extra that installs it (exit 2), not an ImportError."""
    from reshard import ggml_iquants

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails as where it is not installed
    line = ("Error: GGUF files and the GGML blocks they hold need the gguf package (gguf is not installed): "
            "pip install 'reshard[gguf]'")
    assert cli_convert(capsys, gguf, tmp_path / "out") == (2, line)
    monkeypatch.setattr(ggml_iquants, "_TABLES", {})
    with pytest.raises(ggml_iquants.UsageError, match="need the gguf package"):
        ggml_iquants.prepare("iq2_xxs", torch.device("cpu"))


def test_gguf_shrunk_while_converting(tmp_path, small_gguf, monkeypatch, capsys):
    from reshard.gguf_source import GGUFSource

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(small_gguf.read_bytes())
    real_read = GGUFSource.read

    def read_after_truncation(self, keys):
        gguf.write_bytes(gguf.read_bytes()[:gguf.stat().st_size // 2])  # inside the layers' tensors
        return real_read(self, keys)

    monkeypatch.setattr(GGUFSource, "read", read_after_truncation)
    code, line = cli_convert(capsys, gguf, tmp_path / "out")
    assert code == 1
    first = line.split(" is truncated in tensor ")
    assert first[0] == f"Error: {gguf}" and first[1].endswith("; download it again"), line


def test_gguf_processing_that_gives_no_tensor(tmp_path, small_gguf, monkeypatch, capsys):
    from transformers.modeling_gguf_pytorch_utils import GGUFTensor, LlamaTensorProcessor

    real = LlamaTensorProcessor.process

    def drops_the_embeddings(self, weights, name, **kwargs):
        return GGUFTensor(weights, None, {}) if name == "token_embd.weight" else real(self, weights, name, **kwargs)

    monkeypatch.setattr(LlamaTensorProcessor, "process", drops_the_embeddings)
    assert cli_convert(capsys, small_gguf, tmp_path / "out") == (
        1, f"Error: {small_gguf}: transformers' GGUF processing gave no tensor for model.embed_tokens.weight")
