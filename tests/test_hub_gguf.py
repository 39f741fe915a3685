"""Hub repos of GGUF files (llama.cpp's downloads), named `REPO:TAG` as llama.cpp's `-hf` and Ollama
name them: the one model's parts are fetched (through the same `huggingface_hub` boundary, here a
local stand-in) and converted as the local file would be; a repo with one GGUF model needs no tag;
an ambiguous or unknown tag is one line naming what the repo has. The vision projector is never
fetched."""

from __future__ import annotations

import shutil

import pytest
from conftest import FakeHub
from gguf_files import write_split
from test_gguf import cli_convert

from reshard.convert import convert
from reshard.format import read_manifest
from reshard.hub import select_gguf, split_tag

REPO = "someone/Tiny-GGUF"


@pytest.fixture(scope="module")
def local(small_gguf, tmp_path_factory):
    """The small GGUF converted from the local file: what a hub conversion must equal."""
    out = tmp_path_factory.mktemp("local-gguf")
    convert(str(small_gguf), out, progress=False)
    return read_manifest(out)


def gguf_hub(folder, small_gguf, monkeypatch, *, models: int) -> FakeHub:
    """A repo holding the small GGUF as a 2-part split tagged Q8_0, `models` - 1 more copies tagged
    Q4_K_M, and a vision projector."""
    folder.mkdir()
    write_split(small_gguf, folder / "Tiny-Q8_0.gguf", parts=2)
    if models > 1:
        shutil.copyfile(small_gguf, folder / "Tiny-Q4_K_M.gguf")
    shutil.copyfile(small_gguf, folder / "mmproj-Tiny-F16.gguf")
    return FakeHub(folder, folder.parent / "hub-cache").install(monkeypatch)


def test_tags_pick_one_models_parts():
    files = ["README.md", "mmproj-F16.gguf", "Tiny-Q8_0-00002-of-00002.gguf", "Tiny-Q8_0-00001-of-00002.gguf",
             "UD-IQ1_S/Tiny-UD-IQ1_S-00001-of-00002.gguf", "UD-IQ1_S/Tiny-UD-IQ1_S-00002-of-00002.gguf",
             "Tiny-Q4_K_M.gguf", "Tiny-Q4_K_S.gguf"]
    assert select_gguf(REPO, files, "q8_0") == ["Tiny-Q8_0-00001-of-00002.gguf", "Tiny-Q8_0-00002-of-00002.gguf"]
    assert select_gguf(REPO, files, "UD-IQ1_S") == ["UD-IQ1_S/Tiny-UD-IQ1_S-00001-of-00002.gguf",
                                                   "UD-IQ1_S/Tiny-UD-IQ1_S-00002-of-00002.gguf"]
    assert select_gguf(REPO, files, "Q4_K_M") == ["Tiny-Q4_K_M.gguf"]  # a word of the path, not a prefix of one
    assert split_tag(f"{REPO}:Q4_K_M") == (REPO, "Q4_K_M") and split_tag(REPO) == (REPO, None)


def test_repo_tag_downloads_that_models_parts_and_converts_as_the_file(small_gguf, local, tmp_path, monkeypatch):
    hub = gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=2)
    manifest = convert(f"{REPO}:Q8_0", tmp_path / "out", progress=False)
    assert sorted(hub.downloads) == ["Tiny-Q8_0-00001-of-00002.gguf", "Tiny-Q8_0-00002-of-00002.gguf"]
    assert [(g.name, g.sha256) for g in manifest.groups] == [(g.name, g.sha256) for g in local.groups]
    assert manifest.source == {"id": f"{REPO}:Q8_0", "revision": None, "commit": FakeHub.COMMIT}


def test_a_repo_with_one_gguf_model_needs_no_tag(small_gguf, local, tmp_path, monkeypatch):
    hub = gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=1)
    manifest = convert(REPO, tmp_path / "out", progress=False)
    assert "mmproj-Tiny-F16.gguf" not in hub.downloads and len(hub.downloads) == 2
    assert [g.sha256 for g in manifest.groups] == [g.sha256 for g in local.groups]


def test_an_ambiguous_or_unknown_tag_is_one_line(small_gguf, tmp_path, monkeypatch, capsys):
    gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=2)
    assert cli_convert(capsys, REPO, tmp_path / "a") == (
        1, f"Error: {REPO} holds 2 GGUF models: Tiny-Q4_K_M, Tiny-Q8_0; name one as {REPO}:TAG (e.g. {REPO}:Q4_K_M)")
    assert cli_convert(capsys, f"{REPO}:Q2_K", tmp_path / "b") == (
        1, f"Error: {REPO} has no GGUF file tagged 'Q2_K'; it has: Tiny-Q4_K_M, Tiny-Q8_0")


def test_a_tag_on_a_repo_without_gguf_files_is_one_line(fake_hub, tmp_path, capsys):
    assert cli_convert(capsys, f"{REPO}:Q4_K_M", tmp_path / "out") == (
        1, f"Error: {REPO} has no .gguf files (asked for {REPO}:Q4_K_M)")


def test_runtime_generate_repo_tag_converts_into_the_cache_once(small_gguf, tmp_path, monkeypatch, capsys):
    """`runtime generate REPO:TAG` (llama.cpp's `-hf REPO:TAG`): converted into the cache on first use,
    under the repo and its tag at the commit, then reused; the text is the local file's."""
    from runtime.cli import main as runtime_main

    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    hub = gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=2)
    args = ["--prompt", "The capital of France is", "-n", "4", "--device", "cpu", "--max-cpu-memory", "0"]
    assert runtime_main(["generate", str(small_gguf), *args]) == 0
    want = capsys.readouterr().out
    folder = tmp_path / "cache" / "hub" / "someone--Tiny-GGUF_Q8_0" / FakeHub.COMMIT / "auto"
    for first in (True, False):
        assert runtime_main(["generate", f"{REPO}:Q8_0", *args]) == 0
        out, err = capsys.readouterr()
        assert out == want
        assert err.splitlines()[0].startswith("reshard: converting" if first else f"reshard: using {folder}")
    assert len(hub.downloads) == 2  # the two parts, once


def test_a_download_the_hub_cache_cannot_hold_is_refused_before_it_starts(small_gguf, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import reshard.diskspace

    hub = gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=2)
    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=10))
    code, line = cli_convert(capsys, f"{REPO}:Q8_0", tmp_path / "out")
    assert code == 1 and line.startswith("Error: the hub cache ") and "free some space" in line, line
    assert hub.downloads == []


def test_a_download_outs_disk_could_not_convert_is_refused_before_it_starts(small_gguf, tmp_path, monkeypatch, capsys):
    """A folder of a GGUF's blocks is no smaller than the file: where OUT's disk (here the hub cache's
    too) holds the download but not as much again, nothing is downloaded."""
    from types import SimpleNamespace

    import reshard.diskspace

    hub = gguf_hub(tmp_path / "repo", small_gguf, monkeypatch, models=2)
    size = sum(f.stat().st_size for f in (tmp_path / "repo").glob("Tiny-Q8_0*.gguf"))
    free = int(size * 1.5)
    monkeypatch.setattr(reshard.diskspace.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=0, free=free))
    code, line = cli_convert(capsys, f"{REPO}:Q8_0", tmp_path / "out")
    assert code == 1 and line == (f"Error: {tmp_path / 'out'} needs at least {reshard.diskspace.gb(size)} for this "
                                  f"GGUF's conversion but its disk has {reshard.diskspace.gb(free - size)} free besides "
                                  f"the download; free some space or choose an OUT on another disk"), line
    assert hub.downloads == []
