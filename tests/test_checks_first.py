"""`reshard convert` refuses what it would refuse anyway before the expensive part: an OUT that
holds something else, a dtype other than an earlier run's, or a disk too small are found before
a hub repo's weights are downloaded or a GGUF file is de-quantized."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reshard.cli import main as reshard_main


def convert(*args) -> int:
    return reshard_main(["convert", *map(str, args), "--quiet"])


def only_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_dequantizing(monkeypatch):
    """Fail the test if a GGUF file is de-quantized."""
    from reshard.gguf_source import GGUFSource

    def load(self, model):
        raise AssertionError("the GGUF was de-quantized before the checks")

    monkeypatch.setattr(GGUFSource, "load", load)


def test_hub_weights_not_downloaded_into_a_foreign_out(fake_hub, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert("org/tiny-llama", out) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {out} is not empty and holds no conversion record; choose an empty folder, or pass --force "
        f"to write into it anyway")
    assert fake_hub.downloads and not [f for f in fake_hub.downloads if f.endswith(".safetensors")]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow  # transformers reads the GGUF's tokenizer (~20 s)
def test_gguf_into_a_foreign_out_is_refused_before_dequantizing(small_gguf, no_dequantizing, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert(small_gguf, out) == 1
    assert only_error(capsys.readouterr().err) == (
        f"Error: {out} is not empty and holds no conversion record; choose an empty folder, or pass --force "
        f"to write into it anyway")


@pytest.mark.slow  # converts a 2-layer GGUF first
def test_gguf_with_another_dtype_is_refused_before_dequantizing(small_gguf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert convert(small_gguf, out, "--dtype", "float32") == 0
    capsys.readouterr()
    from reshard.gguf_source import GGUFSource

    monkeypatch.setattr(GGUFSource, "load", lambda self, model: pytest.fail("de-quantized before the checks"))
    assert convert(small_gguf, out, "--dtype", "bfloat16") == 1
    line = only_error(capsys.readouterr().err)
    assert line.startswith(f"Error: {out} holds a conversion of {small_gguf.resolve()} @ ")
    assert "(float32, LlamaForCausalLM), not of " in line and "(bfloat16, LlamaForCausalLM)" in line


def test_hub_download_that_does_not_fit_is_refused_before_downloading(fake_hub, tiny_converted, tmp_path,
                                                                      monkeypatch, capsys):
    import reshard.convert

    weights = sum(p.stat().st_size for p in fake_hub.folder.glob("*.safetensors"))
    written = sum(p.stat().st_size for p in tiny_converted["llama"].glob("*.safetensors"))
    free = written + weights // 2  # room for the output, not for the download too
    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=free))
    out = tmp_path / "out"
    assert convert("org/tiny-llama", out) == 1
    need = written + weights
    assert only_error(capsys.readouterr().err) == (
        f"Error: {out} needs about {need / 1e6:.2f} MB more but its disk has {free / 1e6:.2f} MB free; free some "
        f"space or choose an OUT on another disk (for hub sources, --low-disk keeps only one source shard)")
    assert not [f for f in fake_hub.downloads if f.endswith(".safetensors")]
    assert not out.exists()


def test_hub_cache_on_another_disk_is_checked_for_the_download(fake_hub, tmp_path, monkeypatch):
    import reshard.convert
    import reshard.diskspace
    from reshard.errors import DiskSpaceError

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(reshard.diskspace, "_device", lambda path: cache in [path, *path.parents])
    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage",
                        lambda p: SimpleNamespace(total=10**9, used=0, free=10 if cache in [p, *p.parents] else 10**9))
    monkeypatch.setattr("reshard.hub.HubCheckpoint.cache_dir", cache)
    with pytest.raises(DiskSpaceError) as e:
        reshard.convert.convert("org/tiny-llama", tmp_path / "out", progress=False)
    weights = sum(p.stat().st_size for p in fake_hub.folder.glob("*.safetensors"))
    assert str(e.value) == (f"the hub cache {cache} needs about {weights / 1e6:.2f} MB for the download but its "
                            f"disk has 0.00 MB free; free some space, set HF_HUB_CACHE to a folder on another disk, "
                            f"or convert with low_disk=True")
    assert e.value.cli.endswith("or convert with --low-disk")
    assert not [f for f in fake_hub.downloads if f.endswith(".safetensors")]


def test_bad_dtype_is_refused_before_the_hub_is_asked(fake_hub, tmp_path):
    from reshard.convert import convert as convert_api
    from reshard.errors import UsageError

    with pytest.raises(UsageError, match=r"^unknown dtype 'float8'; use auto, float16, bfloat16 or float32$"):
        convert_api("org/tiny-llama", tmp_path / "out", dtype="float8")
    with pytest.raises(UsageError, match=r"^quantize_group must be an even number of 2 or more, not 7$"):
        convert_api("org/tiny-llama", tmp_path / "out", quantize="int4", quantize_group=7)
    assert fake_hub.calls == []
