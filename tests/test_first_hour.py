"""Rough edges a new user meets in the first hour (issue 9): the default device, errors worded
for the API and for the command line, and the small output details."""

from __future__ import annotations

import pytest
import torch

from reshard.errors import UsageError
from runtime.cli import main as runtime_main


def test_from_pretrained_defaults_to_cuda_if_available_else_cpu(tiny_converted, monkeypatch):
    from runtime import LayeredModel

    with LayeredModel.from_pretrained(tiny_converted["llama"], max_cpu_memory=0, max_gpu_memory=0) as model:
        assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with LayeredModel.from_pretrained(tiny_converted["llama"], max_cpu_memory=0) as model:
        assert model.device == torch.device("cpu")
        ids = torch.tensor([[3, 4, 5]])
        assert model(ids).logits.shape == (1, 3, 320)


def test_no_gpu_error_is_worded_for_the_api(tiny_converted, monkeypatch):
    from runtime import LayeredModel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as e:
        LayeredModel.from_pretrained(tiny_converted["llama"], device="cuda:0", max_cpu_memory=0)
    assert str(e.value) == ("device 'cuda:0' asked for, but torch sees no CUDA GPU; "
                            "use device=\"cpu\" (or leave device out)")


def test_no_gpu_error_is_worded_for_the_command_line(tiny_converted, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime_main(["generate", str(tiny_converted["llama"]), "--prompt", "w3", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("Error: device 'cuda' asked for, but torch sees no CUDA GPU; "
                                       "use --device cpu (or leave it out)\n")


def run_quietly(code: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})


def test_auto_dtype_of_a_config_without_one_logs_nothing():
    """A GGUF's config has no dtype; asking for `torch_dtype` made transformers log a deprecation."""
    run = run_quietly("from transformers import LlamaConfig; from reshard.convert import resolve_dtype\n"
                      "config = LlamaConfig(); config.dtype = None; print(resolve_dtype('auto', config))")
    assert (run.returncode, run.stdout, run.stderr) == (0, "torch.float32\n", "")


def test_resident_bytes_count_a_tied_head_once(tiny_converted):
    from reshard.format import read_manifest
    from runtime import LayeredModel

    folder = tiny_converted["llama"]  # tied head: the head group borrows the embeddings
    manifest = read_manifest(folder)
    assert any(g.aliases for g in manifest.groups)
    for budget, place in [(1 << 30, "device"), (0, "disk")]:  # on the CPU, "device" is host memory
        with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=budget) as model:
            assert model.stats.resident_bytes == {place: manifest.total_bytes}


def test_finished_folder_keeps_no_progress_record_and_reruns_quietly(tiny_checkpoints, tmp_path, capsys):
    from reshard.cli import main as reshard_main

    out = tmp_path / "out"
    assert reshard_main(["convert", str(tiny_checkpoints["qwen2"]), str(out), "--quiet"]) == 0
    assert not (out / "convert-progress.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.endswith(".safetensors")}
    capsys.readouterr()
    assert reshard_main(["convert", str(tiny_checkpoints["qwen2"]), str(out)]) == 0  # with its progress bar
    err = capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.endswith(".safetensors")} == before
    assert not (out / "convert-progress.json").exists()
    bar = err.replace("\r", "\n").splitlines()
    assert [line for line in bar if line.startswith("reshard: 100%")], err
    assert not [line for line in bar if "TB/s" in line or "GB/s" in line], err  # no rate from kept files
    assert reshard_main(["convert", str(tiny_checkpoints["llama"]), str(out), "--quiet"]) == 1  # another model
    assert capsys.readouterr().err.startswith(f"Error: {out} holds a conversion of {tiny_checkpoints['qwen2'].resolve()} @ ")


def test_info_names_a_local_source_by_its_fingerprint(tiny_checkpoints, tmp_path, capsys):
    from reshard.cli import main as reshard_main

    out = tmp_path / "out"
    assert reshard_main(["convert", str(tiny_checkpoints["qwen2"]), str(out), "--quiet"]) == 0
    assert reshard_main(["convert", str(tiny_checkpoints["llama"]), str(out), "--quiet"]) == 1
    refusal = capsys.readouterr().err  # `... holds a conversion of SOURCE @ FINGERPRINT (...)`
    named = refusal.split("holds a conversion of ", 1)[1].split(" (", 1)[0]
    assert reshard_main(["info", str(out)]) == 0
    assert f"source        {named}\n" in capsys.readouterr().out
    assert len(named.rsplit(" @ ", 1)[1]) == 12


def test_generate_on_a_terminal_says_it_waits_for_the_prompt(tiny_converted, monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal("w3 w4"))
    assert runtime_main(["generate", str(tiny_converted["llama"]), "-n", "2", "--device", "cpu",
                         "--max-cpu-memory", "0"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "runtime: type the prompt, then Ctrl-D on a line of its own (or pass --prompt)")
    monkeypatch.setattr("sys.stdin", io.StringIO("w3 w4"))  # a pipe: no hint
    assert runtime_main(["generate", str(tiny_converted["llama"]), "-n", "2", "--device", "cpu",
                         "--max-cpu-memory", "0"]) == 0
    assert "runtime: type the prompt" not in capsys.readouterr().err


@pytest.mark.slow  # converts a 2-layer GGUF
def test_quiet_gguf_convert_prints_only_the_folder(small_gguf, tmp_path):
    run = run_quietly(f"import sys; from reshard.cli import main; sys.exit(main(['convert', {str(small_gguf)!r}, "
                      f"{str(tmp_path / 'out')!r}, '--quiet']))")
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{tmp_path / 'out'}\n", "")
