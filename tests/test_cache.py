"""A hub repo id or a `.gguf` file opened directly: converted once into the cache, reused after
(also offline), resumed when interrupted; `reshard list` shows what the cache holds."""

from __future__ import annotations

import pytest
import torch

from conftest import FakeHub
from reshard.format import read_manifest
from runtime import LayeredModel

IDS = torch.tensor([[3, 17, 42, 99, 5]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def open_cpu(source, **kw) -> LayeredModel:
    return LayeredModel.from_pretrained(source, device="cpu", max_cpu_memory=0, **kw)


def weight_downloads(hub: FakeHub) -> list[str]:
    return [f for f in hub.downloads if f.endswith(".safetensors")]


def test_hub_id_converts_once_then_reuses(fake_hub, cache, tiny_checkpoints, tiny_converted, capsys):
    from transformers import AutoModelForCausalLM

    folder = cache / "hub" / "org--tiny-llama" / FakeHub.COMMIT / "auto"
    with open_cpu("org/tiny-llama") as model:
        ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reshard: converting org/tiny-llama @ {FakeHub.COMMIT[:12]} (auto) into {folder} (once; later runs reuse it)")
    assert len(weight_downloads(fake_hub)) == 3
    want = read_manifest(tiny_converted["llama"])
    assert [g.sha256 for g in read_manifest(folder).groups] == [g.sha256 for g in want.groups]

    fake_hub.downloads.clear()
    with open_cpu("org/tiny-llama") as model:
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert capsys.readouterr().err.splitlines() == [
        f"reshard: using {folder} (org/tiny-llama @ {FakeHub.COMMIT[:12]} (auto), converted earlier)"]
    assert fake_hub.downloads == []


def test_cache_is_keyed_by_dtype_and_quantization(fake_hub, cache, capsys):
    with open_cpu("org/tiny-llama", dtype="bfloat16") as model:
        assert model.dtype == torch.bfloat16
    with open_cpu("org/tiny-llama", quantize="int8") as model:
        assert model.manifest.quantization["scheme"] == "int8"
    repo = cache / "hub" / "org--tiny-llama" / FakeHub.COMMIT
    assert sorted(p.name for p in repo.iterdir()) == ["auto-int8", "bfloat16"]
    assert read_manifest(repo / "bfloat16").dtype == "bfloat16"
    assert read_manifest(repo / "auto-int8").dtype == "float32"


def test_offline_reuses_the_commit_converted_last(fake_hub, cache, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    with open_cpu("org/tiny-llama"):
        pass
    capsys.readouterr()

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    with open_cpu("org/tiny-llama") as model:
        assert model.manifest.source["commit"] == FakeHub.COMMIT
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reshard: the hub is not reachable; org/tiny-llama main was {FakeHub.COMMIT[:12]} when last converted")
    # a revision never converted cannot be resolved offline: the hub's error, as it is
    from reshard.errors import HubUnreachableError

    with pytest.raises(HubUnreachableError, match=r"^cannot fetch org/tiny-llama: HF_HUB_OFFLINE is set"):
        open_cpu("org/tiny-llama", revision="v2")


def test_interrupted_conversion_resumes_on_next_use(fake_hub, cache, tiny_converted, monkeypatch, capsys):
    import reshard.convert

    write_group, written = reshard.convert._write_group, []

    def interrupt_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(write_group(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(reshard.convert, "_write_group", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        open_cpu("org/tiny-llama")
    monkeypatch.setattr(reshard.convert, "_write_group", write_group)
    capsys.readouterr()
    folder = cache / "hub" / "org--tiny-llama" / FakeHub.COMMIT / "auto"
    with open_cpu("org/tiny-llama"):
        pass
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reshard: resuming the conversion of org/tiny-llama @ {FakeHub.COMMIT[:12]} (auto) into {folder} "
        f"(once; later runs reuse it)")
    want = read_manifest(tiny_converted["llama"])
    assert [g.sha256 for g in read_manifest(folder).groups] == [g.sha256 for g in want.groups]


def test_list_shows_the_cache_and_sizes(fake_hub, cache, capsys):
    from reshard.cache import list_cached

    assert list_cached() == []
    with open_cpu("org/tiny-llama"):
        pass
    with open_cpu("org/tiny-llama", dtype="bfloat16"):
        pass
    entry32, entry16 = list_cached()  # by source, commit, then variant
    assert (entry32.source, entry32.commit, entry32.variant, entry32.finished) == (
        "org/tiny-llama", FakeHub.COMMIT, "auto", True)
    assert entry16.variant == "bfloat16"
    for entry in (entry16, entry32):
        assert entry.bytes == sum(p.stat().st_size for p in entry.folder.iterdir())
    assert entry16.bytes < entry32.bytes * 0.6


@pytest.mark.slow
def test_gguf_path_converts_once_then_reuses(small_gguf, cache, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from reshard.gguf_source import GGUFSource

    with open_cpu(small_gguf, packed=False) as model:  # the re-packed int4 expands: exact
        ref = AutoModelForCausalLM.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name, dtype=torch.float32)
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    (folder,) = (cache / "gguf").glob("SmolLM2-135M-Instruct.first2layers--*/auto")
    assert capsys.readouterr().err.splitlines()[0] == (
        f"reshard: converting {small_gguf} (auto) into {folder} (once; later runs reuse it)")
    monkeypatch.setattr(GGUFSource, "load", lambda self, model: pytest.fail("converted again"))
    with open_cpu(small_gguf, packed=False) as model:  # the re-packed int4 expands: exact
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert capsys.readouterr().err.splitlines() == [f"reshard: using {folder} ({small_gguf} (auto), converted earlier)"]


def test_runtime_generate_hub_id_converts_once_then_reuses(fake_hub, cache, tiny_converted, capsys):
    from runtime.cli import main as runtime_main

    args = ["--prompt", "w3 w4", "-n", "5", "--device", "cpu", "--max-cpu-memory", "0"]
    assert runtime_main(["generate", str(tiny_converted["llama"]), *args]) == 0
    want = capsys.readouterr().out
    folder = cache / "hub" / "org--tiny-llama" / FakeHub.COMMIT / "auto"
    for first in (True, False):
        assert runtime_main(["generate", "org/tiny-llama", *args]) == 0
        out, err = capsys.readouterr()
        assert out == want
        note = (f"reshard: converting org/tiny-llama @ {FakeHub.COMMIT[:12]} (auto) into {folder} (once; later runs "
                f"reuse it)" if first else
                f"reshard: using {folder} (org/tiny-llama @ {FakeHub.COMMIT[:12]} (auto), converted earlier)")
        assert err.splitlines()[0] == note
    assert len(weight_downloads(fake_hub)) == 3  # downloaded once


def test_reshard_list_prints_the_cache(fake_hub, cache, capsys):
    import json

    from reshard.cli import main as reshard_main

    assert reshard_main(["list"]) == 0
    assert capsys.readouterr() == ("", f"reshard: no converted models in {cache}\n")
    with open_cpu("org/tiny-llama"):
        pass
    capsys.readouterr()
    folder = cache / "hub" / "org--tiny-llama" / FakeHub.COMMIT / "auto"
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert reshard_main(["list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"org/tiny-llama  {FakeHub.COMMIT[:12]}  auto  {size / 1e6:.2f} MB  {folder}",
        f"total {size / 1e6:.2f} MB in {cache}"]
    assert reshard_main(["list", "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"source": "org/tiny-llama", "commit": FakeHub.COMMIT, "variant": "auto", "bytes": size, "finished": True,
         "folder": str(folder)}]
