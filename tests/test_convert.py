"""`reshard convert`: bounded memory, the hub path, and the written files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reshard.format import read_manifest

from conftest import FakeHub, built_once

# Peak RSS from VmHWM: Linux carries the parent's peak into a child's ru_maxrss across fork and
# exec, so ru_maxrss would report pytest's own peak instead of the conversion's.
PEAK_RSS = """
import sys
from reshard.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(peak, file=open(sys.argv[1], "w"))
sys.exit(code)
"""


def _peak_rss_of_convert(src: Path, out: Path, tmp_path: Path, *options: str) -> int:
    report = tmp_path / f"rss-{out.name}.txt"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(report), "convert", str(src), str(out), "--quiet", *options],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return int(report.read_text())


def _llama(folder: Path, layers: int, hidden: int, inter: int) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size="10GB")  # one shard holding every layer
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return layer


@pytest.fixture(scope="module")
def big_and_small_llama(tmp_path_factory):
    """A 12-layer and a 1-layer float32 llama (one shard each), built once per run and shared by
    both dtypes of the peak-memory test; also the bytes of one layer."""
    def build(root):
        layer = _llama(root / "big", layers=12, hidden=512, inter=2048)
        _llama(root / "small", layers=1, hidden=512, inter=2048)
        (root / "layer_bytes").write_text(str(layer))

    root = built_once(tmp_path_factory, "convert-peak-llamas", build)
    return root / "big", root / "small", int((root / "layer_bytes").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # copied as stored; read, cast and written
def test_convert_peak_memory_is_about_one_layer(tmp_path, dtype, big_and_small_llama):
    big_src, small_src, layer_bytes = big_and_small_llama
    shard = max(f.stat().st_size for f in big_src.glob("*.safetensors"))
    assert shard > 10 * layer_bytes
    base = _peak_rss_of_convert(small_src, tmp_path / "small-out", tmp_path, "--dtype", dtype)
    big = _peak_rss_of_convert(big_src, tmp_path / "big-out", tmp_path, "--dtype", dtype)
    # Growth over a one-layer model (float32 layers): a couple of layers at most (the group being
    # written and the next one, read ahead), far below the shard size.
    assert big - base < 3 * layer_bytes, (big - base, layer_bytes, shard)
    assert len(read_manifest(tmp_path / "big-out").groups) == 12 + 3


def test_written_files_are_plain_safetensors(tiny_converted, tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"]).state_dict()
    manifest = read_manifest(tiny_converted["qwen2"])
    seen = set()
    for group in manifest.groups:
        with safe_open(tiny_converted["qwen2"] / group.file, framework="pt") as f:
            assert set(f.keys()) == set(group.tensors)
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), ref[name])
                seen.add(name)
    assert seen == set(ref)
    for side in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tiny_converted["qwen2"] / side).is_file()


def test_weights_lie_64_byte_aligned_in_their_files(tiny_converted, moe_converted):
    """Every tensor whose bytes are a whole multiple of 64 (every weight matrix here) starts at a
    multiple of 64 in its file, as a fresh allocation would (docs/FORMAT.md, Layer files)."""
    import json
    import struct

    for folder in [*tiny_converted.values(), *moe_converted.values()]:
        for g in read_manifest(folder).groups:
            if not g.file:
                continue
            with open(folder / g.file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__")
            assert (8 + n) % 64 == 0, g.file
            whole = {k: v for k, v in header.items() if (v["data_offsets"][1] - v["data_offsets"][0]) % 64 == 0}
            if g.kind == "layer":
                assert any(len(v["shape"]) >= 2 for v in whole.values()), g.file  # the weight matrices are here
            assert all(v["data_offsets"][0] % 64 == 0 for v in whole.values()), (folder, g.file)


def test_dtype_option(tmp_path, tiny_checkpoints):
    from reshard.convert import convert

    manifest = convert(str(tiny_checkpoints["llama"]), tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert manifest.dtype == "bfloat16"
    with safe_open(tmp_path / "bf16" / "layers.00000.safetensors", framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_hub_source_fetches_only_what_is_needed(tmp_path, tiny_checkpoints, tiny_converted, monkeypatch):
    from reshard.convert import convert

    hub = FakeHub(tiny_checkpoints["llama"], tmp_path / "cache",
                  extra_files=["pytorch_model.bin", "README.md", "onnx/model.onnx", "original/consolidated.pth"])
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")

    manifest = convert("someone/tiny-llama", tmp_path / "out", revision="v1", progress=False)

    assert hub.calls[0] == ("model_info", "someone/tiny-llama", "v1", "hf_secret")
    commit = FakeHub.COMMIT
    downloads = [c for c in hub.calls if c[0] == "download"]
    asked = {c[2] for c in downloads}
    assert all(c[1] == "someone/tiny-llama" and c[3] == commit and c[4] == "hf_secret" for c in downloads)
    weights = {f for f in asked if f.endswith((".safetensors", ".bin", ".pth", ".onnx"))}
    assert weights == {p.name for p in tiny_checkpoints["llama"].glob("*.safetensors")}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= asked
    assert "README.md" not in asked
    assert manifest.source == {"id": "someone/tiny-llama", "revision": "v1", "commit": commit}
    for group in manifest.groups:  # same bytes as converting the local folder
        if group.file:
            assert group.sha256 == read_manifest(tiny_converted["llama"]).group(group.name).sha256


def test_hub_files_download_in_parallel_under_one_progress_bar(tmp_path, tiny_checkpoints, monkeypatch):
    import threading
    import time

    import huggingface_hub
    from tqdm.auto import tqdm

    import reshard.hub
    from reshard.convert import convert

    hub = FakeHub(tiny_checkpoints["llama"], tmp_path / "cache").install(monkeypatch)
    lock, running, most, bars, weights = threading.Lock(), [0], [0], [], []

    def download(repo_id, filename, revision=None, token=None, local_dir=None, tqdm_class=None, **kw):
        if tqdm_class is not None:  # the weights (config and tokenizer come first, on their own)
            weights.append(filename)
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            size = (hub.folder / filename).stat().st_size
            progress = tqdm_class(total=size)  # as huggingface_hub reports a file's bytes
            time.sleep(0.2)
            progress.update(size)
            with lock:
                running[0] -= 1
        return hub.hf_hub_download(repo_id, filename, revision=revision, token=token)

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(reshard.hub, "tqdm", Bar)
    convert("someone/tiny-llama", tmp_path / "out", progress=True)
    assert len(weights) > 2 and most[0] > 1  # several files at once
    assert len(bars) == 1  # one bar for all of them, over all their bytes
    assert bars[0].total == bars[0].n == sum((hub.folder / f).stat().st_size for f in weights)


def test_hub_token_flag_wins_over_env(tmp_path, tiny_checkpoints, monkeypatch):
    from reshard.cli import main

    hub = FakeHub(tiny_checkpoints["qwen2"], tmp_path / "cache").install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert main(["convert", "org/model", str(tmp_path / "out"), "--token", "from-flag", "--quiet"]) == 0
    assert {c[-1] for c in hub.calls} == {"from-flag"}
    assert hub.calls[0][2] is None  # no --revision: the hub's default branch
